"""Fine-coarse frame attention (EI², Eq. 10): every query of frame f attends to all
H·W tokens of its own frame ("fine") and to the r×r average-pooled tokens of every
other frame ("coarse"):

    FFAM(z^f) = Attention(z^f, concat[z^f, downsample(z^j, r) for j != f])

    out = fine_coarse_attention(q, k, v, frames=F, size=(H, W), r=2)
    # q, k, v: (B, heads, F·H·W, d), frame-major tokens (frame f owns rows f·H·W ... (f+1)·H·W - 1,
    # each frame row-major over (H, W)); out: (B, heads, F·H·W, d), like q.

Pooling is linear, so pooling K and V after the projection equals projecting pooled
features: the coarse keys/values are `avg_pool2d(K, r)` and `avg_pool2d(V, r)` per frame.
Each query then sees L + (F-1)·P keys (L = H·W, P = pooled tokens per frame), so the
cost is (F-1+r²)/r² · F·L² per head instead of F²·L² for full spatio-temporal attention.

Border choice: H and W need not be divisible by r. Pooling uses `ceil_mode`, so a
border window that sticks out of the map averages only its in-bounds tokens and no
token of another frame is dropped (P = ceil(H/r)·ceil(W/r)); SD latents of 64/32/16/8
are divisible by 2 and 4 and are unaffected, while odd grids (e.g. 15×15 for 480-pixel
frames) still work. r larger than H or W is an error: the paper requires the ratio
to stay within the feature map, and the pooled map would otherwise vanish under
floor pooling.

Three functions of one signature:
- `fine_coarse_attention_reference`: PyTorch, one `scaled_dot_product_attention` per
  frame over [own fine keys; other frames' coarse keys] (no F×F blow-up);
- `fine_coarse_attention_triton`: a flash-style Triton kernel with online softmax and
  float32 accumulation; for a block of queries of frame f it walks frame f's fine keys
  and then the coarse keys of frames < f and > f, never building the concatenation.
  The coarse K/V are pooled once beforehand (`pool_frames`, O(F·L·d), negligible).
  float32 inputs multiply in IEEE float32 (no TF32), to keep 1e-5 parity. Backward
  recomputes the reference and differentiates it (correct gradients, reference memory);
- `fine_coarse_attention`: dispatcher (Triton on CUDA, the reference elsewhere).
The kernel itself lives in `_fine_coarse_attention_triton.py`, imported on first use,
so triton is loaded only when the Triton path runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "fine_coarse_attention", "fine_coarse_attention_reference", "fine_coarse_attention_triton",
    "pool_frames", "pooled_size",
]

_LOG2E = 1.4426950408889634


# ---------------------------------------------------------------- shapes and pooling

def pooled_size(size: tuple[int, int], r: int) -> tuple[int, int]:
    """(H, W) of a frame after r×r pooling with partial border windows kept: ceil(H/r), ceil(W/r)."""
    H, W = size
    return -(-H // r), -(-W // r)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int, size: tuple[int, int], r: int) -> tuple[int, int]:
    """Validate the call; returns (H, W)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"fine_coarse_attention: r must be a positive integer, got {r!r}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"fine_coarse_attention: frames must be a positive integer, got {frames!r}")
    if len(tuple(size)) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"fine_coarse_attention: size must be two positive integers (H, W), got {size!r}")
    H, W = size
    if q.dim() != 4:
        raise ValueError(f"fine_coarse_attention: q must be (B, heads, F·H·W, d), got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            "fine_coarse_attention: q, k and v must have one shape (B, heads, F·H·W, d) (self-attention over "
            f"frames), got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"fine_coarse_attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] != frames * H * W:
        raise ValueError(
            f"fine_coarse_attention: token count {q.shape[2]} != frames·H·W = {frames}·{H}·{W} = {frames * H * W}"
        )
    if r > H or r > W:
        raise ValueError(
            f"fine_coarse_attention: pooling ratio r={r} exceeds the {H}×{W} token grid; the coarse map of "
            f"other frames would vanish (EI² keeps r within the feature map: r <= min(H, W))"
        )
    return H, W


def pool_frames(x: torch.Tensor, frames: int, size: tuple[int, int], r: int) -> torch.Tensor:
    """r×r average pooling of every frame: (B, h, F·H·W, d) -> (B, h, F, P, d), P = ceil(H/r)·ceil(W/r).

    Border windows that stick out of the map average their in-bounds tokens (`ceil_mode`).
    """
    B, h, _, d = x.shape
    H, W = size
    grid = x.reshape(B * h * frames, H, W, d).permute(0, 3, 1, 2)                 # (B·h·F, d, H, W)
    pooled = F.avg_pool2d(grid, r, stride=r, ceil_mode=True) if r > 1 else grid     # (B·h·F, d, H', W')
    return pooled.flatten(2).transpose(1, 2).reshape(B, h, frames, -1, d)


# ---------------------------------------------------------------- PyTorch reference

def fine_coarse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    frames: int,
    size: tuple[int, int],
    r: int = 2,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Fine-coarse frame attention in PyTorch: (B, h, F·H·W, d) ×3 -> (B, h, F·H·W, d).

    One fused attention call per frame over its L fine keys and the (F-1)·P coarse keys of
    the other frames, so memory grows like F·(L + (F-1)·P)·d, never F²·L·d.
    """
    H, W = _check(q, k, v, frames, size, r)
    L = H * W
    k_coarse = pool_frames(k, frames, size, r)                 # (B, h, F, P, d)
    v_coarse = pool_frames(v, frames, size, r)
    out = torch.empty_like(q)
    for f in range(frames):
        own = slice(f * L, (f + 1) * L)
        others = lambda c: torch.cat([c[:, :, :f], c[:, :, f + 1:]], dim=2).flatten(2, 3)  # noqa: E731  (B, h, (F-1)·P, d)
        keys = torch.cat([k[:, :, own], others(k_coarse)], dim=2)     # (B, h, L + (F-1)·P, d)
        values = torch.cat([v[:, :, own], others(v_coarse)], dim=2)
        out[:, :, own] = F.scaled_dot_product_attention(q[:, :, own], keys, values, scale=scale)
    return out


# ---------------------------------------------------------------- Triton kernel

def _triton_forward(q, k, v, frames, size, r, scale, block_m, block_n):
    import triton

    from . import _fine_coarse_attention_triton as impl

    B, h, N, d = q.shape
    H, W = size
    L = H * W
    kc = pool_frames(k, frames, size, r).flatten(2, 3).contiguous()      # (B, h, F·P, d)
    vc = pool_frames(v, frames, size, r).flatten(2, 3).contiguous()
    P = kc.shape[2] // frames
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    block_d = max(16, triton.next_power_of_2(d))
    block_m = block_m or 64
    block_n = block_n or (64 if block_d <= 128 else 32)
    if block_m < 16 or block_n < 16:
        raise ValueError(f"fine_coarse_attention_triton: block sizes must be >= 16 (tl.dot), got {block_m}, {block_n}")
    # float32 inputs multiply in IEEE float32 (not TF32) so the kernel keeps minivid's 1e-5 parity;
    # the option is ignored for 16-bit inputs, which multiply natively with float32 accumulation.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (frames * triton.cdiv(L, block_m), B * h)
    impl.fine_coarse_fwd[grid](
        q, k, v, kc, vc, out,
        *q.stride(), *k.stride(), *v.stride(), *kc.stride(), *out.stride(),
        h, L, P, frames, d, scale * _LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=precision,
    )
    return out


class _FineCoarseTriton(torch.autograd.Function):
    """Triton forward; backward recomputes the PyTorch reference and differentiates it."""

    @staticmethod
    def forward(ctx, q, k, v, frames, size, r, scale, block_m, block_n):
        ctx.save_for_backward(q, k, v)
        ctx.args = (frames, size, r, scale)
        return _triton_forward(q, k, v, frames, size, r, scale, block_m, block_n)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        frames, size, r, scale = ctx.args
        with torch.enable_grad():
            out = fine_coarse_attention_reference(q, k, v, frames, size, r, scale=scale)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
        return (*grads, None, None, None, None, None, None)


def fine_coarse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    frames: int,
    size: tuple[int, int],
    r: int = 2,
    *,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Fine-coarse frame attention with the Triton kernel: (B, h, F·H·W, d) ×3 -> (B, h, F·H·W, d).

    Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton
    was first imported (the tests do). `block_m`/`block_n` (>= 16) override the tile sizes.
    """
    H, W = _check(q, k, v, frames, size, r)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _FineCoarseTriton.apply(q, k, v, frames, (H, W), r, scale, block_m, block_n)


# ---------------------------------------------------------------- dispatcher

def fine_coarse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    frames: int,
    size: tuple[int, int],
    r: int = 2,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Each query of frame f attends to the H·W tokens of frame f and to the r×r-pooled
    tokens of every other frame. q, k, v: (B, heads, F·H·W, d) -> (B, heads, F·H·W, d).

    backend: "auto" (Triton for CUDA tensors, the PyTorch reference otherwise),
    "triton" or "reference". `scale` defaults to 1/√d. r = 1 is full spatio-temporal
    attention over all F·H·W tokens; frames = 1 is plain self-attention.
    """
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"fine_coarse_attention: backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        return fine_coarse_attention_triton(q, k, v, frames, size, r, scale=scale)
    return fine_coarse_attention_reference(q, k, v, frames, size, r, scale=scale)
