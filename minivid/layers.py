"""Small building blocks shared by the UNets, the VAEs and the methods.

Each reproduces one detail of the original `ldm`/`sgm` code that moves outputs
by far more than 1e-5 when done differently (see docs/numerics.md).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------- convolution on the CPU

# im2col + one BLAS matmul beats oneDNN's direct convolution for wide inputs on small grids. One 3x3
# conv, float32, CPU time per call (docs/numerics.md, "CPU convolutions"):
# - Intel Xeon (family 6, model 167; AVX-512), 1 thread: on a 16x16 grid the matmul takes 0.69-0.72x
#   oneDNN's time for 1280/1920/2560 -> 1280 channels, 0.80x for 1920 -> 640, 0.93-1.03x for 640-1280
#   input channels; on 32x32 oneDNN wins (matmul 1.0-1.3x); on 8x8 the matmul takes 0.44x.
# - AMD EPYC (Zen 4; AVX-512), 1 and 2 threads: oneDNN took 1.6-2.5x the matmul's time for >= 1280
#   input channels on an 8x8 grid; on 16x16 the two were within +-30 % either way.
# So: >= 1280 input channels and <= 16x16 output positions per image.
GEMM_MIN_CHANNELS = 1280
GEMM_MAX_POSITIONS = 256          # output positions per image (height x width)
_REFERENCE = [False]


@contextlib.contextmanager
def reference_convolutions():
    """Within the block every float32 convolution is `F.conv2d` itself (oneDNN): bit for bit what
    diffusers and the original code compute on this CPU, at the cost of the im2col path's speed. For
    parity work that wants bitwise equality rather than equality up to summation order."""
    saved = _REFERENCE[0]
    _REFERENCE[0] = True
    try:
        yield
    finally:
        _REFERENCE[0] = saved


HALF = (torch.float16, torch.bfloat16)
_NATIVE: dict[torch.dtype, bool] = {}


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU has oneDNN kernels for `dtype` (bfloat16: AVX-512 BF16 or AMX; float16:
    AVX-512 FP16 or AMX-FP16). Without them torch's CPU half convolutions and matmuls run scalar code."""
    if dtype not in _NATIVE:
        ops = torch.ops.mkldnn
        check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
        try:
            _NATIVE[dtype] = bool(getattr(ops, check)()) and torch.backends.mkldnn.is_available()
        except (AttributeError, RuntimeError):
            _NATIVE[dtype] = False
    return _NATIVE[dtype]


def cpu_compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a CPU op on `x` computes in: x's, or CPU autocast's while it is on."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _upcast(x, weight, bias):
    """float16/bfloat16 without native CPU kernels: the inputs in float32, autocast off (it would
    cast them back). The caller rounds the result to `dtype`."""
    return x.float(), weight.float(), None if bias is None else bias.float()


def _emulated_half(x: torch.Tensor, ndim: int | None) -> torch.dtype | None:
    """The half dtype `x` computes in (its own, or CPU autocast's) where this CPU has no native kernels
    for it, for an input of `ndim` dimensions (None: any); else None."""
    if x.device.type != "cpu" or (ndim is not None and x.dim() != ndim):
        return None
    dtype = cpu_compute_dtype(x)
    return dtype if dtype in HALF and not cpu_has_native(dtype) else None


def _in_fp32(fn, half: torch.dtype, x, weight, bias, *args) -> torch.Tensor:
    """`fn` computed in float32 and its output rounded once to `half`."""
    with torch.autocast("cpu", enabled=False):
        return fn(*_upcast(x, weight, bias), *args).to(half)


def _half_rule(fn, ndim: int | None, x, weight, bias, *args) -> torch.Tensor:
    """`fn(x, weight, bias, *args)`, in float32 rounded once where x's half dtype is emulated here."""
    half = _emulated_half(x, ndim)
    return fn(x, weight, bias, *args) if half is None else _in_fp32(fn, half, x, weight, bias, *args)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """`F.conv2d` with the CPU algorithm and memory layout chosen for speed; the result is the same
    convolution (same shape, dtype and NCHW layout; equal up to float rounding).

    On the CPU (the dtype is the input's, or CPU autocast's):
    - float16 / bfloat16 without native oneDNN kernels on this CPU (`cpu_has_native`) compute in
      float32 and round the output once to the half dtype: torch runs them as `_slow_conv2d_forward`
      (scalar code, ~250x slower than this path for a 64-channel 3x3 conv at 128x128 in fp16 on a Zen 4;
      4-7x slower even in channels_last layout). torch's half kernels also accumulate in float32 and
      round once, so the result is the same up to the half dtype's rounding.
    - float16 / bfloat16 with native kernels: `F.conv2d` (oneDNN, NCHW: faster here than channels_last
      plus the layout copies).
    - float32 with >= GEMM_MIN_CHANNELS input channels and <= GEMM_MAX_POSITIONS output positions per
      image runs as im2col (`F.unfold`) + one matmul per image, where that is faster than oneDNN (the
      result differs from F.conv2d's by float rounding only: another summation order), except inside
      `reference_convolutions()`.
    Everything else (CUDA, other dtypes and shapes) is `F.conv2d` unchanged.
    """
    args = (stride, padding, dilation, groups)
    half = _emulated_half(x, 4)
    if half is not None:
        return _in_fp32(F.conv2d, half, x, weight, bias, *args)
    if (x.device.type == "cpu" and x.dim() == 4 and cpu_compute_dtype(x) == torch.float32 and groups == 1
            and _gemm_is_faster(x, weight, stride, padding, dilation)):
        return _conv2d_gemm(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation))
    return F.conv2d(x, weight, bias, *args)


def conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """`F.conv1d` with `conv2d`'s CPU half-precision rule (float32 compute rounded once where the CPU
    has no native kernels for the dtype: torch runs a half conv1d as a half conv2d, `_slow_conv2d_forward`);
    otherwise `F.conv1d` unchanged."""
    return _half_rule(F.conv1d, 3, x, weight, bias, stride, padding, dilation, groups)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """`F.conv3d` with `conv2d`'s CPU half-precision rule (float32 compute rounded once where the CPU
    has no native kernels for the dtype); otherwise `F.conv3d` unchanged."""
    return _half_rule(F.conv3d, 5, x, weight, bias, stride, padding, dilation, groups)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`; on a CPU without native kernels for x's float16/bfloat16 (`cpu_has_native`), computed
    in float32 and rounded once to the half dtype (torch's fallback half matmul is 2-6x slower than
    float32 there)."""
    return _half_rule(F.linear, None, x, weight, bias)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _out_size(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _gemm_is_faster(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> bool:
    if _REFERENCE[0] or isinstance(padding, str) or x.shape[1] < GEMM_MIN_CHANNELS or weight.shape[-1] * weight.shape[-2] == 1:
        return False
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    kh, kw = weight.shape[-2:]
    positions = _out_size(x.shape[2], kh, sh, ph, dh) * _out_size(x.shape[3], kw, sw, pw, dw)
    return 0 < positions <= GEMM_MAX_POSITIONS


def _conv2d_gemm(x, weight, bias, stride, padding, dilation) -> torch.Tensor:
    """The convolution as im2col + matmul: [B, C·kh·kw, L] columns times the [O, C·kh·kw] weight."""
    B, _, H, W = x.shape
    O, _, kh, kw = weight.shape
    Ho, Wo = (_out_size(H, kh, stride[0], padding[0], dilation[0]), _out_size(W, kw, stride[1], padding[1], dilation[1]))
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)     # [B, C·kh·kw, Ho·Wo]
    w = weight.reshape(O, -1)
    if B == 1:
        out = torch.mm(w, cols[0]) if bias is None else torch.addmm(bias[:, None], w, cols[0])
        return out.view(1, O, Ho, Wo)
    out = torch.matmul(w, cols)                                                         # [B, O, Ho·Wo]
    if bias is not None:
        out = out + bias[:, None]
    return out.view(B, O, Ho, Wo)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters, same checkpoint keys) computed by `conv2d`: fast CPU layouts and
    algorithms for every model that builds its convolutions from it (the UNets and the VAEs)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super()._conv_forward(input, weight, bias)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class Conv1d(nn.Conv1d):
    """`nn.Conv1d` (same parameters and keys) computed by `conv1d`."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super()._conv_forward(input, weight, bias)
        return conv1d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class Conv3d(nn.Conv3d):
    """`nn.Conv3d` (same parameters and keys) computed by `conv3d`."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super()._conv_forward(input, weight, bias)
        return conv3d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same checkpoint keys) computed by `linear`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return linear(input, self.weight, self.bias)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (ldm `GroupNorm32`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type(x.dtype)


def normalization(channels: int, eps: float = 1e-5, groups: int = 32) -> nn.GroupNorm:
    """The UNet's GroupNorm: 32 groups, eps 1e-5, float32 compute."""
    return GroupNorm32(groups, channels, eps=eps)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosine half first.

    ldm `timestep_embedding`: freqs = exp(-ln(max_period) * i / half), i < half;
    out = [cos(t * freqs), sin(t * freqs)]  (diffusers: flip_sin_to_cos=True, freq_shift=0).
    t: [B] -> [B, dim] float32.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (zero-initialised output layers) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GEGLU(nn.Module):
    """Gated GELU projection of the transformer feed-forward (`ff.net.0.proj`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """ldm FeedForward with GEGLU: keys `net.0.proj`, `net.2`."""

    def __init__(self, dim: int, mult: int = 4, dim_out: int | None = None):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), Linear(inner, dim_out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
