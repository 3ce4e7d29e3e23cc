"""EI²'s blocks against the paper's claims: Instance Centering (Eq. 6), STAM (Eq. 7-9, App. A.5)
and the FFAM processor (Eq. 10)."""
import pytest
import torch
import torch.nn.functional as F

from minivid.attention import Attention, capture, call_state, explicit, name_layers, set_processor
from minivid.methods.ei2.blocks import STAM, FFAMProcessor, instance_centering


def stam(dim=32, heads=4, **kw):
    return name_layers(STAM(dim, heads, **kw))


def video(B=2, frames=5, N=6, C=32):
    return torch.randn(B * frames, N, C)


# ---------------------------------------------------------------- Instance Centering (Eq. 6)

def test_instance_centering_zero_temporal_mean_and_same_differences():
    z = torch.randn(7, 8, 16) * 3 + torch.randn(7, 1, 16) * 5          # [(B·N), F, C] with a large temporal mean
    c = instance_centering(z, dim=1)
    # float32 rounding, in any summation order: the mean of F values is off by ≤ F·u·max|z| and each
    # subtraction rounds by u·|z| (u = 2⁻²⁴): a bound in ulps of the data, not a number tuned to one CPU
    bound = (z.shape[1] + 2) * torch.finfo(torch.float32).eps / 2 * z.abs().max()
    assert c.mean(dim=1).abs().max() <= 2 * bound
    assert torch.allclose(c[:, :, None] - c[:, None], z[:, :, None] - z[:, None], atol=2 * bound, rtol=0)  # z_i - z_j kept
    assert torch.allclose(c.var(dim=1), z.var(dim=1), rtol=1e-5, atol=1e-5)                  # temporal variance kept
    assert torch.allclose(instance_centering(c, dim=1), c, atol=2 * bound, rtol=0)            # no rescale: idempotent
    assert (c - z).abs().max() > 1                                    # the checks see the (large) mean removed


# ---------------------------------------------------------------- STAM (Eq. 8-9)

def effective(linear):
    return linear.weight.detach()                    # the parametrised (spectral-normalised) weight as used


def stam_by_hand(s, x, frames):
    """Eq. (9) written out per spatial location: z + softmax(Q Kᵀ/√d) IC(z) W̄_v W̄_L + b, per head."""
    a = s.attn
    a.eval()                                          # read W̄ without another power-iteration step
    BF, N, C = x.shape
    B, h, d = BF // frames, a.heads, a.dim_head
    out = torch.empty_like(x)
    for b in range(B):
        for n in range(N):
            z = x[b * frames:(b + 1) * frames, n]                                   # [F, C]
            zc = z - z.mean(0)
            q, k, v = zc @ a.to_q.weight.T, zc @ a.to_k.weight.T, zc @ effective(a.to_v).T
            heads = [torch.softmax(q[:, i * d:(i + 1) * d] @ k[:, i * d:(i + 1) * d].T / d ** 0.5, -1) @ v[:, i * d:(i + 1) * d]
                     for i in range(h)]
            y = torch.cat(heads, -1) @ effective(a.to_out[0]).T + a.to_out[0].bias
            out[b * frames:(b + 1) * frames, n] = z + y
    return out


def test_stam_equals_equation_9_over_the_frame_axis():
    s = stam()
    with torch.no_grad():
        s.attn.to_out[0].bias.normal_()
    x = video()
    want = stam_by_hand(s, x, 5)
    assert (s(x, frames=5) - want).abs().max() <= 1e-5
    with call_state(s, frames=5):                                       # frame count from the call state
        assert (s(x) - want).abs().max() <= 1e-5


