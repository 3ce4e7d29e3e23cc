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

Four functions share one signature, and a fifth serves both directions:
- `window_topk_band`: PyTorch, the CPU path. Queries are cut into tiles of T_h×T_w tokens
  (`default_tile()`: 4×8 where MKL runs AVX-512 kernels, else 4×4); a tile's windows all lie in
  one key region of (T_h+L_h-1)×(T_w+L_w-1) keys, and the tiles of a column strip are a few bmm
  calls on strided views of two contiguous copies (the strip's queries and its region columns of
  keys): [192, d]×[d, 32] products at l=9 for 4×8 tiles (2.37x the exact multiply-adds),
  [144, d]×[d, 16] for 4×4 (1.78x). Each query then gathers its L² candidates (precomputed
  indices, flat-index order) and keeps the top K by K passes of `max` (first maximal index =
  the tie rule). Pairs run one per worker thread (a pair left over is split over all of them),
  with torch's intra-op threads at 1 meanwhile.
- `window_topk_reference`: PyTorch. Queries are cut into T×T tiles; each tile is one
  batched matmul against the (T+L-1)² key region covering all its windows, from which
  each query then gathers its own L² candidates. Work runs in chunks of tiles, so the
  memory beyond inputs and outputs is bounded by `budget` elements, not by B·H·W·l².
- `window_topk_triton`: a Triton kernel, one program per row segment of queries, one
  tl.dot per window row against its key band, and a running top-K kept in registers
  (fp32 accumulation).
- `window_topk`: the dispatcher (Triton for CUDA tensors when triton imports, else the
  band path; `backend=` forces one). Triton is imported lazily, only by the Triton path.
- `window_topk_pair(a, b)`: `window_topk(a, b)` and `window_topk(b, a)` at once; on the band
  path from one pass (a[p]·b[q] serves p -> q and q -> p; border rows searched again).

