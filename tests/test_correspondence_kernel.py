"""Sliding-window top-K correspondence: reference vs a brute-force loop, the band path and the
both-directions pass vs the reference (bitwise), Triton (interpreter) vs reference, the border and
tie rules, translation recovery, memory and every input error.

Bitwise comparisons between paths that sum a dot product in different orders (BLAS picks its
kernel by shape) use features whose dot products are exact in float32 (small dyadic values), so
equality is guaranteed on any CPU; on general floats only a rounding bound holds."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from minivid.kernels.correspondence import (
    multiply_adds,
    window_starts,
    window_topk,
    window_topk_band,
    window_topk_pair,
    window_topk_reference,
    window_topk_triton,
)
from minivid.methods.cove.correspondence import window_topk_definition


# the definition, one query at a time (shifted window, sort by (-score, flat index)), lives with the method
brute_force = window_topk_definition


def integer_features(*shape, low=-2, high=3):
    """Small integer-valued features: dot products are exact, so ties are exact too."""
    return torch.randint(low, high, shape).float()


def dyadic_features(*shape, seed=0):
    """Random multiples of 1/64 in [-1, 1]: few ties, yet every dot product of D <= 64 terms is
    exact in float32 (and the values exact in fp16/bf16), whatever the summation order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-64, 65, shape, generator=g).float() / 64


