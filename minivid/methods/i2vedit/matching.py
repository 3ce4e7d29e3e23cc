"""Fine-grained attention matching (I2VEdit §4.2, Eq. 6–9) as minivid attention processors, and the
source-attention store.

    ctl = MatchingController(MatchingConfig(beta=PRESETS["local"]), latent_hw=(h, w), frames=F)
    with install(svd.unet, ctl):            # processors on every spatial and temporal attn1
        ...                                 # ctl.phase = "record" during inversion, "match" during editing

Spatial attn1 (every layer, every step, the conditional half only; scores and softmax in fp32):

    D = Σ_keys mean_heads |A_src − A_edit| / 2, clamped to [0, 1]       (Eq. 7, per query token)
    M = 1 where D ≥ thr, else D       (the authors' code; the paper's Eq. 8 writes >: `compare=">"`)
    A = (1 − M)·A_src + M·A_edit                                         (Eq. 9)

with thr ramped over the frames from mask_thr[0] to mask_thr[1] (both 0.35 by default) as the code does,
A_src = softmax(Q_src K_srcᵀ/√d) from the source's Q and K at that layer's own resolution. The
unconditional half gets plain attention.

Temporal attn1 — the attention selector: at edit step j of N, the conditional half's attention
probabilities are the source's for every layer when j < ⌊β₁N⌋; for ⌊β₁N⌋ ≤ j < ⌊β₂N⌋ only for the
coarse layers (`layer_set="official"`: the down layers after the first four, the middle block and the
first two up layers, i.e. input_blocks.7/.8, middle_block, output_blocks.3/.4 in SVD — the authors'
code; `"paper"`: every layer at downscale ≥ 4 relative to the latent, which adds output_blocks.5);
after ⌊β₂N⌋ the edited ones. The downscale is read from each layer's token grid (`ctx.hw`), so any
aspect ratio works.

Step alignment: edit step j (at σ_j) reads the source attention of inversion record N−1−j, which the
inversion computed at σ_{j+1} (the authors' `len(store) − cur_step − 1`).

Where the source attention comes from (`SourceStore`): the authors write every record to disk (fp32;
3.23 GB per step at 576×1024, 14 frames). Here the default ("recompute") keeps only the inversion
trajectory and conditioning and re-runs the source through the UNet (batch 1, motion LoRA off) at each
edit step, which gives bitwise the attention the inversion saw; "stored" keeps, in memory, only the
records, layers and tensors the editing reads. `store_bytes` reports the footprints.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from minivid.attention import AttnContext, attention_layers, attention_probs, wrap_processors

__all__ = [
    "SPATIAL", "TEMPORAL", "PRESETS", "LAYER_SETS", "MatchingConfig", "MatchingController", "install",
    "downscale", "official_coarse_layers", "TemporalSelector", "spatial_match", "store_bytes", "layer_shapes",
    "needed", "keep_for", "temporal_names", "captured_bytes", "SpatialMatching", "TemporalMatching",
]

AUTHORS_TOKEN_CAP = 8 * 9 * 8 * 16     # attention_store.py: tensors with shape[-2] above it are not stored
SPATIAL = "*.transformer_blocks.*.attn1"
TEMPORAL = "*.time_stack.*.attn1"
# (β₁, β₂) of the paper's §5.1 (implementation details)
PRESETS = {"local": (0.5, 0.8), "global": (0.8, 0.9), "shape": (0.4, 0.5)}
LAYER_SETS = ("official", "paper")


@dataclass(frozen=True)
class MatchingConfig:
    steps: int = 25
    beta: tuple[float, float] = PRESETS["local"]
    layer_set: str = "official"
    mask_thr: tuple[float, float] = (0.35, 0.35)
    compare: str = ">="                  # ">=": the authors' code; ">": the paper's Eq. 8
    spatial: bool = True
    temporal: bool = True
    record_masks: bool = True            # keep M per layer and step (for the picture), fp16 on the CPU

    def __post_init__(self) -> None:
        b1, b2 = self.beta
        if not 0.0 <= b1 <= b2 <= 1.0:
            raise ValueError(f"MatchingConfig: beta must satisfy 0 <= β1 <= β2 <= 1, got {self.beta}")
        if self.layer_set not in LAYER_SETS:
            raise ValueError(f"MatchingConfig: layer_set must be one of {LAYER_SETS}, got {self.layer_set!r}")
        if self.compare not in (">=", ">"):
            raise ValueError(f"MatchingConfig: compare must be '>=' (code) or '>' (paper), got {self.compare!r}")


# ---------------------------------------------------------------- layer geometry

def downscale(hw: tuple[int, int], latent_hw: tuple[int, int]) -> int:
    """The power-of-two downscaling factor of a token grid relative to the latent grid (sides round up at
    each downsampling, e.g. 7×13 -> 4×7 -> 2×4), read from the token counts."""
    ratio = math.sqrt(latent_hw[0] * latent_hw[1] / (hw[0] * hw[1]))
    return 2 ** max(0, round(math.log2(ratio)))


def _block_key(name: str) -> tuple[int, int, str]:
    m = re.match(r"(input_blocks|middle_block|output_blocks)\.?(\d*)", name)
    region = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}[m.group(1)]
    return region, int(m.group(2) or 0), name


def official_coarse_layers(names: list[str]) -> set[str]:
    """The authors' middle-stage set by position (attention_util.py `copy_v2`): temporal layers of the
    down path after the first four, all of the middle block, the first two of the up path."""
    ordered = sorted(names, key=_block_key)
    down = [n for n in ordered if n.startswith("input_blocks")]
    up = [n for n in ordered if n.startswith("output_blocks")]
    mid = [n for n in ordered if n.startswith("middle_block")]
    return set(down[4:]) | set(mid) | set(up[:2])


class TemporalSelector:
    """Which temporal layers take the source's attention at edit step j (of `steps`)."""

    def __init__(self, steps: int, beta: tuple[float, float], layer_set: str, temporal_names: list[str]):
        self.steps = steps
        self.bounds = (int(beta[0] * steps), int(beta[1] * steps))   # ⌊β₁N⌋, ⌊β₂N⌋
        self.layer_set = layer_set
        self.official = official_coarse_layers(temporal_names)

    def stage(self, step: int) -> int:
        return 0 if step < self.bounds[0] else 1 if step < self.bounds[1] else 2

    def coarse(self, name: str, hw: tuple[int, int], latent_hw: tuple[int, int]) -> bool:
        if self.layer_set == "official":
            return name in self.official
        return downscale(hw, latent_hw) >= 4

    def copies(self, step: int, name: str, hw: tuple[int, int], latent_hw: tuple[int, int]) -> bool:
        stage = self.stage(step)
        return stage == 0 or (stage == 1 and self.coarse(name, hw, latent_hw))


