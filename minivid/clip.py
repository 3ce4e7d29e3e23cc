"""CLIP text and vision encoders in the two key layouts the official checkpoints use.

One pre-norm transformer serves every tower:

    x = x + attn(norm1(x), mask)        # multi-head self-attention (causal for text)
    x = x + mlp(norm2(x))               # Linear -> GELU or quick-GELU -> Linear

written once (`Block.forward`, `run_blocks`). Only the parameter NAMES differ, because
module attributes copy the checkpoints so they load with `strict=True`:

| flavour  | used by                         | block names                                                        |
|----------|---------------------------------|--------------------------------------------------------------------|
| openai   | SD 1.x text (HF-CLIP names),    | `encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj,        |
|          | OpenAI ViT-L/14 vision          |  layer_norm2, mlp.fc1, mlp.fc2}`                                   |
| openclip | SD 2.x text, SVD image encoder  | `transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias (fused    |
|          | (OpenCLIP names)                |  [q; k; v]), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`           |

Text: `CLIPTextModel(cfg)` returns the flavour's subclass; `model(ids)` is exactly what
the UNet is conditioned on (SD 1.x: last layer + final LN; SD 2.x: all but the last block,
then `ln_final`, as ldm's `FrozenOpenCLIPEmbedder(layer="penultimate")`), `model(ids,
output="projected")` the CLIP text embedding (EOT token after the full stack and final LN,
projected). Vision: `CLIPVisionModel(cfg)(pixels)` -> projected class-token embedding.
`OpenCLIPModel` is OpenCLIP's whole model (text tower at the top level, `visual` beside it),
as SVD's checkpoint stores it under `conditioner.embedders.0.open_clip.model.` (with no text
blocks: sgm deletes them). Attention arithmetic is minivid.attention's processor (`sdpa`).

Checkpoint extras: SD 1.x files also carry `text_model.embeddings.position_ids` ([1, 77]
int64, = arange). It is not a parameter here (positions are always 0..N-1); loading accepts
and drops it (a warning if it is not arange, whose values transformers ignores too).
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from minivid.attention import AttnContext, Processor, sdpa

__all__ = [
    "TowerConfig", "CLIPTextConfig", "CLIPVisionConfig", "TEXT_PRESETS", "VISION_PRESETS", "CHECKPOINT_EXTRAS",
    "CLIPTower", "CLIPTextModel", "OpenAICLIPTextModel", "OpenCLIPTextModel",
    "CLIPVisionModel", "OpenAICLIPVisionModel", "OpenCLIPVisionTransformer", "OpenCLIPModel",
    "QuickGELU", "SelfAttention", "FusedSelfAttention", "SplitSelfAttention",
    "Block", "ResidualAttentionBlock", "CLIPEncoderLayer", "run_blocks", "causal_mask",
    "CLIP_MEAN", "CLIP_STD", "clip_normalize", "clip_preprocess", "svd_resize", "svd_preprocess",
]

logger = logging.getLogger(__name__)

Flavour = Literal["openai", "openclip"]
Activation = Literal["quick_gelu", "gelu"]

# Keys the official files carry that are not parameters here (relative to the text model's prefix).
CHECKPOINT_EXTRAS: tuple[str, ...] = ("text_model.embeddings.position_ids",)


# ---------------------------------------------------------------- configs

@dataclass(frozen=True)
class TowerConfig:
    """What every CLIP transformer tower has: its key names (`flavour`), width, depth, heads, MLP width
    and activation."""

    flavour: Flavour
    width: int
    layers: int
    heads: int
    mlp_width: int
    act: Activation

    def __post_init__(self) -> None:
        if self.flavour not in ("openai", "openclip"):
            raise ValueError(f"flavour must be 'openai' (HF-CLIP names) or 'openclip', got {self.flavour!r}")
        if self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"act must be 'quick_gelu' or 'gelu', got {self.act!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


@dataclass(frozen=True)
class CLIPTextConfig(TowerConfig):
    """A CLIP text tower. `conditioning_layer` says which block output `forward` returns."""

    vocab_size: int = 49408
    context_length: int = 77
    eps: float = 1e-5
    conditioning_layer: Literal["last", "penultimate"] = "last"
    projection_dim: int | None = None        # text_projection (+ logit_scale for openclip); None: not stored

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.conditioning_layer not in ("last", "penultimate"):
            raise ValueError(f"conditioning_layer must be 'last' or 'penultimate', got {self.conditioning_layer!r}")

    @classmethod
    def preset(cls, name: str, **changes: Any) -> "CLIPTextConfig":
        """A named preset (see TEXT_PRESETS), optionally with fields changed."""
        if name not in TEXT_PRESETS:
            raise ValueError(f"unknown CLIP text preset {name!r}; choose from {sorted(TEXT_PRESETS)}")
        return dataclasses.replace(TEXT_PRESETS[name], **changes)


@dataclass(frozen=True)
class CLIPVisionConfig(TowerConfig):
    """A CLIP ViT image tower: patchify, class token, pre-LN, blocks, LN on the class token, projection."""

    projection_dim: int
    image_size: int = 224
    patch_size: int = 14
    eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @classmethod
    def preset(cls, name: str, **changes: Any) -> "CLIPVisionConfig":
        """A named preset (see VISION_PRESETS), optionally with fields changed."""
        if name not in VISION_PRESETS:
            raise ValueError(f"unknown CLIP vision preset {name!r}; choose from {sorted(VISION_PRESETS)}")
        return dataclasses.replace(VISION_PRESETS[name], **changes)


TEXT_PRESETS: dict[str, CLIPTextConfig] = {
    # SD 1.x: OpenAI CLIP ViT-L/14 text tower, conditioning = last layer after the final LN
    "sd1": CLIPTextConfig("openai", width=768, layers=12, heads=12, mlp_width=3072, act="quick_gelu"),
    # SD 2.x: OpenCLIP ViT-H/14 (LAION-2B) text tower, conditioning = penultimate block + ln_final
    "sd2": CLIPTextConfig("openclip", width=1024, layers=24, heads=16, mlp_width=4096, act="gelu",
                          conditioning_layer="penultimate", projection_dim=1024),
    # CLIP-score text side of OpenAI ViT-L/14 (SD 1.x's tower plus its projection)
    "openai_vit_l14": CLIPTextConfig("openai", width=768, layers=12, heads=12, mlp_width=3072,
                                     act="quick_gelu", projection_dim=768),
    "tiny_sd1": CLIPTextConfig("openai", width=32, layers=2, heads=4, mlp_width=64, act="quick_gelu"),
    "tiny_sd2": CLIPTextConfig("openclip", width=32, layers=3, heads=4, mlp_width=64, act="gelu",
                               conditioning_layer="penultimate", projection_dim=24),
}

VISION_PRESETS: dict[str, CLIPVisionConfig] = {
    "openclip_vit_h14": CLIPVisionConfig("openclip", width=1280, layers=32, heads=16, mlp_width=5120,
                                         act="gelu", projection_dim=1024),
    "openai_vit_l14": CLIPVisionConfig("openai", width=1024, layers=24, heads=16, mlp_width=4096,
                                       act="quick_gelu", projection_dim=768),
    "tiny_openclip": CLIPVisionConfig("openclip", width=32, layers=2, heads=4, mlp_width=64, act="gelu",
                                      projection_dim=24, image_size=32, patch_size=8),
    "tiny_openai": CLIPVisionConfig("openai", width=32, layers=2, heads=4, mlp_width=64, act="quick_gelu",
                                    projection_dim=24, image_size=32, patch_size=8),
}


def _text_cfg(cfg: CLIPTextConfig | str) -> CLIPTextConfig:
    return CLIPTextConfig.preset(cfg) if isinstance(cfg, str) else cfg


def _vision_cfg(cfg: CLIPVisionConfig | str) -> CLIPVisionConfig:
    return CLIPVisionConfig.preset(cfg) if isinstance(cfg, str) else cfg


# ---------------------------------------------------------------- the transformer

class QuickGELU(nn.Module):
    """OpenAI CLIP's GELU approximation x·σ(1.702x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: Activation) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


