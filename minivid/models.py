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

from minivid import sd_formats as formats
from minivid import weights
from minivid.checks import parse_dtype
from minivid.clip import CLIPTextConfig, CLIPTextModel
from minivid.samplers import DDPMSchedule
from minivid.tokenizer import CLIPTokenizer
from minivid.unet import UNet, UNetConfig
from minivid.vae import SD_LATENT_SCALE, AutoencoderKL, VAEConfig

__all__ = ["ScheduleConfig", "SDConfig", "SD_PRESETS", "StableDiffusion", "METADATA_KEY"]

log = logging.getLogger(__name__)

Prediction = Literal["eps", "v"]
METADATA_KEY = weights.SD_CONFIG_METADATA_KEY     # safetensors metadata entry holding SDConfig as JSON (one name)


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
        dist = self._posterior(images, chunk)
        z = dist.sample(generator) if sample else dist.mean
        return z.float() * self.latent_scale

    def encode_posterior(self, images: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [B, 3, H, W] in [-1, 1] -> the VAE posterior's (mean, std) as scaled latents
        [B, 4, H/f, W/f] each (float32): what one-shot tuning draws a fresh x_0 from at every step."""
        dist = self._posterior(images, chunk)
        return dist.mean.float() * self.latent_scale, dist.std.float() * self.latent_scale

    def _posterior(self, images: torch.Tensor, chunk: int | None):
        vae = self.vae
        return vae.encode(images.to(self.device, vae.encoder.conv_in.weight.dtype), chunk=chunk)

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
        device, dtype = torch.device(device), parse_dtype(dtype)
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
             prediction: Prediction | None = None, config: SDConfig | None = None,
             allow_nonfinite: bool = False) -> "StableDiffusion":
        """An official single file (.ckpt/.safetensors of SD 1.4, 2.1, 2.1-base) or a diffusers folder.

        SD 1.x/2.x is detected from the keys; ε/v as the module docstring says; sizes from the shapes
        (or from `config`). Every tensor is checked by name and shape (weights.load_strict): a wrong file
        fails with a WeightsError naming it. fp16/bf16 files load into `dtype` (a torch dtype or its name:
        "fp32", "fp16", "bf16"). Weights holding NaN/Inf are refused naming the first tensors, unless
        allow_nonfinite=True (for inspection).
        """
        path = Path(path)
        dtype = parse_dtype(dtype)
        layout, _ = weights.detect_path(path)
        if layout in ("single-file", "diffusers-sd"):
            load = _load_single_file if layout == "single-file" else _load_diffusers
            model = load(cls, path, device, dtype, prediction, config)
            weights.check_finite(model.original_state_dict().items(), str(path), allow=allow_nonfinite)
            return model
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
    if METADATA_KEY not in meta:
        return None
    from minivid.checks import json_object
    from minivid.weights import WeightsError

    return json_object(meta[METADATA_KEY], f"{path} (metadata {METADATA_KEY!r})", WeightsError)


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
    weights.load_strict(model.unet, parts["unet"], source, "unet")
    weights.load_strict(model.vae, parts["vae"], source, "vae")
    weights.load_strict(model.text_encoder, parts["text"], source, "text encoder")


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
    stated = (config.prediction, "the config= argument") if config is not None else None
    if config is None and meta is not None:
        config = SDConfig.from_dict(meta)
        stated = (config.prediction, "the minivid config in the file's metadata")
        log.info("%s: configuration from the file's metadata", path)
    pred = _resolve_prediction(path, kind, stated, prediction)
    if config is None:
        config = SDConfig(formats.unet_config_from_original(parts["unet"], kind, pred),
                          formats.vae_config_from_original(parts["vae"]),
                          formats.text_config_from_original(parts["text"], kind), pad="end" if kind == "sd1" else "zero",
                          prediction=pred, image_size=768 if pred == "v" and kind == "sd2" else 512)
    elif config.prediction != pred:
        config = dataclasses.replace(config, prediction=pred)
    if config.kind != kind:
        raise weights.WeightsError(f"{path}: holds an {kind} checkpoint but the config is {config.kind}")
    model = _materialise(cls, config, dtype)
    _load_components(model, parts, str(path))
    return model.to(device).eval()


# ---------------------------------------------------------------- diffusers folders

def _load_diffusers(cls, path: Path, device, dtype, prediction, config) -> StableDiffusion:
    kind, reason = weights.detect_folder(path)
    if kind not in ("sd1", "sd2"):
        raise weights.WeightsError(f"{path}: not a Stable Diffusion 1.x/2.x pipeline folder: {reason}")
    log.info("%s: %s (%s)", path, weights.MODELS[kind], reason)
    sched_path = path / "scheduler" / "scheduler_config.json"
    sched = formats.read_json(sched_path) if sched_path.is_file() else {}
    ptype = sched.get("prediction_type")
    if ptype not in (None, "epsilon", "v_prediction"):
        raise weights.WeightsError(f"{sched_path}: prediction_type {ptype!r} is not supported "
                                   f"(SD uses 'epsilon' or 'v_prediction')")
    stated = (config.prediction, "the config= argument") if config is not None else None
    if stated is None and ptype is not None:
        stated = ("eps" if ptype == "epsilon" else "v", f"scheduler/scheduler_config.json prediction_type={ptype}")
    pred = _resolve_prediction(path, kind, stated, prediction)
    unet_cfg = formats.read_json(path / "unet" / "config.json")
    vae_cfg = formats.read_json(path / "vae" / "config.json")
    if config is None:
        vae = formats.vae_config_from_diffusers(vae_cfg, path / "vae" / "config.json")
        config = SDConfig(
            formats.unet_config_from_diffusers(unet_cfg, pred, path / "unet" / "config.json"), vae,
            formats.text_config_from_transformers(formats.read_json(path / "text_encoder" / "config.json"), kind),
            pad=formats.pad_from_tokenizer(path, kind), prediction=pred,
            latent_scale=vae_cfg.get("scaling_factor", SD_LATENT_SCALE),
            schedule=ScheduleConfig(**formats.schedule_from_diffusers(sched, sched_path)) if sched else ScheduleConfig(),
            image_size=unet_cfg.get("sample_size", 64) * vae.downsample_factor,
        )
    elif config.prediction != pred:
        config = dataclasses.replace(config, prediction=pred)
    folder = weights.read_diffusers_folder(path, components=("unet", "vae", "text_encoder"))
    text_table = "text_sd1" if kind == "sd1" else "text_sd2"
    parts = {
        "unet": weights.diffusers_to_original("unet", folder.pop("unet")),
        "vae": weights.diffusers_to_original("vae", folder.pop("vae")),
        "text": weights.diffusers_to_original(text_table, folder.pop("text_encoder")),
    }
    model = _materialise(cls, config, dtype)
    _load_components(model, parts, str(path))
    return model.to(device).eval()


# ---------------------------------------------------------------- saving

def _tensors(module_sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors for safetensors, optionally cast; no copy when already so (saving a
    4 GB model does not hold a second 4 GB)."""
    out = {}
    for k, v in module_sd.items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    return out


def _save_original(model: StableDiffusion, path: Path, dtype: torch.dtype | None) -> Path:
    import safetensors.torch

    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: format='original' writes a .safetensors file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = _tensors(model.original_state_dict(), dtype)
    meta = {"format": "pt", METADATA_KEY: json.dumps(model.config.to_dict())}
    from minivid.outputs import write_file

    return write_file(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=meta))


def _save_diffusers(model: StableDiffusion, path: Path, dtype: torch.dtype | None) -> Path:
    import safetensors.torch

    cfg = model.config
    f = cfg.downsample_factor
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        formats.write_json(tmp / "model_index.json", formats.model_index())
        formats.write_json(tmp / "unet" / "config.json", formats.unet_config_to_diffusers(cfg.unet, cfg.image_size // f))
        formats.write_json(tmp / "vae" / "config.json", formats.vae_config_to_diffusers(cfg.vae, cfg.image_size, cfg.latent_scale))
        formats.write_json(tmp / "text_encoder" / "config.json", formats.text_config_to_transformers(cfg.text))
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
        formats.write_tokenizer(tmp / "tokenizer", cfg.pad, cfg.text.context_length)
        formats.write_json(tmp / "scheduler" / "scheduler_config.json", formats.scheduler_config(cfg.schedule, cfg.prediction))
        from minivid.outputs import publish_tree

        publish_tree(tmp)          # mkdtemp's 0700, safetensors' 0600 -> the umask's modes (readable by colleagues)
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path
