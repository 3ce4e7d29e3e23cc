"""COVE correspondence search (Appendix B, Table 4): windowed top-K vs the per-pair full matrices.

On random unit features of F frames with an H×W token grid and width d (COVE: 20 frames,
64×64, d=640, K=3; `--full`), the paths compared, per consecutive pair:

- per-pair full matrix (Eq. 7 without the window): one H·W×H·W BLAS matmul and a top-K over the
  whole frame, (H·W)²·d multiply-adds — the strongest full-matrix path on a CPU; for both
  directions it runs once per direction (i -> i+1 and i+1 -> i);
- `window_topk_reference`: 8×8 query tiles as batched matmuls against their 16×16 key regions,
  candidates packed with their index into int64 keys for the tie rule (the former CPU path);
- `window_topk_band` (the CPU path, one direction): query tiles of `default_tile()` (4×8 where MKL
  runs AVX-512 kernels, else 4×4) against their key regions (12×16 / 12×12 at l=9), the tiles of
  a column strip a few bmm calls on strided views of two contiguous copies;
- `window_topk_pair` (both directions, what `consecutive_topk` runs): the same tiles, with border
  regions grown so that a[p]·b[q] of i -> i+1 also serves i+1 -> i: nothing is searched twice;
- `--full` adds l = 3 / 15 (Table 4's windows) and Eq. 5's all-pairs matrix (one block row measured,
  time × N: the whole matrix, 26.8 GB fp32 at COVE's size, does not fit).

Every run is timed in phases: 1 and 2 torch threads on the machine as it is, then the same with a
concurrent job loading both cores (a second process multiplying 2048² matrices on 2 threads,
started and stopped by this script; `--no-load` skips it). Within a phase the paths run interleaved
(a, b, c, a, b, c, ...), medians of wall and of process CPU time reported, and each phase reports the 1-minute load average before
and after it (the machine is shared). Before timing, the script checks on these random floats that
the band path equals the reference bitwise and the pair path equals two reference searches bitwise.

MACs: "exact" is what the windows need, (N−1)·H·W·l²·d per direction; "executed" is what the
matmuls actually multiply (each path's blocking computes products outside the windows). Peak
memory: the torch CPU allocator's high-water mark during one call beyond its inputs (profiler
self allocations; outputs included; shape plans cached before).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import interleaved_clocks, machine, peak_memory, table, write_section  # noqa: E402

from minivid.kernels.correspondence import (  # noqa: E402
    _block_plan,
    default_tile,
    multiply_adds,
    window_topk_band,
    window_topk_pair,
    window_topk_reference,
)

BAND_TILE = default_tile()                                   # (rows, columns) on this machine
PAPER_GMAC = {3: 0.448, 9: 4.03, 15: 11.2, None: 241.0}      # COVE Table 4 (×10⁹)
TITLE = "COVE correspondence search (windowed vs full matrices)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    if "--full" not in p._option_string_actions:            # `minivid bench` may add --full for every benchmark
        p.add_argument("--full", action="store_true", help="the paper's size: 20 frames (default 3 frames, same pair size)")
    p.add_argument("--frames", type=int, default=None, help="frames (default 3; 20 with --full)")
    p.add_argument("--size", type=int, default=64, help="token grid side (H = W)")
    p.add_argument("--dim", type=int, default=640)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--window", type=int, default=9)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path and phase (median reported)")
    p.add_argument("--thread-list", default="1,2", help="torch thread counts, one phase each")
    p.add_argument("--no-load", action="store_true", help="skip the phases under a concurrent load")


def pairwise_full(src: torch.Tensor, dst: torch.Tensor, k: int):
    """Top-K over whole frames, one H·W×H·W similarity matrix per consecutive pair."""
    B, H, W, D = src.shape
    out = []
    for b in range(B):
        sim = src[b].reshape(H * W, D) @ dst[b].reshape(H * W, D).T          # [HW, HW]
        out.append(sim.topk(k, dim=-1))
    return out


def all_pairs_block_row(feats: torch.Tensor, k: int):
    """One block row of Eq. 5: frame 0's tokens against all N·H·W tokens, top-K per frame."""
    N, H, W, D = feats.shape
    sim = feats[0].reshape(H * W, D) @ feats.reshape(N * H * W, D).T          # [HW, N·HW]
    return sim.view(H * W, N, H * W).topk(k, dim=-1)


