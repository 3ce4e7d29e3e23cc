"""TCVE blocks: the temporal UNet, the STU and its ablations, the temporal branch on a tiny SD UNet."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minivid.attention import call_state
from minivid.methods.tcve.stu import STU, TemporalBranch, from_video, resize_temporal, to_video
from minivid.methods.tcve.temporal_unet import TemporalUNet, Upsample1d, stu_points, to_temporal
from minivid.methods.tuneavideo import inflate_for_tuneavideo
from minivid.unet import UNet, UNetConfig

TINY = dict(in_channels=4, model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1)


def _randomise(module: nn.Module, std: float = 0.1) -> None:
    for p in module.parameters():
        nn.init.normal_(p, std=std)


# ---------------------------------------------------------------- temporal UNet

def test_stu_points_of_sd14():
    assert stu_points((1, 2, 4, 4), 2) == ["middle_block", "output_blocks.2", "output_blocks.5", "output_blocks.8", "output_blocks.11"]


@pytest.mark.parametrize("frames", range(1, 18))
def test_temporal_unet_any_frame_count(frames):
    tu = TemporalUNet(**TINY)
    S = 2 * 3 * 2                                                            # B=2 videos of 3×2 latents
    feats = tu(torch.randn(S, 4, frames))
    assert list(feats) == tu.points == ["middle_block", "output_blocks.1", "output_blocks.3", "output_blocks.5"]
    down = lambda n, k: n if k == 0 else down(-(-n // 2), k - 1)           # noqa: E731  ⌈n/2⌉ k times
    expect = {
        "middle_block": (64, down(frames, 2)),
        "output_blocks.1": (64, down(frames, 1)),                           # after the first ×2 upsampling
        "output_blocks.3": (64, frames),
        "output_blocks.5": (32, frames),
    }
    for name, (C, L) in expect.items():
        assert feats[name].shape == (S, C, L), name
        assert tu.channels[name] == C


def test_temporal_unet_equals_plain_x2_upsampling_when_frames_divide():
    """With F divisible by 2^(levels-1) the network is the authors' (nearest ×2, no cut)."""
    tu = TemporalUNet(**TINY)
    x = torch.randn(5, 4, 8)
    feats = tu(x)
    # reference forward: same modules, upsampling by nn.Upsample(scale_factor=2)
    skips, h = [], x
    for block in tu.input_blocks:
        h = block(h)
        skips.append(h)
    h = tu.middle_block(h)
    for layers in tu.output_blocks:
        h = torch.cat([h, skips.pop()], dim=1)
        for layer in layers:
            h = layer.conv(nn.Upsample(scale_factor=2, mode="nearest")(h)) if isinstance(layer, Upsample1d) else layer(h)
    torch.testing.assert_close(feats["output_blocks.5"], h)


def test_temporal_unet_mixes_frames_not_locations():
    B, Fr, H, W = 2, 6, 3, 4
    tu = TemporalUNet(**TINY)
    x = torch.randn(B * Fr, 4, H, W)
    xp = x.clone()
    xp[Fr + 2, :, 1, 3] += 1.0                                               # video 1, frame 2, location (1, 3)
    a, b = (tu(to_temporal(v, Fr))["output_blocks.5"] for v in (x, xp))
    changed = (a - b).abs().amax(dim=(1, 2)) > 0                             # per sequence (b h w)
    assert changed.nonzero().flatten().tolist() == [1 * H * W + 1 * W + 3]
    assert (a - b)[1 * H * W + 1 * W + 3].abs().amax(dim=0).gt(0).sum() > 1  # and spreads over frames


def test_to_temporal_layout():
    x = torch.arange(2 * 3 * 4 * 2 * 5).float().view(2 * 3, 4, 2, 5)        # B=2, F=3, C=4, H=2, W=5
    t = to_temporal(x, 3)
    assert t.shape == (2 * 2 * 5, 4, 3)
    assert torch.equal(t[1 * 10 + 1 * 5 + 4, :, 2], x[1 * 3 + 2, :, 1, 4])


# ---------------------------------------------------------------- STU

def _inputs(B=2, Fr=5, C=16, h=4, w=6, Ft=3, H=8, W=12):
    return torch.randn(B * Fr, C, h, w), torch.randn(B, C, Ft, H, W), Fr


