"""Half precision on the CPU (issue 18.6) and the CPU convolution dispatch (issue 23.2): minivid.layers.conv2d /
linear compute the same convolution / product as torch (bounds from the computation's size and dtype), never
run torch's scalar NCHW half convolution, leave float32 results alone except where they choose the
im2col path, and every demo runs end to end in float16 and bfloat16 with finite outputs."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import minivid.layers as layers
from minivid.cli import main
from minivid.layers import Conv2d, Linear, conv2d, cpu_has_native, linear

UNIT = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}   # unit roundoff


def conv_bound(x, w, b, out_dtype, **kw):
    """|computed − exact| for a float32-accumulated conv of K = C·kh·kw terms rounded once to out_dtype:
    K·u32·(|w| * |x|) (summation) + u_out·|exact| (the final rounding), all in float64."""
    x64, w64 = x.double(), w.double()
    exact = F.conv2d(x64, w64, None if b is None else b.double(), **kw)
    K = w.shape[1] * w.shape[2] * w.shape[3] + 1
    return exact, K * UNIT[torch.float32] * F.conv2d(x64.abs(), w64.abs(), None if b is None else b.double().abs(), **kw) \
        + UNIT[out_dtype] * exact.abs() + 1e-30


def ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("B,C,O,H,k,stride,padding,bias", [
    (1, 48, 32, 8, 3, 1, 1, True), (3, 48, 16, 6, 3, 2, 1, False), (2, 40, 8, 7, 3, 1, 0, True),
])
def test_fp32_im2col_path_is_the_convolution(monkeypatch, B, C, O, H, k, stride, padding, bias):
    monkeypatch.setattr(layers, "GEMM_MIN_CHANNELS", 32)          # small shapes take the path under test
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(B, C, H, H, generator=g), torch.randn(O, C, k, k, generator=g) / 10
    b = torch.randn(O, generator=g) if bias else None
    assert layers._gemm_is_faster(x, w, stride, padding, 1)
    out = conv2d(x, w, b, stride, padding)
    exact, bound = conv_bound(x, w, b, torch.float32, stride=stride, padding=padding)
    assert out.shape == exact.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert ((out.double() - exact).abs() <= bound).all()
    # and it is what the module computes; gradients flow (tuning runs through it)
    conv = Conv2d(C, O, k, stride=stride, padding=padding, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(w)
        if bias:
            conv.bias.copy_(b)
    xg = x.clone().requires_grad_()
    conv(xg).square().sum().backward()
    xr = x.clone().requires_grad_()
    F.conv2d(xr, w, b, stride, padding).square().sum().backward()
    assert torch.allclose(xg.grad, xr.grad, rtol=1e-4, atol=1e-4)


def test_reference_convolutions_is_f_conv2d_bit_for_bit(monkeypatch):
    monkeypatch.setattr(layers, "GEMM_MIN_CHANNELS", 32)
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 64, 8, 8, generator=g), torch.randn(48, 64, 3, 3, generator=g) / 10, torch.randn(48, generator=g)
    assert "aten::im2col" in ops_run(lambda: conv2d(x, w, b, 1, 1))                # the path is live here
    with layers.reference_convolutions():
        with layers.reference_convolutions():
            pass
        assert not layers._gemm_is_faster(x, w, 1, 1, 1)                             # nesting keeps it on
        assert torch.equal(conv2d(x, w, b, 1, 1), F.conv2d(x, w, b, 1, 1))
        assert "aten::im2col" not in ops_run(lambda: conv2d(x, w, b, 1, 1))
    assert layers._gemm_is_faster(x, w, 1, 1, 1)                                     # and off again after


def test_fp32_elsewhere_is_f_conv2d_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    for shape, C in (((1, 64, 16, 16), 64), ((2, 1280, 17, 17), 1280), ((1, 1024, 8, 8), 1024), ((1, 32, 8, 8), 32)):
        x, w = torch.randn(*shape, generator=g), torch.randn(16, C, 3, 3, generator=g) / 30
        assert not layers._gemm_is_faster(x, w, 1, 1, 1)
        assert torch.equal(conv2d(x, w, None, 1, 1), F.conv2d(x, w, None, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_conv_is_the_convolution_and_never_the_scalar_kernel(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 32, 24, 24, generator=g).to(dtype)
    w = (torch.randn(48, 32, 3, 3, generator=g) / 10).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    out = conv2d(x, w, b, 1, 1)
    assert out.dtype == dtype and out.is_contiguous() and out.shape == (2, 48, 24, 24)
    exact, bound = conv_bound(x, w, b, dtype, padding=1)
    assert ((out.double() - exact).abs() <= bound).all()
    assert "aten::_slow_conv2d_forward" not in ops_run(lambda: conv2d(x, w, b, 1, 1))
    # under CPU autocast from float32 inputs and weights, too
    with torch.autocast("cpu", dtype=dtype):
        assert "aten::_slow_conv2d_forward" not in ops_run(lambda: conv2d(x.float(), w.float(), b.float(), 1, 1))
        assert conv2d(x.float(), w.float(), b.float(), 1, 1).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_linear(dtype):
    g = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((2, 7, 40), (24, 40), (24,)))
    out = linear(x, w, b)
    exact = F.linear(x.double(), w.double(), b.double())
    bound = 41 * UNIT[torch.float32 if not cpu_has_native(dtype) else dtype] * F.linear(
        x.double().abs(), w.double().abs(), b.double().abs()) + UNIT[dtype] * exact.abs()
    assert out.dtype == dtype and ((out.double() - exact).abs() <= bound).all()
    m = Linear(40, 24).to(dtype)
    assert torch.equal(m(x), linear(x, m.weight, m.bias))
    x32 = torch.randn(3, 40, generator=g)
    m32 = Linear(40, 24)
    assert torch.equal(m32(x32), F.linear(x32, m32.weight, m32.bias))      # float32: F.linear itself


@pytest.mark.parametrize("method", [None, "cove", "ei2", "tcve"])
def test_demos_run_in_half_precision_with_finite_outputs(tmp_path, monkeypatch, method):
    from minivid.jobs import Job

    seen = []
    write_video = Job.write_video

    def checked(self, name, frames, *a, **kw):
        seen.append((name, bool(torch.isfinite(frames).all())))
        return write_video(self, name, frames, *a, **kw)

    monkeypatch.setattr(Job, "write_video", checked)
    for dtype in ("fp16", "bf16"):
        out = tmp_path / f"{method}-{dtype}"
        argv = ["demo", "--dtype", dtype, "--steps", "2", "--frames", "2", "--quiet", "--out", str(out)]
        assert main(argv + (["--method", method] if method else [])) == 0
        assert json.loads((out / "record.json").read_text())["ran"]["dtype"] == dtype
    assert seen and all(finite for _, finite in seen), seen
