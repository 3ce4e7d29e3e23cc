"""TCVE's own convolutions (the temporal UNet's Conv1d, the STUs' Conv3d) are minivid.layers': the same
parameters and checkpoint keys, float32 outputs bit for bit those of torch's nn.Conv1d/nn.Conv3d, and in half
precision each convolution within the bound of a float32-accumulated convolution rounded once, computed in
float32 on a CPU that has no native half kernels (torch's scalar half kernels run there otherwise)."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import minivid.layers as layers
from minivid.methods.tcve.model import TCVEModel
from minivid.unet import UNet, UNetConfig

UNIT = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}   # unit roundoff
FRAMES = 3
CONV = {layers.Conv1d: (nn.Conv1d, F.conv1d), layers.Conv3d: (nn.Conv3d, F.conv3d)}


def _model(seed: int = 0) -> TCVEModel:
    """The tiny TCVE model with every zero-initialised tensor made random (so every conv changes the output)."""
    torch.manual_seed(seed)
    model = TCVEModel.build(UNet(UNetConfig.preset("tiny")), seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.05)
    return model


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2 * FRAMES, 4, 8, 8, generator=g), torch.randn(2 * FRAMES, 5, 32, generator=g)
    return x.to(dtype), ctx.to(dtype)


def _convs(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.branch.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv3d))}


@contextlib.contextmanager
def _no_native_half(monkeypatch):
    """As on a CPU without native half kernels (an AMD EPYC, AVX-512 without FP16/AMX): minivid.layers takes
    its float32 path there."""
    monkeypatch.setattr(layers, "_NATIVE", {torch.float16: False, torch.bfloat16: False})
    yield


class _ConvDtypes(TorchDispatchMode):
    """The dtype of every convolution torch runs inside the block."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.convolution:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_every_tcve_conv_is_a_minivid_layer_with_torchs_keys():
    model = _model()
    convs = _convs(model)
    assert {type(m) for m in convs.values()} == {layers.Conv1d, layers.Conv3d}
    assert sum(isinstance(m, layers.Conv3d) for m in convs.values()) == len(model.branch.stus)
    keys = list(model.state_dict())
    for m in convs.values():                     # the same module as torch's class: the same checkpoint names
        m.__class__ = CONV[type(m)][0]
    assert list(model.state_dict()) == keys


def test_fp32_outputs_are_torchs_bit_for_bit():
    model = _model().eval()
    x, ctx = _inputs()
    with torch.no_grad():
        ours = model(x, 400, ctx, frames=FRAMES)
        for m in _convs(model).values():
            m.__class__ = CONV[type(m)][0]
        theirs = model(x, 400, ctx, frames=FRAMES)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("native", [True, False], ids=["this-cpu", "no-native-half"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_convs_are_the_convolution(dtype, native, monkeypatch):
    """Each conv of the half-precision model, on the input it gets in a whole TCVE call, against the exact
    (float64) convolution of the same half values: |out − exact| ≤ K·u_acc·(|w| ∗ |x| + |b|) + u_out·|exact|
    (K = C_in·kernel terms summed with unit roundoff u_acc: float32's on the float32 path, the dtype's own on a
    native half kernel; one final rounding to the dtype)."""
    stack = contextlib.ExitStack()
    if not native:
        stack.enter_context(_no_native_half(monkeypatch))
    model = _model().to(dtype).eval()
    seen = {}

    def keep(name):
        def hook(module, args, out):          # the first call's input and output (returns None: output unchanged)
            seen.setdefault(name, (args[0], out))
        return hook
    hooks = [m.register_forward_hook(keep(name)) for name, m in _convs(model).items()]
    x, ctx = _inputs(dtype)
    with stack, torch.no_grad():
        out = model(x, 400, ctx, frames=FRAMES)
        with _ConvDtypes() as ran:           # what the branch's convs ask torch for (not the UNet's own convs)
            for name, m in _convs(model).items():
                m(seen[name][0])
    for h in hooks:
        h.remove()
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert set(seen) == set(_convs(model))
    u_acc = UNIT[dtype] if native and layers.cpu_has_native(dtype) else UNIT[torch.float32]
    for name, m in _convs(model).items():
        inp, got = seen[name]
        assert got.dtype == dtype, name
        conv = CONV[type(m)][1]
        kw = dict(stride=m.stride, padding=m.padding)
        w, b = m.weight.double(), m.bias.double()
        exact = conv(inp.double(), w, b, **kw)
        K = m.weight[0].numel() + 1
        bound = K * u_acc * conv(inp.double().abs(), w.abs(), b.abs(), **kw) + UNIT[dtype] * exact.abs()
        assert ((got.double() - exact).abs() <= bound).all(), name
    # the point of the change: without native half kernels, never a half convolution (torch runs those as
    # its scalar `_slow_conv2d_forward` / `slow_conv3d_forward` there); with them, torch's own half kernel
    assert len(ran.dtypes) == len(seen) and set(ran.dtypes) == {dtype if native and layers.cpu_has_native(dtype)
                                                                else torch.float32}
