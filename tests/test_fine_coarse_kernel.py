"""Fine-coarse frame attention (EI² FFAM, Eq. 10): Triton kernel (under TRITON_INTERPRET=1, set by
conftest) and PyTorch reference against dense attention over the explicit key concatenation."""
import pytest
import torch
import torch.nn.functional as F

from minivid.kernels import fine_coarse_attention as fca
from minivid.kernels.fine_coarse_attention import (
    fine_coarse_attention,
    fine_coarse_attention_reference,
    fine_coarse_attention_triton,
    pooled_size,
)


def qkv(B, h, frames, H, W, d, dtype=torch.float32):
    return [torch.randn(B, h, frames * H * W, d, dtype=dtype) for _ in range(3)]


def pooled_explicit(x, frames, H, W, r):
    """Per frame, the list of r×r window means written out; border windows average what is inside."""
    B, h, _, d = x.shape
    g = x.reshape(B, h, frames, H, W, d)
    return [
        torch.stack([g[:, :, f, i:i + r, j:j + r].mean(dim=(2, 3)) for i in range(0, H, r) for j in range(0, W, r)], dim=2)
        for f in range(frames)
    ]                                                                  # F × (B, h, P, d)


def dense(q, k, v, frames, H, W, r, rows=None):
    """Oracle in float64: softmax over concat[own frame's keys, pooled keys of every other frame]."""
    q, k, v = q.double(), k.double(), v.double()
    L, d = H * W, q.shape[-1]
    kp, vp = pooled_explicit(k, frames, H, W, r), pooled_explicit(v, frames, H, W, r)
    outs = []
    for f in range(frames):
        own = slice(f * L, (f + 1) * L)
        keys = torch.cat([k[:, :, own]] + [kp[j] for j in range(frames) if j != f], dim=2)
        values = torch.cat([v[:, :, own]] + [vp[j] for j in range(frames) if j != f], dim=2)
        qf = q[:, :, own] if rows is None else q[:, :, own][:, :, rows]
        outs.append(torch.softmax(qf @ keys.transpose(-1, -2) / d ** 0.5, dim=-1) @ values)
    return torch.cat(outs, dim=2)


# (B, heads, frames, H, W, d, r): odd grids, partial border windows, r = 1, r = H, multi-block tiles
CASES = [
    (1, 2, 3, 5, 3, 16, 1),
    (1, 2, 3, 5, 3, 16, 2),
    (2, 1, 3, 5, 3, 16, 3),
    (1, 2, 2, 4, 6, 32, 2),
    (1, 1, 4, 4, 4, 40, 4),
    (1, 1, 2, 9, 7, 16, 2),     # L = 63: four query blocks and four fine key blocks of 16
    (1, 1, 5, 3, 3, 16, 2),     # F·P = 20 coarse keys: partial coarse blocks on both sides of f
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}h{}F{}_{}x{}_d{}_r{}".format(*c))
def test_reference_and_triton_equal_dense_concatenation(case):
    B, h, frames, H, W, d, r = case
    q, k, v = qkv(B, h, frames, H, W, d)
    want = dense(q, k, v, frames, H, W, r).float()
    ref = fine_coarse_attention_reference(q, k, v, frames, (H, W), r)
    tri = fine_coarse_attention_triton(q, k, v, frames, (H, W), r, block_m=16, block_n=16)
    concat = fca._concat_reference(q, k, v, frames, (H, W), r, None)
    chunked = fca._lse_reference(q, k, v, frames, (H, W), r, None, budget=256)  # one head, 16-row chunks
    grouped = fca._lse_reference(q, k, v, frames, (H, W), r, None, budget=2 ** 30)  # all heads, whole frames
    assert ref.shape == tri.shape == concat.shape == chunked.shape == grouped.shape == q.shape
    for out in (ref, tri, concat, chunked, grouped):
        assert (out - want).abs().max() <= 1e-5
    assert (tri - ref).abs().max() <= 1e-5


