"""MUSIQ (Ke et al., "MUSIQ: Multi-scale Image Quality Transformer", ICCV 2021, arXiv:2108.05997)
as VBench's imaging quality runs it: pyiqa's PyTorch port with the SPAQ-trained head.

The official file is pyiqa's `musiq_spaq_ckpt-358bb6af.pth` (the weights VBench downloads); its keys
are this module's names: `conv_root`, `gn_root`, `block1.{conv1, gn1, conv2, gn2, conv3, gn3,
conv_proj, gn_proj}`, `embedding`, `transformer_encoder.{posembed_input.position_emb,
scaleembed_input.scale_emb, cls, encoder_norm, transformer.encoderblock_N.{norm1,
attention.{query, key, value, out}, norm2, mlp.{fc1, fc2}}}`, `head`.

The model, as pyiqa's `MUSIQ.forward` in eval mode:
1. the image in [0, 1] is mapped to [-1, 1] and cut into `patch_size` patches at several scales
   (`multiscale_patches`): the image resized (bicubic, aspect kept) so its longer side is each of
   `longer_side_lengths`, each cut into at most ceil(L / p)^2 patches (zero-padded to that count,
   the padding masked out), then the original resolution with all its patches; "SAME" zero padding
   to whole patches. Each patch carries its hashed spatial position (the patch grid mapped onto a
   `grid` x `grid` table by nearest-neighbour), its scale index and its mask bit.
2. every patch goes through a ResNet stem (weight-standardised convolutions, GroupNorm) and a
   bottleneck, flattened in (h, w, c) order (TensorFlow's), and a Linear to the token width;
3. hashed-position and scale embeddings are added, a class token is prepended, and pre-norm
   transformer blocks run with the mask (masked logits set to -1000, pyiqa's value);
4. the head maps the final class token to the score (SPAQ: one number, 0..100).

VBench (imaging_quality.py, "longer" mode, its default) first resizes a frame whose longer side
exceeds 512 to (int(s·h), int(s·w)) with s = 512 / max(h, w) (bilinear, no antialias, on the float
0..255 frame), and reports the mean frame score / 100 (`vbench_imaging_quality_preprocess`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from minivid.clip import CLIPMLP, Block, SelfAttention

__all__ = [
    "MUSIQConfig", "MUSIQ_PRESETS", "MUSIQ", "MUSIQ_SOURCE", "load_musiq", "multiscale_patches", "same_padding",
    "hashed_positions", "musiq_resized_size", "vbench_imaging_size", "vbench_imaging_quality_preprocess",
    "VBENCH_IMAGING_LONGER_SIDE", "score_frames", "imaging_quality", "StdConv", "Bottleneck", "TransformerBlock",
    "TransformerEncoder",
]

MASKED_LOGIT = -1e3                 # pyiqa's MultiHeadAttention: attn.masked_fill(mask2d == 0, -1e3)
VBENCH_IMAGING_LONGER_SIDE = 512    # VBench imaging_quality.py, transform(..., 'longer')
MUSIQ_SOURCE = ("pyiqa's (IQA-PyTorch) weights release v0.1-weights: musiq_spaq_ckpt-358bb6af.pth "
                "(https://github.com/chaofengc/IQA-PyTorch/releases/download/v0.1-weights/musiq_spaq_ckpt-358bb6af.pth, "
                "the URL VBench downloads)")


@dataclass(frozen=True)
class MUSIQConfig:
    """pyiqa's MUSIQ arguments (its defaults = the released models'); `num_classes` 1 for the
    SPAQ/KonIQ heads (a score), 10 for AVA (a distribution whose mean is the score)."""

    patch_size: int = 32
    width: int = 384                 # hidden_size
    mlp_width: int = 1152
    heads: int = 6
    layers: int = 14
    num_scales: int = 3              # scale embeddings: one per resized scale + the original resolution
    grid: int = 10                   # spatial_pos_grid_size
    stem_width: int = 64             # pyiqa's resnet_token_dim (fixed there)
    num_classes: int = 1
    longer_side_lengths: tuple[int, ...] = (224, 384)
    max_seq_len_from_original_res: int | None = -1   # -1: every patch of the original resolution; None: not used

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.patch_size % 4:
            raise ValueError(f"patch_size {self.patch_size} must be a multiple of 4 (the stem downsamples by 4)")
        scales = len(self.longer_side_lengths) + (self.max_seq_len_from_original_res is not None)
        if scales > self.num_scales:
            raise ValueError(f"{scales} scales need {scales} scale embeddings, the config has {self.num_scales}")


MUSIQ_PRESETS: dict[str, MUSIQConfig] = {
    "musiq_spaq": MUSIQConfig(),
    "musiq_ava": MUSIQConfig(num_classes=10),
    "tiny_musiq": MUSIQConfig(patch_size=16, width=32, mlp_width=64, heads=4, layers=2, grid=4, stem_width=32,
                              longer_side_lengths=(32, 48)),
}


# ---------------------------------------------------------------- the integer side of the preprocessing

def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding of one axis -> (before, after): output ceil(size / stride)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def musiq_resized_size(h: int, w: int, longer_side: int) -> tuple[int, int]:
    """The multiscale resize's output size: (round(h·r), round(w·r)), r = longer_side / max(h, w)
    (Python's round, as pyiqa's `resize_preserve_aspect_ratio`)."""
    ratio = longer_side / max(h, w)
    return round(h * ratio), round(w * ratio)


def vbench_imaging_size(h: int, w: int, longer_side: int = VBENCH_IMAGING_LONGER_SIDE) -> tuple[int, int]:
    """VBench's frame size for imaging quality ("longer" mode): unchanged when max(h, w) <= 512,
    else (int(s·h), int(s·w)) with s = 512. / max(h, w) (truncation, as VBench writes it)."""
    if max(h, w) <= longer_side:
        return h, w
    scale = float(longer_side) / max(h, w)
    return int(scale * h), int(scale * w)


def hashed_positions(grid: int, count_h: int, count_w: int) -> torch.Tensor:
    """Hashed spatial position of each patch of a count_h x count_w grid, row-major -> [count_h·count_w]
    int64 in [0, grid²): the grid x grid table sampled by nearest neighbour (torch's 'nearest')."""
    table = torch.arange(grid, dtype=torch.float32).view(1, 1, grid)
    rows = F.interpolate(table, size=count_h, mode="nearest").view(count_h).long()
    cols = F.interpolate(table, size=count_w, mode="nearest").view(count_w).long()
    return (rows[:, None] * grid + cols[None, :]).reshape(-1)


def _patches(image: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, ceil(H/p)·ceil(W/p), C·p·p] non-overlapping patches after SAME zero padding,
    each flattened in (c, y, x) order, patches row-major."""
    n, c, h, w = image.shape
    (top, bottom), (left, right) = same_padding(h, p, p), same_padding(w, p, p)
    x = F.pad(image, (left, right, top, bottom))
    gh, gw = x.shape[-2] // p, x.shape[-1] // p
    return x.view(n, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * p * p)


def multiscale_patches(image: torch.Tensor, cfg: MUSIQConfig) -> tuple[torch.Tensor, ...]:
    """image [N, 3, H, W] in [-1, 1] -> (patches [N, L, 3·p·p], spatial [N, L], scale [N, L], mask [N, L])
    with L = Σ over scales (pyiqa's get_multiscale_patches, its tensors kept apart)."""
    n, _, h, w = image.shape
    p = cfg.patch_size
    parts = []
    scales = [(s, *musiq_resized_size(h, w, s)) for s in sorted(cfg.longer_side_lengths)]
    if cfg.max_seq_len_from_original_res is not None:
        scales.append((None, h, w))
    for scale_id, (longer, rh, rw) in enumerate(scales):
        img = image if longer is None else F.interpolate(image, (rh, rw), mode="bicubic", align_corners=False)
        patches = _patches(img, p)
        count = patches.shape[1]
        spatial = hashed_positions(cfg.grid, math.ceil(rh / p), math.ceil(rw / p)).to(image.device)
        mask = torch.ones(count, dtype=torch.bool, device=image.device)
        max_len = math.ceil(longer / p) ** 2 if longer is not None else cfg.max_seq_len_from_original_res
        if max_len >= 0:                         # pad with zeros (masked out) or cut to max_len
            pad = max(max_len - count, 0)
            patches = F.pad(patches, (0, 0, 0, pad))[:, :max_len]
            spatial = F.pad(spatial, (0, pad))[:max_len]
            mask = F.pad(mask, (0, pad))[:max_len]
        length = patches.shape[1]
        scale = torch.full((length,), scale_id, dtype=torch.long, device=image.device)
        scale = scale.masked_fill(~mask, 0)     # padding carries scale 0, hash 0, mask 0 (pyiqa's zeros)
        parts.append((patches, spatial.expand(n, -1), scale.expand(n, -1), mask.expand(n, -1)))
    return tuple(torch.cat(t, dim=1) for t in zip(*parts))


def vbench_imaging_quality_preprocess(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [F, 3, H, W] -> VBench's MUSIQ input in [0, 1]: the 0..255 frames as float32,
    resized to `vbench_imaging_size` (bilinear, align_corners=False, no antialias) when the longer
    side exceeds 512, divided by 255."""
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be uint8 [F, 3, H, W], got {frames.dtype} {tuple(frames.shape)}")
    x = frames.float()
    h, w = x.shape[-2:]
    size = vbench_imaging_size(h, w)
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    return x / 255.0


# ---------------------------------------------------------------- the network

class StdConv(nn.Conv2d):
    """Weight-standardised convolution with TensorFlow "SAME" zero padding (pyiqa's StdConv):
    w' = (w - mean(w)) / (std(w, unbiased) + 1e-5) per output channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        (top, bottom), (left, right) = same_padding(x.shape[-2], kh, sh), same_padding(x.shape[-1], kw, sw)
        x = F.pad(x, (left, right, top, bottom))
        weight = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        weight = weight / (weight.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, weight, self.bias, self.stride)


class Bottleneck(nn.Module):
    """`block1`: 1x1, 3x3, 1x1 StdConvs with GroupNorm(32, eps 1e-4), a projected shortcut."""

    def __init__(self, width: int, out: int):
        super().__init__()
        self.conv1, self.gn1 = StdConv(width, width, 1, bias=False), nn.GroupNorm(32, width, eps=1e-4)
        self.conv2, self.gn2 = StdConv(width, width, 3, bias=False), nn.GroupNorm(32, width, eps=1e-4)
        self.conv3, self.gn3 = StdConv(width, out, 1, bias=False), nn.GroupNorm(32, out, eps=1e-4)
        self.conv_proj, self.gn_proj = StdConv(width, out, 1, bias=False), nn.GroupNorm(32, out, eps=1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.gn_proj(self.conv_proj(x))
        x = F.relu(self.gn1(self.conv1(x)))
        x = F.relu(self.gn2(self.conv2(x)))
        return F.relu(self.gn3(self.conv3(x)) + identity)


class MUSIQSelfAttention(SelfAttention):
    """pyiqa names: `query`, `key`, `value`, `out` (all with bias)."""

    def __init__(self, width: int, heads: int):
        super().__init__(width, heads)
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    @property
    def out_proj(self) -> nn.Linear:                  # the name SelfAttention.forward projects with
        return self.out

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.query(x), self.key(x), self.value(x)


class TransformerBlock(Block):
    """pyiqa names: norm1, attention, norm2, mlp.fc1, mlp.fc2 (exact GELU), LayerNorm eps 1e-6."""

    def __init__(self, cfg: MUSIQConfig):
        super().__init__(("norm1", "attention", "norm2", "mlp"), nn.LayerNorm(cfg.width, eps=1e-6),
                         MUSIQSelfAttention(cfg.width, cfg.heads), nn.LayerNorm(cfg.width, eps=1e-6),
                         CLIPMLP(cfg.width, cfg.mlp_width, "gelu"))


class _PositionEmbs(nn.Module):
    def __init__(self, grid: int, width: int):
        super().__init__()
        self.position_emb = nn.Parameter(torch.empty(1, grid * grid, width).normal_(std=0.02))


class _ScaleEmbs(nn.Module):
    def __init__(self, num_scales: int, width: int):
        super().__init__()
        self.scale_emb = nn.Parameter(torch.empty(num_scales, width).normal_(std=0.02))


class TransformerEncoder(nn.Module):
    """`transformer_encoder`: position/scale embeddings, class token, blocks, `encoder_norm`."""

    def __init__(self, cfg: MUSIQConfig):
        super().__init__()
        self.posembed_input = _PositionEmbs(cfg.grid, cfg.width)
        self.scaleembed_input = _ScaleEmbs(cfg.num_scales, cfg.width)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.encoder_norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.transformer = nn.ModuleDict({f"encoderblock_{i}": TransformerBlock(cfg) for i in range(cfg.layers)})

    def forward(self, x: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.posembed_input.position_emb[0][spatial] + self.scaleembed_input.scale_emb[scale]
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        attn_mask = None
        if not bool(mask.all()):                # (B, 1, N, N) additive: -1000 where query or key is padding
            valid = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
            pair = valid[:, None, :, None] & valid[:, None, None, :]
            attn_mask = torch.zeros(pair.shape, dtype=x.dtype, device=x.device).masked_fill(~pair, MASKED_LOGIT)
        for block in self.transformer.values():
            x = block(x, attn_mask)
        return self.encoder_norm(x)


class MUSIQ(nn.Module):
    """forward(images [B, 3, H, W] in [0, 1]) -> quality score [B] (SPAQ: 0..100; AVA: 1..10).

    All images of a batch have one size (they share the patch layout); `score_patches` takes
    ready patches."""

    def __init__(self, cfg: MUSIQConfig | str = "musiq_spaq"):
        super().__init__()
        cfg = MUSIQ_PRESETS[cfg] if isinstance(cfg, str) else cfg
        self.cfg = cfg
        s = cfg.stem_width
        self.conv_root = StdConv(3, s, 7, 2, bias=False)
        self.gn_root = nn.GroupNorm(32, s, eps=1e-6)
        self.block1 = Bottleneck(s, 4 * s)
        self.embedding = nn.Linear(4 * s * (cfg.patch_size // 4) ** 2, cfg.width)
        self.transformer_encoder = TransformerEncoder(cfg)
        self.head = nn.Linear(cfg.width, cfg.num_classes)

    def stem(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, L, 3·p·p] -> tokens [B, L, width]."""
        b, length, _ = patches.shape
        p = self.cfg.patch_size
        x = patches.reshape(b * length, 3, p, p)
        x = F.relu(self.gn_root(self.conv_root(x)))
        (top, bottom), (left, right) = same_padding(x.shape[-2], 3, 2), same_padding(x.shape[-1], 3, 2)
        x = F.max_pool2d(F.pad(x, (left, right, top, bottom)), 3, 2)   # after ReLU, zero padding = pyiqa's
        x = self.block1(x)
        return self.embedding(x.permute(0, 2, 3, 1).reshape(b, length, -1))   # TensorFlow's (h, w, c) order

    def score_patches(self, patches: torch.Tensor, spatial: torch.Tensor, scale: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
        x = self.transformer_encoder(self.stem(patches), spatial, scale, mask)
        q = self.head(x[:, 0])
        if self.cfg.num_classes == 1:
            return q[:, 0]
        q = q.softmax(dim=-1)                   # pyiqa: a distribution over 1..C, its mean is the score
        return (q * torch.arange(1, q.shape[-1] + 1, device=q.device, dtype=q.dtype)).sum(-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got {getattr(images, 'shape', type(images))}")
        x = (images.to(self.head.weight.dtype) - 0.5) * 2
        return self.score_patches(*multiscale_patches(x, self.cfg))


def load_musiq(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> MUSIQ:
    """pyiqa's MUSIQ file (`musiq_spaq_ckpt-358bb6af.pth`, read with weights_only=True) -> MUSIQ, strict.
    A `module.` prefix (data-parallel training) is dropped, as pyiqa's loader does."""
    from minivid.eval.encoders import _load_strict, _read, match_preset

    sd = _read(path, "MUSIQ (SPAQ)", MUSIQ_SOURCE)
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    builders = {name: (lambda c=c: MUSIQ(c)) for name, c in MUSIQ_PRESETS.items()}
    _, build = match_preset(path, sd, builders, "MUSIQ (pyiqa's musiq_spaq_ckpt-358bb6af.pth)")
    return _load_strict(build, sd).to(device=device, dtype=dtype).eval()


def score_frames(model: MUSIQ, frames: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """VBench imaging quality's per-frame MUSIQ scores: uint8 frames [F, 3, H, W] -> [F] (0..100)."""
    x = vbench_imaging_quality_preprocess(frames)
    p = next(model.parameters())
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch_size].to(device=p.device, dtype=p.dtype)).float().cpu()
                          for i in range(0, len(x), batch_size)])


def imaging_quality(scores: torch.Tensor) -> tuple[float, list[float]]:
    """VBench's imaging quality of one video: mean MUSIQ (SPAQ) frame score / 100 -> (value, per-frame scores)."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or not len(scores):
        raise ValueError(f"scores must be [F] with F >= 1, got {getattr(scores, 'shape', type(scores))}")
    return (scores.double().mean() / 100).item(), scores.float().tolist()