def causal_mask(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(N, N) bool, True where query i may attend to key j (j <= i)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


class SelfAttention(nn.Module, abc.ABC):
    """Multi-head self-attention; subclasses own the projections under their checkpoint names.

    The arithmetic is a minivid.attention processor `(q, k, v, ctx) -> out` on (B, heads, N, d).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.dim_head = heads, width // heads
        self.processor: Processor = sdpa

    @abc.abstractmethod
    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, D) -> q, k, v, each (B, N, D)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D), mask (N, N) bool or None -> (B, N, D)."""
        B, N, D = x.shape
        q, k, v = (t.view(B, N, self.heads, self.dim_head).transpose(1, 2) for t in self.project_qkv(x))  # (B, h, N, d)
        ctx = AttnContext(module=self, name="", is_cross=False, scale=self.dim_head ** -0.5, upcast=False,
                          hw=None, state={}, mask=mask)
        out = self.processor(q, k, v, ctx)                            # (B, h, N, d)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class FusedSelfAttention(SelfAttention):
    """OpenCLIP (nn.MultiheadAttention) names: `in_proj_weight` [3D, D] = [q; k; v], `in_proj_bias`, `out_proj`."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)


class SplitSelfAttention(SelfAttention):
    """HF-CLIP names: `q_proj`, `k_proj`, `v_proj`, `out_proj`, all with bias."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads)
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    `names` are the four parts' attribute names, the checkpoint's (e.g. ln_1, attn, ln_2, mlp)."""

    def __init__(self, names: tuple[str, str, str, str], norm1: nn.Module, attn: SelfAttention, norm2: nn.Module,
                 mlp: nn.Module):
        super().__init__()
        self.part_names = names
        for name, part in zip(names, (norm1, attn, norm2, mlp)):
            setattr(self, name, part)

    def parts(self) -> tuple[nn.Module, SelfAttention, nn.Module, nn.Module]:
        """(norm1, attention, norm2, mlp)."""
        return tuple(getattr(self, name) for name in self.part_names)  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D) -> (B, N, D)."""
        norm1, attn, norm2, mlp = self.parts()
        x = x + attn(norm1(x), mask)
        return x + mlp(norm2(x))


class ResidualAttentionBlock(Block):
    """OpenCLIP names: ln_1, attn (fused), ln_2, mlp.c_fc, mlp.c_proj."""

    def __init__(self, width: int, heads: int, mlp_width: int, act: Activation, eps: float):
        super().__init__(("ln_1", "attn", "ln_2", "mlp"), nn.LayerNorm(width, eps=eps),
                         FusedSelfAttention(width, heads), nn.LayerNorm(width, eps=eps),
                         nn.Sequential(OrderedDict(c_fc=nn.Linear(width, mlp_width), gelu=_activation(act),
                                                   c_proj=nn.Linear(mlp_width, width))))


class CLIPMLP(nn.Module):
    """HF-CLIP names: fc1 -> activation -> fc2."""

    def __init__(self, width: int, mlp_width: int, act: Activation):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, mlp_width), _activation(act), nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(Block):
    """HF-CLIP names: layer_norm1, self_attn (q/k/v/out_proj), layer_norm2, mlp.fc1, mlp.fc2."""

    def __init__(self, width: int, heads: int, mlp_width: int, act: Activation, eps: float):
        super().__init__(("layer_norm1", "self_attn", "layer_norm2", "mlp"), nn.LayerNorm(width, eps=eps),
                         SplitSelfAttention(width, heads), nn.LayerNorm(width, eps=eps), CLIPMLP(width, mlp_width, act))


