"""EI²'s two new blocks (Zhang et al., "Towards Consistent Video Editing with Text-to-Image
Diffusion Models", §4.3-4.4): the Shift-restricted Temporal Attention Module (STAM) with
its Instance Centering layer, and the Fine-coarse Frame Attention Module (FFAM).

Both act on the tokens of a video batch [(B·F), N, C] (frames contiguous per video, frame
index fastest in the batch axis), the layout of an inflated SD UNet: 2-D layers see the
frames as a batch of images. The frame count F reaches them through
`minivid.attention.call_state(model, frames=F)` (or an explicit argument).

STAM (Eq. 6-9), at every spatial location, attends over the frame axis:

    IC(z)   = z - (1/n) Σ_i z^i                                   (6)  mean over frames, no rescale
    Attn(z) = softmax(Q Kᵀ/√d) · IC(z) W̄_v,  Q = IC(z) W_q, K = IC(z) W_k        (8)
    STAM(z) = z + Attn(IC(z)) W̄_L + b                              (9)

with W̄ = W / σ_max(W) (spectral normalisation, torch's power-iteration parametrisation) on
W_v and W_L, and b initialised at zero. Because IC removes the temporal mean, the value
vectors have mean zero and the mean of the output distribution moves by b only (App. A.5);
because ‖W̄_v‖ = ‖W̄_L‖ = 1 and attention rows are convex weights, the attention branch
cannot be larger than the centred input (Eq. 7, Prop. 4).

FFAM (Eq. 10) replaces the spatial self-attention (attn1): queries of frame f attend to the
tokens of frame f and to the r×r average-pooled tokens of the other frames. It is a
processor for the existing attn1 layers, so SD's pre-trained W_q, W_k, W_v, W_L are kept.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm

from minivid.attention import Attention, AttnContext, frame_count
from minivid.kernels.fine_coarse_attention import fine_coarse_attention

__all__ = ["instance_centering", "STAM", "FFAMProcessor", "video_frames"]


def video_frames(state: dict[str, Any], batch: int, frames: int | None = None) -> int:
    """The frame count: `frames` if given, else `state["frames"]` from `call_state`; checked
    against a batch of `batch` = B·F frames (`minivid.attention.frame_count`)."""
    return frame_count(state, batch, frames, who="EI²")


# ---------------------------------------------------------------- STAM (§4.3)

def instance_centering(z: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Instance Centering, Eq. (6): IC(z) = z - mean of z over the frame axis `dim`.

    Unlike LayerNorm or InstanceNorm it neither rescales nor has learnable weights: it removes
    the temporal mean and keeps every temporal difference z_i - z_j (hence the temporal variance).
    """
    return z - z.mean(dim=dim, keepdim=True)


class STAM(nn.Module):
    """Shift-restricted Temporal Attention Module, Eq. (9): z + Linear(Attention(IC(z), IC(z))).

    x: [(B·F), N, C] -> [(B·F), N, C]; the attention runs over the F frames at each of the N
    spatial locations. `attn` is a standard minivid `Attention` (keys `attn.to_q`, `attn.to_k`,
    `attn.to_v`, `attn.to_out.0`), so processors, capture and injection apply to it as to
    any other layer; `attn.to_v.weight` (W_v) and `attn.to_out.0.weight` (W_L) are
    spectral-normalised parametrisations (their raw tensors are `...parametrizations.weight.original`
    and the power-iteration vectors the buffers `...parametrizations.weight.0._u/_v`),
    and `attn.to_out.0.bias` (b) starts at zero.

    Initialisation (the paper fixes only b = 0): W_q, W_k, W_v, W_L take PyTorch's default
    Linear initialisation; W_v and W_L are then used with spectral norm 1, so their scale does
    not matter. W_L cannot start at zero as Tune-A-Video's temporal attention does: a zero
    matrix has no spectral normalisation. So STAM is not the identity at initialisation;
    instead its output keeps the input's temporal mean in distribution, and a static video
    (all frames equal, IC(z) = 0) passes through unchanged.

    heads/dim_head default to 8 and dim // 8 (SD 1.4's heads; the paper does not say).
    `n_power_iterations` power-iteration steps refine σ_max at every training-mode forward.
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int | None = None,
        upcast: bool = False,
        n_power_iterations: int = 1,
    ):
        super().__init__()
        if dim_head is None:
            if dim % heads:
                raise ValueError(f"STAM: dim {dim} is not divisible by heads {heads}; pass dim_head")
            dim_head = dim // heads
        self.attn = Attention(dim, None, heads, dim_head, upcast=upcast)
        nn.init.zeros_(self.attn.to_out[0].bias)                          # b = 0 (§4.3)
        spectral_norm(self.attn.to_v, n_power_iterations=n_power_iterations)    # W̄_v, Eq. (8)
        spectral_norm(self.attn.to_out[0], n_power_iterations=n_power_iterations)  # W̄_L, Eq. (8)

    def forward(self, x: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        BF, N, C = x.shape
        frames = video_frames(self.attn.state, BF, frames)
        B = BF // frames
        z = x.view(B, frames, N, C).transpose(1, 2).reshape(B * N, frames, C)     # [(B·N), F, C]
        zc = instance_centering(z, dim=1)                                           # IC(z), Eq. (6)
        z = z + self.attn(zc)                                                       # Eq. (9): z + Attn(IC z) W̄_L + b
        return z.view(B, N, frames, C).transpose(1, 2).reshape(BF, N, C)


# ---------------------------------------------------------------- FFAM (§4.4)

class FFAMProcessor:
    """Attention processor for spatial self-attention (attn1): fine-coarse frame attention, Eq. (10).

    q, k, v: [(B·F), heads, N, d] with F = ctx.state["frames"] and N = H·W = ctx.hw ->
    [(B·F), heads, N, d]. The frames of each video are laid side by side ([B, heads, F·N, d])
    and handed to `minivid.kernels.fine_coarse_attention` (Triton on CUDA, PyTorch elsewhere,
    or `backend`). With one frame it is self-attention; with r = 1 it is full
    spatio-temporal attention over all F·N tokens of the video.
    """

    def __init__(self, r: int = 2, backend: str = "auto"):
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"FFAMProcessor: r must be a positive integer, got {r!r}")
        self.r, self.backend = r, backend

    def __repr__(self) -> str:
        return f"FFAMProcessor(r={self.r}, backend={self.backend!r})"

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        if ctx.is_cross:
            raise ValueError(f"FFAM is a self-attention processor; {ctx.name or 'this layer'} is cross-attention")
        if ctx.mask is not None:
            raise ValueError("FFAM does not take an attention mask")
        if ctx.hw is None:
            raise ValueError(f"FFAM needs the token grid size: {ctx.name or 'the layer'} was called without hw=(H, W)")
        BF, h, N, d = q.shape
        frames = video_frames(ctx.state, BF)
        B = BF // frames

        def videos(t: torch.Tensor) -> torch.Tensor:                  # [(B·F), h, N, d] -> [B, h, F·N, d]
            return t.reshape(B, frames, h, N, d).transpose(1, 2).reshape(B, h, frames * N, d)

        dtype = q.dtype
        if ctx.upcast and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        out = fine_coarse_attention(
            videos(q), videos(k), videos(v), frames, tuple(ctx.hw), self.r, scale=ctx.scale, backend=self.backend
        )                                                                 # [B, h, F·N, d]
        return out.reshape(B, h, frames, N, d).transpose(1, 2).reshape(BF, h, N, d).to(dtype)
