"""Small building blocks shared by the UNets, the VAEs and the methods.

Each reproduces one detail of the original `ldm`/`sgm` code that moves outputs
by far more than 1e-5 when done differently (see docs/numerics.md).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (ldm `GroupNorm32`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type(x.dtype)


def normalization(channels: int, eps: float = 1e-5, groups: int = 32) -> nn.GroupNorm:
    """The UNet's GroupNorm: 32 groups, eps 1e-5, float32 compute."""
    return GroupNorm32(groups, channels, eps=eps)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosine half first.

    ldm `timestep_embedding`: freqs = exp(-ln(max_period) * i / half), i < half;
    out = [cos(t * freqs), sin(t * freqs)]  (diffusers: flip_sin_to_cos=True, freq_shift=0).
    t: [B] -> [B, dim] float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (zero-initialised output layers) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GEGLU(nn.Module):
    """Gated GELU projection of the transformer feed-forward (`ff.net.0.proj`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """ldm FeedForward with GEGLU: keys `net.0.proj`, `net.2`."""

    def __init__(self, dim: int, mult: int = 4, dim_out: int | None = None):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
