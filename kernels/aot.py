"""The Triton kernels as they launch on each GPU architecture, described for ahead-of-time compilation.

Triton compiles for a CUDA target without a GPU, and its wheel bundles NVIDIA's `ptxas`; so this
CPU-only module can prove that every launch the methods make compiles, fits the GPU's shared memory
and spills no registers, on the architectures users run:

    from minivid.kernels import aot_specs
    specs = aot_specs((8, 6))          # one spec per launch the methods make, as chosen for an RTX 3090
    results = compile_specs([(8, 0), (8, 6)])   # compiled in a fresh process: shared, registers, spills, ...

A spec is a dict: `name`, `kernel`, `fn` (the `@triton.jit` function launched), `signature`,
`constexprs` and `attrs` (exactly what `triton.compiler.ASTSource` takes, with the specialisations
Triton's launcher applies to the spec's arguments: an integer 1 becomes a constant, pointers and
multiples of 16 get `tt.divisibility` 16), `options` (`num_warps`, `num_stages`), `dtype` (the
dtype of the call), `shape` (the problem sizes), `grid`, `enabled` (False: a path that does not run
by default) and `note`. Specs are built by passing meta tensors of the spec's shape through the very
function that builds the launcher's arguments (`fine_coarse_attention._launch`,
`correspondence._launch`), so what is compiled here is what is launched there (tests assert it).

`compile_spec` must run in a process where Triton is not interpreting (`TRITON_INTERPRET` unset
when triton was imported: under the interpreter `@triton.jit` makes functions that cannot be
compiled); `compile_specs` starts such a process (`python -m minivid.kernels.aot`), so tests and
benchmarks that run the interpreter can call it. Nothing here needs a GPU or the network.

Peak figures (`ARCHS`, used for roofline bounds): NVIDIA's published data sheets and whitepapers —
A100 SXM 80 GB: NVIDIA A100 Tensor Core GPU data sheet (FP32 19.5 TFLOPS, FP16/BF16 tensor 312
TFLOPS dense, 2,039 GB/s); RTX 3090: NVIDIA Ampere GA102 GPU Architecture whitepaper, appendix table
(FP32 35.6 TFLOPS, FP16/BF16 tensor with FP32 accumulate 71 TFLOPS dense, 936 GB/s); RTX 4090:
NVIDIA Ada GPU Architecture whitepaper, appendix table (FP32 82.6 TFLOPS, FP16/BF16 tensor with FP32
accumulate 165.2 TFLOPS dense, 1,008 GB/s); H100 SXM5: NVIDIA H100 Tensor Core GPU data sheet (FP32
67 TFLOPS, FP16/BF16 tensor 989.4 TFLOPS dense, 3.35 TB/s). Per-SM limits: CUDA C++ Programming
Guide, "Features and Technical Specifications" (compute capabilities 8.0, 8.6, 8.9, 9.0).
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import torch

__all__ = ["ARCHS", "aot_specs", "arch_limits", "device_target", "compile_spec", "compile_specs", "products",
           "occupancy", "work", "roofline"]

# Per architecture: shared memory per block (opt-in) and per SM, registers, threads and blocks per SM,
# SM count and published peaks (FLOP/s, bytes/s) of the product named.
ARCHS: dict[tuple[int, int], dict] = {
    (8, 0): dict(sm="sm_80", gpu="A100 SXM 80 GB", shared_optin=166_912, shared_per_sm=167_936, regs_per_sm=65_536,
                 threads_per_sm=2048, blocks_per_sm=32, sms=108, fp32=19.5e12, tensor16=312e12, bandwidth=2039e9),
    (8, 6): dict(sm="sm_86", gpu="RTX 3090", shared_optin=101_376, shared_per_sm=102_400, regs_per_sm=65_536,
                 threads_per_sm=1536, blocks_per_sm=16, sms=82, fp32=35.6e12, tensor16=71e12, bandwidth=936e9),
    (8, 9): dict(sm="sm_89", gpu="RTX 4090", shared_optin=101_376, shared_per_sm=102_400, regs_per_sm=65_536,
                 threads_per_sm=1536, blocks_per_sm=24, sms=128, fp32=82.6e12, tensor16=165.2e12, bandwidth=1008e9),
    (9, 0): dict(sm="sm_90a", gpu="H100 SXM", shared_optin=232_448, shared_per_sm=233_472, regs_per_sm=65_536,
                 threads_per_sm=2048, blocks_per_sm=32, sms=132, fp32=67e12, tensor16=989.4e12, bandwidth=3350e9),
}
_RESERVED_SHARED = 1024            # bytes of shared memory the driver reserves per block (sm_80 and later)

# The problems the methods launch. FFAM: EI² on SD 1.4 (8 heads of 40 / 80 / 160 at 64² / 32² / 16²
# tokens of 512-pixel frames) and SD 2.1 / SVD heads of 64 (5 heads at 64²); 8 frames, r = 2.
# Correspondence: COVE's search on SD 2.1 decoder features (output_blocks.8, d = 640 on the latent grid;
# methods/cove/features.py), K = 3: 512×512 frames (64×64) at the default l = 9 and Table 4's l = 3 and 15
# (l = 3 makes the window's half-width 1, which Triton specialises to a constant: another compile), and a
# 576×320 clip (40×72: sides not multiples of 16, so H and W lose Triton's divisibility hint: another compile).
FFAM_PROBLEMS = [dict(batch=1, heads=8, frames=8, H=64, W=64, head_dim=40, r=2),
                 dict(batch=1, heads=5, frames=8, H=64, W=64, head_dim=64, r=2),
                 dict(batch=1, heads=8, frames=8, H=32, W=32, head_dim=80, r=2),
                 dict(batch=1, heads=8, frames=8, H=16, W=16, head_dim=160, r=2)]
CORR_PROBLEMS = [dict(pairs=1, H=64, W=64, dim=640, window=9, k=3),
                 dict(pairs=1, H=64, W=64, dim=640, window=3, k=3),
                 dict(pairs=1, H=64, W=64, dim=640, window=15, k=3),
                 dict(pairs=1, H=40, W=72, dim=640, window=9, k=3)]
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def arch_limits(capability, shared_optin: int | None = None) -> dict:
    """The `ARCHS` entry of `capability` (a tuple such as (8, 6)); an unlisted one gets the entry of
    the newest listed architecture not newer than it (sm_80's below 8.0). `shared_optin` (bytes,
    what the device reports) replaces the table's."""
    cap = tuple(int(c) for c in capability)
    known = [c for c in sorted(ARCHS) if c <= cap] or [min(ARCHS)]
    out = dict(ARCHS[known[-1]], capability=cap)
    if shared_optin:
        out["shared_optin"] = int(shared_optin)
    return out