def _blocks(cfg: TowerConfig) -> nn.ModuleList:
    block = CLIPEncoderLayer if cfg.flavour == "openai" else ResidualAttentionBlock
    return nn.ModuleList(block(cfg.width, cfg.heads, cfg.mlp_width, cfg.act, cfg.eps) for _ in range(cfg.layers))


class Transformer(nn.Module):
    """OpenCLIP's `transformer`: `resblocks.N`."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.resblocks = _blocks(cfg)


class CLIPEncoder(nn.Module):
    """HF-CLIP's `encoder`: `layers.N`."""

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.layers = _blocks(cfg)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, mask: torch.Tensor | None = None,
               depth: int | None = None) -> torch.Tensor:
    """Run the first `depth` blocks (all if None) on x (B, N, D)."""
    for block in blocks[:depth]:
        x = block(x, mask)
    return x


# ---------------------------------------------------------------- towers

class CLIPTower(nn.Module, abc.ABC):
    """A CLIP transformer tower, text or vision: embed, run the blocks, a final LayerNorm, project.

    Each flavour says where its parts live under its checkpoint's names (`BLOCKS`, `FINAL_NORM`:
    dotted module paths) and implements `embed` and `project`, which differ in more than names;
    the modality's base class (`CLIPTextModel`, `CLIPVisionModel`) runs them in its `forward`.
    """

    BLOCKS: str          # the ModuleList of transformer blocks
    FINAL_NORM: str      # the LayerNorm after them (text: on every token; vision: on the class token)

    def __init__(self, cfg: TowerConfig):
        super().__init__()
        self.cfg = cfg

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order."""
        return self.get_submodule(self.BLOCKS)

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.get_submodule(self.FINAL_NORM)

    @abc.abstractmethod
    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """ids (B, N) or pixels (B, 3, S, S) -> token embeddings + positions (B, N, D)."""

    @abc.abstractmethod
    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, P) through the flavour's projection."""


