"""How Stable Diffusion's two file formats describe a model, and minivid's configs from and to them.

- Official single files carry tensors only: `*_config_from_original` read the sizes from the shapes
  and take what shapes cannot show (head counts) from SD's rules.
- diffusers folders carry JSON configs: `*_from_diffusers` / `*_to_diffusers` map diffusers'
  UNet2DConditionModel / AutoencoderKL / DDIMScheduler and transformers' CLIPTextConfig to minivid's
  UNetConfig / VAEConfig / ScheduleConfig fields / CLIPTextConfig and back, and `write_tokenizer`
  writes the Hugging Face CLIP tokenizer files from minivid's BPE data.

Used by minivid.models (StableDiffusion.load / save); the rules are listed in docs/pipelines.md.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from minivid import weights
from minivid.clip import CLIPTextConfig
from minivid.tokenizer import load_bpe
from minivid.unet import UNetConfig
from minivid.vae import VAEConfig

log = logging.getLogger(__name__)

Prediction = Literal["eps", "v"]
DIFFUSERS_VERSION = "0.30.0"            # written into config files: the diffusers config format these follow


# ---------------------------------------------------------------- official single files

def _count(keys, pattern_prefix: str) -> int:
    """Number of distinct integer indices right after `pattern_prefix` among `keys`."""
    n = len(pattern_prefix)
    return len({k[n:].split(".")[0] for k in keys if k.startswith(pattern_prefix)})


def unet_config_from_original(sd: Mapping[str, torch.Tensor], kind: str, prediction: Prediction) -> UNetConfig:
    """An ldm UNet's configuration read from its tensors (names relative to `model.diffusion_model.`).

    Head counts are not stored: SD 1.x uses 8 heads, SD 2.x 64-wide heads (ldm inference yamls).
    SD 2.x v-models get attention upcast, as diffusers configures SD 2.1."""
    keys = list(sd)
    layout = weights.UNetLayout.from_keys(keys, "original")
    conv_in = sd["input_blocks.0.0.weight"]
    C0, R = conv_in.shape[0], layout.num_res_blocks
    mult = tuple(sd[f"input_blocks.{1 + lv * (R + 1)}.0.in_layers.2.weight"].shape[0] // C0 for lv in range(layout.levels))
    first_attn = f"input_blocks.{1 + layout.attention_levels[0] * (R + 1)}.1." if layout.attention_levels else "middle_block.1."
    proj_in = sd[first_attn + "proj_in.weight"]
    heads = dict(num_heads=8, num_head_channels=None) if kind == "sd1" else dict(num_heads=None, num_head_channels=64)
    try:
        return UNetConfig(
            in_channels=conv_in.shape[1], out_channels=sd["out.2.weight"].shape[0], model_channels=C0,
            channel_mult=mult, num_res_blocks=R,
            attention_resolutions=tuple(2 ** lv for lv in layout.attention_levels),
            context_dim=sd[first_attn + "transformer_blocks.0.attn2.to_k.weight"].shape[1],
            use_linear_in_transformer=proj_in.ndim == 2,
            transformer_depth=_count(keys, first_attn + "transformer_blocks."),
            upcast_attention=kind == "sd2" and prediction == "v", prediction=prediction, **heads,
        )
    except ValueError as e:
        raise weights.WeightsError(f"the UNet's widths do not fit SD's head rule ({e}); pass config= to "
                                   f"StableDiffusion.load for a model of another size") from None


def vae_config_from_original(sd: Mapping[str, torch.Tensor]) -> VAEConfig:
    """An ldm AutoencoderKL's configuration from its tensors (names relative to `first_stage_model.`)."""
    layout = weights.VAELayout.from_keys(list(sd), "original")
    ch = sd["encoder.conv_in.weight"].shape[0]
    return VAEConfig(
        ch=ch, ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(layout.levels)),
        num_res_blocks=layout.num_res_blocks, in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_ch=sd["decoder.conv_out.weight"].shape[0], z_channels=sd["encoder.conv_out.weight"].shape[0] // 2,
        embed_dim=sd["quant_conv.weight"].shape[0] // 2,
    )


def text_config_from_original(sd: Mapping[str, torch.Tensor], kind: str) -> CLIPTextConfig:
    """The text tower's configuration from its tensors (relative to the SD text prefix).

    Heads are not stored: 12 (SD 1.x, CLIP ViT-L/14) or 16 (SD 2.x, OpenCLIP ViT-H/14)."""
    keys = list(sd)
    try:
        if kind == "sd1":
            tok = sd["text_model.embeddings.token_embedding.weight"]
            return CLIPTextConfig(
                "openai", width=tok.shape[1], layers=_count(keys, "text_model.encoder.layers."), heads=12,
                mlp_width=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0], act="quick_gelu",
                vocab_size=tok.shape[0], context_length=sd["text_model.embeddings.position_embedding.weight"].shape[0],
                projection_dim=sd["text_projection.weight"].shape[0] if "text_projection.weight" in sd else None,
            )
        tok = sd["token_embedding.weight"]
        proj = sd.get("text_projection")
        return CLIPTextConfig(
            "openclip", width=tok.shape[1], layers=_count(keys, "transformer.resblocks."), heads=16,
            mlp_width=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], act="gelu", vocab_size=tok.shape[0],
            context_length=sd["positional_embedding"].shape[0], conditioning_layer="penultimate",
            projection_dim=proj.shape[1] if proj is not None else None,
        )
    except KeyError as e:
        raise weights.WeightsError(f"the text encoder lacks {e.args[0]!r}, which every SD {kind[-1]}.x text "
                                   f"encoder has") from None
    except ValueError as e:
        raise weights.WeightsError(f"the text encoder's width does not fit SD's head rule ({e}); pass config= "
                                   f"to StableDiffusion.load for a model of another size") from None


