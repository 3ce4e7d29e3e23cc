"""The Triton kernels as launched on A100 / RTX 3090 / RTX 4090 / H100 (minivid.kernels.aot):

- the launchers pass, on a device of each compute capability (device properties faked), exactly
  the arguments of that capability's spec — so what is compiled is what is launched;
- the configuration chosen for every capability runs under the interpreter (TRITON_INTERPRET=1,
  conftest) and matches the PyTorch reference — so what is compiled is what is tested;
- one spec per kernel × dtype × head dim compiles for sm_80 and sm_86 (Triton ahead of time, in a
  process without the interpreter; ptxas -v from Triton's wheel): within the shared-memory limit,
  0 bytes of spill stores.
"""
import types

import pytest
import torch

from minivid.kernels import aot
from minivid.kernels import correspondence as corr
from minivid.kernels import fine_coarse_attention as fca

CAPS = [(8, 0), (8, 6), (8, 9), (9, 0)]


class Recorder:
    """Stands in for a @triton.jit function: `fn[grid](*args, **kwargs)` records the launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((tuple(grid), args, kwargs))


def fake_device(monkeypatch, cap):
    props = types.SimpleNamespace(major=cap[0], minor=cap[1], shared_memory_per_block_optin=aot.ARCHS[cap]["shared_optin"])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    # the launchers run on CPU tensors here; they ask device_target, which reads the (faked) CUDA properties
    real = aot.device_target
    monkeypatch.setattr(aot, "device_target", lambda device: real(torch.device("cuda", 0)))


def test_device_target_reads_capability_and_shared_memory(monkeypatch):
    props = types.SimpleNamespace(major=8, minor=9, shared_memory_per_block_optin=101_376)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    assert aot.device_target(torch.device("cuda", 0)) == ((8, 9), 101_376)
    assert aot.device_target(torch.device("cpu")) == ((8, 0), None)           # the interpreter runs sm_80's choice
    assert aot.arch_limits((8, 7))["sm"] == "sm_86" and aot.arch_limits((12, 0))["sm"] == "sm_90a"
    assert aot.arch_limits((8, 6), 49_152)["shared_optin"] == 49_152


@pytest.mark.parametrize("cap", CAPS, ids=lambda c: f"sm{c[0]}{c[1]}")
def test_launcher_arguments_are_the_specs(monkeypatch, cap):
    from minivid.kernels import _fine_coarse_attention_triton as impl

    specs = aot.aot_specs(cap)
    ffam_fn, corr_fn = impl.fine_coarse_fwd, corr._triton_kernel()[1]
    assert {s["kernel"] for s in specs} == {"fine_coarse_fwd", "window_topk_kernel"}
    assert {s["shape"].get("head_dim") for s in specs if s["kernel"] == "fine_coarse_fwd"} == {40, 64, 80, 160}
    fake_device(monkeypatch, cap)
    rec = Recorder()
    monkeypatch.setattr(impl, "fine_coarse_fwd", rec)
    monkeypatch.setattr(corr, "_triton_kernel", lambda: (None, rec))
    for spec in specs:
        s = spec["shape"]
        if spec["kernel"] == "fine_coarse_fwd":
            # the layout EI²'s processor passes (a head-split view): its strides are part of the compiled kernel
            q, k, v = (aot.method_layout(s["batch"], s["heads"], s["frames"], s["H"] * s["W"], s["head_dim"],
                                         dtype=spec["dtype"]) for _ in range(3))
            fca.fine_coarse_attention_triton(q, k, v, s["frames"], (s["H"], s["W"]), s["r"], bf16_native=not spec["enabled"])
            fn = ffam_fn
        else:
            src, dst = (torch.empty(s["pairs"], s["H"], s["W"], s["dim"], dtype=spec["dtype"]) for _ in range(2))
            corr.window_topk_triton(src, dst, s["window"], s["k"])
            fn = corr_fn
        grid, args, kwargs = rec.launches.pop()
        signature, constexprs, attrs = aot.specialize(fn, args, kwargs)
        assert (signature, constexprs, attrs) == (spec["signature"], spec["constexprs"], spec["attrs"]), spec["name"]
        assert dict(num_warps=kwargs["num_warps"], num_stages=kwargs["num_stages"]) == spec["options"], spec["name"]
        assert grid == spec["grid"], spec["name"]


def _configs(kernel):
    """The distinct launch configurations the specs of every capability choose, with a dtype and
    head dim (feature width) each runs at: (dtype, width, constexprs, capability)."""
    out = {}
    for cap in CAPS:
        for s in aot.aot_specs(cap):
            if s["kernel"] != kernel or not s["enabled"]:
                continue
            kdtype = {"*fp32": torch.float32, "*fp16": torch.float16, "*bf16": torch.bfloat16}[next(iter(s["signature"].values()))]
            width = s["shape"].get("head_dim", s["shape"].get("dim"))
            key = (kdtype, width, tuple(sorted((k, v) for k, v in s["constexprs"].items())))
            extra = (s["shape"]["window"],) if kernel == "window_topk_kernel" else ()
            out.setdefault(key, (kdtype, width, *extra, cap))
    return list(out.values())


@pytest.mark.parametrize("dtype,d,cap", _configs("fine_coarse_fwd"), ids=lambda x: str(x).replace("torch.", ""))
def test_every_capabilitys_ffam_configuration_equals_the_reference(dtype, d, cap):
    frames, H, W, r = 3, 9, 8, 2                              # L = 72: partial query and key blocks of 64/32/16
    q, k, v = (torch.randn(1, 2, frames * H * W, d).to(dtype) for _ in range(3))
    tri = fca.fine_coarse_attention_triton(q, k, v, frames, (H, W), r, capability=cap)
    with torch.inference_mode():
        oracle = fca.fine_coarse_attention_reference(q.double(), k.double(), v.double(), frames, (H, W), r)
    # float32: IEEE products, float32 accumulation; float16: output rounding plus the softmax weights
    # rounded to float16 before P·V, each half an ulp of a value at most max|v| (benchmarks/kernels.py)
    tol = 1e-5 if dtype == torch.float32 else 3 * 2 ** -11 * v.abs().max().item()
    assert tri.dtype == dtype and (tri.double() - oracle).abs().max().item() <= tol


@pytest.mark.parametrize("dtype,dim,window,cap", _configs("window_topk_kernel"), ids=lambda x: str(x).replace("torch.", ""))
def test_every_capabilitys_search_configuration_equals_the_reference(dtype, dim, window, cap):
    # exact products: features are multiples of 1/8 in [-1, 1] (exact in fp16/bf16, sums exact in fp32), so
    # scores and the tie rule must agree bitwise with the reference; d = 80 is several feature blocks
    g = torch.Generator().manual_seed(1)
    src, dst = ((torch.randint(-8, 9, (1, 5, 33, 80), generator=g) / 8).to(dtype) for _ in range(2))
    idx, score = corr.window_topk_triton(src, dst, window, 3, capability=cap)     # l = 3: HALF a constant 1
    with torch.inference_mode():
        ridx, rscore = corr.window_topk_reference(src, dst, window, 3)
    assert torch.equal(idx, ridx) and torch.equal(score, rscore.float())


def test_head_pieces_pad_less_than_a_power_of_two():
    assert [fca.head_pieces(d) for d in (16, 40, 64, 80, 160, 8, 100)] == [
        (16, 0), (32, 16), (64, 0), (64, 16), (128, 32), (16, 0), (128, 0)]
    for d in range(1, 300):
        a, b = fca.head_pieces(d)
        assert a + b >= d and a >= 16 and (b == 0 or b >= 16) and a & (a - 1) == 0 and b & (b - 1) == 0


def test_compile_one_spec_per_kernel_dtype_and_head_dim_for_sm80_and_sm86():
    pytest.importorskip("triton")
    results = aot.compile_specs([(8, 0), (8, 6)])          # bf16-via-fp32 specs are fp32's compiles (run once)
    names = {r["name"] for r in results}
    specs = {cap: aot.aot_specs(cap) for cap in [(8, 0), (8, 6)]}
    expected = {s["name"] for s in aot.aot_specs((8, 0))}
    assert names == expected and len(results) == 2 * len(expected)
    for r in results:
        cap = tuple(r["capability"])
        where = f"{r['name']} on sm_{cap[0]}{cap[1]}"
        assert r["error"] is None, f"{where}: {r['error']}"
        assert r["shared"] <= aot.ARCHS[cap]["shared_optin"], f"{where}: {r['shared']} B of shared memory"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{where}: spills\n{r['ptxas']}"
        assert 0 < r["registers"] <= 255
        # fp32 stays IEEE (no tensor-core instruction: no TF32); fp16 and native bf16 products on tensor
        # cores (mma.sync on sm_8x) with the inputs' type and fp32 accumulation; bf16 search tiles are
        # converted to fp32 (no mma)
        spec = specs[cap][r["index"]]
        sig = next(iter(spec["signature"].values()))
        if sig == "*fp32" or "window_topk_kernel bf16" in r["name"]:
            assert r["mma"] == [] and r["mma_inputs"] == [] and r["mma_accum"] == [], where
            assert aot.products(spec, r) == ("fp32 FMA", True), where
        else:
            want = {"*fp16": "f16", "*bf16": "bf16"}[sig]
            assert r["mma"] == ["mma.sync"] and r["mma_inputs"] == [want] and r["mma_accum"] == ["f32"], where
            assert aot.products(spec, r) == (f"mma {want}→f32", True), where
    # the check reads the PTX: a 16-bit kernel without tensor cores, or accumulating in f16, or an fp32 one with
    # tensor cores (TF32), is not as intended
    fp16 = next(s for s in specs[(8, 0)] if next(iter(s["signature"].values())) == "*fp16")
    fp32 = next(s for s in specs[(8, 0)] if next(iter(s["signature"].values())) == "*fp32")
    good = dict(mma=["mma.sync"], mma_inputs=["f16"], mma_accum=["f32"])
    assert aot.products(fp16, good)[1]
    assert not aot.products(fp16, dict(good, mma_accum=["f16"]))[1]
    assert not aot.products(fp16, dict(mma=[], mma_inputs=[], mma_accum=[]))[1]
    assert not aot.products(fp32, dict(mma=["mma.sync"], mma_inputs=["tf32"], mma_accum=["f32"]))[1]


def test_aot_specs_rejects_a_bad_capability():
    with pytest.raises(ValueError, match="capability"):
        aot.aot_specs((8,))


def test_ffam_pipelining_drops_to_one_stage_on_a_small_shared_memory():
    # two stages of 64 keys × 64 dims of fp16 K and V buffers (32 KiB) fit sm_80's 163 KiB, not half of 48 KiB
    assert fca.ffam_launch_config(torch.float16, 64, (8, 0))["num_stages"] == 2
    assert fca.ffam_launch_config(torch.float16, 64, (7, 5), 49_152)["num_stages"] == 1
    assert fca.ffam_launch_config(torch.float32, 64, (8, 6))["precision"] == "ieee"


def test_ffam_specs_have_the_layout_ei2s_processor_launches(monkeypatch):
    # the strides of q/k/v are part of the compiled kernel (Triton's divisibility hints): the specs must
    # be built from what EI²'s FFAM processor hands the kernel, a head-split view, not a contiguous copy
    from minivid.attention import Attention, call_state, name_layers, set_processor
    from minivid.methods.ei2 import blocks

    seen = []
    monkeypatch.setattr(blocks, "fine_coarse_attention", lambda q, k, v, *a, **kw: seen.append((q, k, v)) or q.clone())
    heads, d, frames, (H, W) = 8, 40, 3, (4, 5)
    a = name_layers(Attention(heads * d, None, heads, d))
    set_processor(a, "", blocks.FFAMProcessor(2))
    with call_state(a, frames=frames):
        a(torch.randn(2 * frames, H * W, heads * d), hw=(H, W))
    want = aot.method_layout(2, heads, frames, H * W, d)
    assert seen and all(t.shape == want.shape and t.stride() == want.stride() for t in seen[0])
    assert want.stride() != want.contiguous().stride()