The band path and the reference give bitwise-equal results whenever BLAS sums each dot
product in the same order for their two matmul shapes (it did on this machine's MKL at
COVE's size; it is guaranteed for features whose dot products are exact, as in the tests).
"""
from __future__ import annotations

import bisect
import concurrent.futures
import functools
import os
import threading

import torch

__all__ = [
    "window_topk", "window_topk_pair", "window_topk_band", "window_topk_reference", "window_topk_triton",
    "window_starts", "multiply_adds", "default_tile",
]

_BACKENDS = ("auto", "triton", "band", "reference")
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


# ---------------------------------------------------------------- block path (CPU default)
#
# Queries are cut into tiles of T_h×T_w tokens; the windows of a tile all lie in one key region
# (R ≤ T + L - 1 per axis in the frame interior), so a tile is one [T_h·T_w, d]×[d, R_h·R_w]
# product. Per query it multiplies R_h·R_w keys for L_h·L_w candidates: (T_h+L_h-1)(T_w+L_w-1)
# /(L_h·L_w) the exact work at l=9: 1.78x at 4×4 tiles, 2.37x at 4×8 (a 1×16 row segment: 2.67x);
# which tile is faster depends on BLAS's rate for the two product shapes (`default_tile`). The
# product is computed keys first, region [R_h·R_w, D] × tile^T [D, T_h·T_w]: the same sums as
# tile × region^T (MKL sums each dot product in one order for both), but MKL runs it faster on
# these shapes (one pair, one thread, Intel Xeon AVX-512, 4×4 tiles: 12.8 vs 15.9 ms with
# the copies; its AVX2 kernels: 13.5 vs 16.5 ms). For column strip j the strip's queries are
# copied into qs [H, T_w, D] and its region columns of keys into ks [H, R_w, D] (contiguous), so a tile's
# queries are the block qs[r0 : r0+T_h] -> [T_h·T_w, D] and its region the block
# ks[g : g+R_h] -> [R_h·R_w, D]: row tiles whose starts step evenly are one bmm on strided views,
# writing each tile's [R_h·R_w, T_h·T_w] block of similarities (keys major) into one flat buffer.
#
# Both directions (`window_topk_pair`): a[p]·b[q] serves p -> q and q -> p, if p's tile region
# also holds every q whose window holds p. In the interior that is the same region; at the
# borders a shifted window reaches farther (q = 0's window holds p = l-1), so there the regions
# grow to hold those q as well (plan `both=True`), and nothing is searched twice.

@functools.lru_cache(maxsize=128)
def _axis_tiles(size: int, window: int, tile: int, both: bool = False):
    """Tiles along one axis (shape only, plain Python numbers): (L, T, first, region, extent,
    starts, owner, slot). first [n]: first query position of each tile (the last tile ends at
    `size`, overlapping its neighbour); region/extent [n]: first key position and length of its
    region (inside the axis, holding every window of the tile; with `both`, also every position
    whose window holds one of the tile's); starts [size]: window starts; owner/slot [size]: the
    tile (the last one covering it) and the slot whose result position p takes."""
    L, T = min(window, size), min(tile, size)
    n = -(-size // T)
    first = [min(j * T, size - T) for j in range(n)]
    starts = window_starts(size, window).tolist()
    if both:   # the positions whose window holds p: [lo[p], hi[p]] (starts are nondecreasing)
        lo = [bisect.bisect_right(starts, p - L) for p in range(size)]
        hi = [bisect.bisect_right(starts, p) - 1 for p in range(size)]
        region = [min(starts[x], lo[x]) for x in first]
        extent = [max(starts[x + T - 1] + L, hi[x + T - 1] + 1) - g for x, g in zip(first, region)]
    else:      # one length for all tiles, the region shifted (not cut) at the borders
        R = max(starts[x + T - 1] + L - starts[x] for x in first)
        region = [min(starts[x], size - R) for x in first]
        extent = [R] * n
    owner, slot = [0] * size, [0] * size
    for j, x in enumerate(first):
        for t in range(T):
            owner[x + t], slot[x + t] = j, t
    return L, T, tuple(first), tuple(region), tuple(extent), tuple(starts), tuple(owner), tuple(slot)


@functools.lru_cache(maxsize=128)
def _tile_runs(first: tuple[int, ...], region: tuple[int, ...], extent: tuple[int, ...]):
    """Consecutive tiles of one region length whose query and region starts step evenly:
    [(tile, n, first, region, query step, region step, length), ...], each one bmm."""
    runs, i, n = [], 0, len(first)
    while i < n:
        i1, step = i + 1, None
        while i1 < n and extent[i1] == extent[i]:
            d = (first[i1] - first[i1 - 1], region[i1] - region[i1 - 1])
            if step is None:
                step = d
            if d != step:
                break
            i1 += 1
        runs.append((i, i1 - i, first[i], region[i], *(step or (0, 0)), extent[i]))
        i = i1
    return tuple(runs)


@functools.lru_cache(maxsize=64)
def _block_plan(H: int, W: int, window: int, tile_h: int, tile_w: int, both: bool):
    """The tiles of both axes, each tile's offset in the flat similarity buffer of one pair
    (tiles ordered by column strip, then row tile; tile (j, i) holds [T_h·T_w, R_h[i]·R_w[j]]),
    the buffer's size and the row-tile runs."""
    rows, cols = _axis_tiles(H, window, tile_h, both), _axis_tiles(W, window, tile_w, both)
    block = rows[1] * cols[1]
    offsets, size = [], 0
    for rw in cols[4]:
        offsets.append([])
        for rh in rows[4]:
            offsets[-1].append(size)
            size += block * rh * rw
    return rows, cols, tuple(map(tuple, offsets)), size, _tile_runs(rows[2], rows[3], rows[4])


@functools.lru_cache(maxsize=64)
def _block_gather(H: int, W: int, window: int, tile_h: int, tile_w: int, both: bool, backward: bool) -> torch.Tensor:
    """Flat positions, inside one pair's similarity buffer (`_block_plan`), of every query's
    L_h·L_w window candidates, queries row-major, candidates in flat-index order:
    [H·W·L_h·L_w] (CPU, cached; int32 when it fits).

    backward=True (plan `both`): the buffer holds a[p]·b[q] for queries p of frame a, and the
    queries are those q of frame b: candidate p's entry for q is read in p's tile, at q's place
    in that tile's region."""
    rows, cols, offsets, size, _ = _block_plan(H, W, window, tile_h, tile_w, both)
    Lh, Th, _, rreg, rext, rs, rown, rslot = rows
    Lw, Tw, _, creg, cext, cs, cown, cslot = cols
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    off, rext, cext, rreg, creg = t(offsets), t(rext), t(cext), t(rreg), t(creg)
    h = torch.arange(H)[:, None, None, None]
    w = torch.arange(W)[None, :, None, None]
    kh = t(rs)[h] + torch.arange(Lh)[None, None, :, None]                  # candidate row
    kw = t(cs)[w] + torch.arange(Lw)[None, None, None, :]                  # candidate column
    if backward:     # the entry sits in candidate (kh, kw)'s tile, at the query (h, w)'s place
        (ph, pw), (qh, qw) = (kh, kw), (h, w)
    else:            # in the query's tile, at the candidate's place
        (ph, pw), (qh, qw) = (h, w), (kh, kw)
    i, j = t(rown)[ph], t(cown)[pw]
    place = (qh - rreg[i]) * cext[j] + (qw - creg[j])                     # key's place in the region
    index = off[j, i] + place * (Th * Tw) + t(rslot)[ph] * Tw + t(cslot)[pw]
    index = index.flatten()
    return index.int() if size < 2 ** 31 else index


def _block_sims(q, kf, plan, qs, ks, out, strips) -> None:
    """Similarities of every query tile of q [H, W, D] in column strips `strips` (indices)
    against its key region of kf [H, W, D] into the flat buffer out (`_block_plan` layout);
    qs [H·T_w·D] and ks [H·max R_w·D] are buffers."""
    rows, cols, offsets, _, runs = plan
    H, _, D = q.shape
    Th, Tw = rows[1], cols[1]
    qv = qs.view(H, Tw, D)
    for j in strips:
        w0, c0, rw = cols[2][j], cols[3][j], cols[4][j]
        qv.copy_(q[:, w0:w0 + Tw])
        kv = ks[:H * rw * D].view(H, rw, D)
        kv.copy_(kf[:, c0:c0 + rw])
        for i, n, r0, g0, dr, dg, rh in runs:
            a = qs.as_strided((n, Th * Tw, D), (dr * Tw * D, D, 1), r0 * Tw * D)
            b = kv.as_strided((n, rh * rw, D), (dg * rw * D, D, 1), g0 * rw * D)
            o = offsets[j][i]
            torch.bmm(b, a.transpose(1, 2), out=out[o:o + n * Th * Tw * rh * rw].view(n, rh * rw, Th * Tw))


_MAX_PASSES = 6      # k up to this: k passes of max (2-3x faster than topk at C = 81); above: topk


def _select_topk(cand: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of cand [M, C] (columns in flat-index order), descending, ties to
    the lower column (equal floats, +0.0 = -0.0). Small k: k passes of `max` (it returns the
    first maximal index), each pick then masked by -inf in place (cand is overwritten; scores
    are finite). Larger k: topk of k+1, and a stable sort only for rows whose top k+1 hold an
    exact tie. Returns (score, position)."""
    C = cand.shape[1]
    if k <= _MAX_PASSES:
        val = cand.new_empty(cand.shape[0], k)
        position = torch.empty(cand.shape[0], k, dtype=torch.long, device=cand.device)
        for r in range(k):
            v, p = cand.max(1, keepdim=True)
            val[:, r:r + 1], position[:, r:r + 1] = v, p
            if r + 1 < k:
                cand.scatter_(1, p, float("-inf"))
        return val, position
    if k + 1 > C:
        position = torch.sort(cand, dim=1, descending=True, stable=True).indices[:, :k]
        return cand.gather(1, position), position
    val, position = cand.topk(k + 1, dim=1, sorted=True)
    tie = (val[:, :-1] == val[:, 1:]).any(1).nonzero().flatten()
    val, position = val[:, :k], position[:, :k]
    if tie.numel():
        p = torch.sort(cand[tie], dim=1, descending=True, stable=True).indices[:, :k]
        position = position.index_copy(0, tie, p)
        val = val.index_copy(0, tie, cand[tie].gather(1, p))
    return val, position


@functools.lru_cache(maxsize=64)
def _candidate_index(H: int, W: int, window: int) -> torch.Tensor:
    """Flat index h*W + w into the key frame of every query's L_h·L_w window candidates, in
    flat-index order, queries row-major: [H·W, L_h·L_w] int64 (CPU, cached). A window position
    p of query n is then the key frame's token _candidate_index(...)[n, p]."""
    Lh, Lw = min(window, H), min(window, W)
    rows = window_starts(H, window)[:, None] + torch.arange(Lh)                 # [H, Lh]
    cols = window_starts(W, window)[:, None] + torch.arange(Lw)                 # [W, Lw]
    return (rows[:, None, :, None] * W + cols[None, :, None, :]).reshape(H * W, Lh * Lw)


def _band_check(src, dst, window, k, tile, threads, name):
    _check(src, dst, window, k)
    for v, what in ((tile, "tile"), (threads, "threads")):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name}: {what} must be a positive integer, got {v!r}")


def _over_pairs(B: int, threads: int | None, make, make_shared, phases) -> None:
    """Run phases[0](b, part, parts, buffers, shared), phases[1](...), ... for every pair b in
    range(B) on `threads` Python threads (default torch.get_num_threads()), each worker with its
    own buffers = make(); `shared` is the pair's buffer the phases pass on (one per worker, from
    make_shared(), for a pair run whole).

    Workers take pairs one at a time and run them whole (part 0 of 1). The B mod n pairs left
    when the others are shared out evenly among the n workers (all pairs when B < n) are split:
    each phase of such a pair runs as n parts (part p of n) that the workers take side by side,
    on a shared buffer of the pair, a phase starting when all parts of the one before are done.
    So an odd pair at the end, or a single pair, does not leave a core idle.

    While they run (also with one worker), torch's intra-op threads are set to 1 (restored
    after): every op then runs in its worker's thread, and the only synchronisation is between
    the phases of a split pair. Many small ops that each split over all cores are what collapses
    on a loaded machine (each waits for its slowest thread); whole pairs per core do not.
    """
    n = threads or torch.get_num_threads()
    if B == 0:
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if n == 1:
            buffers, shared = make(), make_shared()
            for b in range(B):
                for phase in phases:
                    phase(b, 0, 1, buffers, shared)
        else:
            _on_workers(B, n, make, make_shared, phases)
    finally:
        torch.set_num_threads(previous)


def _on_workers(B: int, n: int, make, make_shared, phases) -> None:
    """`_over_pairs` on n >= 2 Python threads (torch's intra-op threads already at 1)."""
    whole = B - B % n
    units = [(b, None, 0) for b in range(whole)]                       # (pair, phase, part); None: whole
    units += [(b, f, part) for b in range(whole, B) for f in range(len(phases)) for part in range(n)]
    split_shared = {b: make_shared() for b in range(whole, B)}
    done = {(b, f): 0 for b in range(whole, B) for f in range(len(phases))}
    units, cond, failed = iter(units), threading.Condition(), []
    inference = torch.is_inference_mode_enabled()                     # grad modes are per thread

    def worker():
        try:
            with torch.inference_mode(inference), torch.no_grad():
                buffers, own = make(), None
                while True:
                    with cond:
                        b, f, part = next(units, (None, None, None))
                    if b is None:
                        return
                    if f is None:
                        own = make_shared() if own is None else own
                        for phase in phases:
                            phase(b, 0, 1, buffers, own)
                        continue
                    with cond:                                      # the pair's previous phase done?
                        cond.wait_for(lambda: failed or f == 0 or done[b, f - 1] == n)
                        if failed:
                            return
                    phases[f](b, part, n, buffers, split_shared[b])
                    with cond:
                        done[b, f] += 1
                        cond.notify_all()
        except BaseException:
            with cond:
                failed.append(True)
                cond.notify_all()
            raise

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        for fut in [pool.submit(worker) for _ in range(n)]:
            fut.result()


@functools.lru_cache(maxsize=None)
def default_tile() -> tuple[int, int]:
    """The block path's default tile (rows, columns): 4×8 where MKL runs its AVX-512 kernels (an
    Intel CPU with AVX-512, torch built with MKL, MKL_ENABLE_INSTRUCTIONS not lowering it), 4×4
    elsewhere.

    Why (one pair at COVE's size, l = 9, one thread): a 4×8 tile is one [192, d]×[d, 32] product
    (2.37x the exact multiply-adds), a 4×4 tile one [144, d]×[d, 16] (1.78x). MKL's AVX-512 kernels
    run the larger products at a higher rate (Intel Xeon, AVX-512: 64 vs 48 GMAC/s, tile products
    alone), which more than pays for the extra work; its AVX2 kernels (AMD CPUs, whose MKL runs
    them also on AVX-512 hardware, and Intel CPUs without AVX-512) run both near one rate, and then
    the smaller tile's fewer products win. The results are the same either way (tie rule, fp32
    sums; bitwise wherever BLAS sums both shapes' dot products in one order).
    """
    if torch.backends.cpu.get_cpu_capability() != "AVX512" or "BLAS_INFO=mkl" not in torch.__config__.show():
        return (4, 4)
    if not os.environ.get("MKL_ENABLE_INSTRUCTIONS", "AVX512").upper().startswith("AVX512"):
        return (4, 4)
    try:
        with open("/proc/cpuinfo") as f:
            intel = "GenuineIntel" in f.read(4096)
    except OSError:
        intel = False
    return (4, 8) if intel else (4, 4)


def _tile_sides(tile, name: str) -> tuple[int, int]:
    """tile: an int (T×T), a (rows, columns) pair of positive ints, or None (`default_tile()`)."""
    if tile is None:
        return default_tile()
    sides = (tile, tile) if not isinstance(tile, (tuple, list)) else tuple(tile)
    if len(sides) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in sides):
        raise ValueError(f"{name}: tile must be a positive integer or a (rows, columns) pair of them, got {tile!r}")
    return sides


def _block_search(a, b, window, k, tile, threads, both, name):
    """The block path for a batch of pairs: forward (and with `both` backward) top-K."""
    _band_check(a, b, window, k, None, threads, name)
    tile_h, tile_w = _tile_sides(tile, name)
    B, H, W, D = a.shape
    plan = _block_plan(H, W, window, tile_h, tile_w, both)
    rows, cols, _, size, _ = plan
    dev, acc = a.device, _accum_dtype(a.dtype)
    C = rows[0] * cols[0]
    gathers = [_block_gather(H, W, window, tile_h, tile_w, both, backward).to(dev) for backward in (False, True)[:1 + both]]
    flat = _candidate_index(H, W, window).to(dev)
    out = [torch.empty(B, H, W, k, dtype=t, device=dev) for t in (torch.long, acc) * (1 + both)]

    def make():      # per worker: a strip of queries, one of keys, candidates
        return (torch.empty(H * cols[1] * D, dtype=acc, device=dev), torch.empty(H * max(cols[4]) * D, dtype=acc, device=dev),
                torch.empty(H * W, C, dtype=acc, device=dev))

    def make_shared():   # per pair: its tile similarities
        return torch.empty(size, dtype=acc, device=dev)

    def products(i, part, parts, buffers, sims):       # column strips part, part + parts, ...
        _block_sims(a[i], b[i], plan, buffers[0], buffers[1], sims, range(part, len(cols[2]), parts))

    def select(i, part, parts, buffers, sims):         # query rows [h0, h1)
        h0, h1 = part * H // parts, (part + 1) * H // parts
        n0, n1 = h0 * W, h1 * W
        cand = buffers[2][: n1 - n0]
        for d, gather in enumerate(gathers):
            torch.index_select(sims, 0, gather[n0 * C:n1 * C], out=cand.view(-1))
            s, p = _select_topk(cand, k)
            out[2 * d + 1][i, h0:h1] = s.view(h1 - h0, W, k)
            torch.gather(flat[n0:n1], 1, p, out=out[2 * d][i, h0:h1].view(n1 - n0, k))

    with torch.no_grad():
        _over_pairs(B, threads, make, make_shared, (products, select))
    return tuple(out)


def window_topk_band(
    src: torch.Tensor,
    dst: torch.Tensor,
    window: int = 9,
    k: int = 3,
    *,
    tile: int | tuple[int, int] | None = None,
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed top-K as small query tiles against their key regions (the CPU path).

    Queries are cut into tiles of `tile` = (rows, columns) tokens (an int: square); a tile is
    one matrix product against its region (the R_h×R_w keys holding all its windows), and the
    tiles of a column strip are a few bmm calls on strided views of two contiguous copies (the
    strip's queries and its region columns of keys). Each query then reads its L_h·L_w
    candidates (a precomputed gather, flat-index order) and keeps the top K (tie rule as in the
    module docstring). The default tile (None) is `default_tile()`: at l=9, 4×8 tiles multiply
    2.37x the exact multiply-adds in [192, d]×[d, 32] products, 4×4 tiles 1.78x in
    [144, d]×[d, 16] ones (1×16 row segments, the former default: 2.67x). Pairs (the batch) are
    spread over `threads` worker threads (default torch.get_num_threads(); see `_over_pairs`).
    Memory beyond inputs and outputs per worker: one pair's tile similarities and candidates and
    one strip of queries and keys (at l=9, 64×64, d=640, fp32: 3.0 + 1.3 + 3.8 MiB with 4×8
    tiles, 2.3 + 1.3 + 2.5 MiB with 4×4). Same signature and results as `window_topk_reference`; no gradient.
    """
    return _block_search(src, dst, window, k, tile, threads, False, "window_topk_band")


def window_topk_pair(
    a: torch.Tensor,
    b: torch.Tensor,
    window: int = 9,
    k: int = 3,
    *,
    backend: str = "auto",
    tile: int | tuple[int, int] | None = None,
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both directions at once: `window_topk(a, b)` and `window_topk(b, a)`, as
    (fwd_idx, fwd_score, bwd_idx, bwd_score).

    On the block path (backend "auto" on CPU, or "band") one pass serves both: the similarities
    a[p]·b[q] of each tile of queries p of a against its key region of b are computed once; a
    backward query q of b reads a[p]·b[q] for each p of its window from p's tile. The regions
    hold, besides the tile's windows, every q whose window holds one of the tile's p: the same
    region in the frame interior, up to l//2 rows/columns more for border tiles, where a
    shifted window reaches farther. At l=9 and 64×64 that is 1.20x the exact multiply-adds of
    both directions with 4×8 tiles, 0.91x with 4×4. Memory beyond inputs and outputs per worker
    thread: one pair's similarities (3.0 / 2.3 MiB at l=9, 64×64, fp32, 4×8 / 4×4 tiles), both
    directions' candidates in turn and one strip of queries and keys. Other backends run two
    searches. tile/threads: as in `window_topk_band` (block path only).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"window_topk_pair: backend must be one of {_BACKENDS}, got {backend!r}")
    if _resolve(a, backend) != "band":
        return (*window_topk(a, b, window, k, backend=backend), *window_topk(b, a, window, k, backend=backend))
    return _block_search(a, b, window, k, tile, threads, True, "window_topk_pair")


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
        K: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr, TO_F32: tl.constexpr,
    ):
        # One program: a row segment of BLOCK_T queries (row h, columns w0..) of one frame pair,
        # against its key band: the LH window rows of row h by the BLOCK_R >= BLOCK_T + LW - 1
        # columns from the first query's window start, which hold every query's window.
        w0 = tl.program_id(0) * BLOCK_T
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        N = H * W
        t = tl.arange(0, BLOCK_T)
        w = w0 + t
        q_ok = w < W
        sh = tl.minimum(tl.maximum(h - HALF, 0), H - LH)          # shifted window: rows [sh, sh+LH)
        sw = tl.minimum(tl.maximum(w - HALF, 0), W - LW)          # [BLOCK_T] first window column
        c0 = tl.minimum(tl.maximum(w0 - HALF, 0), W - LW)         # band's first column = sw of query w0
        r = tl.arange(0, BLOCK_R)
        r_ok = c0 + r < W
        src_rows = src_ptr + (b * N + h * W + w.to(tl.int64))[:, None] * D
        d = tl.arange(0, BLOCK_D)
        if SINGLE_D:                                              # the whole feature fits one block: load once
            x_all = tl.load(src_rows + d[None, :], mask=q_ok[:, None] & (d[None, :] < D), other=0.0)
            if TO_F32:
                x_all = x_all.to(tl.float32)

        # Running top-K per query, sorted descending; slots >= K are scratch.
        slot = tl.arange(0, KP)
        from_prev = tl.broadcast_to(tl.maximum(slot - 1, 0)[None, :], [BLOCK_T, KP])
        best_s = tl.full([BLOCK_T, KP], float("-inf"), tl.float32)
        best_i = tl.full([BLOCK_T, KP], 0, tl.int32)

        # Band rows, then window columns, in increasing order: candidates arrive by increasing
        # flat index, so a later candidate whose score equals a kept one goes after it.
        for i in range(0, LH):
            kh = sh + i
            key_rows = dst_ptr + (b * N + kh * W + (c0 + r).to(tl.int64))[:, None] * D
            if SINGLE_D:
                y = tl.load(key_rows + d[None, :], mask=r_ok[:, None] & (d[None, :] < D), other=0.0)
                if TO_F32:
                    y = y.to(tl.float32)
                sims = tl.dot(x_all, tl.trans(y), input_precision="ieee", out_dtype=tl.float32)
            else:
                sims = tl.zeros([BLOCK_T, BLOCK_R], tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    dm = d0 + d[None, :] < D
                    x = tl.load(src_rows + d0 + d[None, :], mask=q_ok[:, None] & dm, other=0.0)
                    y = tl.load(key_rows + d0 + d[None, :], mask=r_ok[:, None] & dm, other=0.0)
                    if TO_F32:
                        x = x.to(tl.float32)
                        y = y.to(tl.float32)
                    sims += tl.dot(x, tl.trans(y), input_precision="ieee", out_dtype=tl.float32)
            for jj in range(0, LW):
                col = sw - c0 + jj                                    # [BLOCK_T] band column of the candidate
                # pick sims[t, col[t]]: the max of one value and -infs (exact, keeps -0.0)
                acc = tl.max(tl.where(r[None, :] == col[:, None], sims, float("-inf")), axis=1)
                cand = kh * W + sw + jj
                # Insert into the sorted list: kept scores >= acc stay, acc takes the first
                # other slot, and the rest move down one slot.
                a = acc[:, None]
                prev_s = tl.gather(best_s, from_prev, 1)
                prev_i = tl.gather(best_i, from_prev, 1)
                keep = best_s >= a
                here = (slot[None, :] == 0) | (prev_s >= a)
                best_s = tl.where(keep, best_s, tl.where(here, a, prev_s))
                best_i = tl.where(keep, best_i, tl.where(here, cand[:, None], prev_i))

        out = (b * N + h * W + w.to(tl.int64))[:, None] * K + slot[None, :]
        m = q_ok[:, None] & (slot[None, :] < K)
        tl.store(score_ptr + out, best_s, mask=m)
        tl.store(idx_ptr + out, best_i.to(tl.int64), mask=m)

    return triton, window_topk_kernel


def window_topk_launch_config(dtype: torch.dtype, dim: int, window: int, width: int,
                              capability: tuple[int, int] = (8, 0), shared_optin: int | None = None) -> dict:
    """The kernel's launch parameters on a GPU of compute `capability` with `shared_optin` bytes of
    shared memory per block (default: the architecture's, `minivid.kernels.aot.ARCHS`), for features
    of `dim` channels, an l = `window` search and frames `width` tokens wide: block_q (query segment),
    block_d (feature block), num_warps, num_stages. Compiled for sm_80/86/89/90 by `minivid bench
    kernels --aot` (0 spill bytes, within shared memory; docs/benchmarks.md); why each: docs/cove.md.
    The choice is the same on those four architectures (the kernel needs at most 12 KiB of shared
    memory and 80 registers there); `capability` and `shared_optin` are taken for the launchers' one
    interface."""
    # Segments of 16 queries against 32-column key bands (16 + l - 1 <= 32 for l <= 17): a band row's
    # dot then computes 16×32 products of which each query uses l (9/32 at l = 9), against 9/64 for
    # 32-query segments, at the same key traffic (band columns per query 2 in both). 56-80 registers
    # and 6-12 KiB of shared memory on sm_80/86/89/90 with a 64-wide feature block in every dtype (the
    # former 32 × 64 segments at Triton's default 3 stages spilled 56-880 B per thread on sm_80); fp32
    # and bf16 (converted in the kernel) multiply in IEEE fp32 on the CUDA cores, unpipelined; fp16 on
    # the tensor cores, 2 stages.
    block_q = 16 if window <= 17 else 32
    block_d, warps, stages = 64, 4, 2 if dtype == torch.float16 else 1
    return dict(block_q=block_q, block_d=block_d, num_warps=warps, num_stages=stages)


def _launch(src, dst, idx, score, window, k, cfg):
    """(grid, positional args, keyword args) of one `window_topk_kernel` launch: what the launcher
    passes and what `minivid.kernels.aot_specs` compiles (from meta tensors of the same shapes)."""
    B, H, W, D = src.shape
    Lh, Lw = min(window, H), min(window, W)
    p2 = lambda n: 1 << max(0, n - 1).bit_length()                     # noqa: E731  next power of two
    bt = max(16, min(p2(cfg["block_q"]), p2(W)))
    br = max(16, p2(bt + Lw - 1))
    bd = max(16, min(p2(cfg["block_d"]), p2(D)))
    grid = (-(-W // bt), H, B)
    kwargs = dict(K=k, KP=p2(k), BLOCK_T=bt, BLOCK_R=br, BLOCK_D=bd, SINGLE_D=D <= bd, TO_F32=src.dtype == torch.bfloat16,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return grid, (src, dst, idx, score, H, W, D, window // 2, Lh, Lw), kwargs


def window_topk_triton(
    src: torch.Tensor,
    dst: torch.Tensor,
    window: int = 9,
    k: int = 3,
    *,
    block_q: int | None = None,
    block_d: int | None = None,
    capability: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windowed top-K as one Triton kernel; never materialises a similarity tensor.

    One program per row segment of `block_q` queries (at least 16): per window row, one
    tl.dot of the segment's features against its key band row (block_q + l - 1 columns,
    padded to a power of two), then each query's l candidates are picked from it into a
    running top-K. Runs on CUDA tensors, or on CPU tensors under the Triton interpreter.
    Inputs float16/bfloat16/float32; products accumulate in float32 (fp32 tl.dot with
    input_precision="ieee", no TF32) and `score` is float32. bfloat16 tiles are converted
    to float32 in the kernel before tl.dot (exact): Triton's CPU interpreter computes bf16
    tl.dot wrongly, so a bf16 tl.dot path could not be verified and does not ship.
    block_q, block_d, warps and stages are chosen for the tensors' GPU
    (`window_topk_launch_config`; on the CPU interpreter: sm_80's); `capability`, e.g. (8, 6),
    chooses them for another GPU, and `block_q`/`block_d` override the blocks.
    """
    _check(src, dst, window, k)
    if src.dtype not in _TRITON_DTYPES:
        raise ValueError(f"window_topk_triton: dtype must be one of {_TRITON_DTYPES}, got {src.dtype}")
    from .aot import device_target

    _, kernel = _triton_kernel()
    B, H, W, D = src.shape
    src, dst = src.contiguous(), dst.contiguous()
    idx = torch.empty(B, H, W, k, dtype=torch.long, device=src.device)
    score = torch.empty(B, H, W, k, dtype=torch.float32, device=src.device)
    cap, shared = device_target(src.device) if capability is None else (tuple(capability), None)
    cfg = window_topk_launch_config(src.dtype, D, window, W, cap, shared)
    cfg.update({n: b for n, b in (("block_q", block_q), ("block_d", block_d)) if b})
    grid, args, kwargs = _launch(src, dst, idx, score, window, k, cfg)
    kernel[grid](*args, **kwargs)
    return idx, score


# ---------------------------------------------------------------- dispatcher

@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve(src: torch.Tensor, backend: str) -> str:
    if backend == "auto":
        use_triton = src.is_cuda and src.dtype in _TRITON_DTYPES and _triton_importable()
        return "triton" if use_triton else "band"
    return backend


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
    imports, the band path otherwise), "triton", "band" or "reference".
    """
    if backend not in _BACKENDS:
        raise ValueError(f"window_topk: backend must be one of {_BACKENDS}, got {backend!r}")
    backend = _resolve(src, backend)
    if backend == "triton":
        return window_topk_triton(src, dst, window, k)
    if backend == "band":
        return window_topk_band(src, dst, window, k)
    return window_topk_reference(src, dst, window, k)


def multiply_adds(frames: int, height: int, width: int, dim: int, window: int | None) -> int:
    """Multiply-adds of one direction of the correspondence search for `frames` frames:
    windowed (N-1)·H·W·L_h·L_w·d (Eq. 10), or for window=None the full pairwise matrices
    of Eq. 7, (N-1)·(H·W)²·d."""
    n = height * width
    if window is None:
        return (frames - 1) * n * n * dim
    return (frames - 1) * n * min(window, height) * min(window, width) * dim