def test_stam_spectral_norms_at_most_one_after_power_iteration():
    """Eq. (8): W̄_v, W̄_L = W / σ_max(W). Power iteration estimates σ_max from below, so the
    effective norm approaches 1 from above as training-mode forwards refine the estimate."""
    s = stam(64, 4)
    x = video(C=64)
    norms = []
    for _ in range(40):
        s(x, frames=5)
        norms.append([torch.linalg.matrix_norm(effective(m), ord=2).item() for m in (s.attn.to_v, s.attn.to_out[0])])
    first, last = torch.tensor(norms[0]), torch.tensor(norms[-1])
    assert (last <= 1 + 1e-3).all() and (last >= 1 - 1e-5).all()
    assert (last <= first + 1e-6).all()
    raw = [torch.linalg.matrix_norm(m.parametrizations.weight.original, ord=2).item() for m in (s.attn.to_v, s.attn.to_out[0])]
    assert all(abs(n - 1) > 0.05 for n in raw)                         # the raw weights are not norm 1 themselves


def test_stam_mean_shift_is_its_bias():
    """App. A.5: with IC, μ_rv(ẑ) = 0, so the output mean moves by b_L only: μ' - μ = b_L.

    The statement is about distributions: rows z^i i.i.d. N(μ, Σ); the attention branch has
    mean W̄_Lᵀ W̄_vᵀ μ_rv(IC(z)) = 0 (per location the temporal mean of the branch is not exactly
    zero, since attention columns need not sum to one). Checked on 6.4·10⁴ sampled rows against the same block with
    LayerNorm in place of IC (Tune-A-Video's TA module, App. A.4), whose shift is not b_L.
    """
    torch.manual_seed(1)
    C, frames, locations = 32, 8, 8_000
    s = stam(C, 4)
    s.eval()
    with torch.no_grad():
        s.attn.to_out[0].bias.copy_(torch.randn(C) * 0.5)
    mu = torch.randn(C) * 3
    A = torch.randn(C, C) / C ** 0.5
    x = (torch.randn(frames, locations, C) @ A.T + mu).reshape(frames, locations, C)     # B = 1, N locations
    with torch.no_grad():
        shift = (s(x, frames=frames) - x).mean(dim=(0, 1))
        z = x.transpose(0, 1)                                                                # [N, F, C]
        ln_shift = s.attn(F.layer_norm(z, (C,))).mean(dim=(0, 1))                          # TA: z + Linear(Attn(LN z)) - z
    b = s.attn.to_out[0].bias.detach()
    assert (shift - b).abs().max() <= 2e-3
    assert (ln_shift - b).abs().max() >= 0.1


def test_stam_uniform_attention_keeps_every_temporal_mean_up_to_b():
    """Exact special case of A.5: with uniform attention weights (W_q = 0) the attention output
    is the temporal mean of IC(z) W̄_v = 0, so STAM(z) = z + b at every location and frame."""
    s = stam()
    with torch.no_grad():
        s.attn.to_q.weight.zero_()
        s.attn.to_out[0].bias.normal_()
    x = video()
    assert (s(x, frames=5) - x - s.attn.to_out[0].bias).abs().max() <= 1e-5


@pytest.mark.parametrize("heads", [1, 4])
def test_stam_branch_bounded_by_centered_input(heads):
    """Eq. (7) / Prop. 4 in deterministic form: with ‖W̄_v‖ = ‖W̄_L‖ = 1 and convex attention
    weights, each output row moves by b plus at most max_j ‖IC(z)_j‖ (one head), or ‖IC(z)‖_F
    over the frames (several heads, the heads' value blocks being disjoint)."""
    s = stam(32, heads, n_power_iterations=50)
    s.eval()
    with torch.no_grad():
        s.attn.to_q.weight.mul_(8)                                   # sharp attention: the worst case
        s.attn.to_out[0].bias.normal_()
    frames = 5
    x = video(frames=frames) * 4
    branch = s(x, frames=frames) - x - s.attn.to_out[0].bias.detach()                       # [(B·F), N, C]
    zc = instance_centering(x.view(2, frames, 6, 32), dim=1)                                # [B, F, N, C]
    rows = branch.view(2, frames, 6, 32).norm(dim=-1)                                        # [B, F, N]
    bound = zc.norm(dim=-1).amax(dim=1, keepdim=True) if heads == 1 else zc.norm(dim=(1, 3))[:, None]
    assert (rows <= bound * (1 + 1e-4)).all()


