"""The encoders the papers' metrics use, under their official files' names (strict loading).

| class | official file (its keys) | used for |
|---|---|---|
| `OpenAICLIPModel` | `openai/clip-vit-large-patch14` `model.safetensors` (transformers' CLIPModel: `text_model.*`, `vision_model.*`, `text_projection.weight`, `visual_projection.weight`, `logit_scale`) | CLIP textual alignment, frame consistency, the aesthetic predictor's input |
| `OpenCLIPModel` (minivid.clip) | `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` `open_clip_pytorch_model.bin` / `open_clip_model.safetensors` (OpenCLIP: text tower at the top level, `visual.*`) | the same CLIP metrics with OpenCLIP ViT-H/14 |
| `DINOViT` | `dino_vitbase16_pretrain.pth` (DINO's VisionTransformer: `cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`) | subject consistency |
| `AestheticPredictor` | `sa_0_4_vit_l_14_linear.pth` (one `nn.Linear(768, 1)`: `weight`, `bias`) | aesthetic quality |

The transformer blocks are minivid.clip's `Block` (pre-norm attention + MLP residuals) with each
file's part names; the towers are minivid.clip's. `load_clip`, `load_dino`, `load_aesthetic` read a
file (pickles only through `torch.load(weights_only=True)`), recognise its architecture by comparing
its names and shapes with the presets below, and load it with `strict=True`; a file that matches no
preset is refused with the differences from the official layout.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from minivid.clip import (
    CLIPMLP, Block, CLIPTextConfig, CLIPVisionConfig, OpenAICLIPTextModel, OpenAICLIPVisionModel, OpenCLIPModel,
    SelfAttention, run_blocks,
)

__all__ = [
    "OpenAICLIPModel", "CLIP_PRESETS", "OPENCLIP_PRESETS", "DINOConfig", "DINO_PRESETS", "DINOViT", "QKVSelfAttention",
    "AestheticPredictor", "AESTHETIC_PRESETS", "CLIPEncoder", "EncoderError", "load_clip", "load_dino",
    "load_aesthetic", "build_clip", "match_preset", "load_clip_folder", "clip_configs_from_transformers",
    "describe_clip", "clip_config_to_transformers", "PICKSCORE_SOURCE",
]


class EncoderError(ValueError):
    """A weights file that is not the encoder it is given as; the message names the file."""


# ---------------------------------------------------------------- CLIP ViT-L/14, transformers' layout

class OpenAICLIPModel(OpenAICLIPTextModel):
    """OpenAI CLIP (text + vision towers + both projections) under transformers' CLIPModel keys.

    It is the text tower (`text_model.*`, `text_projection`) with the vision tower's modules beside
    it at the top level (`vision_model.*`, `visual_projection`) and `logit_scale`, exactly the keys of
    `openai/clip-vit-large-patch14`'s model.safetensors. `encode_text(ids)` = CLIPModel.get_text_features,
    `encode_image(pixels)` = get_image_features. The vision forward is minivid.clip's
    `OpenAICLIPVisionModel`, kept as `self.vision` (not a submodule: it holds the same modules).
    """

    def __init__(self, text: CLIPTextConfig | str, vision: CLIPVisionConfig | str):
        super().__init__(text)
        if self.cfg.projection_dim is None:
            raise ValueError("OpenAICLIPModel needs a text config with projection_dim")
        vision_tower = OpenAICLIPVisionModel(vision)
        if vision_tower.cfg.flavour != "openai" or vision_tower.cfg.projection_dim != self.cfg.projection_dim:
            raise ValueError("OpenAICLIPModel needs an openai-flavoured vision config with the text's projection_dim")
        self.vision_model = vision_tower.vision_model
        self.visual_projection = vision_tower.visual_projection
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.__dict__["vision"] = vision_tower          # a view on the same modules, outside the module tree

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, N] (end-token padded) -> projected text embedding [B, P] (not normalised)."""
        return self(ids, output="projected")

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] (CLIP-normalised) -> projected image embedding [B, P] (not normalised)."""
        return self.vision(pixels)


# name -> (text config, vision config); the eval CLIP files are recognised among these
CLIP_PRESETS: dict[str, tuple[CLIPTextConfig, CLIPVisionConfig]] = {
    "openai_vit_l14": (CLIPTextConfig.preset("openai_vit_l14"), CLIPVisionConfig.preset("openai_vit_l14")),
    "tiny_openai": (CLIPTextConfig.preset("tiny_sd1", projection_dim=24), CLIPVisionConfig.preset("tiny_openai")),
    # CLIP ViT-H/14 (LAION-2B) in transformers' layout: the architecture of PickScore_v1, exact GELU
    "transformers_vit_h14": (
        CLIPTextConfig("openai", width=1024, layers=24, heads=16, mlp_width=4096, act="gelu", projection_dim=1024),
        CLIPVisionConfig("openai", width=1280, layers=32, heads=16, mlp_width=5120, act="gelu", projection_dim=1024)),
    "tiny_pickscore": (
        CLIPTextConfig("openai", width=32, layers=2, heads=4, mlp_width=64, act="gelu", projection_dim=20),
        CLIPVisionConfig("openai", width=48, layers=2, heads=4, mlp_width=96, act="gelu", projection_dim=20,
                         image_size=32, patch_size=8)),
}
OPENCLIP_PRESETS: dict[str, tuple[CLIPTextConfig, CLIPVisionConfig]] = {
    "openclip_vit_h14": (CLIPTextConfig.preset("sd2", conditioning_layer="last"), CLIPVisionConfig.preset("openclip_vit_h14")),
    "tiny_openclip": (CLIPTextConfig.preset("tiny_sd2", conditioning_layer="last"), CLIPVisionConfig.preset("tiny_openclip")),
}


# ---------------------------------------------------------------- DINO ViT-B/16

@dataclass(frozen=True)
class DINOConfig:
    """DINO's VisionTransformer: patch embedding (with bias), class token, learned positions for an
    `image_size` grid, `layers` pre-norm blocks (fused qkv with bias, exact GELU, LayerNorm eps 1e-6),
    a final LayerNorm; the output is the class token."""

    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    patch_size: int = 16
    image_size: int = 224
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


DINO_PRESETS: dict[str, DINOConfig] = {
    "dino_vitb16": DINOConfig(),
    "tiny_dino": DINOConfig(width=32, layers=2, heads=4, mlp_width=64, patch_size=8, image_size=32),
}


class QKVSelfAttention(SelfAttention):
    """timm/DINO names: `qkv` (one Linear to [q; k; v], with bias) and `proj` (the output projection)."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    @property
    def out_proj(self) -> nn.Linear:                  # the name SelfAttention.forward projects with
        return self.proj

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.qkv(x).chunk(3, dim=-1)