# ---------------------------------------------------------------- text

class CLIPTextModel(CLIPTower):
    """CLIP text encoder. `CLIPTextModel(cfg)` builds the flavour's subclass:
    `OpenAICLIPTextModel` (HF-CLIP keys, SD 1.x) or `OpenCLIPTextModel` (OpenCLIP keys, SD 2.x).

    forward(ids [B, N<=77]) -> [B, N, D]: what the UNet is conditioned on;
    forward(ids, output="pooled") -> [B, D]: the EOT token (largest id) after the full stack and final LN;
    forward(ids, output="projected") -> [B, P]: the pooled token through text_projection (CLIP score).
    """

    cfg: CLIPTextConfig

    def __new__(cls, cfg: CLIPTextConfig | str | None = None, *args: Any, **kwargs: Any) -> "CLIPTextModel":
        if cls is CLIPTextModel and cfg is not None:
            cls = OpenAICLIPTextModel if _text_cfg(cfg).flavour == "openai" else OpenCLIPTextModel
        return super().__new__(cls)

    def __init__(self, cfg: CLIPTextConfig | str):
        super().__init__(_text_cfg(cfg))

    def check_ids(self, ids: torch.Tensor) -> None:
        """Raise a clear error for ids the model cannot embed."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(f"ids must be a [B, N] tensor of token ids, got {getattr(ids, 'shape', type(ids))}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        if not 0 < ids.shape[1] <= self.cfg.context_length:
            raise ValueError(f"ids have {ids.shape[1]} positions; the model has {self.cfg.context_length}")
        if ids.numel() and ids.device.type != "meta" and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")

    def forward(self, ids: torch.Tensor, output: Literal["hidden", "pooled", "projected"] = "hidden") -> torch.Tensor:
        """ids [B, N] -> conditioning [B, N, D] ("hidden"), EOT features [B, D] ("pooled") or [B, P] ("projected")."""
        if output not in ("hidden", "pooled", "projected"):
            raise ValueError(f"output must be 'hidden', 'pooled' or 'projected', got {output!r}")
        if not len(self.blocks):
            raise RuntimeError("this text tower has no transformer blocks (SVD's checkpoint keeps only leftovers)")
        self.check_ids(ids)
        B, N = ids.shape
        depth = len(self.blocks)
        if output == "hidden" and self.cfg.conditioning_layer == "penultimate":
            depth -= 1
        x = self.embed(ids)                                                   # (B, N, D)
        x = run_blocks(self.blocks, x, causal_mask(N, ids.device), depth)
        x = self.final_norm(x)
        if output == "hidden":
            return x
        pooled = x[torch.arange(B, device=x.device), ids.argmax(dim=-1)]    # (B, D) at the EOT token
        return pooled if output == "pooled" else self.project(pooled)


class CLIPTextEmbeddings(nn.Module):
    """HF-CLIP `embeddings`: token_embedding, position_embedding (nn.Embedding)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.01)
        self.register_load_state_dict_pre_hook(_drop_position_ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


def _drop_position_ids(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Accept the checkpoint's `position_ids` buffer ([1, N] = arange) and drop it."""
    ids = state_dict.pop(prefix + "position_ids", None)
    if ids is None:
        return
    n = module.position_embedding.num_embeddings
    if tuple(ids.shape) != (1, n):
        raise ValueError(f"{prefix}position_ids has shape {tuple(ids.shape)}, expected (1, {n})")
    if ids.device.type != "meta" and not torch.equal(ids.long().cpu(), torch.arange(n)[None]):
        logger.warning("%sposition_ids in the checkpoint is not 0..%d; it is ignored (positions are always 0..N-1)",
                       prefix, n - 1)


class CLIPTextTransformer(nn.Module):
    """HF-CLIP `text_model`: embeddings, encoder.layers, final_layer_norm."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class OpenAICLIPTextModel(CLIPTextModel):
    """OpenAI CLIP text tower under HF-CLIP keys: `text_model.*` (+ `text_projection` if projection_dim).

    SD 1.x stores it under `cond_stage_model.transformer.`.
    """

    BLOCKS, FINAL_NORM = "text_model.encoder.layers", "text_model.final_layer_norm"

    def __init__(self, cfg: CLIPTextConfig | str):
        super().__init__(cfg)
        cfg = self.cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.embeddings(ids)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.cfg.projection_dim is None:
            raise RuntimeError("this text model has no text_projection (SD 1.x files do not store one)")
        return self.text_projection(pooled)


class OpenCLIPTextModel(CLIPTextModel):
    """OpenCLIP text tower under OpenCLIP keys: token_embedding, positional_embedding,
    transformer.resblocks.*, ln_final, text_projection [D, P], logit_scale [].

    SD 2.x stores it under `cond_stage_model.model.`.
    """

    BLOCKS, FINAL_NORM = "transformer.resblocks", "ln_final"

    def __init__(self, cfg: CLIPTextConfig | str):
        super().__init__(cfg)
        cfg = self.cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.eps)
        if cfg.projection_dim is not None:   # official files store both; a diffusers SD 2 folder neither
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.cfg.projection_dim is None:
            raise RuntimeError("this text model has no text_projection (diffusers SD 2 folders do not store one)")
        return pooled @ self.text_projection


# ---------------------------------------------------------------- vision

class CLIPVisionModel(CLIPTower):
    """CLIP ViT image encoder. `CLIPVisionModel(cfg)` builds the flavour's subclass:
    `OpenAICLIPVisionModel` (HF-CLIP keys) or `OpenCLIPVisionTransformer` (OpenCLIP `visual`).

    forward(pixels [B, 3, S, S], CLIP-normalised) -> [B, P] (output="embeds"), or the
    class token after the post-LN [B, D] (output="pooled").
    """

    cfg: CLIPVisionConfig

    def __new__(cls, cfg: CLIPVisionConfig | str | None = None, *args: Any, **kwargs: Any) -> "CLIPVisionModel":
        if cls is CLIPVisionModel and cfg is not None:
            cls = OpenAICLIPVisionModel if _vision_cfg(cfg).flavour == "openai" else OpenCLIPVisionTransformer
        return super().__new__(cls)

    PRE_NORM: str        # the LayerNorm on all tokens before the blocks

    def __init__(self, cfg: CLIPVisionConfig | str):
        super().__init__(_vision_cfg(cfg))

    @property
    def pre_norm(self) -> nn.LayerNorm:
        return self.get_submodule(self.PRE_NORM)

    def forward(self, pixels: torch.Tensor, output: Literal["embeds", "pooled"] = "embeds") -> torch.Tensor:
        """pixels [B, 3, S, S] -> image embedding [B, P] ("embeds") or class token after post-LN [B, D] ("pooled")."""
        S = self.cfg.image_size
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, S, S):
            raise ValueError(f"pixels must be [B, 3, {S}, {S}], got {getattr(pixels, 'shape', type(pixels))}")
        if output not in ("embeds", "pooled"):
            raise ValueError(f"output must be 'embeds' or 'pooled', got {output!r}")
        x = self.pre_norm(self.embed(pixels))            # (B, 1 + G², D): class token + patch tokens
        x = run_blocks(self.blocks, x)
        pooled = self.final_norm(x[:, 0])                # (B, D) class token
        return pooled if output == "pooled" else self.project(pooled)


def _patchify(conv: nn.Conv2d, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, G², D) patch tokens in row-major order."""
    return conv(pixels.to(conv.weight.dtype)).flatten(2).transpose(1, 2)


class OpenCLIPVisionTransformer(CLIPVisionModel):
    """OpenCLIP `visual`: conv1 (no bias), class_embedding, positional_embedding, ln_pre,
    transformer.resblocks.*, ln_post, proj [D, P]."""

    BLOCKS, PRE_NORM, FINAL_NORM = "transformer.resblocks", "ln_pre", "ln_post"

    def __init__(self, cfg: CLIPVisionConfig | str):
        super().__init__(cfg)
        cfg = self.cfg
        self.conv1 = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.grid ** 2 + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.transformer = Transformer(cfg)
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.proj = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))
        for p in (self.class_embedding, self.positional_embedding, self.proj):
            nn.init.normal_(p, std=cfg.width ** -0.5)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        x = _patchify(self.conv1, pixels)                                 # (B, G², D)
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.positional_embedding

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled @ self.proj