def run(args: argparse.Namespace) -> int:
    N = args.frames or (20 if args.full else 3)
    H = W = args.size
    D, K, l = args.dim, args.k, args.window
    threads = [int(t) for t in args.thread_list.split(",")]
    torch.manual_seed(0)
    feats = F.normalize(torch.randn(N, H, W, D), dim=-1)
    a, b = feats[:-1], feats[1:]
    torch.set_num_threads(threads[0])

    fns = {
        "per-pair full matrix": lambda: pairwise_full(a, b, K),
        "per-pair full matrix, backward": lambda: pairwise_full(b, a, K),
        "reference (8×8 tiles)": lambda: window_topk_reference(a, b, l, K),
        "reference, backward": lambda: window_topk_reference(b, a, l, K),
        "band (one direction)": lambda: window_topk_band(a, b, l, K),
        "band, backward": lambda: window_topk_band(b, a, l, K),
        "pair (both, one pass)": lambda: window_topk_pair(a, b, l, K),
    }
    with torch.inference_mode():
        # bitwise checks on these random floats (and warm-up: shape plans cached)
        fwd, bwd = window_topk_reference(a, b, l, K), window_topk_reference(b, a, l, K)
        band_eq = all(torch.equal(x, y) for x, y in zip(window_topk_band(a, b, l, K), fwd))
        pair_eq = all(torch.equal(x, y) for x, y in zip(window_topk_pair(a, b, l, K), (*fwd, *bwd)))
        del fwd, bwd
        memory = {name: peak_memory_1(fns[name]) for name in
                  ("per-pair full matrix", "reference (8×8 tiles)", "band (one direction)", "pair (both, one pass)")}
        extra_rows = []
        if args.full:
            for lw in (3, 15):
                fn = lambda lw=lw: window_topk_band(a, b, lw, K)  # noqa: E731
                fn()
                t = interleaved_clocks({"w": fn}, repeats=args.repeats, warmup=0)["w"][0]
                extra_rows.append((f"band l={lw}", lw, t, peak_memory_1(fn)))
            row_t = interleaved_clocks({"row": lambda: all_pairs_block_row(feats, K)}, 1, 1)["row"][0]
            extra_rows.append(("all-pairs (Eq. 5), one block row × N", None, N * row_t, peak_memory_1(lambda: all_pairs_block_row(feats, K))))

        phases = []
        for loaded in ([False] if args.no_load else [False, True]):
            job = start_load() if loaded else None
            try:
                for t in threads:
                    torch.set_num_threads(t)
                    before = os.getloadavg()[0]
                    times = interleaved_clocks(fns, repeats=args.repeats, warmup=0)
                    phases.append((t, loaded, before, os.getloadavg()[0], times))
            finally:
                if job is not None:
                    stop_load(job)

    # ---- tables
    ex = lambda name, win=l: executed_macs(name, N, H, W, D, win)  # noqa: E731
    exact = multiply_adds(N, H, W, D, l)
    cost_rows = []
    mem_base = memory["per-pair full matrix"]
    for name, dirs, key in [
        ("per-pair full matrix", 1, "full"), ("reference (8×8 tiles)", 1, "reference"),
        ("band (one direction)", 1, "band"), ("pair (both, one pass)", 2, "pair"),
    ]:
        e = ex(key)
        need = multiply_adds(N, H, W, D, None) * dirs if key == "full" else exact * dirs
        cost_rows.append([name, dirs, need / 1e9, e / 1e9, f"{e / (exact * dirs):.2f}×",
                          f"{memory[name] / 2 ** 20:.1f}", f"{100 * memory[name] / mem_base:.1f}%"])
    time_rows = []
    for t, loaded, before, after, clocks in phases:
        for c, clock in enumerate(("wall", "CPU")):
            tm = {name: v[c] for name, v in clocks.items()}
            pp = tm["per-pair full matrix"]
            pp2 = pp + tm["per-pair full matrix, backward"]
            ref, ref2 = tm["reference (8×8 tiles)"], tm["reference (8×8 tiles)"] + tm["reference, backward"]
            band, band2 = tm["band (one direction)"], tm["band (one direction)"] + tm["band, backward"]
            pair = tm["pair (both, one pass)"]
            time_rows.append([
                t, "concurrent job" if loaded else "as is", f"{before:.1f} / {after:.1f}", clock,
                f"{pp:.2f}", f"{ref:.3f} ({pp / ref:.1f}×)", f"{band:.3f} (**{pp / band:.1f}×**)",
                f"{pp2:.2f}", f"{ref2:.3f} ({pp2 / ref2:.1f}×)", f"{band2:.3f} ({pp2 / band2:.1f}×)",
                f"{pair:.3f} (**{pp2 / pair:.1f}×**)",
            ])
    body = table(["path", "directions", f"GMAC exact (l={l})", "GMAC executed", "executed / exact", "peak MiB", "peak / per-pair"], cost_rows)
    body += "\n\n" + table([
        "threads", "other work", "load avg before / after", "clock", "per-pair s", "reference s (×)", "band s (×)",
        "per-pair ×2 s", "reference ×2 s (×)", "band ×2 s (×)", "pair s (×)",
    ], time_rows)
    if extra_rows:
        body += "\n\n" + table(["path (1st thread count, as is)", "GMAC exact", "paper GMAC", "GMAC executed", "s (median)", "peak MiB"], [
            [name, (multiply_adds(N, H, W, D, win) if win else (N * H * W) ** 2 * D) / 1e9,
             PAPER_GMAC[win] if (N, H, D) == (20, 64, 640) else "",
             (ex("band", win) if win else (N * H * W) ** 2 * D) / 1e9, t, f"{m / 2 ** 20:.1f}"]
            for name, win, t, m in extra_rows
        ])
    cmd = "minivid bench correspondence" + (" --full" if args.full else "")
    notes = (
        f"{N} frames ({N - 1} consecutive pairs), {H}×{W} tokens, d={D}, l={l}, K={K}, fp32 random unit features, "
        f"{args.repeats} interleaved runs per phase (median s; × = speed-up over the per-pair full matrix, "
        "for both directions over the per-pair full matrix run in each direction; '×2' columns: the "
        "one-direction path run in each direction). Ratios are per pair, so they hardly depend "
        f"on the number of frames. Bitwise on these features: band = reference {band_eq}, pair = two "
        f"reference searches {pair_eq}. 'concurrent job': a second process multiplying 2048×2048 fp32 "
        "matrices on 2 threads throughout the phase (on top of whatever else runs on the shared machine). "
        "Peak memory measured at 1 thread (the profiler does not see worker threads); with more threads each "
        "worker thread holds its own buffers: add the peak minus the outputs per extra worker. 'executed / exact': executed multiply-adds over the exact windowed count of the same "
        "directions (for the per-pair path: its whole-frame products over the window's). Clocks: 'wall' "
        "is elapsed time, 'CPU' the process CPU time of the same runs (all its threads, BLAS spin-waits "
        "included; time other jobs hold the cores not counted): on a loaded machine the CPU-time ratios are "
        f"the steadier ones. Band path tiles {BAND_TILE[0]}×{BAND_TILE[1]} queries (`default_tile()`: 4×8 where MKL "
        "runs its AVX-512 kernels, else 4×4; pair: the same tiles, "
        "regions grown at the borders so that one pass serves both directions). "
        f"Machine: {machine(threads='/'.join(map(str, threads)))}.\n\n"
        f"Command: `{cmd} --write`."
    )
    print(body)
    print(f"\nbitwise: band == reference {band_eq}; pair == two reference searches {pair_eq}")
    if getattr(args, "write", False):
        write_section(TITLE, notes + "\n\n" + body, threads="/".join(map(str, threads)))
    return 0


