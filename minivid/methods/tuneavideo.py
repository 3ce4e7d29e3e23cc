"""Tune-A-Video's two video blocks on the SD UNet: sparse-causal self-attention and temporal attention.

Tune-A-Video (Wu et al., "Tune-A-Video: One-Shot Tuning of Image Diffusion Models for
Text-to-Video Generation", ICCV 2023, arXiv:2212.11565) inflates SD into a video model with two changes to every
BasicTransformerBlock; TCVE builds on it, and the EI² benchmark uses it as its baseline.

1. Sparse-causal self-attention (`sparse_causal`, a processor for the `attn1` layers): the
   queries of frame f attend to the tokens of frame 0 and of frame f-1. In the official code
   (`SparseCausalAttention`) the key/value frames are [0, max(f-1, 0)], so frame 0 attends to
   its own tokens twice. A key repeated twice gets half the weight in each copy, so frame 0's
   output equals plain self-attention within frame 0 (up to rounding); we keep the duplicated
   keys to reproduce the official arithmetic exactly, except for a one-frame "video", which runs
   plain self-attention so that it equals the image model exactly.
   Keys and values are projected per token, so gathering projected K/V rows equals projecting
   the gathered hidden states, which is what the official code does.

2. Temporal attention (`attn_temp`, `norm_temp`): after the feed-forward, every spatial
   location attends over the frames: [(B·F), N, C] -> [(B·N), F, C], x + attn_temp(norm_temp(x)),
   back. No positional encoding (as the official code). The output projection starts at zero,
   so at initialisation the block is unchanged.

Block order in the official `BasicTransformerBlock.forward`: attn1 (sparse-causal) -> attn2
(cross) -> ff -> attn_temp, each pre-norm and residual.

Frames are contiguous per video in the batch ((B F) ordering, frame index fastest). The frame
count F reaches the layers through `minivid.attention.call_state(unet, frames=F)`.

    inflate_for_tuneavideo(unet)                       # in place: processors + temporal blocks
    with call_state(unet, frames=8):
        eps = unet(latents, t, context)                # latents: [(B·8), 4, h, w]
"""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from minivid.attention import SPATIAL_SELF, Attention, AttnContext, Processor, frame_count, name_layers, sdpa, set_processor

__all__ = [
    "TRAINABLE", "frames_of", "sparse_causal_kv", "sparse_causal", "temporal_attention",
    "init_temporal_attention", "TemporalAttention", "TemporalBlockMixin", "temporal_block_class",
    "inflate_for_tuneavideo",
]

# Parameters Tune-A-Video tunes (official `trainable_modules`: attn1.to_q, attn2.to_q, attn_temp);
# globs for minivid.tuning.select_parameters. norm_temp stays frozen, as in the official code.
TRAINABLE = ("*attn1.to_q.*", "*attn2.to_q.*", "*attn_temp.*")


def frames_of(state: dict[str, Any], batch: int) -> int:
    """The frame count F set by `call_state(model, frames=F)`, checked against a (B·F) batch
    (`minivid.attention.frame_count`)."""
    return frame_count(state, batch)


# ---------------------------------------------------------------- 1. sparse-causal attention

