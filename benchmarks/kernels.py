"""Every Triton kernel against its PyTorch reference: errors in fp32/fp16/bf16 over border, odd and random shapes, then timings.

Kernels (minivid.kernels):
- `fine_coarse_attention_triton` (EI² FFAM, Eq. 10) against a float64 run of the reference on the
  same (rounded) inputs, and against the reference in the input dtype. Tolerances (|Δ| against
  float64): float32 1e-5 (IEEE products, float32 accumulation); float16 3·2^-11·max|v| and
  bfloat16 3·2^-8·max|v| (output rounding, plus the rounding of the softmax weights to the input
  dtype before P·V, each half an ulp of a value at most max|v|). bfloat16 is checked twice: the
  path `fine_coarse_attention` dispatches bf16 to today (the float32 kernel, until
  `BF16_NATIVE_VERIFIED`), and the native bf16 kernel (`bf16_native=True`), which is what a GPU
  run verifies.
- `window_topk_triton` (COVE, Eq. 10) against `window_topk_reference`: the scores of the same
  rank may differ by the summation order only, |Δ| <= 2·D·2^-24 (unit features; 16-bit products
  are exact in float32, so this holds for every input dtype); the chosen indices must lie in the
  query's window and score, recomputed in float64, within that bound of the reference's scores of
  the same rank (so near-ties may legitimately swap); exact index mismatches are counted.

On CUDA: all three dtypes, the shapes below plus larger ones, then the timings at the paper sizes
(FFAM: 8 frames × 64×64 tokens, 8 heads, d=40, r=2 and 4 — Triton vs the reference vs
`scaled_dot_product_attention` over the explicit fine+coarse keys built beforehand; correspondence:
20 frames × 64×64, d=640, l=9, K=3 — Triton vs the reference). On CPU the kernels run in Triton's
interpreter (TRITON_INTERPRET=1, set here before triton is imported) on the small shapes in float32
and float16 only: the interpreter computes bfloat16 `tl.dot` wrongly and its timings mean nothing,
so bf16 and timing need CUDA. `--check`: the correctness table only. Exit status 1 if a check fails.

`--aot` (no GPU needed): every launch spec (`minivid.kernels.aot_specs`) compiled ahead of time by
Triton for sm_80 (A100), sm_86 (RTX 3090), sm_89 (RTX 4090) and sm_90a (H100), with `ptxas -v`
from Triton's wheel: shared memory against the architecture's per-block limit, registers, spill
bytes, resident blocks per SM, multiply-adds (executed, with the padding of the tiles) and DRAM
bytes, and the roofline bound on time at the GPU's published peaks beside the same bound for the
reference the kernel replaces (`minivid.kernels.aot.work`/`roofline`), and how it multiplies, read
from the PTX (`minivid.kernels.aot.products`). Exit status 1 if a spec fails to compile, exceeds its
shared-memory limit, spills, or multiplies otherwise than intended (fp32 on tensor cores, i.e. TF32;
fp16/bf16 off the tensor cores or not accumulating in fp32).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import random
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import table, write_section  # noqa: E402

# (B, heads, frames, H, W, d, r)
FFAM_SHAPES = {
    "border: partial pooling windows": [(1, 2, 3, 5, 3, 16, 2), (2, 1, 3, 5, 3, 16, 3), (1, 1, 2, 6, 5, 40, 4)],
    "odd: multi-block, 15×15 grid, r = 1": [(1, 1, 2, 9, 7, 16, 2), (1, 1, 2, 15, 15, 40, 2), (1, 2, 3, 5, 3, 16, 1)],
}
FFAM_GPU_SHAPES = {"paper layers (sampled sizes)": [(1, 8, 8, 32, 32, 40, 2), (1, 8, 4, 16, 16, 160, 4), (2, 8, 3, 15, 15, 80, 2)]}
# (B, H, W, D, window, k)
CORR_SHAPES = {
    "border: window larger than the frame": [(2, 5, 7, 16, 9, 3), (1, 3, 12, 8, 5, 2)],
    "odd": [(1, 7, 5, 40, 5, 3), (1, 13, 11, 24, 9, 4), (1, 9, 9, 70, 3, 1)],
}
CORR_GPU_SHAPES = {"paper sizes": [(4, 64, 64, 640, 9, 3), (2, 32, 32, 1280, 15, 3)]}
RANDOM_SHAPES = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true", help="correctness only (no timing)")
    p.add_argument("--kernel", choices=["all", "fine-coarse", "correspondence"], default="all")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per path (median; default 10, --full 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aot", action="store_true",
                   help="compile every launch spec for sm_80/86/89/90 (no GPU): shared memory, registers, spills, "
                        "occupancy, roofline bounds")
    p.add_argument("--jobs", type=int, default=None, help="--aot: compiles at a time (default: CPU count)")


def random_ffam_shapes(rng: random.Random, n: int) -> list[tuple]:
    out = []
    for _ in range(n):
        H, W = rng.randint(2, 12), rng.randint(2, 12)
        out.append((rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 5), H, W, rng.choice([16, 40, 64, 80]),
                    rng.randint(1, min(H, W, 4))))
    return out


def random_corr_shapes(rng: random.Random, n: int) -> list[tuple]:
    out = []
    for _ in range(n):
        H, W, window = rng.randint(2, 14), rng.randint(2, 14), rng.choice([1, 3, 5, 9])
        k = rng.randint(1, min(4, min(window, H) * min(window, W)))
        out.append((rng.randint(1, 2), H, W, rng.choice([8, 24, 40, 64]), window, k))
    return out


# ---------------------------------------------------------------- checks

def check_ffam(shape, dtype, device, interpreted: bool, native_bf16: bool = False) -> dict:
    from minivid.kernels import fine_coarse_attention as fca

    B, h, frames, H, W, d, r = shape
    g = torch.Generator().manual_seed(hash(shape) % 2 ** 31)
    q, k, v = (torch.randn(B, h, frames * H * W, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    blocks = dict(block_m=16, block_n=16) if interpreted else {}
    tri = fca.fine_coarse_attention_triton(q, k, v, frames, (H, W), r, bf16_native=native_bf16, **blocks)
    with torch.inference_mode():
        oracle = fca.fine_coarse_attention_reference(q.double(), k.double(), v.double(), frames, (H, W), r)
        ref = fca.fine_coarse_attention_reference(q, k, v, frames, (H, W), r)
    vmax = v.abs().max().item()
    tol = {torch.float32: 1e-5, torch.float16: 3 * 2 ** -11 * vmax, torch.bfloat16: 3 * 2 ** -8 * vmax}[dtype]
    err = (tri.double() - oracle).abs().max().item()
    return dict(err=err, err_ref=(tri.double() - ref.double()).abs().max().item(), tol=tol, ok=err <= tol and tri.dtype == dtype)


def check_corr(shape, dtype, device, interpreted: bool) -> dict:
    from minivid.kernels.correspondence import window_starts, window_topk_reference, window_topk_triton

    B, H, W, D, window, k = shape
    g = torch.Generator().manual_seed(hash(shape) % 2 ** 31)
    src, dst = (torch.nn.functional.normalize(torch.randn(B, H, W, D, generator=g), dim=-1).to(device=device, dtype=dtype)
                for _ in range(2))
    idx_t, score_t = window_topk_triton(src, dst, window, k)
    with torch.inference_mode():
        idx_r, score_r = window_topk_reference(src, dst, window, k)
    tol = 2 * D * 2 ** -24
    err = (score_t.double() - score_r.double()).abs().max().item()
    # each chosen candidate: inside the query's window, and its exact score as good as the reference's of that rank
    rows = window_starts(H, window, device)[:, None, None].expand(H, W, k)
    cols = window_starts(W, window, device)[None, :, None].expand(H, W, k)
    ci, cj = idx_t // W, idx_t % W
    inside = ((ci >= rows) & (ci < rows + min(window, H)) & (cj >= cols) & (cj < cols + min(window, W))).all().item()
    flat = dst.double().reshape(B, H * W, D)
    chosen = torch.gather(flat, 1, idx_t.reshape(B, -1, 1).expand(-1, -1, D)).reshape(B, H, W, k, D)
    exact = (chosen * src.double()[:, :, :, None]).sum(-1)
    rank_err = (exact - score_r.double()).abs().max().item()
    mismatches = int((idx_t != idx_r).sum().item())
    ok = err <= tol and rank_err <= 2 * tol and bool(inside)
    return dict(err=err, err_ref=rank_err, tol=tol, ok=ok, mismatches=mismatches)


# ---------------------------------------------------------------- timings (CUDA)

def cuda_time(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def time_ffam(device, repeats: int) -> list[list]:
    from minivid.kernels import fine_coarse_attention as fca

    rows = []
    frames, H, W, h, d = 8, 64, 64, 8, 40
    L = H * W
    for dtype in (torch.float16, torch.float32):
        q, k, v = (torch.randn(1, h, frames * L, d, device=device, dtype=dtype) for _ in range(3))
        for r in (2, 4):
            kc, vc = fca.pool_frames(k, frames, (H, W), r), fca.pool_frames(v, frames, (H, W), r)
            keys, values = [], []
            for f in range(frames):                                        # explicit fine+coarse keys, built beforehand
                own = slice(f * L, (f + 1) * L)
                keys.append(torch.cat([k[:, :, own], torch.cat([kc[:, :, :f], kc[:, :, f + 1:]], 2).flatten(2, 3)], 2))
                values.append(torch.cat([v[:, :, own], torch.cat([vc[:, :, :f], vc[:, :, f + 1:]], 2).flatten(2, 3)], 2))

            def explicit():
                return [torch.nn.functional.scaled_dot_product_attention(q[:, :, f * L:(f + 1) * L], keys[f], values[f])
                        for f in range(frames)]

            with torch.inference_mode():
                t = {"Triton": cuda_time(lambda: fca.fine_coarse_attention_triton(q, k, v, frames, (H, W), r), repeats),
                     "reference": cuda_time(lambda: fca.fine_coarse_attention_reference(q, k, v, frames, (H, W), r), repeats),
                     "SDPA, explicit keys": cuda_time(explicit, repeats)}
            for name, s in t.items():
                rows.append([f"FFAM r={r}, {frames}×{H}×{W}, h={h}, d={d}", str(dtype).replace("torch.", ""), name,
                             s * 1e3, s / t["Triton"]])
    return rows


def time_corr(device, repeats: int) -> list[list]:
    from minivid.kernels.correspondence import window_topk_reference, window_topk_triton

    rows = []
    N, H, W, D, window, k = 20, 64, 64, 640, 9, 3
    for dtype in (torch.float16, torch.float32):
        feats = torch.nn.functional.normalize(torch.randn(N, H, W, D, device=device), dim=-1).to(dtype)
        with torch.inference_mode():
            t = {"Triton": cuda_time(lambda: window_topk_triton(feats[:-1], feats[1:], window, k), repeats),
                 "reference": cuda_time(lambda: window_topk_reference(feats[:-1], feats[1:], window, k), repeats)}
        for name, s in t.items():
            rows.append([f"window top-K, {N} frames × {H}×{W}, D={D}, l={window}, K={k}", str(dtype).replace("torch.", ""),
                         name, s * 1e3, s / t["Triton"]])
    return rows


# ---------------------------------------------------------------- run

def run_aot(args: argparse.Namespace) -> int:
    from minivid.kernels import aot

    caps = sorted(aot.ARCHS)
    t0 = time.perf_counter()
    results = aot.compile_specs(caps, jobs=args.jobs)
    wall = time.perf_counter() - t0
    specs = {cap: aot.aot_specs(cap) for cap in caps}
    rows, failed = [], 0
    for r in results:
        cap = tuple(r["capability"])
        spec, a = specs[cap][r["index"]], aot.ARCHS[cap]
        c, o = spec["constexprs"], spec["options"]
        if spec["kernel"] == "fine_coarse_fwd":
            tiles = f"M{c['BLOCK_M']} N{c['BLOCK_N']} D{c['BLOCK_D']}" + (f"+{c['BLOCK_D2']}" if c["BLOCK_D2"] else "")
        else:
            tiles = f"T{c['BLOCK_T']} R{c['BLOCK_R']} D{c['BLOCK_D']}"
        launch = f"{tiles}, w{o['num_warps']} s{o['num_stages']}"
        name = spec["name"] + ("" if spec["enabled"] else " (off)")
        if r["error"]:
            failed += 1
            rows.append([a["gpu"], name, launch, "FAIL: " + r["error"][:80]] + [""] * 10)
            continue
        products, as_intended = aot.products(spec, r)
        ok = r["shared"] <= a["shared_optin"] and r["spill_stores"] == 0 and r["spill_loads"] == 0 and as_intended
        failed += not ok
        occ = aot.occupancy(r, cap)
        roof = aot.roofline(spec, cap)
        w = roof["work"]
        rows.append([a["gpu"], name, launch, products, f"{r['shared']:,} / {a['shared_optin']:,}", r["registers"],
                     f"{r['spill_stores']} / {r['spill_loads']}", f"{occ['blocks']} ({occ['limit']})",
                     f"{w['executed'] / 1e9:.3g}", f"{100 * (1 - w['useful'] / w['executed']):.1f} % "
                     f"({100 * w['head_padding']:.0f} %)", f"{w['bytes'] / 1e6:.3g}",
                     f"{roof['kernel'] * 1e6:.4g}", f"{roof['reference'] * 1e6:.4g}",
                     f"{roof['ratio']:.3g}" + ("" if ok else " FAIL")])
    headers = ["GPU", "spec", "launch (tiles, warps, stages)", "products (PTX)", "shared B / limit", "registers", "spill stores / loads B",
               "blocks per SM (limit)", "kernel G multiply-adds", "wasted products: all (head dim)", "kernel MB moved",
               "kernel bound µs", "reference bound µs", "reference / kernel"]
    body = table(headers, rows)
    problems = "; ".join(
        [f"FFAM: {p['batch']}×{p['heads']} heads, {p['frames']} frames of {p['H']}×{p['W']}, d = {p['head_dim']}, r = {p['r']}"
         for p in aot.FFAM_PROBLEMS] +
        [f"search: {p['pairs']} pair of {p['H']}×{p['W']}, D = {p['dim']}, l = {p['window']}, K = {p['k']}"
         for p in aot.CORR_PROBLEMS])
    notes = (f"{len(results)} compiles ({len(specs[caps[0]])} specs × {len(caps)} architectures, Triton ahead of time, "
             f"`ptxas -v` from Triton's wheel; identical compiles run once), {failed} failed, {wall:.0f} s wall. "
             f"Problems: {problems}. Bounds: max(2·multiply-adds / peak, bytes / bandwidth) at the published "
             "peaks (FP32 for fp32 products, FP16/BF16 tensor cores with FP32 accumulation for 16-bit ones; "
             "sources in kernels/aot.py); the reference is SDPA over the explicit fine + coarse keys (FFAM) and the "
             "per-pair H·W × H·W matmul + top-K (search). Occupancy: resident blocks per SM from registers, shared "
             "memory (+1 KiB per block) and threads. Wasted products: the share of the kernel's multiply-adds "
             "outside the useful ones (FFAM: partial tiles and head-dim padding; search: also the band columns "
             "outside each query's window, 1 − l/BLOCK_R); in brackets the head-dim (feature-block) padding alone. "
             "Products (read from the PTX): fp32 FMA = no tensor-core instruction (IEEE fp32, no TF32); mma / wgmma "
             "IN→ACC = mma.sync (sm_8x) or wgmma (sm_90a) on IN operands accumulating in ACC; a spec that multiplies "
             "otherwise than intended (16-bit on tensor cores with f32 accumulation, fp32 without) fails. "
             "(off): compiled, not launched by default.")
    print(notes)
    print(body)
    if args.write:
        write_section("Triton kernels compiled for A100, RTX 3090, RTX 4090, H100 (`bench kernels --aot`)",
                      notes + "\n\n" + body + "\n\nCommand: `minivid bench kernels --aot`.")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    if args.aot:
        return run_aot(args)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if not cuda:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("triton was imported before TRITON_INTERPRET=1 could be set; run `minivid bench kernels` in a fresh process")
            return 1
        os.environ["TRITON_INTERPRET"] = "1"
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if cuda else [])
    rng = random.Random(args.seed)
    ffam = dict(FFAM_SHAPES, **{"random": random_ffam_shapes(rng, RANDOM_SHAPES)}, **(FFAM_GPU_SHAPES if cuda else {}))
    corr = dict(CORR_SHAPES, **{"random": random_corr_shapes(rng, RANDOM_SHAPES)}, **(CORR_GPU_SHAPES if cuda else {}))
    rows, failed = [], 0
    t0 = time.perf_counter()
    if args.kernel in ("all", "fine-coarse"):
        for dtype in dtypes:
            variants = [("", False)] + ([(" (native kernel)", True)] if dtype == torch.bfloat16 else [])
            for suffix, native in variants:
                label = str(dtype).replace("torch.", "") + (" (dispatched: fp32 kernel)" if dtype == torch.bfloat16 and not native else suffix)
                for kind, shapes in ffam.items():
                    for shape in shapes:
                        res = check_ffam(shape, dtype, device, not cuda, native)
                        failed += not res["ok"]
                        rows.append(["fine_coarse_attention", label, kind, "B{}h{} F{} {}×{} d{} r{}".format(*shape),
                                     f"{res['err']:.2e}", f"{res['err_ref']:.2e}", f"{res['tol']:.2e}", "",
                                     "pass" if res["ok"] else "FAIL"])
    if args.kernel in ("all", "correspondence"):
        for dtype in dtypes:
            for kind, shapes in corr.items():
                for shape in shapes:
                    res = check_corr(shape, dtype, device, not cuda)
                    failed += not res["ok"]
                    rows.append(["window_topk", str(dtype).replace("torch.", ""), kind, "B{} {}×{} D{} l{} K{}".format(*shape),
                                 f"{res['err']:.2e}", f"{res['err_ref']:.2e}", f"{res['tol']:.2e}", str(res["mismatches"]),
                                 "pass" if res["ok"] else "FAIL"])
    check_s = time.perf_counter() - t0
    headers = ["kernel", "dtype", "shapes", "shape", "max |Δ| (FFAM: vs float64; top-K: scores)",
               "FFAM: vs reference in dtype; top-K: chosen vs reference score", "tolerance", "index mismatches", "result"]
    body = table(headers, rows)
    where = ("CUDA " + torch.cuda.get_device_name() if cuda else
             "CPU, Triton interpreter (TRITON_INTERPRET=1): float32 and float16 only — bfloat16 and timing need CUDA "
             "(Triton 3.9's interpreter computes bfloat16 tl.dot wrongly; interpreter timings mean nothing)")
    notes = (f"Correctness on {where}; {len(rows)} checks, {failed} failed, {check_s:.0f} s. Tolerances and what is "
             "compared: see benchmarks/kernels.py.")
    print(notes)
    print(body)
    sections = [notes + "\n\n" + body]
    if cuda and not args.check:
        repeats = args.repeats or (30 if args.full else 10)
        trows = []
        if args.kernel in ("all", "fine-coarse"):
            trows += time_ffam(device, repeats)
        if args.kernel in ("all", "correspondence"):
            trows += time_corr(device, repeats)
        tbody = table(["problem", "dtype", "path", "ms (median)", "× Triton's time"], trows)
        print(tbody)
        sections.append(f"Timings on {where}, median of {repeats} CUDA-event-timed runs after one warm-up.\n\n{tbody}")
    elif not args.check:
        print("timing skipped: it needs CUDA")
    if args.write:
        cmd = "minivid bench kernels" + (" --check" if args.check else "") + (" --full" if args.full else "")
        write_section("Triton kernels vs their references (`bench kernels`)",
                      "\n\n".join(sections) + f"\n\nCommand: `{cmd}`.")
    return 1 if failed else 0