def test_lse_plan_keeps_the_working_set_in_budget():
    for heads, L, P, d, frames in [(8, 4096, 1024, 40, 8), (8, 1024, 256, 40, 8), (8, 1024, 64, 80, 8),
                                   (8, 64, 16, 160, 8), (3, 63, 20, 16, 5)]:
        g, rows = fca._lse_plan(heads, L, P, d, 4, 2 ** 19, frames)
        assert 1 <= g <= heads and min(L, 16) <= rows <= min(L, 512)
        assert g == 1 or (2 * P * d + frames * L) * g * 4 <= 2 ** 18       # pooled K/V + running lse: half the budget
        assert rows == min(L, 16) or g * rows * d * 4 <= 2 ** 18              # a chunk's partial output: the other half
    assert fca._lse_plan(8, 4096, 1024, 40, 4, 2 ** 19, 8) == (1, 512)     # SD's 64×64 layer, r = 2: 8 chunks per frame
    assert fca._lse_plan(8, 1024, 256, 40, 4, 2 ** 19, 8) == (2, 512)


def test_reference_paths_by_autograd():
    """No gradient: the log-sum-exp path (bitwise); a gradient: the concatenation path, differentiable."""
    q, k, v = qkv(1, 2, 3, 5, 3, 16)
    assert torch.equal(fine_coarse_attention_reference(q, k, v, 3, (5, 3), 2), fca._lse_reference(q, k, v, 3, (5, 3), 2, None))
    qg = q.clone().requires_grad_()
    out = fine_coarse_attention_reference(qg, k, v, 3, (5, 3), 2)
    assert out.requires_grad and torch.equal(out.detach(), fca._concat_reference(q, k, v, 3, (5, 3), 2, None))


def test_lse_merge_equals_concatenation():
    """The two reference formulations of one softmax, F = 8 frames (8 merges per query), float32.

    Bound: each formulation is within a few float32 ulps of the exact softmax average (whose size
    is at most max|v|); a merge rescales and adds once (2 roundings), F + 1 partial results per
    query, so |lse - concat| <= 2·(F + 2)·2^-24·max|v| with room for the fused kernels' own sums.
    """
    frames = 8
    q, k, v = qkv(1, 2, frames, 6, 6, 40)
    a = fca._lse_reference(q, k, v, frames, (6, 6), 2, None)
    b = fca._concat_reference(q, k, v, frames, (6, 6), 2, None)
    assert (a - b).abs().max() <= 2 * (frames + 2) * 2 ** -24 * v.abs().max()


def test_pooled_size_keeps_border_windows():
    assert pooled_size((64, 64), 2) == (32, 32)
    assert pooled_size((15, 15), 2) == (8, 8)
    assert pooled_size((5, 3), 3) == (2, 1)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_one_frame_is_self_attention(backend):
    q, k, v = qkv(2, 2, 1, 5, 3, 16)
    out = fine_coarse_attention(q, k, v, 1, (5, 3), 2, backend=backend)
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_r1_is_full_spatio_temporal_attention(backend):
    q, k, v = qkv(1, 2, 3, 5, 3, 16)
    out = fine_coarse_attention(q, k, v, 3, (5, 3), 1, backend=backend)
    assert (out - F.scaled_dot_product_attention(q, k, v)).abs().max() <= 1e-5


# SD 1.4's attention blocks: 8 heads, d = 40 / 80 / 160 at 64 / 32 / 16 / 8 token grids (512-pixel frames)
@pytest.mark.parametrize(
    "frames,H,d,r", [(2, 64, 40, 2), (3, 32, 80, 4), (4, 16, 160, 2), (8, 8, 160, 4)], ids=lambda x: str(x)
)
def test_reference_at_sd14_sizes(frames, H, d, r):
    q, k, v = qkv(1, 8, frames, H, H, d)
    out = fine_coarse_attention_reference(q, k, v, frames, (H, H), r)
    rows = torch.randperm(H * H)[:32]                               # dense oracle on 32 sampled queries per frame
    want = dense(q, k, v, frames, H, H, r, rows=rows).float()
    got = torch.cat([out[:, :, f * H * H:(f + 1) * H * H][:, :, rows] for f in range(frames)], dim=2)
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("d", [40, 80, 160])
def test_triton_at_sd14_head_dims(d):
    q, k, v = qkv(1, 8, 2, 6, 5, d)
    tri = fine_coarse_attention_triton(q, k, v, 2, (6, 5), 2, block_m=16, block_n=16)
    assert (tri - dense(q, k, v, 2, 6, 5, 2).float()).abs().max() <= 1e-5


