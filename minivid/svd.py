"""Stable Video Diffusion (img2vid, SVD and SVD-XT): the model container, conditioning, loading and saving.

    svd = minivid.StableVideoDiffusion.load("weights/svd.safetensors")     # or a diffusers folder
    svd.image_encoder(pixels)            # [B, 3, 224, 224] CLIP-normalised -> [B, 1024]
    svd.unet(x, c_noise, image_embeds, added_time_ids)   # [B, F, 8, h, w] -> [B, F, 4, h, w]
    svd.vae.encode(x) / svd.vae.decode(z, num_frames=F)

The three networks keep the original (sgm) key names below the official prefixes
(`model.diffusion_model.`, `first_stage_model.`, `conditioner.embedders.0.open_clip.model.`).
How SVD conditions on its input image (the parts of sgm's conditioner, done as diffusers does):

- `encode_image`: the image, resized to 224×224 with SVD's antialiasing and CLIP-normalised, through
  the OpenCLIP ViT-H/14 image tower -> [B, 1, 1024], the UNet's cross-attention context;
- `encode_condition`: the image plus `noise_aug_strength`·N(0, I), VAE-encoded (posterior mode),
  UNSCALED -> [B, 4, h, w]; repeated over frames and concatenated to the noisy latent on channels;
- `added_time_ids`: (fps − 1, motion bucket id, noise_aug_strength) -> [B, 3].

Loading never guesses: a single file must be detected as SVD (see minivid.weights.detect) and
carries exactly the known components plus the listed extra (`SVD_KNOWN_EXTRAS`: sgm's second,
conditioning-frame VAE, which the loader compares with the first-stage encoder; see
docs/svd.md). A diffusers folder is read from its config files and renamed by the tables of
minivid.weights.svd_names.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from minivid.checks import parse_dtype
from minivid.clip import (CLIP_MEAN, CLIP_STD, CLIPTextConfig, CLIPVisionConfig, OpenCLIPModel,
                          OpenCLIPVisionTransformer, svd_preprocess)
from minivid.unet_video import VideoUNet, VideoUNetConfig
from minivid.vae import SD_LATENT_SCALE, TemporalAutoencoder, VAEConfig
from minivid.weights import (WeightsError, check_finite, describe_detection, detect_folder, load_strict, read_diffusers_folder,
                             read_state_dict, split_by_prefix)
from minivid.weights.diffusers_names import diffusers_to_original, original_to_diffusers
from minivid.weights.svd_names import (SVD_PREFIXES, check_identity_quant_conv, conditioning_encoder_difference,
                                       identity_quant_conv)

__all__ = ["SVDConfig", "SVD_PRESETS", "StableVideoDiffusion", "SVD_SCHEDULER_CONFIG"]

log = logging.getLogger(__name__)

COND_VAE_PREFIX = "conditioner.embedders.3.encoder."
CONFIG_METADATA_KEY = "minivid_svd_config"

# stabilityai/stable-video-diffusion-img2vid(-xt) scheduler/scheduler_config.json (docs/samplers.md):
# the EDM Euler sampler of minivid.samplers in diffusers' words, written into saved diffusers folders.
SVD_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "sigma_max": 700.0, "sigma_min": 0.002,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "timestep_type": "continuous",
    "trained_betas": None, "use_karras_sigmas": True,
}


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class SVDConfig:
    """The three networks of SVD. `text` is the OpenCLIP text tower's leftovers the official file
    keeps beside the image tower (0 blocks); `vision.projection_dim` is the UNet's context width."""

    unet: VideoUNetConfig
    vae: VAEConfig
    vision: CLIPVisionConfig
    text: CLIPTextConfig
    latent_scale: float = SD_LATENT_SCALE
    image_size: tuple[int, int] = (576, 1024)     # (height, width) the model was trained at: the default size

    def __post_init__(self) -> None:
        if len(self.image_size) != 2 or any(int(v) < 8 or int(v) % self.vae.downsample_factor for v in self.image_size):
            raise ValueError(f"SVDConfig: image_size (height, width) must be two multiples of "
                             f"{self.vae.downsample_factor}, got {self.image_size}")
        if self.vision.projection_dim != self.unet.context_dim:
            raise ValueError(f"SVDConfig: the image embedding width ({self.vision.projection_dim}) must equal the "
                             f"UNet's context_dim ({self.unet.context_dim})")
        if 2 * self.vae.latent_channels != self.unet.in_channels or self.vae.latent_channels != self.unet.out_channels:
            raise ValueError(f"SVDConfig: the UNet takes {self.unet.in_channels} channels (noisy ⊕ conditioning latent) "
                             f"and returns {self.unet.out_channels}; the VAE has {self.vae.latent_channels} latent channels")
        if not self.vae.temporal or self.vae.quant_conv:
            raise ValueError("SVDConfig: SVD's VAE is temporal and has no quant convs (VAEConfig.preset('svd'))")
        if self.vision.flavour != "openclip" or self.text.flavour != "openclip" or self.text.layers != 0:
            raise ValueError("SVDConfig: the image encoder is an OpenCLIP vision tower; text is its 0-block leftovers")

    @property
    def num_frames(self) -> int:
        return self.unet.num_frames

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent side: the VAE's factor; sides must also divide by the UNet's."""
        return self.vae.downsample_factor

    @classmethod
    def preset(cls, name: str) -> "SVDConfig":
        """"svd" (14 frames), "svd_xt" (25 frames; same architecture) or "tiny" (tests and demos)."""
        if name not in SVD_PRESETS:
            raise ValueError(f"unknown SVD preset {name!r}; choose from {sorted(SVD_PRESETS)}")
        return SVD_PRESETS[name]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SVDConfig":
        d = json.loads(text)
        tup = lambda sub: {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}  # noqa: E731
        unet = VideoUNetConfig(**tup(d["unet"]))
        # files written before the size was recorded: the preset with this UNet, else SVD's
        size = tuple(d["image_size"]) if "image_size" in d else _preset_size(unet)
        return cls(unet, VAEConfig(**tup(d["vae"])), CLIPVisionConfig(**tup(d["vision"])),
                   CLIPTextConfig(**tup(d["text"])), d["latent_scale"], size)


_SVD_TEXT = CLIPTextConfig.preset("sd2", layers=0)
_SVD_VISION = CLIPVisionConfig.preset("openclip_vit_h14")

SVD_PRESETS: dict[str, SVDConfig] = {
    "svd": SVDConfig(VideoUNetConfig.preset("svd"), VAEConfig.preset("svd"), _SVD_VISION, _SVD_TEXT),
    "svd_xt": SVDConfig(VideoUNetConfig.preset("svd_xt"), VAEConfig.preset("svd"), _SVD_VISION, _SVD_TEXT),
    # tiny: the vision tower keeps a 224 input (SVD's fixed conditioning resize) with 32-px patches
    "tiny": SVDConfig(
        VideoUNetConfig.preset("tiny"), VAEConfig.preset("tiny_svd"),
        CLIPVisionConfig("openclip", width=32, layers=2, heads=4, mlp_width=64, act="gelu", projection_dim=32,
                         image_size=224, patch_size=32),
        CLIPTextConfig.preset("tiny_sd2", layers=0, vocab_size=1000), image_size=(48, 64),
    ),
}


def _preset_size(unet: VideoUNetConfig) -> tuple[int, int]:
    """The default (height, width) of the preset with this UNet, else SVD's 576x1024."""
    return next((c.image_size for c in SVD_PRESETS.values() if c.unet == unet), (576, 1024))