# ---------------------------------------------------------------- the spatial matching arithmetic

def spatial_match(q: Tensor, k: Tensor, v: Tensor, q_src: Tensor, k_src: Tensor, scale: float,
                  thr: float, compare: str = ">=", chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """One frame of Eq. 7–9: q, k, v [h, N, d] (edited), q_src, k_src [h, N, d] -> (out [h, N, d] fp32, M [N]).
    Scores and softmax in fp32. Every query row is independent, so the rows go `chunk` at a time: two
    [h, chunk, N] maps instead of two [h, N, N] ones (at 576×1024, 0.2 GB instead of 3.4 GB)."""
    kf, ksf, vf = k.float().transpose(-1, -2), k_src.float().transpose(-1, -2), v.float()
    outs, ms = [], []
    for s in range(0, q.shape[1], chunk):
        a_edit = (torch.matmul(q[:, s:s + chunk].float(), kf) * scale).softmax(-1)           # [h, c, M]
        a_src = (torch.matmul(q_src[:, s:s + chunk].float(), ksf) * scale).softmax(-1)
        d = (a_src - a_edit).abs().mean(0).sum(-1).clamp(0, 2) / 2                           # [c]
        hit = d >= thr if compare == ">=" else d > thr
        m = torch.where(hit, torch.ones_like(d), d)
        a = (1 - m)[None, :, None] * a_src + m[None, :, None] * a_edit
        outs.append(torch.matmul(a, vf))
        ms.append(m)
    return torch.cat(outs, 1), torch.cat(ms)


# ---------------------------------------------------------------- the controller and its processors

class MatchingController:
    """State the processors share. The pipeline sets `phase` ("off", "record", "match"), `step` (the edit
    step in "match"), `source` ({layer: {"q","k"} or {"probs"}} for that step) and, for skip-interval
    attention, `kv_source` / `kv_record`. In "record", `keep(name, kind)` decides what is kept in `captured`.
    """

    def __init__(self, cfg: MatchingConfig, latent_hw: tuple[int, int], frames: int, temporal_names: list[str]):
        self.cfg = cfg
        self.latent_hw = tuple(latent_hw)
        self.frames = frames
        self.selector = TemporalSelector(cfg.steps, cfg.beta, cfg.layer_set, temporal_names)
        self.phase = "off"
        self.step = 0
        self.source: dict[str, dict[str, Tensor]] = {}
        self.captured: dict[str, dict[str, Tensor]] = {}
        self.keep = lambda name, kind, hw: True         # record everything (the authors' store)
        self.record_to: Any = None                       # device for captured tensors (None: where they are)
        self.kv_source: dict[str, tuple[Tensor, Tensor]] | None = None
        self.kv_record: dict[str, tuple[Tensor, Tensor]] | None = None
        self.kv_to: Any = None                           # where recorded K/V are kept (None: where computed)
        self.masks: dict[tuple[str, int], Tensor] = {}   # (layer, step) -> M [F, N] (fp16, CPU)
        self.copied: dict[int, list[str]] = {}           # step -> temporal layers that took the source's maps
        self.hw: dict[str, tuple[int, int]] = {}         # layer -> token grid seen
        self.order: list[str] = []                       # attn1 layers in call order (seen in the first call)
        self.stop_after: str | None = None               # "record": end the forward after this layer

    def _seen(self, ctx: AttnContext) -> None:
        if ctx.hw is not None:
            self.hw[ctx.name] = tuple(ctx.hw)
        if ctx.name not in self.order:
            self.order.append(ctx.name)

    def _maybe_stop(self, ctx: AttnContext) -> None:
        if self.stop_after is not None and ctx.name == self.stop_after:
            raise StopForward

    def last_needed(self, keep) -> str | None:
        """The last layer, in call order, of which `keep` wants a tensor (the recomputation ends there)."""
        last = None
        for name in self.order:
            kinds = ("probs",) if "time_stack" in name else ("q", "k")
            if any(keep(name, kind, self.hw.get(name)) for kind in kinds):
                last = name
        return last

    def _capture(self, ctx: AttnContext, kind: str, t: Tensor) -> None:
        if self.keep(ctx.name, kind, tuple(ctx.hw)):
            t = t.detach()
            self.captured.setdefault(ctx.name, {})[kind] = t.to(self.record_to) if self.record_to is not None else t

    def thresholds(self) -> list[float]:
        t0, t1 = self.cfg.mask_thr
        return [(t1 - t0) / self.frames * f + t0 for f in range(self.frames)]


class StopForward(Exception):
    """Raised by a recording processor after the last layer a recomputation needs."""


class SpatialMatching:
    """The spatial attn1 wrapper of Eq. 7–9: records Q/K in "record", matches in "match", else `inner`."""

    def __init__(self, inner, ctl: MatchingController):
        self.inner, self.ctl = inner, ctl

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> Tensor:
        ctl = self.ctl
        ctl._seen(ctx)
        if ctl.phase == "record":
            ctl._capture(ctx, "q", q)
            ctl._capture(ctx, "k", k)
            ctl._maybe_stop(ctx)
            return F.scaled_dot_product_attention(q, k, v, scale=ctx.scale)      # the authors' inversion: sdpa
        if ctl.phase != "match" or not ctl.cfg.spatial:
            return self.inner(q, k, v, ctx)
        src = ctl.source[ctx.name]
        Fr = ctl.frames
        first_cond = q.shape[0] - Fr                       # [uncond frames; cond frames] or cond frames only
        masks = []
        # unconditional half: plain attention in fp32 (fused, no N×N map)
        outs = list(F.scaled_dot_product_attention(q[:first_cond].float(), k[:first_cond].float(),
                                                   v[:first_cond].float(), scale=ctx.scale).unbind(0))
        thr = ctl.thresholds()
        for f in range(Fr):
            i = first_cond + f
            out, m = spatial_match(q[i], k[i], v[i], src["q"][f].to(q.device), src["k"][f].to(q.device), ctx.scale,
                                   thr[f], ctl.cfg.compare)
            outs.append(out)
            masks.append(m)
        if ctl.cfg.record_masks:
            ctl.masks[ctx.name, ctl.step] = torch.stack(masks).to("cpu", torch.float16)
        return torch.stack(outs).to(q.dtype)


class TemporalMatching:
    """The temporal attn1 wrapper: the selector (β₁, β₂) in "match", probabilities in "record",
    skip-interval K/V concatenation whenever the controller holds clip 0's K/V; else `inner`."""

    def __init__(self, inner, ctl: MatchingController):
        self.inner, self.ctl = inner, ctl

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> Tensor:
        ctl = self.ctl
        ctl._seen(ctx)
        if ctl.kv_record is not None:                      # skip-interval: clip 0 keeps its K/V
            kk, vv = k.detach(), v.detach()
            ctl.kv_record[ctx.name] = (kk, vv) if ctl.kv_to is None else (kk.to(ctl.kv_to), vv.to(ctl.kv_to))
        if ctl.kv_source is not None:                      # skip-interval: K = [K_clip0; K], V likewise
            k0, v0 = ctl.kv_source[ctx.name]
            k = torch.cat([k0.to(k), k], dim=2)
            v = torch.cat([v0.to(v), v], dim=2)
        if ctl.phase == "record":
            probs = attention_probs(q, k, ctx)
            ctl._capture(ctx, "probs", probs)
            ctl._maybe_stop(ctx)
            return torch.matmul(probs, v)
        if ctl.phase != "match" or not ctl.cfg.temporal:
            return self.inner(q, k, v, ctx)
        probs = attention_probs(q, k, ctx)
        if ctl.selector.copies(ctl.step, ctx.name, ctx.hw, ctl.latent_hw):
            src = ctl.source[ctx.name]["probs"].to(probs)
            n = src.shape[0]
            probs = src if probs.shape[0] == n else torch.cat([probs[: probs.shape[0] - n], src])
            ctl.copied.setdefault(ctl.step, []).append(ctx.name)
        return torch.matmul(probs, v)


@contextlib.contextmanager
def install(unet: torch.nn.Module, ctl: MatchingController, spatial: Any = None, temporal: Any = None,
            spatial_layers: Any = SPATIAL, temporal_layers: Any = TEMPORAL) -> Iterator[MatchingController]:
    """Matching processors on every spatial and temporal attn1 of `unet` for the duration of the block:
    `spatial(inner, ctl)` (default `SpatialMatching`) pushed on `spatial_layers`, `temporal(inner, ctl)`
    (default `TemporalMatching`) on `temporal_layers` (`minivid.attention.wrap_processors`)."""
    spatial, temporal = spatial or SpatialMatching, temporal or TemporalMatching
    with wrap_processors(unet, spatial_layers, lambda inner: spatial(inner, ctl)), \
            wrap_processors(unet, temporal_layers, lambda inner: temporal(inner, ctl)):
        yield ctl


def temporal_names(unet: torch.nn.Module) -> list[str]:
    return list(attention_layers(unet, TEMPORAL))


# ---------------------------------------------------------------- what the editing reads

def needed(kind: str, name: str, edit_step: int, ctl: MatchingController, hw: tuple[int, int]) -> bool:
    """Does edit step `edit_step` read `kind` of layer `name`? (the stored mode keeps only these)"""
    if kind in ("q", "k"):
        return ctl.cfg.spatial
    return ctl.cfg.temporal and ctl.selector.copies(edit_step, name, hw, ctl.latent_hw)


def keep_for(edit_step: int, ctl: MatchingController):
    """The `keep` filter of a record read by edit step `edit_step`."""
    return lambda name, kind, hw: needed(kind, name, edit_step, ctl, hw)


# ---------------------------------------------------------------- footprints

@dataclass
class LayerShape:
    name: str
    kind: str            # "spatial" | "temporal"
    hw: tuple[int, int]
    heads: int
    dim_head: int


def layer_shapes(unet_cfg, latent_hw: tuple[int, int], frames: int) -> list[LayerShape]:
    """Every attn1 layer's token grid, heads and head width for a latent size, in call order, computed
    from the UNet config (no model, no forward: microseconds at any size).

    The layout is the UNet's (`minivid.unet.UNet.__init__`): `input_blocks.0` is the input conv, then per
    level ℓ (channels `model_channels · channel_mult[ℓ]`) `num_res_blocks` blocks, each with a
    transformer at position 1 when the level's downscale 2^ℓ is in `attention_resolutions`, and a
    Downsample block after every level but the last; the middle block's transformer (`middle_block.1`)
    at the deepest level; on the way up `num_res_blocks + 1` blocks per level, deepest first, with the
    level's transformer at position 1. Every transformer has `transformer_depth` spatial blocks, each
    followed (SVD) by its temporal block: `transformer_blocks.d.attn1` then `time_stack.d.attn1`.
    Token grids: a Downsample (3×3 conv, stride 2, padding 1) rounds each side up, H -> ⌈H/2⌉, and the
    up path meets the skips' grids, so level ℓ has the same grid down and up. Heads and head width:
    `unet_cfg.heads(channels)`. `frames` does not change the list (kept for the callers' signature).
    tests/test_i2vedit_layer_shapes.py checks it against a forward of the real UNet on the meta device."""
    from minivid.unet_video import VideoUNetConfig

    del frames
    h, w = (int(v) for v in latent_hw)
    if h < 1 or w < 1:
        raise ValueError(f"layer_shapes: latent size must be positive, got {latent_hw}")
    grids = []
    for _ in unet_cfg.channel_mult:
        grids.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    temporal = isinstance(unet_cfg, VideoUNetConfig)           # SVD: a temporal block after each spatial one
    shapes: list[LayerShape] = []

    def transformer(prefix: str, level: int) -> None:
        heads, dim_head = unet_cfg.heads(unet_cfg.model_channels * unet_cfg.channel_mult[level])
        for d in range(unet_cfg.transformer_depth):
            shapes.append(LayerShape(f"{prefix}.transformer_blocks.{d}.attn1", "spatial", grids[level], heads, dim_head))
            if temporal:
                shapes.append(LayerShape(f"{prefix}.time_stack.{d}.attn1", "temporal", grids[level], heads, dim_head))

    last = len(unet_cfg.channel_mult) - 1
    block = 1
    for level in range(last + 1):
        for _ in range(unet_cfg.num_res_blocks):
            if 2 ** level in unet_cfg.attention_resolutions:
                transformer(f"input_blocks.{block}.1", level)
            block += 1
        block += level != last                                   # the Downsample block
    transformer("middle_block.1", last)
    block = 0
    for level in range(last, -1, -1):
        for _ in range(unet_cfg.num_res_blocks + 1):
            if 2 ** level in unet_cfg.attention_resolutions:
                transformer(f"output_blocks.{block}.1", level)
            block += 1
    return shapes


def store_bytes(unet_cfg, latent_hw: tuple[int, int], frames: int, steps: int = 25,
                matching: MatchingConfig | None = None, bytes_per_value: int = 4) -> dict[str, dict[str, float]]:
    """Bytes of the source-attention store per step and per clip, for
    - "official": the authors' disk store, every record's spatial attn1 Q and K ([F, heads, N, d]) and
      temporal attn1 probabilities ([N, heads, F, F]) in fp32, except spatial layers over 9216 tokens
      (their cap; it binds only above 576×1024);
    - "stored": only what the editing reads (all spatial Q/K; the temporal maps of the records the
      selector copies, for the layers it copies);
    - "recompute": the inversion trajectory (steps + 1 latents) and the conditioning (the CLIP embedding,
      two conditioning latents, the time ids).
    "per_step" of stored/recompute is the per-clip figure divided by `steps`.
    """
    cfg = matching or MatchingConfig(steps=steps)
    if cfg.steps != steps:
        cfg = MatchingConfig(**{**cfg.__dict__, "steps": steps})
    shapes = layer_shapes(unet_cfg, latent_hw, frames)
    temporal = [s.name for s in shapes if s.kind == "temporal"]
    ctl = MatchingController(cfg, latent_hw, frames, temporal)
    b = bytes_per_value

    def spatial(s):
        return 2 * frames * s.heads * s.hw[0] * s.hw[1] * s.dim_head * b

    def tmaps(s):
        return s.hw[0] * s.hw[1] * s.heads * frames * frames * b

    # the authors keep a tensor only when its shape[-2] <= 8·9·8·16 = 9216 (attention_store.py
    # AttentionStore.forward): spatial q/k [F, h, N, d] of a layer over 9216 tokens are not stored
    official_step = sum((spatial(s) if s.hw[0] * s.hw[1] <= AUTHORS_TOKEN_CAP else 0) if s.kind == "spatial" else tmaps(s)
                        for s in shapes)
    stored_clip = 0
    for j in range(steps):
        for s in shapes:
            if s.kind == "spatial":
                stored_clip += spatial(s) if cfg.spatial else 0
            elif needed("probs", s.name, j, ctl, s.hw):
                stored_clip += tmaps(s)
    h, w = latent_hw
    latent = frames * unet_cfg.out_channels * h * w * 4
    cond = unet_cfg.context_dim * 4 + 2 * unet_cfg.out_channels * h * w * 4 + 3 * 4
    recompute_clip = (steps + 1) * latent + cond
    out = {
        "official": {"per_step": official_step, "per_clip": official_step * steps},
        "stored": {"per_step": stored_clip / steps, "per_clip": stored_clip},
        "recompute": {"per_step": recompute_clip / steps, "per_clip": recompute_clip},
    }
    return out


def captured_bytes(records) -> int:
    """Bytes of a {record: {layer: {kind: tensor}}} store (or one record's {layer: {kind: tensor}})."""
    total = 0
    for value in records.values():
        if isinstance(value, Tensor):
            total += value.numel() * value.element_size()
        else:
            total += captured_bytes(value)
    return total
