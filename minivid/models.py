"""`StableDiffusion`: the SD 1.x / 2.x components in one container, built from a config, loaded from
the official files or a diffusers folder, and saved in either format.

    sd = StableDiffusion.load("weights/v2-1_512-ema-pruned.safetensors")   # or a diffusers folder
    ids = sd.tokenizer(["a prompt"])             # LongTensor [B, 77]
    context = sd.text_encoder(ids)               # [B, 77, 768|1024]: what the UNet is conditioned on
    z = sd.vae.encode(x).mean * sd.latent_scale  # x in [-1, 1]; the diffusion models see scaled latents
    out = sd.unet(z_t, t, context)               # ε or v, as sd.prediction says
    sd.save("copy.safetensors")                  # official names; or save(dir, format="diffusers")

What a checkpoint cannot tell, and the rules used (docs/pipelines.md):
- SD 1.x vs 2.x: from the tensor names (`minivid.weights.detect`).
- ε vs v: a diffusers scheduler config or minivid's own metadata says it; else the `prediction=`
  argument; else the file-name rule of `weights.guess_prediction`. An explicit argument overrides
  the files (with a warning when they disagree). The source is logged.
- Sizes: read from the tensor shapes. Head counts leave no trace in a state dict: SD's values are
  used (UNet: 8 heads in SD 1.x, 64-wide heads in SD 2.x; text: 12 heads in SD 1.x, 16 in SD 2.x),
  unless the file carries minivid's config in its safetensors metadata (every file `save` writes
  does, so tiny test models round-trip) or `config=` is passed.

Loading is lean: the model is built on the meta device (no memory, no init) and the file's tensors
are assigned into it (`weights.load_strict` with assign=True), so a 4-5 GB file is held once.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.nn as nn

from minivid import weights
from minivid.clip import CLIPTextConfig, CLIPTextModel
from minivid.samplers import DDPMSchedule
from minivid.tokenizer import CLIPTokenizer, load_bpe
from minivid.unet import UNet, UNetConfig
from minivid.vae import SD_LATENT_SCALE, AutoencoderKL, VAEConfig

__all__ = ["ScheduleConfig", "SDConfig", "SD_PRESETS", "StableDiffusion", "METADATA_KEY"]

log = logging.getLogger(__name__)

Prediction = Literal["eps", "v"]
METADATA_KEY = "minivid_config"          # safetensors metadata entry holding SDConfig as JSON
_DIFFUSERS_VERSION = "0.30.0"            # written into config files: the diffusers API these follow


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class ScheduleConfig:
    """SD's training noise schedule (scaled-linear β, the ldm/diffusers defaults of SD 1.x and 2.x)."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    set_alpha_to_one: bool = False

    def build(self) -> DDPMSchedule:
        return DDPMSchedule.scaled_linear(self.beta_start, self.beta_end, self.num_train_timesteps,
                                          self.set_alpha_to_one)