def test_stam_at_init_bias_zero_and_static_video_unchanged():
    s = stam()
    assert torch.count_nonzero(s.attn.to_out[0].bias) == 0
    x = torch.randn(2, 1, 6, 32).expand(2, 5, 6, 32).reshape(10, 6, 32)                    # every frame identical
    assert (s(x, frames=5) - x).abs().max() <= 1e-6                  # IC(z) = 0 up to the rounding of the mean


def test_stam_checkpoint_names_and_processors():
    s = stam().eval()                           # eval: no power-iteration step between the two calls
    keys = set(s.state_dict())
    assert {"attn.to_q.weight", "attn.to_k.weight", "attn.to_out.0.bias",
            "attn.to_v.parametrizations.weight.original", "attn.to_out.0.parametrizations.weight.original"} <= keys
    x = video()
    with capture(s, "attn", kinds=("q",)) as store:
        out = s(x, frames=5)
    assert store["attn"]["q"][0].shape == (2 * 6, 4, 5, 8)                                  # [(B·N), heads, F, d]
    set_processor(s, "attn", explicit)
    assert (s(x, frames=5) - out).abs().max() <= 1e-5


def test_stam_errors():
    s = stam()
    with pytest.raises(KeyError, match="frame count unknown"):
        s(video())
    with pytest.raises(ValueError, match="not a whole number of videos"):
        s(video(), frames=3)
    with pytest.raises(ValueError, match="not divisible by heads"):
        STAM(30, 4)


# ---------------------------------------------------------------- FFAM processor (Eq. 10)

def ffam_layer(r, C=32, heads=4, backend="reference"):
    a = name_layers(Attention(C, None, heads, C // heads))
    set_processor(a, "", FFAMProcessor(r, backend=backend))
    return a


def test_ffam_one_frame_is_self_attention():
    a = ffam_layer(2)
    x = torch.randn(3, 5 * 3, 32)                                   # three one-frame videos
    with call_state(a, frames=1):
        out = a(x, hw=(5, 3))
    a.processor = explicit
    assert (out - a(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_ffam_r1_is_full_spatio_temporal_attention(backend):
    a = ffam_layer(1, backend=backend)
    B, frames, N = 2, 3, 4 * 5
    x = torch.randn(B * frames, N, 32)
    with call_state(a, frames=frames):
        out = a(x, hw=(4, 5))
    a.processor = explicit
    full = a(x.reshape(B, frames * N, 32)).reshape(B * frames, N, 32)     # every token of the video as key
    assert (out - full).abs().max() <= 1e-5


def test_ffam_triton_equals_reference_through_the_layer():
    x = torch.randn(2 * 3, 6 * 5, 32)
    outs = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        a = ffam_layer(2, backend=backend)
        with call_state(a, frames=3):
            outs.append(a(x, hw=(6, 5)))
    assert (outs[0] - outs[1]).abs().max() <= 1e-5


def test_ffam_errors():
    a = ffam_layer(2)
    x = torch.randn(6, 20, 32)
    with pytest.raises(ValueError, match="token grid size"):
        with call_state(a, frames=3):
            a(x)
    with pytest.raises(KeyError, match="frame count unknown"):
        a(x, hw=(4, 5))
    cross = name_layers(Attention(32, 16, 4, 8))
    cross.processor = FFAMProcessor(2)
    with pytest.raises(ValueError, match="cross-attention"):
        cross(x, torch.randn(6, 7, 16), hw=(4, 5))
    with pytest.raises(ValueError, match="positive integer"):
        FFAMProcessor(0)