# ---------------------------------------------------------------- diffusers folders

# diffusers UNet2DConditionModel settings SD uses; a folder with other values is another model
_UNET_FIXED = {
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
    "center_input_sample": False, "time_embedding_type": "positional", "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "dual_cross_attention": False, "resnet_time_scale_shift": "default",
    "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
    "downsample_padding": 1, "time_embedding_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
}


def read_json(path: Path) -> dict:
    from minivid.checks import json_object

    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise weights.WeightsError(f"{path}: missing; a diffusers Stable Diffusion folder has one per component") from None
    return json_object(text, str(path), weights.WeightsError)


def _uniform(value, levels: int, what: str, path: Path) -> int:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(set(values)) != 1:
        raise weights.WeightsError(f"{path}: {what} differs between levels ({values}); SD uses one value")
    return values[0]


def unet_config_from_diffusers(cfg: Mapping[str, Any], prediction: Prediction, path: Path = Path("unet/config.json")) -> UNetConfig:
    """diffusers' UNet2DConditionModel config -> UNetConfig. diffusers' `attention_head_dim` is the
    number of heads per level (a historical misnomer; `num_attention_heads` wins when set)."""
    for key, want in _UNET_FIXED.items():
        if key in cfg and cfg[key] != want:
            raise weights.WeightsError(f"{path}: {key}={cfg[key]!r}, but SD 1.x/2.x use {want!r}: not an SD UNet")
    boc = list(cfg["block_out_channels"])
    C0, levels = boc[0], len(boc)
    down = list(cfg.get("down_block_types", []))
    known = {"CrossAttnDownBlock2D", "DownBlock2D"}
    if len(down) != levels or not set(down) <= known:
        raise weights.WeightsError(f"{path}: down_block_types {down} are not SD's CrossAttnDownBlock2D/DownBlock2D")
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
    dims = {b // h for b, h in zip(boc, heads)}
    if len(set(heads)) == 1:
        head_args = dict(num_heads=heads[0], num_head_channels=None)
    elif len(dims) == 1:
        head_args = dict(num_heads=None, num_head_channels=dims.pop())
    else:
        raise weights.WeightsError(f"{path}: heads {heads} over widths {boc} are neither a fixed count (SD 1.x) "
                                   f"nor a fixed width (SD 2.x)")
    if any(b % C0 for b in boc):
        raise weights.WeightsError(f"{path}: block_out_channels {boc} are not multiples of the first")
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4), model_channels=C0,
        channel_mult=tuple(b // C0 for b in boc), num_res_blocks=_uniform(cfg.get("layers_per_block", 2), levels, "layers_per_block", path),
        attention_resolutions=tuple(2 ** lv for lv, t in enumerate(down) if t == "CrossAttnDownBlock2D"),
        context_dim=_uniform(cfg.get("cross_attention_dim", 1280), levels, "cross_attention_dim", path),
        use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
        transformer_depth=_uniform(cfg.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block", path),
        upcast_attention=bool(cfg.get("upcast_attention", False)), prediction=prediction, **head_args,
    )


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int) -> dict[str, Any]:
    levels = len(cfg.channel_mult)
    attn = [2 ** lv in cfg.attention_resolutions for lv in range(levels)]
    boc = [cfg.model_channels * m for m in cfg.channel_mult]
    heads: int | list[int] = cfg.num_heads if cfg.num_heads is not None else [b // cfg.num_head_channels for b in boc]
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": boc, "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_head_dim": heads,
        "cross_attention_dim": cfg.context_dim, "use_linear_projection": cfg.use_linear_in_transformer,
        "transformer_layers_per_block": cfg.transformer_depth, "upcast_attention": cfg.upcast_attention,
        **{k: v for k, v in _UNET_FIXED.items() if v is not None},
    }