# ---------------------------------------------------------------- the model

class StableVideoDiffusion(nn.Module):
    """SVD's networks and its image conditioning. Build with `from_config` (random) or `load` (weights).

    `image_encoder` is OpenCLIP's model (image tower + text leftovers, the official file's layout)
    or, when loaded from a diffusers folder (which has no text leftovers), the bare image tower;
    both map CLIP-normalised pixels [B, 3, 224, 224] to [B, 1024].
    """

    def __init__(self, config: SVDConfig | str = "svd", image_tower_only: bool = False):
        super().__init__()
        cfg = SVDConfig.preset(config) if isinstance(config, str) else config
        self.config = cfg
        self.unet = VideoUNet(cfg.unet)
        self.vae = TemporalAutoencoder(cfg.vae)
        self.image_encoder: nn.Module = (OpenCLIPVisionTransformer(cfg.vision) if image_tower_only
                                         else OpenCLIPModel(cfg.text, cfg.vision))
        self.load_info: dict[str, Any] = {}

    # ------------------------------------------------------------ properties

    @property
    def latent_scale(self) -> float:
        return self.config.latent_scale

    @property
    def num_frames(self) -> int:
        return self.config.num_frames

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # ------------------------------------------------------------ conditioning

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1] -> CLIP image embedding [B, 1, D] (the UNet's context)."""
        pixels = svd_preprocess(image.float()).to(self.dtype)            # resize 224 (antialiased), CLIP mean/std
        return self.image_encoder(pixels)[:, None]

    def encode_condition(self, image: torch.Tensor, noise_aug_strength: float = 0.02,
                         generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The conditioning latent: VAE posterior mode of image + noise_aug_strength·ε, UNSCALED.

        image [B, 3, H, W] in [-1, 1] -> [B, 4, H/8, W/8]. ε is drawn with `generator` (on the
        generator's device, as diffusers' randn_tensor) unless `noise` is given.
        """
        if noise is None:
            gen_device = generator.device if generator is not None else image.device
            noise = torch.randn(image.shape, generator=generator, device=gen_device, dtype=image.dtype)
        noisy = image + noise_aug_strength * noise.to(image.device, image.dtype)
        return self.vae.encode(noisy.to(self.vae.encoder.conv_in.weight.dtype)).mode()

    @staticmethod
    def added_time_ids(fps: float, motion_bucket_id: float, noise_aug_strength: float, batch: int = 1,
                       dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """[B, 3] = (fps − 1, motion bucket id, noise augmentation): SVD was micro-conditioned on fps − 1
        (diffusers subtracts 1 from the playback rate; sgm's scripts pass fps_id directly)."""
        ids = torch.tensor([[fps - 1, motion_bucket_id, noise_aug_strength]], dtype=dtype, device=device)
        return ids.repeat(batch, 1)

    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int | None = None) -> torch.Tensor:
        """Scaled latents [B, F, 4, h, w] -> frames [B, F, 3, H, W] (about [-1, 1]).

        decode_chunk_size=n decodes n frames at a time, each piece as its own clip (diffusers' and
        sgm's behaviour; default: whole clips, F frames at a time).
        """
        B, F = latents.shape[:2]
        z = latents.flatten(0, 1) / self.latent_scale
        z = z.to(self.vae.decoder.conv_in.weight.dtype)
        frames = self.vae.decode(z, num_frames=F, decode_chunk_size=decode_chunk_size or F)
        return frames.unflatten(0, (B, F))

    # ------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: SVDConfig | str = "tiny", device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> "StableVideoDiffusion":
        """A randomly initialised model of a preset ("svd", "svd_xt", "tiny") or config; `dtype` a torch
        dtype or its name ("fp32", "fp16", "bf16")."""
        return cls(config).to(device=device, dtype=parse_dtype(dtype)).eval()

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             config: SVDConfig | str | None = None, variant: str | None = None,
             allow_nonfinite: bool = False) -> "StableVideoDiffusion":
        """Load an official single file (svd.safetensors, svd_xt.safetensors, or one written by `save`)
        or a diffusers folder (unet/, vae/, image_encoder/ ...). fp16/bf16 files load into `dtype` (a torch
        dtype or its name: "fp32", "fp16", "bf16").

        `config` overrides the architecture of a single file (default: from the file's minivid
        metadata, else the detected official preset). Raises WeightsError naming what does not match,
        and naming the first tensors holding NaN/Inf unless allow_nonfinite=True (for inspection).
        """
        path = Path(path)
        dtype = parse_dtype(dtype)
        if path.is_dir():
            model = _load_diffusers(cls, path, dtype, variant)
        else:
            model = _load_original(cls, path, dtype, config)
        check_finite(((SVD_PREFIXES[comp] + k, v) for comp in ("unet", "vae", "image_encoder")
                      for k, v in getattr(model, comp).state_dict().items()), str(path), allow=allow_nonfinite)
        return model.to(device=device).eval()

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors under the official single-file names (model.diffusion_model.*, ...)."""
        if not isinstance(self.image_encoder, OpenCLIPModel):
            raise WeightsError(
                "this model's image encoder came from a diffusers folder, which does not keep the OpenCLIP text "
                "tower's leftovers (token_embedding, positional_embedding, ln_final, text_projection, logit_scale) "
                "that the original format stores; save it with format='diffusers'.")
        out: dict[str, torch.Tensor] = {}
        for comp, module in (("unet", self.unet), ("vae", self.vae), ("image_encoder", self.image_encoder)):
            out.update({SVD_PREFIXES[comp] + k: v for k, v in module.state_dict().items()})
        return out

    def save(self, path: str | Path, format: Literal["original", "diffusers"] = "original") -> Path:
        """Write the model as one original-format .safetensors file or as a diffusers folder.

        The original file holds the three networks under the official names (not sgm's unused
        conditioning-VAE copy) and this config as metadata; the diffusers folder is loadable by
        diffusers' StableVideoDiffusionPipeline.from_pretrained.
        """
        import safetensors.torch

        path = Path(path)
        if format == "original":
            from minivid.outputs import write_file

            tensors = {k: v.detach().contiguous().cpu() for k, v in self.original_state_dict().items()}
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = {CONFIG_METADATA_KEY: self.config.to_json()}
            return write_file(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=meta))
        if format == "diffusers":
            from minivid.outputs import publish_tree

            _save_diffusers(self, path)
            publish_tree(path)
            return path
        raise ValueError(f"save: format must be 'original' or 'diffusers', got {format!r}")


# ---------------------------------------------------------------- original single files

def _file_config(path: Path, model_name: str) -> SVDConfig:
    """The config a minivid-written file records, else the detected official preset."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if CONFIG_METADATA_KEY in meta:
            from minivid.checks import json_object

            json_object(meta[CONFIG_METADATA_KEY], f"{path} (metadata {CONFIG_METADATA_KEY!r})", WeightsError)
            return SVDConfig.from_json(meta[CONFIG_METADATA_KEY])
    return SVDConfig.preset(model_name)


def _load_original(cls, path: Path, dtype: torch.dtype, config: SVDConfig | str | None) -> StableVideoDiffusion:
    state = read_state_dict(path)
    model_name, reason = describe_detection(state, path.name)
    if model_name not in ("svd", "svd_xt"):
        raise WeightsError(f"{path}: not a Stable Video Diffusion checkpoint ({reason}).")
    cfg = (SVDConfig.preset(config) if isinstance(config, str) else config) or _file_config(path, model_name)
    parts = split_by_prefix(state, {**SVD_PREFIXES, "cond_vae": COND_VAE_PREFIX}, source=str(path))
    with torch.device("meta"):
        model = cls(cfg)
    model.to(dtype)
    for comp in ("unet", "vae", "image_encoder"):
        load_strict(getattr(model, comp), parts[comp], str(path), comp)
    model.load_info = {"format": "original", "detected": model_name, "reason": reason}
    if parts["cond_vae"]:
        diff = conditioning_encoder_difference(parts["vae"], parts["cond_vae"])
        model.load_info["conditioning_encoder_difference"] = diff
        if diff > 1e-6:
            log.warning("%s: sgm encodes the conditioning frame with conditioner.embedders.3, minivid (like diffusers) "
                        "with first_stage_model's encoder; the two differ by %.3g (max relative, its quant_conv folded "
                        "in), so conditioning latents follow diffusers", path, diff)
        else:
            log.info("%s: conditioner.embedders.3 equals the first-stage encoder (max relative difference %.3g); "
                     "not kept", path, diff)
    return model


# ---------------------------------------------------------------- diffusers folders

def _read_json(path: Path) -> dict:
    from minivid.checks import json_object

    if not path.is_file():
        raise WeightsError(f"{path}: missing; a diffusers SVD folder has unet/, vae/ and image_encoder/ with config.json")
    return json_object(path.read_bytes(), str(path), WeightsError)


def _unet_config_from_diffusers(c: dict, source: Path) -> VideoUNetConfig:
    boc = list(c["block_out_channels"])
    heads = c["num_attention_heads"]
    heads = [heads] * len(boc) if isinstance(heads, int) else list(heads)
    head_ch = {ch // h for ch, h in zip(boc, heads)}
    depth = c.get("transformer_layers_per_block", 1)
    if len(head_ch) != 1 or any(ch % h for ch, h in zip(boc, heads)) or not isinstance(depth, int) \
            or not isinstance(c.get("layers_per_block", 2), int) or any(b % boc[0] for b in boc):
        raise WeightsError(f"{source}: a UNetSpatioTemporalConditionModel config sgm's VideoUNet cannot express "
                           f"(one head width for all levels, one depth and res-block count): {c}")
    return VideoUNetConfig(
        in_channels=c.get("in_channels", 8), out_channels=c.get("out_channels", 4), model_channels=boc[0],
        channel_mult=tuple(b // boc[0] for b in boc), num_res_blocks=c.get("layers_per_block", 2),
        attention_resolutions=tuple(2 ** i for i, t in enumerate(c["down_block_types"]) if t.startswith("CrossAttn")),
        num_head_channels=head_ch.pop(), context_dim=c.get("cross_attention_dim", 1024), transformer_depth=depth,
        addition_time_embed_dim=c.get("addition_time_embed_dim", 256),
        adm_in_channels=c.get("projection_class_embeddings_input_dim", 768), num_frames=c.get("num_frames", 14),
    )


def _unet_config_to_diffusers(cfg: VideoUNetConfig) -> dict:
    if cfg.upcast_attention or cfg.video_kernel_size != (3, 1, 1) or not cfg.use_linear_in_transformer:
        raise WeightsError("this video UNet config has no diffusers UNetSpatioTemporalConditionModel counterpart "
                           "(upcast attention, a kernel other than (3,1,1) or conv proj_in)")
    boc = [cfg.model_channels * m for m in cfg.channel_mult]
    att = [2 ** i in cfg.attention_resolutions for i in range(len(boc))]
    return {
        "_class_name": "UNetSpatioTemporalConditionModel", "_diffusers_version": "0.24.0",
        "addition_time_embed_dim": cfg.addition_time_embed_dim, "block_out_channels": boc,
        "cross_attention_dim": cfg.context_dim,
        "down_block_types": ["CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal" for a in att],
        "in_channels": cfg.in_channels, "layers_per_block": cfg.num_res_blocks,
        "num_attention_heads": [cfg.heads(ch)[0] for ch in boc], "num_frames": cfg.num_frames,
        "out_channels": cfg.out_channels, "projection_class_embeddings_input_dim": cfg.adm_in_channels,
        "sample_size": 96, "transformer_layers_per_block": cfg.transformer_depth,
        "up_block_types": ["CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal" for a in reversed(att)],
    }


def _vae_config_from_diffusers(c: dict) -> VAEConfig:
    boc = list(c["block_out_channels"])
    z = c.get("latent_channels", 4)
    return VAEConfig(ch=boc[0], ch_mult=tuple(b // boc[0] for b in boc), num_res_blocks=c.get("layers_per_block", 2),
                     in_channels=c.get("in_channels", 3), out_ch=c.get("out_channels", 3), z_channels=z, embed_dim=z,
                     quant_conv=False, temporal=True)


def _vae_config_to_diffusers(cfg: VAEConfig, latent_scale: float) -> dict:
    if cfg.num_res_blocks != 2:
        raise WeightsError("diffusers' TemporalDecoder ties its mid-block depth to layers_per_block, so it can only "
                           "express SVD VAEs with num_res_blocks=2")
    return {
        "_class_name": "AutoencoderKLTemporalDecoder", "_diffusers_version": "0.24.0",
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "down_block_types": ["DownEncoderBlock2D"] * len(cfg.ch_mult),
        "force_upcast": True, "in_channels": cfg.in_channels, "latent_channels": cfg.embed_dim,
        "layers_per_block": cfg.num_res_blocks, "out_channels": cfg.out_ch, "sample_size": 768,
        "scaling_factor": latent_scale,
    }


def _vision_config_from_transformers(c: dict) -> CLIPVisionConfig:
    return CLIPVisionConfig("openclip", width=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                            mlp_width=c["intermediate_size"], act=c.get("hidden_act", "gelu"),
                            projection_dim=c["projection_dim"], image_size=c.get("image_size", 224),
                            patch_size=c.get("patch_size", 14), eps=c.get("layer_norm_eps", 1e-5))


def _vision_config_to_transformers(cfg: CLIPVisionConfig) -> dict:
    return {
        "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
        "hidden_size": cfg.width, "intermediate_size": cfg.mlp_width, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "image_size": cfg.image_size, "patch_size": cfg.patch_size,
        "hidden_act": cfg.act, "layer_norm_eps": cfg.eps, "projection_dim": cfg.projection_dim, "num_channels": 3,
        "torch_dtype": "float32",
    }


def _load_diffusers(cls, path: Path, dtype: torch.dtype, variant: str | None) -> StableVideoDiffusion:
    model_name, reason = detect_folder(path)
    if model_name not in ("svd", "svd_xt"):
        raise WeightsError(f"{path}: not a Stable Video Diffusion diffusers folder ({reason}).")
    unet_cfg = _unet_config_from_diffusers(_read_json(path / "unet" / "config.json"), path / "unet" / "config.json")
    vae_json = _read_json(path / "vae" / "config.json")
    cfg = SVDConfig(unet_cfg, _vae_config_from_diffusers(vae_json),
                    _vision_config_from_transformers(_read_json(path / "image_encoder" / "config.json")),
                    SVD_PRESETS["svd"].text, vae_json.get("scaling_factor", SD_LATENT_SCALE),
                    _preset_size(unet_cfg))
    folder = read_diffusers_folder(path, ("unet", "vae", "image_encoder"), variant=variant)
    check_identity_quant_conv(folder["vae"], str(path / "vae"))
    with torch.device("meta"):
        model = cls(cfg, image_tower_only=True)
    model.to(dtype)
    load_strict(model.unet, diffusers_to_original("svd_unet", folder["unet"]), str(path / "unet"), "unet")
    load_strict(model.vae, diffusers_to_original("svd_vae", folder["vae"]), str(path / "vae"), "vae")
    image = diffusers_to_original("svd_image_encoder", folder["image_encoder"])
    image = {k.removeprefix("visual."): v for k, v in image.items()}
    load_strict(model.image_encoder, image, str(path / "image_encoder"), "image_encoder")
    model.load_info = {"format": "diffusers", "detected": model_name, "reason": reason}
    return model


def _save_diffusers(model: StableVideoDiffusion, path: Path) -> None:
    import safetensors.torch

    cfg = model.config
    cpu = lambda sd: {k: v.detach().contiguous().cpu() for k, v in sd.items()}  # noqa: E731
    image = model.image_encoder.state_dict()
    visual = image if isinstance(model.image_encoder, OpenCLIPVisionTransformer) else \
        {k.removeprefix("visual."): v for k, v in image.items() if k.startswith("visual.")}
    parts = {
        "unet": (original_to_diffusers("svd_unet", model.unet.state_dict()), _unet_config_to_diffusers(cfg.unet),
                 "diffusion_pytorch_model.safetensors"),
        "vae": ({**original_to_diffusers("svd_vae", model.vae.state_dict()),
                 **identity_quant_conv(cfg.vae.embed_dim, model.vae.encoder.conv_in.weight.dtype)},
                _vae_config_to_diffusers(cfg.vae, cfg.latent_scale), "diffusion_pytorch_model.safetensors"),
        "image_encoder": (original_to_diffusers("svd_image_encoder", {"visual." + k: v for k, v in visual.items()}),
                          _vision_config_to_transformers(cfg.vision), "model.safetensors"),
    }
    for name, (tensors, config, filename) in parts.items():
        (path / name).mkdir(parents=True, exist_ok=True)
        (path / name / "config.json").write_text(json.dumps(config, indent=2))
        safetensors.torch.save_file(cpu(tensors), str(path / name / filename), metadata={"format": "pt"})
    (path / "scheduler").mkdir(exist_ok=True)
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SVD_SCHEDULER_CONFIG, indent=2))
    (path / "feature_extractor").mkdir(exist_ok=True)
    size = cfg.vision.image_size
    (path / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(CLIP_MEAN), "image_processor_type": "CLIPImageProcessor", "image_std": list(CLIP_STD),
        "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": size},
    }, indent=2))
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "StableVideoDiffusionPipeline", "_diffusers_version": "0.24.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
        "vae": ["diffusers", "AutoencoderKLTemporalDecoder"],
    }, indent=2))