def sparse_causal_kv(k: torch.Tensor, v: torch.Tensor, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values of frame f := those of frames [0, max(f-1, 0)], concatenated along tokens.

    k, v: [(B·F), h, N, d] -> [(B·F), h, 2N, d].
    """
    BF, h, N, d = k.shape
    B = BF // frames
    first = torch.zeros(frames, dtype=torch.long, device=k.device)                   # [F]: 0, 0, ..., 0
    prev = (torch.arange(frames, device=k.device) - 1).clamp(min=0)                  # [F]: 0, 0, 1, ..., F-2

    def gather(x: torch.Tensor) -> torch.Tensor:
        x = x.view(B, frames, h, N, d)
        return torch.cat([x[:, first], x[:, prev]], dim=3).reshape(BF, h, 2 * N, d)

    return gather(k), gather(v)


def sparse_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, inner: Processor = sdpa
) -> torch.Tensor:
    """Processor: Tune-A-Video sparse-causal self-attention (set it on the `attn1` layers).

    q, k, v: [(B·F), h, N, d] -> [(B·F), h, N, d]; F from `ctx.state["frames"]`. `inner` computes
    the attention on the gathered keys (default `sdpa`; `explicit` gives the written-out form).
    A single frame (F = 1) attends to its own tokens only: that is plain self-attention, computed
    directly (the official duplicated keys would change only the rounding), so a one-frame video
    model is exactly the image model.
    """
    frames = frames_of(ctx.state, q.shape[0])
    if frames == 1:
        return inner(q, k, v, ctx)
    k, v = sparse_causal_kv(k, v, frames)
    return inner(q, k, v, ctx)


# ---------------------------------------------------------------- 2. temporal attention

def temporal_attention(x: torch.Tensor, norm: nn.Module, attn: Attention, frames: int) -> torch.Tensor:
    """x + attn(norm(x)) over the frame axis at each token position.

    x: [(B·F), N, C] -> [(B·N), F, C] -> attention over F -> [(B·F), N, C].
    """
    BF, N, C = x.shape
    B = BF // frames
    xt = x.view(B, frames, N, C).transpose(1, 2).reshape(B * N, frames, C)          # [(B·N), F, C]
    xt = xt + attn(norm(xt))
    return xt.view(B, N, frames, C).transpose(1, 2).reshape(BF, N, C)


def init_temporal_attention(
    module: nn.Module, dim: int, heads: int, dim_head: int, upcast: bool = False, zero_bias: bool = True
) -> None:
    """Give `module` Tune-A-Video's `norm_temp` (LayerNorm) and `attn_temp` (zero-initialised output).

    The official code zeroes only `attn_temp.to_out.0.weight` and leaves its bias at PyTorch's
    default (uniform in ±1/√(heads·dim_head)), so its temporal attention adds a small constant
    at initialisation; `zero_bias=True` (minivid's default) also zeroes the bias, which makes the
    inflated model exactly equal to the image model at initialisation. `zero_bias=False`
    reproduces the official initialisation.
    """
    module.norm_temp = nn.LayerNorm(dim)
    module.attn_temp = Attention(dim, None, heads, dim_head, upcast=upcast)
    out = module.attn_temp.to_out[0]
    nn.init.zeros_(out.weight)
    if zero_bias:
        nn.init.zeros_(out.bias)


class TemporalAttention(nn.Module):
    """Stand-alone Tune-A-Video temporal attention: x [(B·F), N, C] -> x + attn_temp(norm_temp(x)) over F.

    F comes from `call_state(self, frames=F)` (or the model it is part of), or `frames=`.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int | None = None, upcast: bool = False, zero_bias: bool = True):
        super().__init__()
        init_temporal_attention(self, dim, heads, dim_head or dim // heads, upcast, zero_bias)
        name_layers(self)

    def forward(self, x: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        frames = frames or frames_of(self.attn_temp.state, x.shape[0])
        return temporal_attention(x, self.norm_temp, self.attn_temp, frames)


class TemporalBlockMixin:
    """Adds the temporal step after a transformer block's own steps (attn1 -> attn2 -> ff -> attn_temp).

    Mixed into a BasicTransformerBlock class by `temporal_block_class`; instances are made by
    swapping the class of existing blocks (`inflate_block`), so every original submodule keeps
    its name and weights and the new parameters appear as `attn_temp.*` / `norm_temp.*`.
    """

    base: type                      # the block class this mixin extends
    attn_temp: Attention
    norm_temp: nn.LayerNorm

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = super().forward(x, *args, **kwargs)                                        # [(B·F), N, C]
        return temporal_attention(x, self.norm_temp, self.attn_temp, frames_of(self.attn_temp.state, x.shape[0]))

    @classmethod
    def inflate_block(cls, block: nn.Module, zero_bias: bool = True) -> nn.Module:
        """Turn an existing block into this class in place; heads and widths copied from its attn1."""
        if not isinstance(block, cls.base) or isinstance(block, TemporalBlockMixin):
            raise TypeError(f"{cls.__name__} inflates a plain {cls.base.__name__}, got {type(block).__name__}")
        a = block.attn1
        dim = a.to_q.in_features
        block.__class__ = cls
        init_temporal_attention(block, dim, a.heads, a.dim_head, a.upcast, zero_bias)
        block.attn_temp.to(device=a.to_q.weight.device, dtype=a.to_q.weight.dtype)
        block.norm_temp.to(device=a.to_q.weight.device, dtype=a.to_q.weight.dtype)
        return block


@functools.cache
def temporal_block_class(base: type) -> type:
    """`class Temporal<Base>(TemporalBlockMixin, base)` for a transformer-block class `base`.

    `base` must have `attn1` (an Attention) and `forward(x, ...) -> x` on [(B·F), N, C] tokens.
    """
    cls = type(f"Temporal{base.__name__}", (TemporalBlockMixin, base), {"__module__": __name__, "base": base})
    globals()[cls.__name__] = cls                          # importable by name, so pickling works
    return cls


def inflate_for_tuneavideo(
    unet: nn.Module,
    *,
    sparse: bool = True,
    temporal: bool = True,
    zero_bias: bool = True,
    block_type: type | None = None,
) -> list[str]:
    """Make an SD UNet a Tune-A-Video model, in place; returns the names of the inflated blocks.

    sparse: set `sparse_causal` on every `*attn1` layer. temporal: add `attn_temp`/`norm_temp`
    to every transformer block (instances of `block_type`, default minivid.unet.BasicTransformerBlock).
    Layers are renamed afterwards (`name_layers`) so the new attention layers share the call state.
    """
    if block_type is None:
        from minivid.unet import BasicTransformerBlock as block_type
    names = []
    if temporal:
        cls = temporal_block_class(block_type)
        for name, m in unet.named_modules():
            if type(m) is block_type:
                cls.inflate_block(m, zero_bias)
                names.append(name)
        if not names:
            raise ValueError(f"inflate_for_tuneavideo: no un-inflated {block_type.__name__} in {type(unet).__name__}")
    name_layers(unet)
    if sparse:
        set_processor(unet, SPATIAL_SELF, sparse_causal)
    return names
