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
- `fine_coarse_attention_reference`: PyTorch, never the F×F blow-up. Without autograd on
  CPU it attends to the own frame's keys and to each other frame's pooled keys in
  separate fused calls, as many heads and query rows per call as a 512 KiB working set
  allows, and merges them by log-sum-exp into the output tensor: beyond the output it holds
  the running log-sum-exp of one group of heads, one frame's pooled K/V and one chunk's
  partial result (below full spatio-temporal attention's peak, docs/benchmarks.md). With autograd (training, the
  Triton backward) or off the CPU it runs one `scaled_dot_product_attention` per frame
  over [own fine keys; other frames' coarse keys] (memory F·(L + (F-1)·P)·d);
- `fine_coarse_attention_triton`: a flash-style Triton kernel with online softmax and
  float32 accumulation; for a block of queries of frame f it walks frame f's fine keys
  and then the coarse keys of frames < f and > f, never building the concatenation.
  The coarse K/V are pooled once beforehand (`pool_frames`, O(F·L·d), negligible).
  float32 inputs multiply in IEEE float32 (no TF32), to keep 1e-5 parity. Backward
  recomputes the reference and differentiates it (correct gradients, reference memory);
- `fine_coarse_attention`: dispatcher (Triton on CUDA, the reference elsewhere).
The kernel itself lives in `_fine_coarse_attention_triton.py`, imported on first use,
so triton is loaded only when the Triton path runs.

bfloat16: Triton 3.9's CPU interpreter computes bfloat16 `tl.dot` wrongly, so the native
bfloat16 kernel cannot be checked without a GPU. Until a GPU run of `minivid bench kernels
--check` has verified it (then set `BF16_NATIVE_VERIFIED = True`), bfloat16 inputs of the
Triton path are computed by the float32 kernel (inputs upcast, output rounded to bfloat16
once): exact to bfloat16 rounding, at float32's memory traffic. float16 runs natively
(checked under the interpreter). `bf16_native=True` forces the native path (the check uses it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "fine_coarse_attention", "fine_coarse_attention_reference", "fine_coarse_attention_triton",
    "pool_frames", "pooled_size",
]

_LOG2E = 1.4426950408889634

# Set to True once `minivid bench kernels --check` has passed the native bfloat16 kernel on a GPU.
BF16_NATIVE_VERIFIED = False


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

    Two formulations of the same softmax, chosen by what the call needs:
    - without autograd, on CPU (inference, the benchmarks): `_lse_reference`, the fine and
      the coarse keys attended separately and merged by log-sum-exp, a group of heads and of
      query rows at a time, so the memory beyond the output is about 1 MiB (below full
      spatio-temporal attention's, see docs/benchmarks.md);
    - when a gradient is needed, or off the CPU: `_concat_reference`, one fused attention
      call per frame over [own fine keys; other frames' coarse keys] (autograd through
      `scaled_dot_product_attention`; memory grows like F·(L + (F-1)·P)·d, never F²·L·d).
    Both agree to float32 rounding (tests/test_fine_coarse_kernel.py).
    """
    H, W = _check(q, k, v, frames, size, r)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad or q.device.type != "cpu" or _cpu_attention_with_lse() is None:
        return _concat_reference(q, k, v, frames, (H, W), r, scale)
    return _lse_reference(q, k, v, frames, (H, W), r, scale)


def _concat_reference(q, k, v, frames, size, r, scale):
    """One `scaled_dot_product_attention` per frame over the concatenated fine and coarse keys."""
    L = size[0] * size[1]
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


def _cpu_attention_with_lse():
    """torch's CPU flash attention returning (output, log-sum-exp of the scaled logits), or None
    if this torch build has no such operator (then the concatenation path runs)."""
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _merge_(acc: torch.Tensor, lse: torch.Tensor, o: torch.Tensor, lse_o: torch.Tensor) -> None:
    """In place: (acc, lse) <- the softmax over the union of two disjoint key sets.

    acc (..., n, d), lse (..., n): output and log-sum-exp so far; o, lse_o: those of the new keys.
    With lse' = log(e^lse + e^lse_o) the merged output is the convex combination
    acc + w·(o − acc), w = e^(lse_o − lse'): one `lerp_` over the large tensor.
    """
    new = torch.logaddexp(lse, lse_o)
    w = torch.exp(lse_o - new)
    acc.lerp_(o.to(acc.dtype) if o.dtype != acc.dtype else o, w[..., None])
    lse.copy_(new)


def _pool_heads(x: torch.Tensor, size: tuple[int, int], r: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """r×r average pooling of one frame of g heads: (g, H·W, d) -> (g, P, d), as `pool_frames`;
    written into `out` (g, P, d) when given (no allocation per frame)."""
    if r == 1:
        return x if out is None else out.copy_(x)
    g, _, d = x.shape
    grid = x.reshape(g, size[0], size[1], d).permute(0, 3, 1, 2)                    # channels-last view
    if out is None:
        return F.avg_pool2d(grid, r, stride=r, ceil_mode=True).flatten(2).transpose(1, 2).contiguous()
    Hp, Wp = pooled_size(size, r)
    torch._C._nn.avg_pool2d(grid, r, r, 0, True, True, None, out=out.view(g, Hp, Wp, d).permute(0, 3, 1, 2))
    return out


# Working set of one fused call of the log-sum-exp path (one source frame's pooled K/V and one chunk's
# partial output, for a group of heads): calls are made as large as this allows, so that there are few
# of them (each is a parallel region; many small ones stall on a loaded machine).
_LSE_WORK_BYTES = 512 * 1024


def _lse_plan(heads: int, L: int, P: int, d: int, itemsize: int, budget: int, frames: int = 1) -> tuple[int, int]:
    """(heads per call g, query rows per call R) of the log-sum-exp path.

    Per group of g heads the path holds one source frame's pooled K/V (2·g·P·d) and the running
    log-sum-exp (g·F·L); g is the largest count keeping these within half the budget (at least
    one head, groups of even size). R keeps a chunk's partial output (g·R·d) within the other
    half, between min(L, 16) and 512 rows: below 768 query rows torch's CPU flash attention
    uses 64-row blocks and a 4× smaller scratch buffer.
    """
    half = budget // 2
    g = max(1, min(heads, half // max(1, (2 * P * d + frames * L) * itemsize)))
    g = -(-heads // -(-heads // g))                                                 # even groups
    rows = min(512, max(min(L, 16), half // (g * d * itemsize)))
    chunks = -(-L // rows)
    return g, -(-L // chunks)


def _lse_reference(q, k, v, frames, size, r, scale, budget=_LSE_WORK_BYTES):
    """Fine and coarse keys attended separately and merged by log-sum-exp (no concatenation).

    For each (batch, group of heads): every frame's queries attend to their own frame's L keys;
    then, for each frame j, its r×r-pooled keys are built once and every other frame's queries
    attend to them, merged into the running result with `_merge_`. The running output is the
    output tensor itself (float32/float64 inputs) or the group's float32 buffer (16-bit inputs,
    rounded once at the end); the running log-sum-exp is the group's F·L floats per head. Extra
    memory: that log-sum-exp, and per call about `budget` bytes (`_lse_plan`).
    """
    attend = _cpu_attention_with_lse()
    B, heads, N, d = q.shape
    L = size[0] * size[1]
    P = pooled_size(size, r)[0] * pooled_size(size, r)[1]
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    g, rows = _lse_plan(heads, L, P, d, acc_dtype.itemsize, budget, frames)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(g, N, dtype=acc_dtype, device=q.device)                  # reused by every group
    pooled = torch.empty(2, g, P, d, dtype=q.dtype, device=q.device)            # one source frame's K, V
    chunks = [(f, slice(f * L + c, f * L + min(c + rows, L))) for f in range(frames) for c in range(0, L, rows)]
    for b in range(B):
        for h0 in range(0, heads, g):
            hs = slice(h0, min(h0 + g, heads))
            qh, kh, vh = q[b, hs], k[b, hs], v[b, hs]                             # (g, F·L, d) views
            gl = lse[: qh.shape[0]]
            acc = out[b, hs] if q.dtype == acc_dtype else torch.empty(qh.shape, dtype=acc_dtype, device=q.device)
            for f, c in chunks:                                                   # fine: the own frame
                own = slice(f * L, (f + 1) * L)
                o, lse_o = attend(qh[None, :, c], kh[None, :, own], vh[None, :, own], scale=scale)
                acc[:, c] = o[0]
                gl[:, c] = lse_o[0]
            for j in range(frames):                                               # coarse: frame j's pooled keys
                src = slice(j * L, (j + 1) * L)
                kc = _pool_heads(kh[:, src], size, r, pooled[0, : qh.shape[0]])[None]
                vc = _pool_heads(vh[:, src], size, r, pooled[1, : qh.shape[0]])[None]
                for f, c in chunks:
                    if f != j:
                        o, lse_o = attend(qh[None, :, c], kc, vc, scale=scale)
                        _merge_(acc[:, c], gl[:, c], o[0], lse_o[0])
            if q.dtype != acc_dtype:
                out[b, hs] = acc
    return out


# ---------------------------------------------------------------- Triton kernel

def head_pieces(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_D2): the head dimension as one or two power-of-two pieces of at least 16
    (what `tl.dot` takes), the second 0 when one piece holds it. Two pieces are used when they
    pad less than the next power of two: 40 -> 32 + 16, 80 -> 64 + 16, 160 -> 128 + 32, 64 -> 64."""
    whole = max(16, 1 << (head_dim - 1).bit_length())
    first = max(16, 1 << (head_dim.bit_length() - 1))
    if first >= head_dim:
        return whole, 0
    second = max(16, 1 << (head_dim - first - 1).bit_length())
    return (first, second) if first + second < whole else (whole, 0)


def ffam_launch_config(dtype: torch.dtype, head_dim: int, capability: tuple[int, int] = (8, 0),
                       shared_optin: int | None = None) -> dict:
    """The kernel's launch parameters on a GPU of compute `capability` with `shared_optin` bytes
    of shared memory per block (default: that architecture's, `minivid.kernels.aot.ARCHS`).

    Returns block_m, block_n, block_d, block_d2 (`head_pieces`), num_warps, num_stages and
    precision. `dtype` is the dtype the kernel computes in (bfloat16 inputs that run the float32
    kernel: torch.float32). Every choice is compiled for sm_80/86/89/90 by `minivid bench kernels
    --aot` (0 spill bytes, shared memory within the limit; docs/benchmarks.md); why each: docs/ei2.md.
    """
    from .aot import arch_limits

    shared = arch_limits(capability, shared_optin)["shared_optin"]
    block_d, block_d2 = head_pieces(head_dim)
    width = block_d + block_d2
    if dtype == torch.float32:
        # IEEE float32 tl.dot runs on the CUDA cores (FMA), every operand tile in registers: 8 warps
        # share them (4 warps spill at d = 40 / 80 / 160 on sm_80/86) and the key tile narrows as
        # the head widens; no software pipelining (its buffers add shared memory, an FMA dot is
        # not waiting on loads). Chosen by compiling the candidates (docs/ei2.md).
        block_m, block_n = {48: (64, 32), 64: (32, 32), 80: (64, 16)}.get(width, (32, 16))
        warps, stages = 8, 1
    else:
        # float16/bfloat16: mma on the tensor cores, float32 accumulation; two stages of cp.async
        # pipelining up to d = 80; at d = 160 (128 + 32) the 64×160 accumulator and Q leave room
        # for a 16-key tile only, unpipelined, to stay within 255 registers.
        block_m, block_n, warps, stages = 64, 64 if width <= 64 else 32, 4, 2
        if width > 128:
            block_n, stages = 16, 1
    if stages > 1 and 2 * stages * block_n * width * dtype.itemsize > shared // 2:
        stages = 1                                    # a small shared memory (not one of sm_80/86/89/90)
    return dict(block_m=block_m, block_n=block_n, block_d=block_d, block_d2=block_d2,
                num_warps=warps, num_stages=stages, precision="ieee" if dtype == torch.float32 else "tf32")


def _launch(q, k, v, kc, vc, out, frames, size, scale, cfg):
    """(grid, positional args, keyword args) of one `fine_coarse_fwd` launch: what the launcher
    passes and what `minivid.kernels.aot_specs` compiles (from meta tensors of the same shapes)."""
    B, h, N, d = q.shape
    L = size[0] * size[1]
    P = kc.shape[2] // frames
    grid = (frames * -(-L // cfg["block_m"]), B * h)
    args = (q, k, v, kc, vc, out, *q.stride(), *k.stride(), *v.stride(), *kc.stride(), *out.stride(),
            h, L, P, frames, d, scale * _LOG2E)
    kwargs = dict(BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_D=cfg["block_d"], BLOCK_D2=cfg["block_d2"],
                  PRECISION=cfg["precision"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return grid, args, kwargs


def _triton_forward(q, k, v, frames, size, r, scale, block_m, block_n, capability=None):
    from . import _fine_coarse_attention_triton as impl
    from .aot import device_target

    kc = pool_frames(k, frames, size, r).flatten(2, 3).contiguous()      # (B, h, F·P, d)
    vc = pool_frames(v, frames, size, r).flatten(2, 3).contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    cap, shared = device_target(q.device) if capability is None else (tuple(capability), None)
    cfg = ffam_launch_config(q.dtype, q.shape[-1], cap, shared)
    cfg.update({k: b for k, b in (("block_m", block_m), ("block_n", block_n)) if b})
    if cfg["block_m"] < 16 or cfg["block_n"] < 16:
        raise ValueError(f"fine_coarse_attention_triton: block sizes must be >= 16 (tl.dot), got {cfg['block_m']}, {cfg['block_n']}")
    # float32 inputs multiply in IEEE float32 (not TF32) so the kernel keeps minivid's 1e-5 parity;
    # the option is ignored for 16-bit inputs, which multiply natively with float32 accumulation.
    grid, args, kwargs = _launch(q, k, v, kc, vc, out, frames, size, scale, cfg)
    impl.fine_coarse_fwd[grid](*args, **kwargs)
    return out


class _FineCoarseTriton(torch.autograd.Function):
    """Triton forward; backward recomputes the PyTorch reference and differentiates it."""

    @staticmethod
    def forward(ctx, q, k, v, frames, size, r, scale, block_m, block_n, bf16_native, capability):
        ctx.save_for_backward(q, k, v)
        ctx.args = (frames, size, r, scale)
        if q.dtype == torch.bfloat16 and not bf16_native:           # unverified native bf16: run the fp32 kernel
            out = _triton_forward(q.float(), k.float(), v.float(), frames, size, r, scale, block_m, block_n, capability)
            return out.to(torch.bfloat16)
        return _triton_forward(q, k, v, frames, size, r, scale, block_m, block_n, capability)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = (t.detach().requires_grad_() for t in ctx.saved_tensors)
        frames, size, r, scale = ctx.args
        with torch.enable_grad():
            out = fine_coarse_attention_reference(q, k, v, frames, size, r, scale=scale)
            grads = torch.autograd.grad(out, (q, k, v), grad_out)
        return (*grads, None, None, None, None, None, None, None, None)


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
    bf16_native: bool | None = None,
    capability: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Fine-coarse frame attention with the Triton kernel: (B, h, F·H·W, d) ×3 -> (B, h, F·H·W, d).

    Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before triton
    was first imported (the tests do). Tile sizes, warps and pipeline stages are chosen for the
    tensors' GPU (`ffam_launch_config`; on the CPU interpreter: sm_80's); `capability`, e.g. (8, 6),
    chooses them for another GPU instead, and `block_m`/`block_n` (>= 16) override the tiles.
    bfloat16 inputs run the float32 kernel unless `bf16_native` (default:
    `BF16_NATIVE_VERIFIED`, False until a GPU check passed; see the module docstring).
    """
    H, W = _check(q, k, v, frames, size, r)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    native = BF16_NATIVE_VERIFIED if bf16_native is None else bool(bf16_native)
    return _FineCoarseTriton.apply(q, k, v, frames, (H, W), r, scale, block_m, block_n, native, capability)


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