def vae_config_from_diffusers(cfg: Mapping[str, Any], path: Path = Path("vae/config.json")) -> VAEConfig:
    boc = list(cfg["block_out_channels"])
    if cfg.get("norm_num_groups", 32) != 32 or cfg.get("act_fn", "silu") != "silu":
        raise weights.WeightsError(f"{path}: not SD's VAE (norm_num_groups / act_fn differ)")
    if not cfg.get("use_quant_conv", True) or not cfg.get("use_post_quant_conv", True):
        raise weights.WeightsError(f"{path}: SD's VAE has quant_conv and post_quant_conv")
    latent = cfg.get("latent_channels", 4)
    return VAEConfig(ch=boc[0], ch_mult=tuple(b // boc[0] for b in boc), num_res_blocks=cfg.get("layers_per_block", 1),
                     in_channels=cfg.get("in_channels", 3), out_ch=cfg.get("out_channels", 3),
                     z_channels=latent, embed_dim=latent)


def vae_config_to_diffusers(cfg: VAEConfig, sample_size: int, scaling_factor: float) -> dict[str, Any]:
    if cfg.embed_dim != cfg.z_channels:
        raise ValueError("diffusers' AutoencoderKL needs embed_dim == z_channels")
    n = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "sample_size": sample_size,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_ch, "latent_channels": cfg.z_channels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "act_fn": "silu", "norm_num_groups": 32, "scaling_factor": scaling_factor,
        "use_quant_conv": True, "use_post_quant_conv": True,
    }


def text_config_from_transformers(cfg: Mapping[str, Any], kind: str) -> CLIPTextConfig:
    """transformers' CLIPTextConfig (text_encoder/config.json) -> CLIPTextConfig. A diffusers SD 2
    text encoder holds exactly the layers SD 2 runs (23 of OpenCLIP's 24), so all of them run; like
    SD 1.x's, it stores no contrastive head (text_projection, logit_scale), which SD never uses."""
    common = dict(width=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
                  mlp_width=cfg["intermediate_size"], act=cfg.get("hidden_act", "quick_gelu"),
                  vocab_size=cfg.get("vocab_size", 49408), context_length=cfg.get("max_position_embeddings", 77),
                  eps=cfg.get("layer_norm_eps", 1e-5))
    if kind == "sd1":
        return CLIPTextConfig("openai", **common)
    return CLIPTextConfig("openclip", **common, conditioning_layer="last")


def text_config_to_transformers(cfg: CLIPTextConfig) -> dict[str, Any]:
    if cfg.flavour == "openai" and cfg.conditioning_layer != "last":
        raise ValueError("an SD 1.x text encoder conditions on its last layer")
    layers = cfg.layers - 1 if cfg.conditioning_layer == "penultimate" else cfg.layers
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_width, "num_hidden_layers": layers, "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.context_length, "hidden_act": cfg.act, "layer_norm_eps": cfg.eps,
        "vocab_size": cfg.vocab_size, "projection_dim": cfg.projection_dim or cfg.width,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "attention_dropout": 0.0,
        "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02, "torch_dtype": "float32",
    }


def pad_from_tokenizer(folder: Path, kind: str) -> str:
    """"end" or "zero" from tokenizer/tokenizer_config.json or special_tokens_map.json (SD 2: pad "!")."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = folder / "tokenizer" / name
        if f.is_file():
            pad = json.loads(f.read_text()).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if pad == "<|endoftext|>":
                return "end"
            if pad == "!":
                return "zero"
    return "end" if kind == "sd1" else "zero"


def schedule_from_diffusers(cfg: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """ScheduleConfig fields from a scheduler_config.json (SD's scaled-linear betas only)."""
    if cfg.get("beta_schedule", "scaled_linear") != "scaled_linear" or cfg.get("trained_betas"):
        raise weights.WeightsError(f"{path}: beta_schedule {cfg.get('beta_schedule')!r}; SD uses scaled_linear")
    if cfg.get("steps_offset", 1) != 1 or cfg.get("timestep_spacing", "leading") != "leading":
        log.warning("%s: minivid's DDIM uses SD's 'leading' spacing with steps_offset 1, not this folder's "
                    "(steps_offset=%s, timestep_spacing=%s)", path, cfg.get("steps_offset"), cfg.get("timestep_spacing"))
    return {"beta_start": cfg.get("beta_start", 0.00085), "beta_end": cfg.get("beta_end", 0.012),
            "num_train_timesteps": cfg.get("num_train_timesteps", 1000),
            "set_alpha_to_one": cfg.get("set_alpha_to_one", False)}


def scheduler_config(schedule, prediction: Prediction) -> dict[str, Any]:
    """diffusers' DDIMScheduler config with SD's settings (`schedule`: a ScheduleConfig)."""
    return {
        "_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        "beta_start": schedule.beta_start, "beta_end": schedule.beta_end, "beta_schedule": "scaled_linear",
        "num_train_timesteps": schedule.num_train_timesteps, "set_alpha_to_one": schedule.set_alpha_to_one,
        "steps_offset": 1, "timestep_spacing": "leading", "clip_sample": False,
        "prediction_type": "epsilon" if prediction == "eps" else "v_prediction",
    }


def model_index() -> dict[str, Any]:
    """model_index.json of a StableDiffusionPipeline without safety checker."""
    return {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
    }


def write_tokenizer(folder: Path, pad: str, max_length: int) -> None:
    """vocab.json + merges.txt (the classic Hugging Face CLIP files) generated from minivid's BPE data."""
    vocab, merges = load_bpe()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>" if pad == "end" else "!"}
    write_json(folder / "special_tokens_map.json", specials)
    write_json(folder / "tokenizer_config.json", {**specials, "tokenizer_class": "CLIPTokenizer",
                                                   "model_max_length": max_length, "do_lower_case": True})


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
