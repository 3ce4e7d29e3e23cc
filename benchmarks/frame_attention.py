"""Frame attention variants of EI² (§4.4): FLOPs, CPU time and peak memory.

Compares, on the Q/K/V of one SD 1.4 self-attention layer over a video of F frames with an
H×W token grid (the projections are the same for all variants and are not timed):

- self-attention per frame (SD's attn1 applied to each frame):  n·l² query-key pairs
- Tune-A-Video sparse-causal attention (keys of frame 0 and f-1): 2·n·l²
- EI² FFAM, r = 2 and r = 4 (own frame fine, other frames pooled r×r): (n-1+r²)/r² · n·l²
- full spatio-temporal attention (every token of the video):     n²·l²

(n = F frames, l = H·W tokens per frame, the paper's notation). FLOPs are analytic
multiply-adds of Q·Kᵀ and P·V (2 · queries · keys · d · heads); the paper's claim is that FFAM
with r = 2 or 4 "achieves comparable speed to SCA". Times are medians of interleaved runs;
peak memory is torch's CPU allocator peak during one call (benchmarks/_common.py).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import interleaved, table, write_section  # noqa: E402

from minivid.attention import Attention, sdpa  # noqa: E402
from minivid.methods.ei2.blocks import FFAMProcessor  # noqa: E402
from minivid.methods.tuneavideo import sparse_causal  # noqa: E402

# (frames, H, W, channels) of SD 1.4 layers at 512×512: 320 channels at 64×64, 640 at 32×32; 8 heads
CONFIGS = [(8, 64, 64, 320), (8, 32, 32, 640)]
QUICK = [(4, 16, 16, 320), (4, 8, 8, 640)]
HEADS = 8


def peak_memory(fn) -> int:
    """Peak bytes held by torch's CPU allocator while `fn` runs.

    Like _common.peak_memory, but summing each profiler event's SELF allocations: the inclusive
    `cpu_memory_usage` counts an allocation once per enclosing op (a clone of 1.25 MiB reads
    2.5 MiB, an sdpa output 5.1 MiB).
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak = cur = 0
    for e in sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes (4 frames at 16×16 and 8×8 tokens), 2 repeats")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported)")
    p.add_argument("--no-full", action="store_true", help="skip full spatio-temporal attention (the slowest)")
    p.add_argument("--ffam-backend", default="auto", choices=["auto", "reference", "triton"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 avoids OpenMP stalls on a shared, loaded machine")


def keys_per_query(variant: str, frames: int, H: int, W: int) -> int:
    L = H * W
    if variant == "self-attention":
        return L
    if variant == "sparse-causal (Tune-A-Video)":
        return 2 * L
    if variant == "full spatio-temporal":
        return frames * L
    r = int(variant.split("r=")[1].rstrip(")"))
    return L + (frames - 1) * (-(-H // r)) * (-(-W // r))


def paper_ratio(variant: str, frames: int) -> float:
    """The paper's complexity relative to per-frame self-attention O(n·l²)."""
    if variant == "self-attention":
        return 1.0
    if variant == "sparse-causal (Tune-A-Video)":
        return 2.0
    if variant == "full spatio-temporal":
        return float(frames)
    r = int(variant.split("r=")[1].rstrip(")"))
    return (frames - 1 + r * r) / (r * r)


def variants(frames: int, H: int, W: int, channels: int, args) -> tuple[dict, tuple]:
    d = channels // HEADS
    layer = Attention(channels, None, HEADS, d)
    layer.state = {"frames": frames}
    ctx = layer.context(hw=(H, W))
    q, k, v = (torch.randn(frames, HEADS, H * W, d) for _ in range(3))      # [(B·F), heads, N, d], B = 1
    full = lambda t: t.transpose(0, 1).reshape(1, HEADS, frames * H * W, d)  # noqa: E731  [1, heads, F·N, d]
    fns = {
        "self-attention": lambda: sdpa(q, k, v, ctx),
        "sparse-causal (Tune-A-Video)": lambda: sparse_causal(q, k, v, ctx),
        "FFAM (r=2)": lambda: FFAMProcessor(2, args.ffam_backend)(q, k, v, ctx),
        "FFAM (r=4)": lambda: FFAMProcessor(4, args.ffam_backend)(q, k, v, ctx),
        "full spatio-temporal": lambda: sdpa(full(q), full(k), full(v), ctx),
    }
    if args.no_full:
        fns.pop("full spatio-temporal")
    return fns, (q, d)


def run(args: argparse.Namespace) -> int:
    configs, repeats = (QUICK, min(args.repeats, 2)) if args.quick else (CONFIGS, args.repeats)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with torch.inference_mode():
        for frames, H, W, channels in configs:
            fns, (q, d) = variants(frames, H, W, channels, args)
            memory = {name: peak_memory(fn) for name, fn in fns.items()}           # also the warm-up run
            times = interleaved(fns, repeats=repeats, warmup=0)
            macs = {name: 2 * frames * H * W * keys_per_query(name, frames, H, W) * d * HEADS for name in fns}
            base = "self-attention"
            for name in fns:
                rows.append([
                    f"{frames}×{H}×{W}, {channels} ch, d={d}", name, keys_per_query(name, frames, H, W),
                    macs[name] / 1e9, macs[name] / macs[base], paper_ratio(name, frames),
                    times[name], times[name] / times[base], memory[name] / 2 ** 20,
                ])
            print(f"done {frames}×{H}×{W}", flush=True)
    headers = ["frames×H×W", "attention", "keys/query", "GMAC", "MAC ratio", "paper ratio",
               "CPU s (median)", "time ratio", "peak MiB"]
    body = table(headers, rows)
    notes = (
        "One attention layer's arithmetic on given Q/K/V (batch 1, 8 heads, fp32, B·F = F), "
        f"{repeats} interleaved runs, {torch.get_num_threads()} thread(s); ratios relative to per-frame self-attention. 'paper ratio' is the "
        "paper's complexity over O(n·l²): SCA 2, FFAM (n-1+r²)/r², full n. FFAM runs the PyTorch "
        "reference on CPU (one fused attention call per frame).\n\n"
        "Command: `minivid bench frame-attention" + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads else "") + "`."
    )
    print(body)
    if args.write:
        write_section("Frame attention (EI² FFAM vs SA / SCA / full)", notes + "\n\n" + body)
    return 0