class CLIPVisionEmbeddings(nn.Module):
    """HF-CLIP vision `embeddings`: class_embedding, patch_embedding (no bias), position_embedding."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.grid ** 2 + 1, cfg.width)
        nn.init.normal_(self.class_embedding, std=cfg.width ** -0.5)
        self.register_load_state_dict_pre_hook(_drop_position_ids)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = _patchify(self.patch_embedding, pixels)                       # (B, G², D)
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)  # (B, 1, D)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


class CLIPVisionTransformer(nn.Module):
    """HF-CLIP `vision_model`: embeddings, pre_layrnorm (sic), encoder.layers, post_layernorm."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class OpenAICLIPVisionModel(CLIPVisionModel):
    """OpenAI CLIP vision tower under HF-CLIP keys: `vision_model.*`, `visual_projection` (no bias)."""

    BLOCKS = "vision_model.encoder.layers"
    PRE_NORM, FINAL_NORM = "vision_model.pre_layrnorm", "vision_model.post_layernorm"

    def __init__(self, cfg: CLIPVisionConfig | str):
        super().__init__(cfg)
        cfg = self.cfg
        self.vision_model = CLIPVisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_model.embeddings(pixels)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(pooled)


class OpenCLIPModel(OpenCLIPTextModel):
    """OpenCLIP's whole model: the text tower at the top level (OpenCLIP's layout) and `visual`.

    Called on pixels it is an image encoder (SVD's conditioner): forward(pixels) -> [B, P].
    SVD's checkpoint keeps only the text tower's leftovers (token_embedding,
    positional_embedding, ln_final, text_projection, logit_scale; sgm deletes
    `transformer`), so the "svd" preset has a text tower with 0 blocks.
    """

    PRESETS: dict[str, tuple[str, str, dict[str, Any]]] = {
        "svd": ("sd2", "openclip_vit_h14", {"layers": 0}),
        "tiny_svd": ("tiny_sd2", "tiny_openclip", {"layers": 0}),
        "openclip_vit_h14": ("sd2", "openclip_vit_h14", {}),
    }

    def __init__(self, text: CLIPTextConfig | str, vision: CLIPVisionConfig | str):
        super().__init__(text)
        vision = _vision_cfg(vision)
        if vision.flavour != "openclip" or self.cfg.flavour != "openclip":
            raise ValueError("OpenCLIPModel needs openclip-flavoured text and vision configs")
        self.visual = OpenCLIPVisionTransformer(vision)

    @classmethod
    def from_preset(cls, name: str) -> "OpenCLIPModel":
        """'svd' (SVD's image encoder with the text leftovers), 'tiny_svd', 'openclip_vit_h14' (full model)."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown OpenCLIPModel preset {name!r}; choose from {sorted(cls.PRESETS)}")
        text, vision, changes = cls.PRESETS[name]
        return cls(CLIPTextConfig.preset(text, **changes), vision)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, S, S] (CLIP-normalised) -> image embedding [B, P]."""
        return self.visual(pixels)

    def encode_text(self, ids: torch.Tensor, output: Literal["hidden", "pooled", "projected"] = "projected") -> torch.Tensor:
        """ids [B, N] -> text features (see CLIPTextModel.forward); raises without text blocks."""
        return super().forward(ids, output)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """pixels [B, 3, S, S] (CLIP-normalised) -> image embedding [B, P], as SVD's conditioner calls it."""
        return self.encode_image(pixels)