# ---------------------------------------------------------------- helpers of this benchmark

def peak_memory_1(fn) -> int:
    """`_common.peak_memory` (profiler self allocations; Kineto's start/stop lines kept off the
    terminal) at 1 torch thread (restored after): the band paths then run in this thread,
    whose allocations the profiler sees (a worker thread's it does not)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return peak_memory(fn)
    finally:
        torch.set_num_threads(before)


_LOAD_CODE = (                                                # stops by itself if the benchmark dies
    "import os, torch\ntorch.set_num_threads(2)\nx = torch.randn(2048, 2048)\nparent = os.getppid()\n"
    "while os.getppid() == parent:\n    y = x @ x\n"
)


def start_load() -> subprocess.Popen:
    """A concurrent CPU job (BLAS on 2 threads) for the loaded phases; stopped by stop_load."""
    job = subprocess.Popen([sys.executable, "-c", _LOAD_CODE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3.0)                                           # let it reach full speed
    return job


def stop_load(job: subprocess.Popen) -> None:
    job.terminate()
    try:
        job.wait(timeout=10)
    except subprocess.TimeoutExpired:
        job.kill()
        job.wait()


def executed_macs(path: str, N: int, H: int, W: int, D: int, window: int) -> int:
    """Multiply-adds the matmuls of a path execute for N frames (products outside the windows included)."""
    P = N - 1
    if path == "full":
        return P * (H * W) ** 2 * D
    if path == "reference":                                   # T×T tiles (clamped) against R_h×R_w regions
        def axis(size, t=8):
            L, T = min(window, size), min(t, size)
            starts = [max(0, min(p - window // 2, size - L)) for p in range(size)]
            n = -(-size // T)
            q = [[min(i * T + j, size - 1) for j in range(T)] for i in range(n)]
            return n, T, max(starts[r[-1]] + L - starts[r[0]] for r in q)
        nh, th, rh = axis(H)
        nw, tw, rw = axis(W)
        return P * nh * nw * th * tw * rh * rw * D
    plan = _block_plan(H, W, window, *BAND_TILE, path == "pair")  # tiles against their key regions
    return P * plan[3] * D