def device_target(device: torch.device) -> tuple[tuple[int, int], int | None]:
    """(compute capability, shared memory per block opt-in) of a CUDA device; on another device
    (the CPU interpreter) sm_80's, so that the interpreter runs a configuration a GPU runs."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (props.major, props.minor), props.shared_memory_per_block_optin
    return (8, 0), None


# ---------------------------------------------------------------- specs

def _raw(fn):
    """The Python function behind a @triton.jit function (JIT or interpreted)."""
    return getattr(fn, "fn", fn)


def specialize(fn, args: tuple, kwargs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) of launching `fn` with these arguments, as Triton's launcher
    specialises them (triton.runtime.jit: native_specialize_impl per argument)."""
    import inspect

    import triton.language as tl
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    params = list(inspect.signature(_raw(fn)).parameters.values())
    bound = dict(zip([p.name for p in params], args))
    bound.update({k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")})
    if set(bound) != {p.name for p in params}:
        raise TypeError(f"specialize: arguments {sorted(bound)} do not match {_raw(fn).__name__}'s {[p.name for p in params]}")
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(params):
        value = bound[p.name]
        if p.annotation is tl.constexpr or p.annotation == "tl.constexpr":
            kind, attr = "constexpr", None
        else:
            kind, attr = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[p.name] = value
        elif attr == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _spec(name, kernel, fn, launch, dtype, shape, enabled=True, note=""):
    grid, args, kwargs = launch
    signature, constexprs, attrs = specialize(fn, args, kwargs)
    return dict(name=name, kernel=kernel, fn=fn, signature=signature, constexprs=constexprs, attrs=attrs,
                options=dict(num_warps=kwargs["num_warps"], num_stages=kwargs["num_stages"]),
                dtype=dtype, shape=dict(shape), grid=tuple(grid), enabled=enabled, note=note)


def method_layout(batch: int, heads: int, frames: int, tokens: int, head_dim: int, **kw) -> torch.Tensor:
    """Q, K or V [batch, heads, frames·tokens, head_dim] laid out as EI²'s FFAM processor hands them to
    the kernel (methods/ei2/blocks.py): a view of the projection's [batch·frames, tokens, heads·head_dim]
    output split into heads (minivid.attention), not a contiguous copy. Its strides (head d, token h·d)
    set Triton's divisibility hints: at d = 40 they differ from a contiguous tensor's, so the spec must
    be built from this layout to be the kernel the method launches."""
    x = torch.empty(batch * frames, tokens, heads * head_dim, **kw)
    q = x.view(batch * frames, tokens, heads, head_dim).transpose(1, 2)
    return q.reshape(batch, frames, heads, tokens, head_dim).transpose(1, 2).reshape(batch, heads, frames * tokens, head_dim)


def _ffam_specs(capability) -> list[dict]:
    from . import _fine_coarse_attention_triton as impl
    from . import fine_coarse_attention as fca

    specs = []
    for prob in FFAM_PROBLEMS:
        B, h, Fr, H, W, d, r = (prob[k] for k in ("batch", "heads", "frames", "H", "W", "head_dim", "r"))
        Hp, Wp = fca.pooled_size((H, W), r)
        for dtype in _DTYPES:
            variants = [(dtype, True, "")]
            if dtype == torch.bfloat16:
                variants = [(torch.float32, True, "bf16 inputs run the fp32 kernel (default until a GPU verified "
                             "the native one)"),
                            (torch.bfloat16, False, "native bf16 kernel: off until `minivid bench kernels --check` "
                             "passed on a GPU")]
            for kdtype, enabled, note in variants:
                meta = dict(device="meta", dtype=kdtype)
                q, k, v = (method_layout(B, h, Fr, H * W, d, **meta) for _ in range(3))
                out = torch.empty(B, h, Fr * H * W, d, **meta)
                kc, vc = (torch.empty(B, h, Fr * Hp * Wp, d, **meta) for _ in range(2))
                cfg = fca.ffam_launch_config(kdtype, d, capability)
                launch = fca._launch(q, k, v, kc, vc, out, Fr, (H, W), d ** -0.5, cfg)
                tag = _SHORT[dtype] + ("" if kdtype == dtype else " (fp32 kernel)") + (" native" if not enabled else "")
                specs.append(_spec(f"fine_coarse_fwd {tag} d{d}", "fine_coarse_fwd", impl.fine_coarse_fwd, launch,
                                   dtype, dict(prob, pooled=Hp * Wp), enabled, note))
    return specs


def _corr_specs(capability) -> list[dict]:
    from . import correspondence as corr

    specs = []
    for prob in CORR_PROBLEMS:
        B, H, W, D, window, k = (prob[x] for x in ("pairs", "H", "W", "dim", "window", "k"))
        for dtype in _DTYPES:
            meta = dict(device="meta")
            src, dst = (torch.empty(B, H, W, D, dtype=dtype, **meta) for _ in range(2))
            idx = torch.empty(B, H, W, k, dtype=torch.long, **meta)
            score = torch.empty(B, H, W, k, dtype=torch.float32, **meta)
            cfg = corr.window_topk_launch_config(dtype, D, window, W, capability)
            launch = corr._launch(src, dst, idx, score, window, k, cfg)
            note = "bf16 tiles converted to fp32 in the kernel (exact), fp32 products" if dtype == torch.bfloat16 else ""
            specs.append(_spec(f"window_topk_kernel {_SHORT[dtype]} D{D} l{window} {H}x{W}", "window_topk_kernel",
                               corr._triton_kernel()[1], launch, dtype, prob, True, note))
    return specs


def aot_specs(capability) -> list[dict]:
    """One spec per Triton launch the methods make, with the launch parameters chosen for a GPU of
    compute `capability` (e.g. (8, 0)): FFAM × fp32/fp16/bf16 (the default fp32-kernel path and the
    native kernel, off) × head dims 40, 64, 80, 160; the correspondence search × fp32/fp16/bf16 at
    COVE's d = 640 on 64×64 (l = 3, 9, 15) and 40×72 (l = 9) grids (`CORR_PROBLEMS`). See the module
    docstring for the fields."""
    cap = tuple(int(c) for c in capability)
    if len(cap) != 2:
        raise ValueError(f"aot_specs: capability must be (major, minor), e.g. (8, 0), got {capability!r}")
    return _ffam_specs(cap) + _corr_specs(cap)


# ---------------------------------------------------------------- compilation

_PTXAS = {"registers": r"Used (\d+) registers", "stack": r"(\d+) bytes stack frame",
          "spill_stores": r"(\d+) bytes spill stores", "spill_loads": r"(\d+) bytes spill loads"}


def compile_spec(spec: dict, capability) -> dict:
    """Compile one spec for `capability` with Triton (ahead of time, no GPU) and read `ptxas -v`
    (Triton runs ptxas with -v on every compile; its log is captured). Returns shared (bytes),
    registers, stack, spill_stores, spill_loads, threads and the ptxas log. Raises RuntimeError under
    the Triton interpreter (use `compile_specs`)."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton.knobs.runtime.interpret or not hasattr(spec["fn"], "arg_names"):
        raise RuntimeError("compile_spec: triton was imported with TRITON_INTERPRET=1; compile in a fresh process "
                           "without it (minivid.kernels.aot.compile_specs does)")
    cap = tuple(capability)
    triton.knobs.nvidia.dump_ptxas_log = True          # Triton prints ptxas -v's log (else it deletes it)
    triton.knobs.compilation.always_compile = True     # a cached kernel would skip ptxas and its log
    src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"], attrs=spec["attrs"])
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        k = triton.compile(src, target=GPUTarget("cuda", cap[0] * 10 + cap[1], 32), options=dict(spec["options"]))
    text = log.getvalue()
    out = {key: int(m.group(1)) if (m := re.search(rx, text)) else None for key, rx in _PTXAS.items()}
    if out["registers"] is None:
        raise RuntimeError(f"compile_spec: no ptxas -v report for {spec['name']} on {cap}:\n{text}")
    ptx = k.asm["ptx"]
    # tensor-core instructions in the PTX: mma.sync (sm_80/86/89) or wgmma (sm_90a), and their input types
    mma = sorted({m.group(1) for m in re.finditer(r"\b(wgmma\.mma_async|mma\.sync)\S*", ptx)})
    kinds = sorted(set(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)\S*\.(f16|bf16|tf32)\b", ptx)))
    # the accumulator (D) type: the first type after the shape (mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32,
    # wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16)
    accum = sorted(set(re.findall(r"\b(?:wgmma\.mma_async\.sync|mma\.sync)\.aligned\.m\d+n\d+k\d+(?:\.row\.col)?\.(f16|f32)\.",
                                  ptx)))
    return dict(out, shared=int(k.metadata.shared), threads=32 * spec["options"]["num_warps"], mma=mma,
                mma_inputs=kinds, mma_accum=accum, ptxas=text.strip())


def products(spec: dict, result: dict) -> tuple[str, bool]:
    """(label, as intended) of how a compiled spec multiplies, read from its PTX (`compile_spec`'s
    mma fields): fp32 kernels (and the search's bf16 tiles, converted to fp32) must have no
    tensor-core instruction (so no TF32: IEEE products on the CUDA cores, the 1e-5 parity); fp16 and
    native bf16 kernels must multiply on the tensor cores (mma.sync / wgmma) in their own type with
    fp32 accumulation."""
    sig = next(iter(spec["signature"].values()))
    fp32 = sig == "*fp32" or spec["constexprs"].get("TO_F32", False)
    if fp32:
        return ("fp32 FMA" if not result["mma"] else f"{'/'.join(result['mma'])} {'/'.join(result['mma_inputs'])}"), \
            result["mma"] == [] and result["mma_inputs"] == []
    want = {"*fp16": "f16", "*bf16": "bf16"}[sig]
    label = f"{'/'.join(m.split('.')[0] for m in result['mma']) or 'no mma'} {'/'.join(result['mma_inputs'])}" \
            f"→{'/'.join(result['mma_accum'])}"
    return label, (len(result["mma"]) == 1 and result["mma_inputs"] == [want] and result["mma_accum"] == ["f32"])


def _compile_one(job):
    cap, index = job
    spec = aot_specs(cap)[index]
    try:
        return dict(compile_spec(spec, cap), error=None)
    except Exception as e:                                  # reported per spec (e.g. out of shared memory)
        return dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")


def _key(spec: dict, cap) -> str:
    return repr((tuple(cap), spec["kernel"], sorted(spec["signature"].items()), sorted(map(repr, spec["constexprs"].items())),
                 sorted(spec["attrs"]), sorted(spec["options"].items())))


def _main(argv=None) -> int:
    import argparse
    import concurrent.futures

    p = argparse.ArgumentParser(prog="python -m minivid.kernels.aot",
                                description="Compile the Triton launch specs for CUDA targets; print JSON.")
    p.add_argument("--arch", action="append", required=True, help="compute capability, e.g. 8.0 (repeatable)")
    p.add_argument("--name", action="append", default=None, help="only specs whose name contains this (repeatable)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    caps = [tuple(int(x) for x in s.split(".")) for s in a.arch]
    jobs, keys, rows = [], {}, []
    for cap in caps:
        for i, spec in enumerate(aot_specs(cap)):
            if a.name and not any(n in spec["name"] for n in a.name):
                continue
            key = _key(spec, cap)                           # identical compiles (e.g. fp32 and bf16-via-fp32) run once
            if key not in keys:
                keys[key] = len(jobs)
                jobs.append((cap, i))
            rows.append(dict(capability=list(cap), index=i, name=spec["name"], job=keys[key]))
    with concurrent.futures.ProcessPoolExecutor(max(1, a.jobs)) as pool:
        results = list(pool.map(_compile_one, jobs))
    for row in rows:
        row.update(results[row.pop("job")])
    json.dump(rows, sys.stdout)
    return 0


def compile_specs(capabilities, names=None, jobs: int | None = None, timeout: float = 900) -> list[dict]:
    """Compile the specs of every capability in a fresh Python process without TRITON_INTERPRET
    (`python -m minivid.kernels.aot`), `jobs` compiles at a time (default: the CPU count). Returns one
    dict per (capability, spec): capability, index (into `aot_specs(capability)`), name, and
    `compile_spec`'s fields, or `error` (the compile failed, e.g. the launch does not fit)."""
    cmd = [sys.executable, "-m", "minivid.kernels.aot", "--jobs", str(jobs or os.cpu_count() or 1)]
    for cap in capabilities:
        cmd += ["--arch", f"{cap[0]}.{cap[1]}"]
    for n in names or []:
        cmd += ["--name", n]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")          # Triton 3.9's default, stated (silences its warning)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"compile_specs: {' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout)


# ---------------------------------------------------------------- occupancy, work, roofline

def occupancy(result: dict, capability) -> dict:
    """Resident blocks per SM and what limits them: registers (allocated per warp in units of 256),
    shared memory (plus 1 KiB reserved per block) and threads (CUDA occupancy rules)."""
    a = arch_limits(capability)
    warps = result["threads"] // 32
    per_warp = math.ceil(result["registers"] * 32 / 256) * 256
    by = {"registers": a["regs_per_sm"] // (warps * per_warp),
          "shared": a["shared_per_sm"] // (result["shared"] + _RESERVED_SHARED),
          "threads": a["threads_per_sm"] // result["threads"],
          "blocks": a["blocks_per_sm"]}
    limit = min(by, key=by.get)
    return dict(blocks=by[limit], limit=limit, warps=by[limit] * warps)


def _ceil(a, b):
    return -(-a // b) * b


def work(spec: dict) -> dict:
    """Multiply-adds (executed by the kernel, with its padding; useful ones) and DRAM bytes of the
    kernel and of the reference it replaces, for the spec's problem. Bytes count each tensor read
    or written once (compulsory traffic). FFAM's reference: `scaled_dot_product_attention` over the
    explicit fine + coarse keys (built per frame: written and read). The search's reference: per
    pair, the full H·W × H·W similarity matmul (Eq. 7; written and read in fp32) and a top-K over it."""
    s, c = spec["shape"], spec["constexprs"]
    item = spec["dtype"].itemsize
    if spec["kernel"] == "fine_coarse_fwd":
        bh, Fr, L, P, d = s["batch"] * s["heads"], s["frames"], s["H"] * s["W"], s["pooled"], s["head_dim"]
        BM, BN, width = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_D"] + c["BLOCK_D2"]
        keys = sum(_ceil(L, BN) + _ceil(f * P, BN) + _ceil((Fr - 1 - f) * P, BN) for f in range(Fr))
        executed = 2 * bh * _ceil(L, BM) * keys * width
        useful = 2 * bh * Fr * L * (L + (Fr - 1) * P) * d
        kitem = 4 if spec["signature"]["Q"] == "*fp32" else 2
        kernel_bytes = bh * d * (4 * Fr * L * kitem + 2 * Fr * L * kitem + 4 * Fr * P * kitem)   # q,k,v,o; pooling; kc,vc
        if kitem != item:                                   # bf16 through the fp32 kernel: casts in and out
            kernel_bytes += bh * d * Fr * L * (3 * (item + 4) + (4 + item))
        explicit = Fr * (L + (Fr - 1) * P)                  # keys per head, all frames
        ref_bytes = bh * d * item * (2 * Fr * L + 2 * Fr * L + 4 * Fr * P + 4 * explicit)
        return dict(executed=executed, useful=useful, head_padding=1 - d / width, bytes=kernel_bytes,
                    ref_macs=useful, ref_bytes=ref_bytes, tensor_cores=kitem == 2, ref_tensor_cores=item == 2)
    B, H, W, D, l, k = (s[x] for x in ("pairs", "H", "W", "dim", "window", "k"))
    BT, BR, BD = c["BLOCK_T"], c["BLOCK_R"], c["BLOCK_D"]
    Lh, Lw = min(l, H), min(l, W)
    executed = B * H * _ceil(W, BT) * Lh * BR * _ceil(D, BD)
    useful = B * H * W * Lh * Lw * D
    out_bytes = B * H * W * k * (8 + 4)
    n = H * W
    return dict(executed=executed, useful=useful, head_padding=1 - D / _ceil(D, BD),
                bytes=B * 2 * n * D * item + out_bytes, ref_macs=B * n * n * D,
                ref_bytes=B * (2 * n * D * item + 2 * n * n * 4) + out_bytes,
                tensor_cores=item == 2 and not c.get("TO_F32", False), ref_tensor_cores=item == 2)


def roofline(spec: dict, capability) -> dict:
    """Lower bounds on time (seconds) at the architecture's published peaks: max(FLOPs / peak,
    bytes / bandwidth), for the kernel (executed multiply-adds) and for the reference it replaces;
    fp32 products at the FP32 (CUDA core) peak, fp16/bf16 ones at the tensor-core peak."""
    a, w = arch_limits(capability), work(spec)
    peak = a["tensor16"] if w["tensor_cores"] else a["fp32"]
    ref_peak = a["tensor16"] if w["ref_tensor_cores"] else a["fp32"]
    kernel = max(2 * w["executed"] / peak, w["bytes"] / a["bandwidth"])
    ref = max(2 * w["ref_macs"] / ref_peak, w["ref_bytes"] / a["bandwidth"])
    return dict(work=w, kernel=kernel, reference=ref, ratio=ref / kernel)


if __name__ == "__main__":
    sys.exit(_main())