# ---------------------------------------------------------------- image preprocessing

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {getattr(images, 'shape', type(images))}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be floating point, got {images.dtype}")


def clip_normalize(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> (x - CLIP mean) / CLIP std."""
    _check_images(images)
    mean = torch.tensor(CLIP_MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def clip_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """CLIP's image preprocessing in torch: [B, 3, H, W] in [-1, 1] -> [B, 3, size, size] normalised.

    Shorter side resized to `size` (longer side int(size·long/short), as torchvision's Resize),
    antialiased bicubic, clamped to [0, 1] as an 8-bit image would be, centre crop
    (offset round((H - size) / 2)), CLIP mean/std.
    """
    _check_images(images)
    x = (images + 1) / 2
    H, W = x.shape[-2:]
    short, long = min(H, W), max(H, W)
    long_new = int(size * long / short)
    hw = (size, long_new) if H <= W else (long_new, size)
    if hw != (H, W):
        x = F.interpolate(x, size=hw, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = int(round((hw[0] - size) / 2.0)), int(round((hw[1] - size) / 2.0))
    return clip_normalize(x[..., top:top + size, left:left + size])


def _gaussian_kernel(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normalised 1-D Gaussian of odd length `size`, centred."""
    x = torch.arange(size, dtype=dtype, device=device) - size // 2
    s = torch.tensor(sigma, dtype=dtype, device=device)
    g = torch.exp(-x.pow(2.0) / (2 * s.pow(2.0)))
    return g / g.sum()


def _blur_1d(x: torch.Tensor, kernel: torch.Tensor, dim: int) -> torch.Tensor:
    """Depthwise convolution of (B, C, H, W) along H (dim=2) or W (dim=3), reflect-padded."""
    C, k = x.shape[1], kernel.numel()
    pad = ((k - 1) // 2, k - 1 - (k - 1) // 2)
    if dim == 3:
        x, weight = F.pad(x, (*pad, 0, 0), mode="reflect"), kernel.view(1, 1, 1, k)
    else:
        x, weight = F.pad(x, (0, 0, *pad), mode="reflect"), kernel.view(1, 1, k, 1)
    return F.conv2d(x, weight.expand(C, 1, *weight.shape[2:]), groups=C)


def svd_resize(images: torch.Tensor, size: tuple[int, int] = (224, 224)) -> torch.Tensor:
    """The resize diffusers' SVD pipeline (and sgm, via kornia) applies to the conditioning image.

    Anti-aliasing first: a separable Gaussian blur with sigma = max((scale - 1) / 2, 0.001)
    per axis (skimage's rule), kernel length int(max(4·sigma, 3)) made odd, reflect padding,
    width pass then height pass; then bicubic interpolation with align_corners=True.
    images: [B, C, H, W] (any range) -> [B, C, size[0], size[1]].
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got {getattr(images, 'shape', type(images))}")
    H, W = images.shape[-2:]
    sigmas = [max((H / size[0] - 1.0) / 2.0, 0.001), max((W / size[1] - 1.0) / 2.0, 0.001)]
    ks = [int(max(4.0 * s, 3)) for s in sigmas]
    ks = [k + 1 if k % 2 == 0 else k for k in ks]
    x = _blur_1d(images, _gaussian_kernel(ks[1], sigmas[1], images.dtype, images.device), dim=3)
    x = _blur_1d(x, _gaussian_kernel(ks[0], sigmas[0], images.dtype, images.device), dim=2)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=True)


def svd_preprocess(images: torch.Tensor, size: tuple[int, int] = (224, 224)) -> torch.Tensor:
    """SVD's image-encoder input: [B, 3, H, W] in [-1, 1] -> svd_resize -> [0, 1] -> CLIP mean/std."""
    _check_images(images)
    return clip_normalize((svd_resize(images, size) + 1.0) / 2.0)