# (B, H, W, D, window, k): H != W, frames narrower/shorter than the window, k up to the window size
SHAPES = [
    (2, 5, 7, 3, 3, 3),
    (1, 9, 6, 4, 9, 5),
    (2, 7, 10, 5, 5, 1),
    (1, 3, 4, 2, 9, 5),
    (1, 11, 6, 3, 3, 9),
    (1, 6, 5, 2, 1, 1),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_reference_equals_brute_force_with_ties(shape):
    B, H, W, D, window, k = shape
    src, dst = integer_features(B, H, W, D), integer_features(B, H, W, D)
    idx0, score0 = brute_force(src, dst, window, k)
    for tile in (1, 3, 8, (2, 5)):
        idx, score = window_topk_reference(src, dst, window, k, tile=tile, budget=1)
        assert torch.equal(idx, idx0), f"tile={tile}"
        assert torch.equal(score.double(), score0), f"tile={tile}"


# more shapes for the band path: W not a multiple of the tile, tile wider than the frame,
# windows larger than one side only, both sides, and a single row/column
BAND_SHAPES = SHAPES + [
    (1, 20, 37, 3, 9, 3),
    (1, 13, 17, 4, 5, 25),
    (2, 12, 5, 3, 7, 4),
    (1, 4, 23, 2, 9, 6),
    (1, 1, 9, 2, 3, 3),
    (1, 9, 1, 2, 5, 2),
]


@pytest.mark.parametrize("shape", BAND_SHAPES, ids=str)
def test_band_and_pair_equal_reference_with_ties(shape):
    """Integer features (many exact ties): the band path equals the reference bitwise, for
    several tile shapes, and the both-directions pass (its border regions grown so that one pass
    serves both) equals two separate searches."""
    B, H, W, D, window, k = shape
    src, dst = integer_features(B, H, W, D), integer_features(B, H, W, D)
    fwd = window_topk_reference(src, dst, window, k)
    bwd = window_topk_reference(dst, src, window, k)
    for tile in (1, 3, 16, 40):
        out = window_topk_band(src, dst, window, k, tile=tile)
        assert torch.equal(out[0], fwd[0]) and torch.equal(out[1], fwd[1]), f"tile={tile}"
        both = window_topk_pair(src, dst, window, k, tile=tile)
        assert all(torch.equal(x, y) for x, y in zip(both, (*fwd, *bwd))), f"tile={tile}"
    for tile in (None, (4, 4), (4, 8), (2, 8), (1, 16), (3, 5), (5, 1), (40, 2)):  # default, rows x columns tiles, incl. ragged and wider than the frame
        out = window_topk_band(src, dst, window, k, tile=tile)
        assert torch.equal(out[0], fwd[0]) and torch.equal(out[1], fwd[1]), f"tile={tile}"
        both = window_topk_pair(src, dst, window, k, tile=tile)
        assert all(torch.equal(x, y) for x, y in zip(both, (*fwd, *bwd))), f"tile={tile}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_band_and_pair_random_dyadic_bitwise(dtype):
    """Random features with exact dot products, border-heavy 19x23 frames, l = 9, K = 3 (the
    max-pass top-k) and K = 9 (topk + tie sort): bitwise equal to the reference in every dtype."""
    src = dyadic_features(3, 19, 23, 24, seed=1).to(dtype)
    dst = dyadic_features(3, 19, 23, 24, seed=2).to(dtype)
    for k in (3, 9):
        fwd = window_topk_reference(src, dst, 9, k)
        bwd = window_topk_reference(dst, src, 9, k)
        out = window_topk_band(src, dst, 9, k)
        assert out[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.equal(out[0], fwd[0]) and torch.equal(out[1], fwd[1])
        both = window_topk_pair(src, dst, 9, k)
        assert all(torch.equal(x, y) for x, y in zip(both, (*fwd, *bwd)))


def test_band_worker_threads_give_the_same_result():
    """Pairs spread over 2 or 3 worker threads (intra-op threads 1 meanwhile, restored after):
    the same tensors as one thread, and torch's thread setting is unchanged."""
    src, dst = dyadic_features(5, 11, 13, 8, seed=3), dyadic_features(5, 11, 13, 8, seed=4)
    one = window_topk_pair(src, dst, 5, 3, threads=1)
    before = torch.get_num_threads()
    for threads in (2, 3):
        assert all(torch.equal(x, y) for x, y in zip(window_topk_pair(src, dst, 5, 3, threads=threads), one))
        band = window_topk_band(src, dst, 5, 3, threads=threads)
        assert torch.equal(band[0], one[0]) and torch.equal(band[1], one[1])
        assert torch.get_num_threads() == before
    with torch.inference_mode():                      # the workers write the caller's (inference) outputs
        assert all(torch.equal(x, y) for x, y in zip(window_topk_pair(src, dst, 5, 3, threads=2), one))
        assert torch.equal(window_topk_band(src, dst, 5, 3, threads=2)[0], one[0])


def test_band_gaussian_features_within_rounding():
    """General floats: the band path and the reference sum each dot product in BLAS orders that
    may differ (by shape), so scores agree to a rounding bound (|error| <= D·eps·sum|x·y|, here
    <= 1 for unit vectors) and indices wherever the ranking is not decided by that rounding."""
    tol = 64 * torch.finfo(torch.float32).eps
    src = F.normalize(torch.randn(2, 17, 21, 64), dim=-1)
    dst = F.normalize(torch.randn(2, 17, 21, 64), dim=-1)
    idx0, score0 = window_topk_reference(src, dst, 9, 3)
    idx, score = window_topk_band(src, dst, 9, 3)
    assert torch.allclose(score, score0, atol=tol, rtol=0)
    ref_all = window_topk_reference(src, dst, 9, 4)[1]
    clear = (ref_all[..., :-1] - ref_all[..., 1:]).min(dim=-1).values > 2 * tol
    assert clear.float().mean() > 0.9
    assert torch.equal(idx[clear], idx0[clear])


def test_band_memory_stays_below_the_window_tensor():
    """The band path never holds the B·H·W·l² candidate scores of all pairs: beyond its outputs,
    its peak allocation during a call (torch profiler, self allocations) is one pair's working
    set, below a quarter of that tensor at B = 32 pairs."""
    B, H, W, D, window, k = 32, 32, 32, 4, 9, 3
    src, dst = torch.randn(B, H, W, D), torch.randn(B, H, W, D)
    window_topk_pair(src, dst, window, k)                         # shape plan cached
    for fn, outputs in ((window_topk_band, 1), (window_topk_pair, 2)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(src, dst, window, k)
        peak = cur = 0
        for e in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
            cur += e.self_cpu_memory_usage
            peak = max(peak, cur)
        extra = peak - outputs * B * H * W * k * (8 + 4)
        assert 0 < extra < B * H * W * window * window * 4 / 4, (fn.__name__, extra)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_equals_reference_with_ties(shape):
    B, H, W, D, window, k = shape
    src, dst = integer_features(B, H, W, D), integer_features(B, H, W, D)
    idx0, score0 = window_topk_reference(src, dst, window, k)
    idx, score = window_topk_triton(src, dst, window, k, block_q=128)
    assert torch.equal(idx, idx0) and torch.equal(score, score0)


def test_triton_row_segments_and_feature_blocks():
    """Several row segments per row (the last one partial) and the feature dimension in several
    blocks (the multi-block tl.dot loop), random dyadic features: bitwise equal to the reference."""
    src, dst = dyadic_features(1, 7, 37, 40, seed=5), dyadic_features(1, 7, 37, 40, seed=6)
    idx0, score0 = window_topk_reference(src, dst, 5, 3)
    idx, score = window_topk_triton(src, dst, 5, 3, block_q=16, block_d=16)
    assert torch.equal(idx, idx0) and torch.equal(score, score0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_dyadic_features_bitwise(dtype):
    """Dot products exact in fp32 but not in fp16: the fp16 tl.dot must accumulate in fp32.
    bf16 inputs go through the kernel's fp32 conversion (no bf16 tl.dot)."""
    src, dst = dyadic_features(2, 6, 19, 24, seed=7), dyadic_features(2, 6, 19, 24, seed=8)
    idx0, score0 = window_topk_reference(src, dst, 5, 3)
    idx, score = window_topk_triton(src.to(dtype), dst.to(dtype), 5, 3, block_q=16)
    assert torch.equal(idx, idx0) and torch.equal(score, score0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_exact_ties_agree(dtype):
    src, dst = integer_features(2, 6, 7, 4), integer_features(2, 6, 7, 4)
    idx0, score0 = window_topk_reference(src, dst, 5, 3)
    for fn in (window_topk_reference, window_topk_triton):
        idx, score = fn(src.to(dtype), dst.to(dtype), 5, 3)
        assert score.dtype == torch.float32
        assert torch.equal(idx, idx0) and torch.equal(score, score0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_random_features(dtype):
    """Random unit features: indices agree wherever the scores are not nearly tied. Both sum
    exact fp32 products of the same inputs in different orders, so scores differ by ~1e-7."""
    tol = 1e-6
    src = F.normalize(torch.randn(2, 7, 9, 16), dim=-1).to(dtype)
    dst = F.normalize(torch.randn(2, 7, 9, 16), dim=-1).to(dtype)
    idx0, score0 = window_topk_reference(src, dst, 5, 5)
    idx, score = window_topk_triton(src, dst, 5, 5, block_q=128)
    assert torch.allclose(score, score0, atol=tol, rtol=0)
    # where consecutive candidates are separated by more than the rounding, ranks are unambiguous
    ref_all = window_topk_reference(src, dst, 5, 25)[1]
    gaps = (ref_all[..., :-1] - ref_all[..., 1:])[..., :5].min(dim=-1).values
    clear = gaps > 10 * tol
    assert clear.float().mean() > 0.8
    assert torch.equal(idx[clear], idx0[clear])


def test_dispatcher_backends_agree_and_cpu_uses_band():
    src, dst = integer_features(1, 5, 6, 3), integer_features(1, 5, 6, 3)
    ref = window_topk(src, dst, 3, 2, backend="reference")
    for backend in ("auto", "band", "triton"):
        assert all(torch.equal(a, b) for a, b in zip(window_topk(src, dst, 3, 2, backend=backend), ref)), backend
        both = window_topk_pair(src, dst, 3, 2, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(both, (*ref, *window_topk_reference(dst, src, 3, 2)))), backend
    fp64 = window_topk(src.double(), dst.double(), 3, 2)
    assert fp64[1].dtype == torch.float64 and torch.equal(fp64[0], ref[0])


def test_exact_tie_lower_flat_index_first():
    # every token identical: all candidates tie, so the k lowest flat indices of the window win
    src = torch.ones(1, 6, 6, 2)
    idx, score = window_topk_reference(src, src, 3, 4)
    idx_t, _ = window_topk_triton(src, src, 3, 4)
    W = 6
    h, w = 3, 3                                            # interior: window rows/cols 2..4
    assert idx[0, h, w].tolist() == [2 * W + 2, 2 * W + 3, 2 * W + 4, 3 * W + 2]
    assert torch.equal(idx, idx_t)
    assert torch.all(score == 2.0)
    # +0.0 and -0.0 count as equal: scores -0.0 (index 0) and +0.0 (index 1) tie
    src = torch.tensor([1.0, 0.0]).expand(1, 1, 2, 2).contiguous()
    dst = torch.tensor([[[[-0.0, -1.0], [0.0, 1.0]]]])
    for fn in (window_topk_reference, window_topk_triton):
        assert fn(src, dst, 3, 2)[0].flatten().tolist() == [0, 1, 0, 1]


def test_window_is_shifted_not_cut_at_corners():
    """At a corner the window is moved inside the frame: a match l-1 rows/cols away is found,
    one step farther is not, even if it is the most similar token of the frame."""
    H, W, D, window = 9, 10, 4, 5
    dst = torch.zeros(1, H, W, D)
    src = torch.zeros(1, H, W, D)
    src[0, 0, 0] = torch.tensor([1.0, 0, 0, 0])
    src[0, H - 1, W - 1] = torch.tensor([0, 1.0, 0, 0])
    dst[0, 4, 4] = torch.tensor([0.9, 0, 0, 0])              # inside the shifted window of (0, 0)
    dst[0, 5, 5] = torch.tensor([1.0, 0, 0, 0])              # outside it (a cut window would not even reach (4, 4))
    dst[0, H - 5, W - 5] = torch.tensor([0, 0.9, 0, 0])      # inside the shifted window of the far corner
    dst[0, H - 6, W - 6] = torch.tensor([0, 1.0, 0, 0])      # outside it
    for fn in (window_topk_reference, window_topk_triton):
        idx, score = fn(src, dst, window, 1)
        assert idx[0, 0, 0, 0] == 4 * W + 4 and score[0, 0, 0, 0] == pytest.approx(0.9)
        assert idx[0, H - 1, W - 1, 0] == (H - 5) * W + (W - 5)
    assert window_starts(9, 5).tolist() == [0, 0, 0, 1, 2, 3, 4, 4, 4]
    assert window_starts(3, 9).tolist() == [0, 0, 0]


def test_corners_match_brute_force_on_random_features():
    src, dst = torch.randn(1, 8, 11, 6), torch.randn(1, 8, 11, 6)
    idx0, score0 = brute_force(src, dst, 5, 3)
    for fn in (window_topk_reference, window_topk_triton):
        idx, score = fn(src, dst, 5, 3)
        assert torch.equal(idx, idx0)
        assert torch.allclose(score.double(), score0, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_translation_is_recovered(backend):
    """Frames cropped from one random map at shifts |dy|, |dx| <= l//2: every token whose
    content stays in the frame finds its own content, at the known shift, as top-1."""
    window, H, W, D = 5, 9, 11, 8
    big = F.normalize(torch.randn(H + 8, W + 8, D), dim=-1)
    shifts = [(2, -1), (-2, 2), (0, 1), (1, 0)]
    for dy, dx in shifts:
        src = big[4:4 + H, 4:4 + W][None]
        dst = big[4 - dy:4 - dy + H, 4 - dx:4 - dx + W][None]   # content moves by (+dy, +dx)
        idx, score = window_topk(src, dst, window, 2, backend=backend)
        hs, ws = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        inside = (hs + dy >= 0) & (hs + dy < H) & (ws + dx >= 0) & (ws + dx < W)
        expect = (hs + dy) * W + ws + dx
        assert torch.equal(idx[0, ..., 0][inside], expect[inside])
        assert torch.allclose(score[0, ..., 0][inside], torch.ones(()), atol=1e-5)


def test_translation_full_size_reference():
    """The same at 64x64 tokens, l=9, shifts up to 4, on the reference's default tiling."""
    H = W = 64
    big = F.normalize(torch.randn(H + 8, W + 8, 32), dim=-1)
    src = big[4:4 + H, 4:4 + W][None]
    dst = big[4 - 4:4 - 4 + H, 4 + 3:4 + 3 + W][None]            # shift (+4, -3)
    idx, _ = window_topk(src, dst, 9, 3)
    hs, ws = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    inside = (hs + 4 < H) & (ws - 3 >= 0)
    assert torch.equal(idx[0, ..., 0][inside], ((hs + 4) * W + ws - 3)[inside])


def test_bad_inputs():
    x = torch.randn(1, 4, 5, 3)
    with pytest.raises(ValueError, match="odd"):
        window_topk(x, x, window=4)
    with pytest.raises(ValueError, match="odd"):
        window_topk(x, x, window=0)
    with pytest.raises(ValueError, match="k must be"):
        window_topk(x, x, 3, k=0)
    with pytest.raises(ValueError, match="exceeds the 9 candidates"):
        window_topk(x, x, 3, k=10)
    with pytest.raises(ValueError, match="exceeds the 20 candidates"):
        window_topk(x, x, 9, k=21)                              # 4x5 frame: min(l,H)*min(l,W) = 20
    window_topk(x, x, 9, k=20)
    with pytest.raises(ValueError, match="same shape"):
        window_topk(x, torch.randn(1, 4, 6, 3))
    with pytest.raises(ValueError, match="4-D"):
        window_topk(x[0], x[0])
    with pytest.raises(ValueError, match="dtype and device"):
        window_topk(x, x.double())
    with pytest.raises(ValueError, match="floating"):
        window_topk(x.long(), x.long())
    with pytest.raises(ValueError, match="backend"):
        window_topk(x, x, backend="cuda")
    with pytest.raises(ValueError, match="dtype must be"):
        window_topk(x.double(), x.double(), backend="triton")
    with pytest.raises(ValueError, match="tile"):
        window_topk_reference(x, x, tile=0)
    with pytest.raises(ValueError, match="tile"):
        window_topk_band(x, x, 3, 2, tile=0)
    for tile in ((4, 0), (4,), (2, 2, 2), "4", (4, 2.0), True):
        with pytest.raises(ValueError, match="tile"):
            window_topk_band(x, x, 3, 2, tile=tile)
    with pytest.raises(ValueError, match="threads"):
        window_topk_pair(x, x, 3, 2, threads=0)
    with pytest.raises(ValueError, match="backend"):
        window_topk_pair(x, x, backend="gpu")
    with pytest.raises(ValueError, match="exceeds"):
        window_topk_pair(x, x, 3, k=10)


def test_multiply_adds_match_the_paper():
    # COVE Table 4 (20 frames, 64x64, d=640): 0.448e9 / 4.03e9 / 11.2e9 for l = 3 / 9 / 15
    assert [round(multiply_adds(20, 64, 64, 640, l) / 1e9, 3) for l in (3, 9, 15)] == [0.448, 4.034, 11.207]


def test_importing_and_cpu_dispatch_do_not_import_triton():
    code = textwrap.dedent("""
        import sys, torch
        import minivid, minivid.kernels.correspondence as c, minivid.methods.cove.attention
        x = torch.randn(1, 4, 4, 3)
        c.window_topk(x, x, 3, 2)
        print('triton' in sys.modules)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("size, window, tile", [(64, 9, 4), (19, 9, 4), (23, 9, 3), (7, 9, 2), (12, 5, 5), (1, 3, 1), (30, 15, 4)])
def test_tile_regions_hold_the_windows_and_for_the_pair_the_reverse(size, window, tile):
    """Along an axis, every tile's key region holds the window of each of its positions p, and with
    both=True (window_topk_pair) also every position q whose window holds p, inside the axis: what
    lets one pass serve both directions. The one-direction regions have one length, at most T+L-1."""
    from minivid.kernels.correspondence import _axis_tiles

    starts = window_starts(size, window).tolist()
    L = min(window, size)
    for both in (False, True):
        _, T, first, region, extent, _, owner, slot = _axis_tiles(size, window, tile, both)
        assert all(0 <= g and g + e <= size for g, e in zip(region, extent))
        for p in range(size):
            j = owner[p]
            assert first[j] + slot[p] == p
            inside = set(range(region[j], region[j] + extent[j]))
            assert set(range(starts[p], starts[p] + L)) <= inside
            if both:
                assert {q for q in range(size) if starts[q] <= p < starts[q] + L} <= inside
        if not both:
            assert len(set(extent)) == 1 and extent[0] <= min(T + L - 1, size)


def test_default_tile_follows_the_blas_kernels():
    """The block path's default tile: 4×8 only where MKL runs AVX-512 kernels (an Intel CPU with
    AVX-512); with MKL limited to AVX2 (MKL_ENABLE_INSTRUCTIONS, as MKL runs on AMD CPUs) 4×4."""
    from minivid.kernels.correspondence import default_tile

    assert default_tile() in ((4, 4), (4, 8))
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        assert default_tile() == (4, 4)
    code = "from minivid.kernels.correspondence import default_tile; print(default_tile())"
    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="AVX2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "(4, 4)"


@pytest.mark.parametrize("B, threads", [(3, 2), (1, 3), (4, 3)])
def test_split_pairs_equal_whole_pairs(B, threads):
    """Pairs left over when the others are shared out among the worker threads (or a single pair)
    are split into column strips, then query rows, over all workers: results as on one thread."""
    src, dst = integer_features(B, 13, 21, 4), integer_features(B, 13, 21, 4)
    for tile in (None, (4, 4), (3, 5)):
        one = window_topk_pair(src, dst, 5, 3, tile=tile, threads=1)
        assert all(torch.equal(x, y) for x, y in zip(window_topk_pair(src, dst, 5, 3, tile=tile, threads=threads), one))
        assert all(torch.equal(x, y) for x, y in zip(window_topk_band(src, dst, 5, 3, tile=tile, threads=threads), one[:2]))


def test_over_pairs_runs_every_part_once_and_raises_a_worker_error():
    """The worker pool: whole pairs once, each phase of a split pair once per part and after all
    parts of the phase before it; an error in one worker is raised, not waited on forever."""
    import threading

    from minivid.kernels.correspondence import _over_pairs

    seen, lock = [], threading.Lock()

    def phase(f):
        def run(b, part, parts, buffers, shared):
            with lock:
                seen.append((b, f, part, parts))
                if f == 1 and parts > 1:   # the products of every part are done
                    assert sum(1 for s in seen if s[:2] == (b, 0)) == parts
        return run

    _over_pairs(5, 3, lambda: None, lambda: None, (phase(0), phase(1)))
    assert sorted(seen) == sorted([(b, f, 0, 1) for b in range(3) for f in (0, 1)] +
                                  [(b, f, p, 3) for b in (3, 4) for f in (0, 1) for p in range(3)])

    def boom(b, part, parts, buffers, shared):
        if part == 1:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _over_pairs(1, 2, lambda: None, lambda: None, (boom, phase(1)))


def test_benchmark_peak_memory_keeps_the_profiler_lines_off_stderr(capfd):
    """`minivid bench correspondence` measures peak memory through the profiler without Kineto's
    `USDT: ... profiler_start/stop` lines reaching the terminal (issue 17.10)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "correspondence.py"
    spec = importlib.util.spec_from_file_location("bench_correspondence_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = integer_features(1, 9, 9, 4)
    assert mod.peak_memory_1(lambda: window_topk_band(x, x, 3, 2)) > 0
    assert "USDT" not in capfd.readouterr().err