@dataclass(frozen=True)
class SDConfig:
    """Everything a Stable Diffusion model is made of. `prediction` is the truth for the UNet's
    output (the UNet config's own field is set to it); `pad` is the tokenizer's padding
    ("end": SD 1.x pads with <|endoftext|>, "zero": SD 2.x pads with 0); `image_size` is the
    default generation size in pixels."""

    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig
    pad: Literal["end", "zero"] = "end"
    prediction: Prediction = "eps"
    latent_scale: float = SD_LATENT_SCALE
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    image_size: int = 512

    def __post_init__(self) -> None:
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"SDConfig: prediction must be 'eps' or 'v', got {self.prediction!r}")
        if self.pad not in ("end", "zero"):
            raise ValueError(f"SDConfig: pad must be 'end' or 'zero', got {self.pad!r}")
        if self.unet.prediction != self.prediction:
            object.__setattr__(self, "unet", dataclasses.replace(self.unet, prediction=self.prediction))
        if self.unet.context_dim != self.text.width:
            raise ValueError(f"SDConfig: the UNet's context_dim {self.unet.context_dim} differs from the text "
                             f"encoder's width {self.text.width}")
        if self.unet.in_channels != self.vae.embed_dim or self.unet.out_channels != self.vae.embed_dim:
            raise ValueError(f"SDConfig: the UNet maps {self.unet.in_channels} -> {self.unet.out_channels} channels "
                             f"but the VAE latent has {self.vae.embed_dim}")
        if self.vae.temporal:
            raise ValueError("SDConfig: SD uses the image VAE (temporal=False)")

    @property
    def kind(self) -> str:
        """"sd1" (OpenAI CLIP text, HF key names) or "sd2" (OpenCLIP text)."""
        return "sd1" if self.text.flavour == "openai" else "sd2"

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        return self.vae.downsample_factor

    @classmethod
    def preset(cls, name: str, **changes: Any) -> "SDConfig":
        """"sd14", "sd21" (v, 768), "sd21_base" (ε, 512), "tiny" (SD 1-style), "tiny_sd2" (SD 2-style, v)."""
        if name not in SD_PRESETS:
            raise ValueError(f"unknown Stable Diffusion preset {name!r}; choose from {sorted(SD_PRESETS)}")
        return dataclasses.replace(SD_PRESETS[name], **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SDConfig":
        """Inverse of `to_dict` (lists back to tuples; unknown fields refused)."""
        def build(klass, values):
            names = {f.name for f in dataclasses.fields(klass)}
            unknown = sorted(set(values) - names)
            if unknown:
                raise ValueError(f"{klass.__name__}: unknown fields {unknown}")
            return klass(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

        d = dict(d)
        parts = {"unet": UNetConfig, "vae": VAEConfig, "text": CLIPTextConfig, "schedule": ScheduleConfig}
        for key, klass in parts.items():
            if key in d:
                d[key] = build(klass, d[key])
        return build(cls, d)


_TINY_VAE = VAEConfig.preset("tiny")
SD_PRESETS: dict[str, SDConfig] = {
    "sd14": SDConfig(UNetConfig.preset("sd14"), VAEConfig.preset("sd"), CLIPTextConfig.preset("sd1")),
    "sd21": SDConfig(UNetConfig.preset("sd21"), VAEConfig.preset("sd"), CLIPTextConfig.preset("sd2"),
                     pad="zero", prediction="v", image_size=768),
    "sd21_base": SDConfig(UNetConfig.preset("sd21_base"), VAEConfig.preset("sd"), CLIPTextConfig.preset("sd2"),
                          pad="zero"),
    # test sizes: f=4 VAE, 8x8 latents at the default 32x32 pixels
    "tiny": SDConfig(UNetConfig.preset("tiny"), _TINY_VAE, CLIPTextConfig.preset("tiny_sd1"), image_size=32),
    "tiny_sd2": SDConfig(UNetConfig.preset("tiny_sd2"), _TINY_VAE, CLIPTextConfig.preset("tiny_sd2", width=48),
                         pad="zero", prediction="v", image_size=32),
}


# ---------------------------------------------------------------- the container

@lru_cache(maxsize=2)
def _tokenizer(pad: str) -> CLIPTokenizer:
    return CLIPTokenizer(pad=pad)


class StableDiffusion(nn.Module):
    """Tokenizer, text encoder, VAE and UNet of SD 1.x / 2.x, plus the noise schedule and what the
    UNet predicts. Each component is the plain minivid module (see design.md's public API);
    `encode_prompt`, `encode_images` and `decode_latents` are the three conversions every pipeline
    needs. Pipelines: minivid.pipelines.sd."""

    def __init__(self, config: SDConfig | str):
        super().__init__()
        config = SDConfig.preset(config) if isinstance(config, str) else config
        self.config = config
        self.tokenizer = _tokenizer(config.pad)
        self.text_encoder = CLIPTextModel(config.text)
        self.vae = AutoencoderKL(config.vae)
        self.unet = UNet(config.unet)
        with torch.device("cpu"):  # a real tensor even when the modules are built on the meta device
            self.schedule = config.schedule.build()
        self.prediction: Prediction = config.prediction
        self.latent_scale = config.latent_scale

    @property
    def kind(self) -> str:
        return self.config.kind

    def _reference_parameter(self) -> torch.Tensor:
        """The UNet's first parameter (or any, if a method swapped in a parameter-free stand-in)."""
        return next(itertools.chain(self.unet.parameters(), self.parameters()))

    @property
    def device(self) -> torch.device:
        return self._reference_parameter().device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's parameter dtype: the compute dtype of the pipelines."""
        return self._reference_parameter().dtype

    # ------------------------------------------------------------ conversions

    def encode_prompt(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts -> UNet context [B, 77, D] (in the text encoder's dtype)."""
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids)

    def encode_images(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None,
                      chunk: int | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/f, W/f] (float32).

        The posterior mean by default (deterministic, what inversion wants); `sample=True` draws
        from it with `generator`, as diffusers' img2img does."""
        vae = self.vae
        dist = vae.encode(images.to(self.device, vae.encoder.conv_in.weight.dtype), chunk=chunk)
        z = dist.sample(generator) if sample else dist.mean
        return z.float() * self.latent_scale

    def decode_latents(self, latents: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Scaled latents [B, 4, h, w] -> images [B, 3, h·f, w·f] clamped to [-1, 1] (float32)."""
        z = latents.to(self.device, self.vae.decoder.conv_in.weight.dtype) / self.latent_scale
        return self.vae.decode(z, chunk=chunk).float().clamp(-1, 1)

    # ------------------------------------------------------------ building

    @classmethod
    def from_config(cls, config: SDConfig | str = "tiny", device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0,
                    init: Literal["random", "default"] = "random") -> "StableDiffusion":
        """A model of `config` (a preset name or an SDConfig) with random weights, deterministic in `seed`.

        init="random": every weight ~ N(0, 1/fan_in), norm scales 1 + N(0, 0.1²), biases N(0, 0.05²),
        including the layers ldm initialises to zero, so every parameter moves the output (what tests
        and the demo need). init="default": the modules' own initialisation (zero output layers, as
        for training from scratch). device="meta" builds shapes only (no memory, e.g. to compare
        full-size key sets with the official manifests).
        """
        config = SDConfig.preset(config) if isinstance(config, str) else config
        device = torch.device(device)
        if device.type == "meta":
            with torch.device("meta"):
                return cls(config).to(dtype)
        if init not in ("random", "default"):
            raise ValueError(f"init must be 'random' or 'default', got {init!r}")
        with torch.random.fork_rng(devices=[]):  # the default init draws from the global RNG: leave it as it was
            torch.manual_seed(seed)
            model = cls(config)
        if init == "random":
            _randomize_(model, torch.Generator().manual_seed(seed))
        return model.to(device=device, dtype=dtype).eval()

    # ------------------------------------------------------------ state dicts

    def prefixes(self) -> dict[str, str]:
        """Component -> prefix of the official single file (weights.SD_PREFIXES)."""
        return weights.SD_PREFIXES[self.kind]

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """All tensors under the official single-file names (`model.diffusion_model.*`, ...)."""
        out = {}
        for comp, module in (("unet", self.unet), ("vae", self.vae), ("text", self.text_encoder)):
            prefix = self.prefixes()[comp]
            out.update({prefix + k: v for k, v in module.state_dict().items()})
        return out

    # ------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             prediction: Prediction | None = None, config: SDConfig | None = None) -> "StableDiffusion":
        """An official single file (.ckpt/.safetensors of SD 1.4, 2.1, 2.1-base) or a diffusers folder.

        SD 1.x/2.x is detected from the keys; ε/v as the module docstring says; sizes from the shapes
        (or from `config`). Every tensor is checked by name and shape (weights.load_strict): a wrong file
        fails with a WeightsError naming it. fp16/bf16 files load into `dtype`.
        """
        path = Path(path)
        layout, _ = weights.detect_path(path)
        if layout == "single-file":
            return _load_single_file(cls, path, device, dtype, prediction, config)
        if layout == "diffusers-sd":
            return _load_diffusers(cls, path, device, dtype, prediction, config)
        if layout == "diffusers-svd":
            raise weights.WeightsError(f"{path}: a Stable Video Diffusion folder; load it with "
                                       f"minivid.StableVideoDiffusion.load")
        if layout == "diffusers-component":
            raise weights.WeightsError(f"{path}: one component of a diffusers pipeline (no model_index.json); "
                                       f"pass the pipeline folder that holds unet/, vae/, text_encoder/")
        raise weights.WeightsError(f"{path}: a diffusers folder without a Stable Diffusion pipeline "
                                   f"(model_index.json names no StableDiffusionPipeline; no unet/vae/text_encoder)")

    # ------------------------------------------------------------ saving

    def save(self, path: str | os.PathLike, format: Literal["original", "diffusers"] = "original",
             dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
        """Write the model as one official-style .safetensors file ("original": official key names and
        prefixes, plus this config in the metadata) or as a diffusers pipeline folder ("diffusers":
        model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/, each with the config file
        diffusers/transformers read). Written to a temporary name and renamed into place. `dtype`
        casts floating tensors (e.g. torch.float16 for half-size files)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        if format == "original":
            return _save_original(self, path, dtype)
        if format == "diffusers":
            return _save_diffusers(self, path, dtype)
        raise ValueError(f"format must be 'original' or 'diffusers', got {format!r}")


def _randomize_(model: nn.Module, gen: torch.Generator) -> None:
    """In place, module by module in a fixed order (so a seed gives one model)."""
    with torch.no_grad():
        for m in model.modules():
            for name, p in m.named_parameters(recurse=False):
                if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                    base = 1.0 if name == "weight" else 0.0
                    p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
                elif p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=gen) / (p[0].numel() ** 0.5))
                elif p.ndim == 1:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
                # 0-d parameters (OpenCLIP's logit_scale) keep their value


# ---------------------------------------------------------------- single files

def _read_metadata(path: Path) -> dict | None:
    """minivid's SDConfig from a .safetensors file's metadata (None for other files)."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None


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
            projection_dim=proj.shape[1] if proj is not None else tok.shape[1],
        )
    except KeyError as e:
        raise weights.WeightsError(f"the text encoder lacks {e.args[0]!r}, which every SD {kind[-1]}.x text "
                                   f"encoder has") from None
    except ValueError as e:
        raise weights.WeightsError(f"the text encoder's width does not fit SD's head rule ({e}); pass config= "
                                   f"to StableDiffusion.load for a model of another size") from None


def _resolve_prediction(path: Path, kind: str, stated: tuple[str, str] | None, argument: Prediction | None) -> Prediction:
    """stated: (prediction, source) written in the files (diffusers scheduler / minivid metadata)."""
    if argument is not None:
        if argument not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {argument!r}")
        if stated and stated[0] != argument:
            log.warning("%s: prediction=%r overrides %s, which says %r", path, argument, stated[1], stated[0])
        log.info("%s: %s-prediction (the prediction= argument)", path, argument)
        return argument
    if stated:
        log.info("%s: %s-prediction (%s)", path, stated[0], stated[1])
        return stated[0]  # type: ignore[return-value]
    pred, reason = weights.guess_prediction(path, kind)
    log.info("%s: %s-prediction (%s)", path, pred, reason)
    return pred  # type: ignore[return-value]


def _materialise(cls, config: SDConfig, dtype: torch.dtype) -> StableDiffusion:
    with torch.device("meta"):
        return cls(config).to(dtype)


def _load_components(model: StableDiffusion, parts: Mapping[str, Mapping[str, torch.Tensor]], source: str) -> None:
    _drop_missing_contrastive_head(model.text_encoder, parts["text"])
    weights.load_strict(model.unet, parts["unet"], source, "unet")
    weights.load_strict(model.vae, parts["vae"], source, "vae")
    weights.load_strict(model.text_encoder, parts["text"], source, "text encoder")


def _drop_missing_contrastive_head(text: nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """OpenCLIP's contrastive head (text_projection, logit_scale) is never used by SD and diffusers
    folders do not store it: a state dict without it loads into a model without it."""
    if text.cfg.flavour == "openclip" and "text_projection" not in sd and "logit_scale" not in sd:
        del text.text_projection
        del text.logit_scale


def _load_single_file(cls, path: Path, device, dtype, prediction, config) -> StableDiffusion:
    sd = weights.read_state_dict(path)
    kind, reason = weights.describe_detection(sd, path.name)
    if kind not in ("sd1", "sd2"):
        hint = " (load SVD with minivid.StableVideoDiffusion.load)" if kind.startswith("svd") else ""
        raise weights.WeightsError(f"{path}: not a Stable Diffusion 1.x/2.x checkpoint{hint}: {reason}")
    log.info("%s: %s (%s)", path, weights.MODELS[kind], reason)
    parts = weights.split_by_prefix(sd, weights.SD_PREFIXES[kind], source=str(path))
    del sd
    meta = _read_metadata(path)
    stated = None
    if config is None and meta is not None:
        config = SDConfig.from_dict(meta)
        stated = (config.prediction, "the minivid config in the file's metadata")
        log.info("%s: configuration from the file's metadata", path)
    pred = _resolve_prediction(path, kind, stated, prediction)
    if config is None:
        config = SDConfig(unet_config_from_original(parts["unet"], kind, pred), vae_config_from_original(parts["vae"]),
                          text_config_from_original(parts["text"], kind), pad="end" if kind == "sd1" else "zero",
                          prediction=pred, image_size=768 if pred == "v" and kind == "sd2" else 512)
    elif config.prediction != pred:
        config = dataclasses.replace(config, prediction=pred)
    if config.kind != kind:
        raise weights.WeightsError(f"{path}: holds an {kind} checkpoint but the config is {config.kind}")
    model = _materialise(cls, config, dtype)
    _load_components(model, parts, str(path))
    return model.to(device).eval()


# ---------------------------------------------------------------- diffusers folders

# diffusers UNet2DConditionModel settings SD uses; a folder with other values is another model
_UNET_FIXED = {
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
    "center_input_sample": False, "time_embedding_type": "positional", "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "dual_cross_attention": False, "resnet_time_scale_shift": "default",
    "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
    "downsample_padding": 1, "time_embedding_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise weights.WeightsError(f"{path}: missing; a diffusers Stable Diffusion folder has one per component") from None
    except json.JSONDecodeError as e:
        raise weights.WeightsError(f"{path}: not valid JSON ({e})") from None


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
        "_class_name": "UNet2DConditionModel", "_diffusers_version": _DIFFUSERS_VERSION,
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
        "_class_name": "AutoencoderKL", "_diffusers_version": _DIFFUSERS_VERSION, "sample_size": sample_size,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_ch, "latent_channels": cfg.z_channels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "act_fn": "silu", "norm_num_groups": 32, "scaling_factor": scaling_factor,
        "use_quant_conv": True, "use_post_quant_conv": True,
    }


def text_config_from_transformers(cfg: Mapping[str, Any], kind: str) -> CLIPTextConfig:
    """transformers' CLIPTextConfig (text_encoder/config.json) -> CLIPTextConfig. A diffusers SD 2
    text encoder holds exactly the layers SD 2 runs (23 of OpenCLIP's 24), so all of them run."""
    common = dict(width=cfg["hidden_size"], layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"],
                  mlp_width=cfg["intermediate_size"], act=cfg.get("hidden_act", "quick_gelu"),
                  vocab_size=cfg.get("vocab_size", 49408), context_length=cfg.get("max_position_embeddings", 77),
                  eps=cfg.get("layer_norm_eps", 1e-5))
    if kind == "sd1":
        return CLIPTextConfig("openai", **common)
    return CLIPTextConfig("openclip", **common, conditioning_layer="last",
                          projection_dim=cfg.get("projection_dim") or cfg["hidden_size"])


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


def _pad_from_tokenizer(folder: Path, kind: str) -> str:
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


def _schedule_from_diffusers(cfg: Mapping[str, Any], path: Path) -> ScheduleConfig:
    if cfg.get("beta_schedule", "scaled_linear") != "scaled_linear" or cfg.get("trained_betas"):
        raise weights.WeightsError(f"{path}: beta_schedule {cfg.get('beta_schedule')!r}; SD uses scaled_linear")
    if cfg.get("steps_offset", 1) != 1 or cfg.get("timestep_spacing", "leading") != "leading":
        log.warning("%s: minivid's DDIM uses SD's 'leading' spacing with steps_offset 1, not this folder's "
                    "(steps_offset=%s, timestep_spacing=%s)", path, cfg.get("steps_offset"), cfg.get("timestep_spacing"))
    return ScheduleConfig(cfg.get("beta_start", 0.00085), cfg.get("beta_end", 0.012),
                          cfg.get("num_train_timesteps", 1000), cfg.get("set_alpha_to_one", False))


def _with_text_model_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5 saves CLIPTextModel tensors without the `text_model.` level older files have."""
    if any(k.startswith("text_model.") for k in sd):
        return dict(sd)
    return {"text_model." + k: v for k, v in sd.items()}


def _folder_kind(path: Path) -> tuple[str, str]:
    """weights.detect_folder, which knows SD's official widths; for a folder of another size (a tiny
    test model), SD 1.x and 2.x are told apart by the UNet's projection (conv / Linear), which
    goes with the text encoder's activation (quick-GELU / GELU)."""
    kind, reason = weights.detect_folder(path)
    if kind != "unknown" or "of another size" not in reason:
        return kind, reason
    linear = _read_json(path / "unet" / "config.json").get("use_linear_projection", False)
    act = _read_json(path / "text_encoder" / "config.json").get("hidden_act", "quick_gelu")
    if not linear and act == "quick_gelu":
        return "sd1", "SD 1.x layout of another size (conv proj_in, quick-GELU text encoder)"
    if linear and act == "gelu":
        return "sd2", "SD 2.x layout of another size (Linear proj_in, GELU text encoder)"
    return kind, f"{reason}; text encoder hidden_act {act!r} does not match the UNet's projection"


def _load_diffusers(cls, path: Path, device, dtype, prediction, config) -> StableDiffusion:
    kind, reason = _folder_kind(path)
    if kind not in ("sd1", "sd2"):
        raise weights.WeightsError(f"{path}: not a Stable Diffusion 1.x/2.x pipeline folder: {reason}")
    log.info("%s: %s (%s)", path, weights.MODELS[kind], reason)
    sched_path = path / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_path.read_text()) if sched_path.is_file() else {}
    stated = None
    if sched.get("prediction_type") in ("epsilon", "v_prediction"):
        stated = ("eps" if sched["prediction_type"] == "epsilon" else "v",
                  f"scheduler/scheduler_config.json prediction_type={sched['prediction_type']}")
    elif sched.get("prediction_type") is not None:
        raise weights.WeightsError(f"{sched_path}: prediction_type {sched['prediction_type']!r} is not supported "
                                   f"(SD uses 'epsilon' or 'v_prediction')")
    pred = _resolve_prediction(path, kind, stated, prediction)
    unet_cfg = _read_json(path / "unet" / "config.json")
    vae_cfg = _read_json(path / "vae" / "config.json")
    if config is None:
        vae = vae_config_from_diffusers(vae_cfg, path / "vae" / "config.json")
        config = SDConfig(
            unet_config_from_diffusers(unet_cfg, pred, path / "unet" / "config.json"), vae,
            text_config_from_transformers(_read_json(path / "text_encoder" / "config.json"), kind),
            pad=_pad_from_tokenizer(path, kind), prediction=pred,
            latent_scale=vae_cfg.get("scaling_factor", SD_LATENT_SCALE),
            schedule=_schedule_from_diffusers(sched, sched_path) if sched else ScheduleConfig(),
            image_size=unet_cfg.get("sample_size", 64) * vae.downsample_factor,
        )
    elif config.prediction != pred:
        config = dataclasses.replace(config, prediction=pred)
    folder = weights.read_diffusers_folder(path, components=("unet", "vae", "text_encoder"))
    text_table = "text_sd1" if kind == "sd1" else "text_sd2"
    parts = {
        "unet": weights.diffusers_to_original("unet", folder.pop("unet")),
        "vae": weights.diffusers_to_original("vae", folder.pop("vae")),
        "text": weights.diffusers_to_original(text_table, _with_text_model_prefix(folder.pop("text_encoder"))),
    }
    model = _materialise(cls, config, dtype)
    _load_components(model, parts, str(path))
    return model.to(device).eval()