def _manual_stu(stu: STU, x_spa, x_tem, frames, attention=True, conv=True):
    """Eq. 7 and the fusion, written out with explicit loops over videos and locations."""
    spa = to_video(x_spa, frames)                                             # [B, C, F, h, w]
    tem = F.interpolate(x_tem, size=spa.shape[2:], mode="nearest")
    if attention:
        a = stu.attn_temp
        out = tem.clone()
        B, C, Fr, h, w = tem.shape
        for b in range(B):
            for i in range(h):
                for j in range(w):
                    seq = tem[b, :, :, i, j].T                                # [F, C]
                    n = stu.norm_temp(seq)
                    q, k, v = (a.split_heads(p(n)[None]) for p in (a.to_q, a.to_k, a.to_v))
                    att = torch.softmax(q @ k.transpose(-1, -2) / (C // 8) ** 0.5, -1) @ v
                    out[b, :, :, i, j] = (seq + a.to_out(a.merge_heads(att))[0]).T
        tem = out
    fuse = spa + 0.1 * tem
    if not conv:
        return from_video(fuse)
    g = F.group_norm(fuse, 8, stu.norm.weight, stu.norm.bias, eps=1e-5)
    return from_video(spa + F.silu(F.conv3d(g, stu.conv_3d.weight, stu.conv_3d.bias, padding=1)))


def test_stu_is_identity_at_init():
    x_spa, x_tem, Fr = _inputs()
    stu = STU(16)
    assert torch.equal(stu(x_spa, x_tem, Fr), x_spa)
    official = STU(16, zero_bias=False)                                       # authors' init: bias left random
    assert torch.equal(official(x_spa, x_tem, Fr), x_spa)


def test_stu_equals_written_out_formula():
    x_spa, x_tem, Fr = _inputs()
    stu = STU(16)
    _randomise(stu)
    torch.testing.assert_close(stu(x_spa, x_tem, Fr), _manual_stu(stu, x_spa, x_tem, Fr), atol=1e-5, rtol=1e-5)


def test_resize_is_nearest_from_the_latent_grid():
    x = torch.arange(3 * 8 * 12).float().view(1, 1, 3, 8, 12)
    r = resize_temporal(x, (6, 2, 3))
    assert r.shape == (1, 1, 6, 2, 3)
    assert torch.equal(r[0, 0, :, 1, 2], x[0, 0, [0, 0, 1, 1, 2, 2], 4, 8])  # frame i -> ⌊i/2⌋, row 1 -> 4, col 2 -> 8
    assert resize_temporal(x, (3, 8, 12)) is x


def test_ablation_no_stu_is_the_plain_sum():
    x_spa, x_tem, Fr = _inputs()
    stu = STU(16, temporal_attention=False, conv3d=False)
    assert not list(stu.parameters())
    expect = x_spa + 0.1 * from_video(F.interpolate(x_tem, size=(Fr, 4, 6), mode="nearest"))
    assert torch.equal(stu(x_spa, x_tem, Fr), expect)


def test_ablation_without_temporal_attention():
    x_spa, x_tem, Fr = _inputs()
    stu = STU(16, temporal_attention=False)
    assert stu.attn_temp is None
    _randomise(stu)
    torch.testing.assert_close(stu(x_spa, x_tem, Fr), _manual_stu(stu, x_spa, x_tem, Fr, attention=False))


def test_ablation_without_conv3d():
    x_spa, x_tem, Fr = _inputs()
    stu = STU(16, conv3d=False)
    assert stu.conv_3d is None
    _randomise(stu)
    out = stu(x_spa, x_tem, Fr)
    torch.testing.assert_close(out, _manual_stu(stu, x_spa, x_tem, Fr, conv=False), atol=1e-5, rtol=1e-5)


def test_ablation_without_temporal_unet_ignores_x_tem():
    x_spa, _, Fr = _inputs()
    stu = STU(16, temporal_attention=False)
    _randomise(stu)
    g = F.group_norm(to_video(x_spa, Fr), 8, stu.norm.weight, stu.norm.bias, eps=1e-5)
    expect = from_video(to_video(x_spa, Fr) + F.silu(F.conv3d(g, stu.conv_3d.weight, stu.conv_3d.bias, padding=1)))
    torch.testing.assert_close(stu(x_spa, None, Fr), expect, atol=1e-6, rtol=1e-5)
    branch = TemporalBranch(**TINY, ablation="no_temporal_unet")
    assert branch.temporal_unet is None and all(s.attn_temp is None for s in branch.stus)


def test_stu_bad_inputs():
    x_spa, x_tem, Fr = _inputs()
    with pytest.raises(ValueError, match="does not match"):
        STU(16)(x_spa, x_tem[:, :8], Fr)
    with pytest.raises(ValueError, match="heads"):
        STU(12)
    with pytest.raises(ValueError, match="ablation"):
        TemporalBranch(**TINY, ablation="no_everything")


def test_official_reshape_differs_only_on_coarse_up_levels():
    branch = TemporalBranch(**TINY)
    official = TemporalBranch(**TINY, official_reshape=True)
    x_tem = torch.randn(2 * 8 * 8, 64, 3)                                     # B=2, H=W=8
    for name, block_h in [("middle_block", 2), ("output_blocks.1", 4), ("output_blocks.5", 8)]:
        a = branch.unflatten(name, x_tem, 2, (8, 8), block_h)
        b = official.unflatten(name, x_tem, 2, (8, 8), block_h)
        assert torch.equal(a, b) == (name != "output_blocks.1"), name
    assert official.unflatten("output_blocks.1", x_tem, 2, (8, 8), 4).shape == (2, 64, 3, 4, 16)


# ---------------------------------------------------------------- the branch on a tiny SD UNet

def _unet():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.preset("tiny"))
    for p in unet.parameters():                                               # un-zero ldm's zero-initialised outputs
        if not p.any():
            nn.init.normal_(p, std=0.05)
    return unet


def test_branch_points_follow_the_unet_config():
    cfg = UNetConfig.preset("tiny")
    branch = TemporalBranch.for_unet(cfg)
    assert branch.points == ["middle_block", "output_blocks.2", "output_blocks.5", "output_blocks.8"]
    assert [s.channels for s in branch.stus] == [64, 64, 64, 32]
    with torch.device("meta"):
        sd14 = TemporalBranch.for_unet(UNetConfig.preset("sd14"))
    assert sd14.points == ["middle_block", "output_blocks.2", "output_blocks.5", "output_blocks.8", "output_blocks.11"]
    assert [s.channels for s in sd14.stus] == [1280, 1280, 1280, 640, 320]


def test_attached_branch_is_identity_at_init_and_trains():
    unet = _unet()
    branch = TemporalBranch.for_unet(unet.cfg)
    B, Fr = 2, 3
    x, ctx = torch.randn(B * Fr, 4, 8, 8), torch.randn(B * Fr, 5, 32)
    with torch.no_grad():
        plain = unet(x, 400, ctx)
        with branch.attach(unet), call_state(unet, frames=Fr):
            fused = unet(x, 400, ctx)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=0)
    assert not unet._forward_hooks and not unet._forward_pre_hooks              # scoped: hooks removed
    assert not unet.middle_block._forward_hooks

    # only the zero-initialised 3-D convs get a gradient at initialisation
    with branch.attach(unet, frames=Fr):
        unet(x, 400, ctx).square().mean().backward()
    grads = {n: p.grad for n, p in branch.named_parameters()}
    assert all(grads[f"stus.{i}.conv_3d.weight"].abs().sum() > 0 for i in range(4))
    assert all(g is None or not g.any() for n, g in grads.items() if "conv_3d" not in n)

    # once the convs are non-zero, the whole branch trains and changes the output
    branch.zero_grad()
    for s in branch.stus:
        _randomise(s.conv_3d, 0.05)
        _randomise(s.attn_temp.to_out, 0.05)
    with branch.attach(unet, frames=Fr):
        out = unet(x, 400, ctx)
        out.square().mean().backward()
    assert (out - plain).abs().max() > 1e-4
    missing = [n for n, p in branch.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, missing


def test_attached_branch_ablation_no_stu_changes_output_at_init():
    unet = _unet()
    branch = TemporalBranch.for_unet(unet.cfg, ablation="no_stu")
    x, ctx = torch.randn(4, 4, 8, 8), torch.randn(4, 5, 32)
    with torch.no_grad():
        plain = unet(x, 400, ctx)
        with branch.attach(unet, frames=4):
            summed = unet(x, 400, ctx)
    assert (summed - plain).abs().max() > 1e-4


def test_tcve_model_at_init_first_frame_is_plain_sd():
    """Tune-A-Video inflation + temporal branch, at initialisation: frame 0 of each video is SD's
    (in float64: batched and per-frame calls run kernels of other shapes (other summation orders, and other kernels on other CPUs: float32 margins were 3.5x here); two float64 orders differ by ~1e-13)."""
    unet = _unet().double()
    base = _unet().double()
    inflate_for_tuneavideo(unet)
    branch = TemporalBranch.for_unet(unet.cfg).double()
    Fr = 3
    x, ctx = torch.randn(2 * Fr, 4, 8, 8).double(), torch.randn(1, 5, 32).double().expand(2 * Fr, 5, 32)
    with torch.no_grad(), branch.attach(unet), call_state(unet, frames=Fr):
        out = unet(x, 250, ctx)
    with torch.no_grad():
        first = base(x[::Fr], 250, ctx[::Fr])
    torch.testing.assert_close(out[::Fr], first, atol=1e-10, rtol=0)
    assert (out[1::Fr] - first).abs().max() > 1e-3                       # later frames differ: the check sees it


def test_attach_needs_the_frame_count():
    unet = _unet()
    branch = TemporalBranch.for_unet(unet.cfg)
    with branch.attach(unet), pytest.raises(KeyError, match="call_state"):
        unet(torch.randn(2, 4, 8, 8), 10, torch.randn(2, 5, 32))
    with branch.attach(unet, frames=3), pytest.raises(ValueError, match="whole number"):
        unet(torch.randn(2, 4, 8, 8), 10, torch.randn(2, 5, 32))