def test_float16_inputs():
    """16-bit inputs: both paths against float32 attention of the same (rounded) inputs.

    Error budget: the output is rounded to float16 (half an ulp, 2^-11 relative, of |out| <= max|v|)
    and the kernel rounds the softmax weights to float16 before P·V (2^-11 relative per weight,
    <= 2^-11·max|v| in total); Q·Kᵀ and the sums accumulate in float32. Hence 3·2^-11·max|v|.
    """
    q, k, v = qkv(1, 2, 3, 6, 5, 40, dtype=torch.float16)
    want = dense(q, k, v, 3, 6, 5, 2).float()
    tol = 3 * 2 ** -11 * v.abs().max().item()
    for out in (fine_coarse_attention_reference(q, k, v, 3, (6, 5), 2),
                fine_coarse_attention_triton(q, k, v, 3, (6, 5), 2, block_m=16, block_n=16)):
        assert out.dtype == torch.float16
        assert (out.float() - want).abs().max() <= tol


def test_bfloat16_triton_runs_the_float32_kernel_until_verified():
    """bf16 tl.dot is not checkable under the interpreter: bf16 inputs take the float32 kernel."""
    assert fca.BF16_NATIVE_VERIFIED is False
    q, k, v = qkv(1, 2, 3, 6, 5, 40, dtype=torch.bfloat16)
    out = fine_coarse_attention_triton(q, k, v, 3, (6, 5), 2, block_m=16, block_n=16)
    want = fine_coarse_attention_triton(q.float(), k.float(), v.float(), 3, (6, 5), 2, block_m=16, block_n=16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want.to(torch.bfloat16))


def test_triton_reads_strided_inputs():
    """Q/K/V as Attention.split_heads makes them: (B, N, h, d) storage viewed as (B, h, N, d)."""
    q, k, v = (torch.randn(1, 2 * 4 * 5, 2, 16).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    tri = fine_coarse_attention_triton(q, k, v, 2, (4, 5), 2, block_m=16, block_n=16)
    assert (tri - fine_coarse_attention_reference(q, k, v, 2, (4, 5), 2)).abs().max() <= 1e-5


def test_triton_gradients_equal_reference():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 4, 5, 16))
    g = torch.randn_like(q)
    grads_tri = torch.autograd.grad(fine_coarse_attention_triton(q, k, v, 2, (4, 5), 2, block_m=16, block_n=16), (q, k, v), g)
    grads_ref = torch.autograd.grad(fine_coarse_attention_reference(q, k, v, 2, (4, 5), 2), (q, k, v), g)
    for a, b in zip(grads_tri, grads_ref):
        assert (a - b).abs().max() <= 1e-5


def test_auto_backend_on_cpu_is_the_reference_and_scale_is_used():
    q, k, v = qkv(1, 2, 2, 4, 4, 16)
    assert torch.equal(fine_coarse_attention(q, k, v, 2, (4, 4), 2), fine_coarse_attention_reference(q, k, v, 2, (4, 4), 2))
    a = fine_coarse_attention(q, k, v, 2, (4, 4), 2, scale=0.1)
    b = fine_coarse_attention(q * (0.1 * 16 ** 0.5), k, v, 2, (4, 4), 2)
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(r=1.5), "r must be a positive integer"),
        (dict(r=True), "r must be a positive integer"),
        (dict(r=6), "exceeds the 5×3 token grid"),
        (dict(r=4), "exceeds the 5×3 token grid"),
        (dict(frames=2), "token count 45 != frames·H·W"),
        (dict(frames=0), "frames must be a positive integer"),
        (dict(size=(5,)), "size must be two positive integers"),
        (dict(size=(5, 0)), "size must be two positive integers"),
        (dict(backend="cuda"), "backend must be"),
    ],
)
def test_errors(kwargs, match):
    q, k, v = qkv(1, 1, 3, 5, 3, 16)
    args = dict(frames=3, size=(5, 3), r=2) | kwargs
    with pytest.raises(ValueError, match=match):
        fine_coarse_attention(q, k, v, **args)


def test_shape_and_dtype_errors():
    q, k, v = qkv(1, 1, 2, 4, 4, 16)
    with pytest.raises(ValueError, match="one shape"):
        fine_coarse_attention(q, k[:, :, :-1], v, 2, (4, 4))
    with pytest.raises(ValueError, match=r"must be \(B, heads"):
        fine_coarse_attention(q[0], k[0], v[0], 2, (4, 4))
    with pytest.raises(ValueError, match="floating dtype"):
        fine_coarse_attention(q, k.double(), v, 2, (4, 4))
    with pytest.raises(ValueError, match="block sizes"):
        fine_coarse_attention_triton(q, k, v, 2, (4, 4), block_m=8)