# ---------------------------------------------------------------- saving

def _tensors(module_sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies (safetensors refuses shared or strided storage), optionally cast."""
    out = {}
    for k, v in module_sd.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().clone()
    return out


def _save_original(model: StableDiffusion, path: Path, dtype: torch.dtype | None) -> Path:
    import safetensors.torch

    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: format='original' writes a .safetensors file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _tensors(model.original_state_dict(), dtype)
    meta = {"format": "pt", METADATA_KEY: json.dumps(model.config.to_dict())}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_diffusers(model: StableDiffusion, path: Path, dtype: torch.dtype | None) -> Path:
    import safetensors.torch

    cfg = model.config
    f = cfg.downsample_factor
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        _write_json(tmp / "model_index.json", {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": _DIFFUSERS_VERSION,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None],
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        })
        _write_json(tmp / "unet" / "config.json", unet_config_to_diffusers(cfg.unet, cfg.image_size // f))
        _write_json(tmp / "vae" / "config.json", vae_config_to_diffusers(cfg.vae, cfg.image_size, cfg.latent_scale))
        _write_json(tmp / "text_encoder" / "config.json", text_config_to_transformers(cfg.text))
        save = safetensors.torch.save_file
        save(_tensors(weights.original_to_diffusers("unet", model.unet.state_dict()), dtype),
             str(tmp / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        save(_tensors(weights.original_to_diffusers("vae", model.vae.state_dict()), dtype),
             str(tmp / "vae" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        if cfg.kind == "sd1":
            text = weights.original_to_diffusers("text_sd1", model.text_encoder.state_dict())
        else:
            runs = cfg.text.layers - (cfg.text.conditioning_layer == "penultimate")
            text = weights.original_to_diffusers("text_sd2", model.text_encoder.state_dict(),
                                                 weights.TextSD2Layout(layers=runs))
        save(_tensors(text, dtype), str(tmp / "text_encoder" / "model.safetensors"), metadata={"format": "pt"})
        _write_tokenizer(tmp / "tokenizer", cfg.pad, cfg.text.context_length)
        _write_json(tmp / "scheduler" / "scheduler_config.json", {
            "_class_name": "DDIMScheduler", "_diffusers_version": _DIFFUSERS_VERSION,
            "beta_start": cfg.schedule.beta_start, "beta_end": cfg.schedule.beta_end, "beta_schedule": "scaled_linear",
            "num_train_timesteps": cfg.schedule.num_train_timesteps, "set_alpha_to_one": cfg.schedule.set_alpha_to_one,
            "steps_offset": 1, "timestep_spacing": "leading", "clip_sample": False,
            "prediction_type": "epsilon" if cfg.prediction == "eps" else "v_prediction",
        })
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def _write_tokenizer(folder: Path, pad: str, max_length: int) -> None:
    """vocab.json + merges.txt (the classic Hugging Face CLIP files) generated from minivid's BPE data."""
    vocab, merges = load_bpe()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>" if pad == "end" else "!"}
    _write_json(folder / "special_tokens_map.json", specials)
    _write_json(folder / "tokenizer_config.json", {**specials, "tokenizer_class": "CLIPTokenizer",
                                                   "model_max_length": max_length, "do_lower_case": True})