class DINOBlock(Block):
    """DINO names: norm1, attn (qkv, proj), norm2, mlp.fc1, mlp.fc2 (exact GELU)."""

    def __init__(self, cfg: DINOConfig):
        super().__init__(("norm1", "attn", "norm2", "mlp"), nn.LayerNorm(cfg.width, eps=cfg.eps),
                         QKVSelfAttention(cfg.width, cfg.heads), nn.LayerNorm(cfg.width, eps=cfg.eps),
                         CLIPMLP(cfg.width, cfg.mlp_width, "gelu"))


class PatchEmbed(nn.Module):
    """DINO's `patch_embed`: `proj`, a stride-p convolution with bias."""

    def __init__(self, cfg: DINOConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)


class DINOViT(nn.Module):
    """DINO ViT (`dino_vitb16` of facebookresearch/dino's hub): forward(pixels [B, 3, H, W],
    ImageNet-normalised) -> class token after the final LayerNorm [B, D].

    Any H, W: the patch grid is (H // p, W // p); for a grid other than the trained square one the
    position embeddings are resized as DINO does (`interpolate_pos_encoding`).
    """

    def __init__(self, cfg: DINOConfig | str = "dino_vitb16"):
        super().__init__()
        cfg = DINO_PRESETS[cfg] if isinstance(cfg, str) else cfg
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid ** 2 + 1, cfg.width))
        self.blocks = nn.ModuleList(DINOBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def positions(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings [1, 1 + (h//p)(w//p), D] for an h x w input.

        The trained square grid as it is; otherwise DINO's resize: the G x G patch positions
        through bicubic interpolation (align_corners=False) with scale factors
        ((h // p + 0.1) / G, (w // p + 0.1) / G) (the 0.1 keeps the floor of the output size at
        h // p, w // p), the class position unchanged."""
        p, G = self.cfg.patch_size, self.cfg.grid
        gh, gw = h // p, w // p
        if gh * gw == G * G and h == w:
            return self.pos_embed
        D = self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].reshape(1, G, G, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / G, (gw + 0.1) / G), mode="bicubic")
        if tuple(grid.shape[-2:]) != (gh, gw):
            raise RuntimeError(f"position grid resized to {tuple(grid.shape[-2:])}, expected {(gh, gw)}")
        return torch.cat([self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, D)], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> class token features [B, D]."""
        p = self.cfg.patch_size
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, H, W], got {getattr(pixels, 'shape', type(pixels))}")
        if min(pixels.shape[-2:]) < p:
            raise ValueError(f"pixels of {tuple(pixels.shape[-2:])} are smaller than one {p}x{p} patch")
        x = self.patch_embed.proj(pixels.to(self.cls_token.dtype)).flatten(2).transpose(1, 2)   # (B, gh*gw, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.positions(*pixels.shape[-2:])
        x = run_blocks(self.blocks, x)
        return self.norm(x)[:, 0]


# ---------------------------------------------------------------- LAION aesthetic predictor

class AestheticPredictor(nn.Linear):
    """LAION's aesthetic predictor v1 (`sa_0_4_vit_l_14_linear.pth`): one Linear(768, 1) on the
    L2-normalised CLIP ViT-L/14 image embedding; the score is on a 1..10 scale.
    forward(image_embeds [B, 768]) -> [B] (the embeddings are normalised here)."""

    def __init__(self, dim: int = 768):
        super().__init__(dim, 1)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if image_embeds.dim() != 2 or image_embeds.shape[1] != self.in_features:
            raise ValueError(f"the aesthetic predictor takes [B, {self.in_features}] CLIP image embeddings "
                             f"(ViT-L/14), got {tuple(image_embeds.shape)}")
        return super().forward(F.normalize(image_embeds.to(self.weight.dtype), dim=-1)).squeeze(-1)


AESTHETIC_PRESETS: dict[str, int] = {"laion_vit_l14": 768, "tiny_aesthetic": 24}


# ---------------------------------------------------------------- recognising and loading files

def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def match_preset(path: str | Path, state_dict: Mapping[str, torch.Tensor], builders: Mapping[str, Callable[[], nn.Module]],
                 what: str, drop: tuple[str, ...] = ()) -> tuple[str, nn.Module]:
    """The preset whose model (built on the meta device) has exactly the file's names and shapes.

    `drop`: names the file may carry that are not parameters (e.g. position_ids). Raises EncoderError
    naming the file and listing, against the first (official) preset, the missing, unexpected and
    differently shaped tensors (the first 10 of each)."""
    got = {k: tuple(v.shape) for k, v in state_dict.items() if k not in drop}
    metas = {}
    for name, build in builders.items():
        with torch.device("meta"):
            metas[name] = _shapes(build())
        if metas[name] == got:
            return name, build
    name, want = next(iter(metas.items()))
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    other = [f"{k} {got[k]} (expected {want[k]})" for k in want if k in got and got[k] != want[k]]
    parts = [f"{label} ({len(keys)}): {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", other)) if keys]
    raise EncoderError(f"{path}: is not {what}: its tensors differ from the official layout ({name}): " + "; ".join(parts)
                       + ("; a CLIP of another architecture loads from its transformers folder (config.json beside "
                          "model.safetensors)" if "CLIP" in what and "describes" not in what else ""))


def _read(path: str | Path, what: str, source: str) -> dict[str, torch.Tensor]:
    from minivid.weights import read_state_dict

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(missing_message(path, what, source))
    return read_state_dict(path)


def _load_strict(build: Callable[[], nn.Module], state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Build on the meta device (no random init of a full-size model) and take the file's tensors, strict."""
    with torch.device("meta"):
        model = build()
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    return model


def missing_message(path: Path, what: str, source: str) -> str:
    return f"{path}: not found; {what} is expected there. It comes from {source} (see weights/README.md)."


@dataclass
class CLIPEncoder:
    """A whole CLIP model with what its reference feeds it: `kind` "openai" (transformers' layout,
    prompts padded with the end token) or "openclip" (OpenCLIP's layout, padded with 0)."""

    model: nn.Module
    kind: Literal["openai", "openclip"]
    preset: str

    @property
    def image_size(self) -> int:
        return (self.model.vision.cfg if self.kind == "openai" else self.model.visual.cfg).image_size

    @property
    def embed_dim(self) -> int:
        return self.model.cfg.projection_dim

    def tokenizer(self):
        from minivid.tokenizer import CLIPTokenizer

        return CLIPTokenizer(pad="end" if self.kind == "openai" else "zero", max_length=self.model.cfg.context_length)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(ids) if self.kind == "openai" else self.model.encode_text(ids, "projected")

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): the trained temperature CLIPModel multiplies the cosine by (PickScore's scale)."""
        return float(self.model.logit_scale.detach().float().exp())


def build_clip(preset: str) -> CLIPEncoder:
    """A randomly initialised CLIP of a preset of CLIP_PRESETS (openai) or OPENCLIP_PRESETS."""
    if preset in CLIP_PRESETS:
        return CLIPEncoder(OpenAICLIPModel(*CLIP_PRESETS[preset]).eval(), "openai", preset)
    if preset in OPENCLIP_PRESETS:
        return CLIPEncoder(OpenCLIPModel(*OPENCLIP_PRESETS[preset]).eval(), "openclip", preset)
    raise ValueError(f"unknown CLIP preset {preset!r}; choose from {sorted({**CLIP_PRESETS, **OPENCLIP_PRESETS})}")


CLIP_SOURCE = ("the Hugging Face Hub: openai/clip-vit-large-patch14 (model.safetensors, renamed "
               "clip-vit-large-patch14.safetensors), or for OpenCLIP ViT-H/14 laion/CLIP-ViT-H-14-laion2B-s32B-b79K "
               "(open_clip_model.safetensors or open_clip_pytorch_model.bin)")
DINO_SOURCE = ("facebookresearch/dino's release: "
               "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth")
AESTHETIC_SOURCE = ("LAION-AI/aesthetic-predictor on GitHub: "
                    "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_l_14_linear.pth")
POSITION_IDS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
PICKSCORE_SOURCE = ("the Hugging Face Hub: yuvalkirstain/PickScore_v1 (config.json and model.safetensors, in one "
                    "folder); its processor is laion/CLIP-ViT-H-14-laion2B-s32B-b79K's, restated in minivid.eval.preprocess")


# transformers' CLIPConfig defaults (configuration_clip.py), for config.json files that leave a field out
_HF_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                     "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "layer_norm_eps": 1e-5}
_HF_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
                       "num_channels": 3}
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}     # transformers' ACT2FN names minivid.clip has


def clip_configs_from_transformers(config: Mapping, where: str | Path = "config.json") -> tuple[CLIPTextConfig, CLIPVisionConfig]:
    """transformers' CLIPConfig (a config.json as a dict) -> minivid's (text, vision) configs in the
    transformers layout ("openai" flavour). Any CLIP ViT: B/32, B/16, L/14, L/14-336, H/14 (PickScore), ...
    The projection width is the top-level `projection_dim`, as CLIPModel builds its projections."""
    if config.get("model_type", "clip") != "clip":
        raise EncoderError(f"{where}: model_type is {config.get('model_type')!r}, not 'clip' (transformers' CLIPModel)")
    try:
        text = {**_HF_TEXT_DEFAULTS, **(config.get("text_config") or {})}
        vision = {**_HF_VISION_DEFAULTS, **(config.get("vision_config") or {})}
        projection = int(config.get("projection_dim", 512))
        acts = []
        for tower, cfg in (("text", text), ("vision", vision)):
            if cfg["hidden_act"] not in _HF_ACTIVATIONS:
                raise EncoderError(f"{where}: {tower}_config.hidden_act {cfg['hidden_act']!r} is not one of "
                                   f"{', '.join(_HF_ACTIVATIONS)}")
            acts.append(_HF_ACTIVATIONS[cfg["hidden_act"]])
        if int(vision["num_channels"]) != 3:
            raise EncoderError(f"{where}: vision_config.num_channels is {vision['num_channels']}, expected 3")
        text_cfg = CLIPTextConfig("openai", width=int(text["hidden_size"]), layers=int(text["num_hidden_layers"]),
                                  heads=int(text["num_attention_heads"]), mlp_width=int(text["intermediate_size"]),
                                  act=acts[0], vocab_size=int(text["vocab_size"]),
                                  context_length=int(text["max_position_embeddings"]),
                                  eps=float(text["layer_norm_eps"]), projection_dim=projection)
        vision_cfg = CLIPVisionConfig("openai", width=int(vision["hidden_size"]), layers=int(vision["num_hidden_layers"]),
                                      heads=int(vision["num_attention_heads"]), mlp_width=int(vision["intermediate_size"]),
                                      act=acts[1], projection_dim=projection, image_size=int(vision["image_size"]),
                                      patch_size=int(vision["patch_size"]), eps=float(vision["layer_norm_eps"]))
    except (TypeError, ValueError) as e:
        if isinstance(e, EncoderError):
            raise
        raise EncoderError(f"{where}: not a usable CLIPConfig ({e})") from None
    return text_cfg, vision_cfg


def clip_config_to_transformers(text: CLIPTextConfig, vision: CLIPVisionConfig) -> dict:
    """minivid's (text, vision) configs in the transformers layout -> transformers' CLIPConfig as a
    config.json dict (the inverse of clip_configs_from_transformers)."""
    if text.flavour != "openai" or vision.flavour != "openai" or text.projection_dim != vision.projection_dim:
        raise ValueError("only transformers-layout CLIP configs with one projection width have a CLIPConfig")
    return {
        "model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": vision.projection_dim,
        "text_config": {"hidden_size": text.width, "num_hidden_layers": text.layers, "num_attention_heads": text.heads,
                        "intermediate_size": text.mlp_width, "hidden_act": text.act, "layer_norm_eps": text.eps,
                        "vocab_size": text.vocab_size, "max_position_embeddings": text.context_length,
                        "projection_dim": text.projection_dim},
        "vision_config": {"hidden_size": vision.width, "num_hidden_layers": vision.layers,
                          "num_attention_heads": vision.heads, "intermediate_size": vision.mlp_width,
                          "hidden_act": vision.act, "layer_norm_eps": vision.eps, "image_size": vision.image_size,
                          "patch_size": vision.patch_size, "num_channels": 3, "projection_dim": vision.projection_dim},
    }


def describe_clip(text: CLIPTextConfig, vision: CLIPVisionConfig) -> str:
    """'ViT-B/32 224px, text 12x512, proj 512' - the architecture a CLIP config gives."""
    return (f"ViT {vision.layers}x{vision.width} patch {vision.patch_size} at {vision.image_size}px, "
            f"text {text.layers}x{text.width}, projection {vision.projection_dim}")


TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def load_clip_folder(folder: str | Path, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> CLIPEncoder:
    """A transformers CLIP folder (config.json + model.safetensors or pytorch_model.bin) -> CLIPEncoder,
    the architecture read from config.json, the weights loaded strictly."""
    import json

    folder = Path(folder)
    config_file = folder / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise EncoderError(f"{folder}: a transformers CLIP folder needs config.json beside its weights") from None
    except (OSError, ValueError) as e:
        raise EncoderError(f"{config_file}: not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise EncoderError(f"{config_file}: expected a JSON object (transformers' CLIPConfig)")
    text, vision = clip_configs_from_transformers(config, config_file)
    weights = next((folder / n for n in TRANSFORMERS_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise EncoderError(f"{folder}: no {' or '.join(TRANSFORMERS_WEIGHTS)} beside config.json")
    sd = _read(weights, "the CLIP model", CLIP_SOURCE)
    name = f"{folder.name} ({describe_clip(text, vision)})"
    match_preset(weights, sd, {name: lambda: OpenAICLIPModel(text, vision)}, f"the CLIP model {config_file} describes",
                 drop=POSITION_IDS)
    model = _load_strict(lambda: OpenAICLIPModel(text, vision), sd)
    return CLIPEncoder(model.to(device=device, dtype=dtype).eval(), "openai", name)


def load_clip(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> CLIPEncoder:
    """A CLIP file or folder -> CLIPEncoder.

    A transformers folder (config.json + model.safetensors) may hold any CLIP ViT: its architecture is
    read from config.json. A single file is recognised by its names among the presets: transformers'
    CLIPModel ViT-L/14 (`vision_model.*`) or OpenCLIP ViT-H/14 (`visual.*`)."""
    if Path(path).is_dir() and (Path(path) / "config.json").is_file():
        return load_clip_folder(path, device, dtype)
    sd = _read(path, "the CLIP model", CLIP_SOURCE)
    if any(k.startswith("visual.") for k in sd):
        kind, presets = "openclip", OPENCLIP_PRESETS
    elif any(k.startswith("vision_model.") for k in sd):
        kind, presets = "openai", CLIP_PRESETS
    else:
        raise EncoderError(f"{path}: is not a whole CLIP model: it has neither transformers' CLIPModel keys "
                           f"(vision_model.*, text_model.*) nor OpenCLIP's (visual.*, transformer.*); "
                           f"first keys: {', '.join(list(sd)[:5])}")
    cls = OpenAICLIPModel if kind == "openai" else OpenCLIPModel
    builders = {name: (lambda t=t, v=v: cls(t, v)) for name, (t, v) in presets.items()}
    name, build = match_preset(path, sd, builders, f"a CLIP model ({kind} layout)", drop=POSITION_IDS)
    model = _load_strict(build, sd)
    return CLIPEncoder(model.to(device=device, dtype=dtype).eval(), kind, name)


def _load_preset_file(path, what: str, source: str, presets: Mapping, make: Callable, description: str,
                      device, dtype) -> nn.Module:
    """Read `path`, find the preset whose model has exactly its names and shapes, load it strictly."""
    sd = _read(path, what, source)
    builders = {name: (lambda c=c: make(c)) for name, c in presets.items()}
    _, build = match_preset(path, sd, builders, description)
    return _load_strict(build, sd).to(device=device, dtype=dtype).eval()


def load_dino(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DINOViT:
    """DINO's `dino_vitbase16_pretrain.pth` (read with weights_only=True) -> DINOViT, strict."""
    return _load_preset_file(path, "DINO ViT-B/16", DINO_SOURCE, DINO_PRESETS, DINOViT,
                             "DINO ViT-B/16 (dino_vitbase16_pretrain.pth)", device, dtype)


def load_aesthetic(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> AestheticPredictor:
    """LAION's `sa_0_4_vit_l_14_linear.pth` (weights_only=True) -> AestheticPredictor, strict."""
    return _load_preset_file(path, "the LAION aesthetic predictor", AESTHETIC_SOURCE, AESTHETIC_PRESETS,
                             AestheticPredictor, "the LAION aesthetic predictor (Linear(768, 1): weight, bias)",
                             device, dtype)
