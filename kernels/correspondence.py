"""Sliding-window top-K correspondence between two frames (COVE, Eq. 7-10).

    idx, score = window_topk(src, dst, window=9, k=3)
    # src, dst: [B, H, W, D]  L2-normalised features of frame i and of frame i±1
    # idx:      [B, H, W, K]  int64, flat index h*W + w into dst
    # score:    [B, H, W, K]  dot product (cosine for unit vectors), descending

For every query token (h, w) of `src`, only the l×l window of `dst` around the same
position is searched (Eq. 10), which turns the O(H²W²d) product of Eq. 7 into
O(HWl²d) and never builds an H·W×H·W similarity matrix.

Conventions (both implementations follow them exactly):
- Border: the window is centred on the query's own position and *shifted* (not cut)
  to stay inside the frame, so every query has exactly min(l,H)·min(l,W) candidates:
  rows [s, s+L) with L = min(l, H) and s = clamp(h - l//2, 0, H - L); columns alike.
  A side shorter than l is searched whole.
- Ties: equal scores are ordered by the lower flat index first. "Equal" means bitwise
  equal float results (+0.0 and -0.0 count as equal); two implementations summing in
  a different order may legitimately disagree on candidates that are only nearly tied.
- Precision: dot products accumulate in float32 (float64 for float64 inputs, reference
  only); `score` is returned in that accumulation dtype, also for float16/bfloat16 inputs.

Three functions share one signature:
- `window_topk_reference`: PyTorch. Queries are cut into T×T tiles; each tile is one
  batched matmul against the (T+L-1)² key region covering all its windows, from which
  each query then gathers its own L² candidates. Work runs in chunks of tiles, so the
  memory beyond inputs and outputs is bounded by `budget` elements, not by B·H·W·l².
- `window_topk_triton`: a Triton kernel, one program per block of queries, looping over
  the l² window offsets with a running top-K kept in registers (fp32 accumulation).
- `window_topk`: the dispatcher (Triton for CUDA tensors when triton imports, else the
  reference; `backend=` forces one). Triton is imported lazily, only by the Triton path.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["window_topk", "window_topk_reference", "window_topk_triton", "window_starts", "multiply_adds"]

_BACKENDS = ("auto", "triton", "reference")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------- shared rules

def _check(src: torch.Tensor, dst: torch.Tensor, window: int, k: int) -> None:
    if not isinstance(window, int) or isinstance(window, bool) or window < 1 or window % 2 == 0:
        raise ValueError(f"window_topk: window must be an odd integer >= 1, got {window!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"window_topk: k must be an integer >= 1, got {k!r}")
    if src.dim() != 4 or dst.dim() != 4:
        raise ValueError(
            f"window_topk: src and dst must be 4-D [B, H, W, D], got {tuple(src.shape)} and {tuple(dst.shape)}"
        )
    if src.shape != dst.shape:
        raise ValueError(f"window_topk: src and dst must have the same shape, got {tuple(src.shape)} and {tuple(dst.shape)}")
    if src.dtype != dst.dtype or src.device != dst.device:
        raise ValueError(
            f"window_topk: src and dst must share dtype and device, got {src.dtype}/{src.device} and {dst.dtype}/{dst.device}"
        )
    if not src.is_floating_point():
        raise ValueError(f"window_topk: features must be floating point, got {src.dtype}")
    B, H, W, D = src.shape
    if min(H, W, D) < 1:
        raise ValueError(f"window_topk: empty feature map {tuple(src.shape)}")
    candidates = min(window, H) * min(window, W)
    if k > candidates:
        raise ValueError(
            f"window_topk: k={k} exceeds the {candidates} candidates of a {window}x{window} window "
            f"in a {H}x{W} frame (min(l,H)*min(l,W))"
        )


def window_starts(size: int, window: int, device: torch.device | str | None = None) -> torch.Tensor:
    """First row (or column) of each position's window along an axis of length `size`: [size].

    s = clamp(p - window//2, 0, size - L) with L = min(window, size): the window is
    shifted, not cut, at the borders, and covers the whole axis when it is shorter.
    """
    L = min(window, size)
    return (torch.arange(size, device=device) - window // 2).clamp(0, size - L)


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- PyTorch reference

def _topk_lowest_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last axis, descending, ties -> lower position first.

    scores: [..., C] float32, the last axis ordered by flat index. For float32 the
    score and the position are packed into one int64 key (order-preserving float bits
    in the high word, C-1-position in the low word), so a single exact integer top-k
    yields the tie rule; float64 falls back to a stable sort. Returns (score, position).
    """
    C = scores.shape[-1]
    if scores.dtype == torch.float32:
        s = scores + 0.0                                      # -0.0 -> +0.0: equal floats, equal keys
        bits = s.view(torch.int32)
        ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()  # monotone in the float value
        pos = torch.arange(C - 1, -1, -1, device=scores.device)
        key = ordered * C + pos                                # |key| < 2^31 * C: no overflow
        top = key.topk(k, dim=-1, sorted=True).values
        position = (C - 1) - torch.remainder(top, C)
    else:
        position = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return scores.gather(-1, position), position


def _tile_plan(size: int, window: int, tile: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Along one axis: query positions per tile [nT, T], the first key position of each
    tile's region [nT], each query's window offset inside its region [nT, T], and the
    region length R (the same for all tiles).

    Tiles start at 0, T, 2T, ...; positions past the end are clamped to the last one
    (computed twice, kept once). A region starts at its first query's window and is
    long enough for its last query's window.
    """
    L = min(window, size)
    T = min(tile, size)
    nT = -(-size // T)
    starts = window_starts(size, window, device)
    q = (torch.arange(nT, device=device)[:, None] * T + torch.arange(T, device=device)).clamp(max=size - 1)
    first = starts[q[:, 0]]
    R = int((starts[q[:, -1]] + L - first).max())
    return q, first, starts[q] - first[:, None], R


def window_topk_reference(
    src: torch.Tensor,
    dst: torch.Tensor,
    window: int = 9,
    k: int = 3,
    *,
    tile: int | tuple[int, int] = 8,
    budget: int = 1 << 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed top-K in PyTorch: tiles of T×T queries as batched matmuls against the
    R_h×R_w key region that holds all their windows (R = T + L - 1 inside the frame).

    Work runs on groups of tile rows sized to keep the memory beyond inputs and
    outputs near `budget` elements (default 2^20, 4 MiB in float32; at least one tile
    row): the group's queries, its key rows laid out so that every region is a view,
    and the region similarities. Returns (idx [B,H,W,K] int64,
    score [B,H,W,K] float32, float64 for float64 inputs).
    """
    _check(src, dst, window, k)
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tuple(tile)
    if min(tile_h, tile_w) < 1:
        raise ValueError(f"window_topk_reference: tile sides must be positive, got {tile!r}")
    B, H, W, D = src.shape
    dev, acc = src.device, _accum_dtype(src.dtype)
    qr, r_first, r_off, Rh = _tile_plan(H, window, tile_h, dev)   # [nTh, Th], [nTh], [nTh, Th]
    qc, c_first, c_off, Rw = _tile_plan(W, window, tile_w, dev)   # [nTw, Tw], [nTw], [nTw, Tw]
    nTh, Th = qr.shape
    nTw, Tw = qc.shape
    Lh, Lw = min(window, H), min(window, W)

    # Where each query's L_h×L_w window candidates sit inside its region's R_h×R_w
    # similarities, row-major, i.e. by increasing flat index (built per group of tile rows).
    rows = r_off[:, :, None] + torch.arange(Lh, device=dev)                 # [nTh, Th, Lh]
    cols = c_off[:, :, None] + torch.arange(Lw, device=dev)                 # [nTw, Tw, Lw]

    # Work runs on groups of tile rows of one frame pair, in buffers reused throughout.
    # keys[tj, y, c] = dst[r0 + y, c_first[tj] + c] for the group's key rows r0.., so the
    # region of tile (ti, tj) is the view keys[tj, r_first[ti]-r0 : +Rh] -> [Rh*Rw, D].
    # Positions past the frame's bottom/right edge are never among the gathered
    # candidates, so what those buffer cells hold does not matter.
    first_rows, first_cols = r_first.tolist(), c_first.tolist()
    per_row = D * (nTw * Rw * Th + Th * nTw * Tw) + nTw * Th * Tw * (Rh * Rw + 4 * Lh * Lw)
    group = max(1, min(nTh, budget // per_row))
    keys = torch.zeros(nTw, (group - 1) * Th + Rh, Rw, D, dtype=acc, device=dev)
    queries = torch.empty(group, nTw, Th, Tw, D, dtype=acc, device=dev)
    sim = torch.empty(group, nTw, Th * Tw, Rh * Rw, dtype=acc, device=dev)
    whole_tiles = H % Th == 0 and W % Tw == 0

    # Window starts of every query, in the tile layout: rows [nTh, 1, Th, 1, 1], cols [nTw, 1, Tw, 1].
    row_start = window_starts(H, window, dev)[qr][:, None, :, None, None]
    col_start = window_starts(W, window, dev)[qc][None, :, None, :, None]
    idx = torch.empty(B, H, W, k, dtype=torch.long, device=dev)
    score = torch.empty(B, H, W, k, dtype=acc, device=dev)
    for b in range(B):
        for t0 in range(0, nTh, group):
            t1 = min(nTh, t0 + group)
            g, r0 = t1 - t0, first_rows[t0]
            r1 = min(H, first_rows[t1 - 1] + Rh)
            for tj, c0 in enumerate(first_cols):
                c1 = min(W, c0 + Rw)
                keys[tj, : r1 - r0, : c1 - c0].copy_(dst[b, r0:r1, c0:c1])
            if whole_tiles:
                q = src[b, t0 * Th:t1 * Th]
            else:
                q = src[b].index_select(0, qr[t0:t1].flatten()).index_select(1, qc.flatten())
            queries[:g].copy_(q.view(g, Th, nTw, Tw, D).transpose(1, 2))
            for ti in range(t0, t1):
                y0 = first_rows[ti] - r0
                region = keys[:, y0:y0 + Rh].reshape(nTw, Rh * Rw, D)
                q = queries[ti - t0].view(nTw, Th * Tw, D)
                torch.bmm(q, region.transpose(1, 2), out=sim[ti - t0])          # [nTw, Th*Tw, Rh*Rw]
            cand = rows[t0:t1, None, :, None, :, None] * Rw + cols[None, :, None, :, None, :]
            cand = cand.reshape(g, nTw, Th * Tw, Lh * Lw)                       # [g, nTw, Th*Tw, Lh*Lw]
            s, p = _topk_lowest_index(sim[:g].gather(3, cand), k)                # [g, nTw, Th*Tw, K]
            # window position -> flat index into dst, then from tiles back to rows of the frame
            p = p.view(g, nTw, Th, Tw, k)
            flat = (row_start[t0:t1] + p // Lw) * W + (col_start + p % Lw)
            h0, h1 = t0 * Th, min(H, t1 * Th)
            idx[b, h0:h1] = flat.transpose(1, 2).reshape(g * Th, nTw * Tw, k)[: h1 - h0, :W]
            score[b, h0:h1] = s.view(g, nTw, Th, Tw, k).transpose(1, 2).reshape(g * Th, nTw * Tw, k)[: h1 - h0, :W]
    return idx, score


# ---------------------------------------------------------------- Triton kernel

@functools.lru_cache(maxsize=None)
def _triton_kernel():
    """Build the kernel on first use, so that importing this module never imports triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def window_topk_kernel(
        src_ptr, dst_ptr, idx_ptr, score_ptr,
        H, W, D, HALF, LH, LW,
        K: tl.constexpr, KP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
        SINGLE_D: tl.constexpr,
    ):
        # One program: BLOCK_Q consecutive query tokens (flat h*W+w) of one frame pair.
        pid_q = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        N = H * W
        q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)             # [BLOCK_Q]
        q_ok = q < N
        h = q // W
        w = q % W
        sh = tl.minimum(tl.maximum(h - HALF, 0), H - LH)         # shifted window: rows [sh, sh+LH)
        sw = tl.minimum(tl.maximum(w - HALF, 0), W - LW)
        src_rows = src_ptr + b * N * D + q.to(tl.int64)[:, None] * D
        dst_base = dst_ptr + b * N * D
        d = tl.arange(0, BLOCK_D)
        if SINGLE_D:                                             # the whole feature fits one block: load once
            x_all = tl.load(src_rows + d[None, :], mask=q_ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)

        # Running top-K per query, sorted descending; slots >= K are scratch.
        slot = tl.arange(0, KP)
        from_prev = tl.broadcast_to(tl.maximum(slot - 1, 0)[None, :], [BLOCK_Q, KP])
        best_s = tl.full([BLOCK_Q, KP], float("-inf"), tl.float32)
        best_i = tl.full([BLOCK_Q, KP], 0, tl.int32)

        # Offsets run row-major through the window, i.e. by increasing flat index, so a
        # new candidate whose score equals a kept one goes after it (lower index first).
        for off in range(0, LH * LW):
            cand = (sh + off // LW) * W + (sw + off % LW)        # [BLOCK_Q]
            dst_rows = dst_base + cand.to(tl.int64)[:, None] * D
            if SINGLE_D:
                y = tl.load(dst_rows + d[None, :], mask=q_ok[:, None] & (d[None, :] < D), other=0.0)
                acc = tl.sum(x_all * y.to(tl.float32), axis=1)
            else:
                acc = tl.zeros([BLOCK_Q], tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    m = q_ok[:, None] & (d0 + d[None, :] < D)
                    x = tl.load(src_rows + d0 + d[None, :], mask=m, other=0.0).to(tl.float32)
                    y = tl.load(dst_rows + d0 + d[None, :], mask=m, other=0.0).to(tl.float32)
                    acc += tl.sum(x * y, axis=1)
            # Insert into the sorted list: kept scores >= acc stay, acc takes the first
            # other slot, and the rest move down one slot.
            a = acc[:, None]
            prev_s = tl.gather(best_s, from_prev, 1)
            prev_i = tl.gather(best_i, from_prev, 1)
            keep = best_s >= a
            here = (slot[None, :] == 0) | (prev_s >= a)
            best_s = tl.where(keep, best_s, tl.where(here, a, prev_s))
            best_i = tl.where(keep, best_i, tl.where(here, cand[:, None], prev_i))

        out = (b * N + q.to(tl.int64))[:, None] * K + slot[None, :]
        m = q_ok[:, None] & (slot[None, :] < K)
        tl.store(score_ptr + out, best_s, mask=m)
        tl.store(idx_ptr + out, best_i.to(tl.int64), mask=m)

    return triton, window_topk_kernel


def window_topk_triton(
    src: torch.Tensor,
    dst: torch.Tensor,
    window: int = 9,
    k: int = 3,
    *,
    block_q: int = 64,
    block_d: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed top-K as one Triton kernel; never materialises a similarity tensor.

    Runs on CUDA tensors, or on CPU tensors under the Triton interpreter. Inputs are
    float16/bfloat16/float32; products accumulate in float32 and `score` is float32.
    """
    _check(src, dst, window, k)
    if src.dtype not in _TRITON_DTYPES:
        raise ValueError(f"window_topk_triton: dtype must be one of {_TRITON_DTYPES}, got {src.dtype}")
    triton, kernel = _triton_kernel()
    B, H, W, D = src.shape
    src, dst = src.contiguous(), dst.contiguous()
    idx = torch.empty(B, H, W, k, dtype=torch.long, device=src.device)
    score = torch.empty(B, H, W, k, dtype=torch.float32, device=src.device)
    bq = min(block_q, triton.next_power_of_2(H * W))
    bd = min(block_d, triton.next_power_of_2(D))
    grid = (triton.cdiv(H * W, bq), B)
    kernel[grid](
        src, dst, idx, score, H, W, D, window // 2, min(window, H), min(window, W),
        K=k, KP=triton.next_power_of_2(k), BLOCK_Q=bq, BLOCK_D=bd, SINGLE_D=D <= bd,
    )
    return idx, score


# ---------------------------------------------------------------- dispatcher

@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def window_topk(
    src: torch.Tensor,
    dst: torch.Tensor,
    window: int = 9,
    k: int = 3,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K most similar tokens of `dst` inside each `src` token's l×l window.

    src, dst: [B, H, W, D]; returns idx [B, H, W, K] (int64, flat h*W+w into dst) and
    score [B, H, W, K] (float32; float64 for float64 inputs), descending, ties by lower
    index. backend: "auto" (Triton for CUDA float16/bfloat16/float32 tensors when triton
    imports, the PyTorch reference otherwise), "triton" or "reference".
    """
    if backend not in _BACKENDS:
        raise ValueError(f"window_topk: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        use_triton = src.is_cuda and src.dtype in _TRITON_DTYPES and _triton_importable()
        backend = "triton" if use_triton else "reference"
    if backend == "triton":
        return window_topk_triton(src, dst, window, k)
    return window_topk_reference(src, dst, window, k)


def multiply_adds(frames: int, height: int, width: int, dim: int, window: int | None) -> int:
    """Multiply-adds of one direction of the correspondence search for `frames` frames:
    windowed (N-1)·H·W·L_h·L_w·d (Eq. 10), or for window=None the full pairwise matrices
    of Eq. 7, (N-1)·(H·W)²·d."""
    n = height * width
    if window is None:
        return (frames - 1) * n * n * dim
    return (frames - 1) * n * min(window, height) * min(window, width) * dim

