"""AMT-S and VBench's motion smoothness against a restatement of VBench 0.1.5
(vbench/motion_smoothness.py and its vendored AMT, vbench/third_party/amt/networks/AMT-S.py).

vbench cannot be installed here (it needs torchvision, decord, cv2...), so the oracle is an
independent restatement in plain functional code (`reference_amt` below, reading the state dict by
name; the score in numpy as VBench computes it with cv2.absdiff and np.mean). The networks run in
float64 on a tiny random AMT so they agree to rounding (1e-9), and the uint8 frames exactly.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minivid.eval.amt import (
    AMT, AMT_PRESETS, InputPadder, interpolate_odd_frames, load_amt, motion_smoothness, motion_smoothness_score,
    to_uint8_truncate,
)
from minivid.eval.encoders import EncoderError

MANIFEST = Path(__file__).resolve().parents[1] / "weights" / "manifests" / "amt-s.json"


# ---------------------------------------------------------------- the restatement (oracle)

def _up(x, s):
    return F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)


def _conv(sd, name, x, stride=1, pad=None):
    w = sd[name + ".weight"]
    return F.conv2d(x, w, sd.get(name + ".bias"), stride, w.shape[-1] // 2 if pad is None else pad)


def _cr(sd, name, x, stride=1):                          # conv + PReLU (IFRNet's convrelu)
    return F.prelu(_conv(sd, name + ".0", x, stride), sd[name + ".1.weight"])


def _warp(img, flow):
    b, _, h, w = flow.shape
    # AMT's base grid is a float32 linspace whatever the image's dtype
    gx = torch.linspace(-1, 1, w, dtype=torch.float32).to(img.dtype)[None, None, :].expand(b, h, w) + flow[:, 0] * 2 / (w - 1)
    gy = torch.linspace(-1, 1, h, dtype=torch.float32).to(img.dtype)[None, :, None].expand(b, h, w) + flow[:, 1] * 2 / (h - 1)
    return F.grid_sample(img, torch.stack([gx, gy], -1), "bilinear", "border", align_corners=True)


def _res(sd, name, x, side):
    o = _cr(sd, name + ".conv1", x)
    o = _cr(sd, name + ".conv3", torch.cat([o[:, :-side], _cr(sd, name + ".conv2", o[:, -side:])], 1))
    o = _conv(sd, name + ".conv5", torch.cat([o[:, :-side], _cr(sd, name + ".conv4", o[:, -side:])], 1))
    return F.prelu(x + o, sd[name + ".prelu.weight"])


def _decode(sd, name, x, side):
    y = _res(sd, name + ".convblock.1", _cr(sd, name + ".convblock.0", x), side)
    return F.conv_transpose2d(y, sd[name + ".convblock.2.weight"], sd[name + ".convblock.2.bias"], 2, 1)


def _bottleneck(sd, name, x, stride):
    y = F.relu(F.instance_norm(_conv(sd, name + ".conv1", x)))
    y = F.relu(F.instance_norm(_conv(sd, name + ".conv2", y, stride)))
    y = F.relu(F.instance_norm(_conv(sd, name + ".conv3", y)))
    if name + ".downsample.0.weight" in sd:
        x = F.instance_norm(_conv(sd, name + ".downsample.0", x, stride))
    return F.relu(x + y)


def _features(sd, x):
    x = F.relu(F.instance_norm(_conv(sd, "feat_encoder.conv1", x, 2)))
    for i, stride in ((1, 1), (2, 2), (3, 2)):
        x = _bottleneck(sd, f"feat_encoder.layer{i}.1", _bottleneck(sd, f"feat_encoder.layer{i}.0", x, stride), 1)
    return _conv(sd, "feat_encoder.conv2", x)


def _lookup_level(corr, centres, r):
    """corr [N, 1, H, W], centres [N, 2] pixel (x, y) -> [N, (2r+1)²] bilinear samples (zero outside) at
    centre + (a, b), a, b in -r..r, a (the x offset) the slow index: RAFT stacks meshgrid(dy, dx) and
    uses it as (x, y)."""
    H, W = corr.shape[-2:]
    off = torch.arange(-r, r + 1, dtype=corr.dtype)
    ox = off[:, None].expand(2 * r + 1, 2 * r + 1)        # RAFT stacks meshgrid(dy, dx) as (x, y)
    oy = off[None, :].expand(2 * r + 1, 2 * r + 1)
    gx = (centres[:, 0, None, None] + ox) * 2 / (W - 1) - 1
    gy = (centres[:, 1, None, None] + oy) * 2 / (H - 1) - 1
    return F.grid_sample(corr, torch.stack([gx, gy], -1), align_corners=True).flatten(1)


def _corr_lookup(f0, f1, c0, c1, levels, r):
    b, d, h, w = f0.shape
    # AMT divides by torch.sqrt(torch.tensor(d).float()): sqrt(D) rounded to float32, in any dtype
    corr = torch.einsum("bdp,bdq->bpq", f0.flatten(2), f1.flatten(2)) / float(np.float32(np.sqrt(np.float32(d))))
    outs = []
    for pyr, centres in ((corr.reshape(b * h * w, 1, h, w), c0),
                         (corr.transpose(1, 2).reshape(b * h * w, 1, h, w), c1)):
        cen = centres.permute(0, 2, 3, 1).reshape(-1, 2)
        per = []
        for i in range(levels):
            per.append(_lookup_level(pyr, cen / 2 ** i, r))
            pyr = F.avg_pool2d(pyr, 2)
        outs.append(torch.cat(per, 1).reshape(b, h, w, -1).permute(0, 3, 1, 2))
    return torch.cat(outs, 1)


def _update(sd, name, cfg, ft, flow, corr, sf):
    lrelu = lambda v: F.leaky_relu(v, 0.1)               # noqa: E731
    if sf:
        ft = _up(ft, 1 / sf)
    cor = lrelu(_conv(sd, name + ".convc1", corr))
    flo = lrelu(_conv(sd, name + ".convf2", lrelu(_conv(sd, name + ".convf1", flow))))
    inp = lrelu(_conv(sd, name + ".conv", torch.cat([cor, flo], 1)))
    out = _conv(sd, name + ".gru.2", lrelu(_conv(sd, name + ".gru.0", torch.cat([inp, flow, ft], 1))))
    dft = _conv(sd, name + ".feat_head.2", lrelu(_conv(sd, name + ".feat_head.0", out)))
    dfl = _conv(sd, name + ".flow_head.2", lrelu(_conv(sd, name + ".flow_head.0", out)))
    if sf:
        dft, dfl = _up(dft, sf), sf * _up(dfl, sf)
    return dft, dfl


def reference_amt(sd, cfg, img0, img1, t=0.5):
    """AMT-S's forward (eval, scale_factor 1) from the state dict; img [b, 3, H, W] in [0, 1], H, W % 16 == 0."""
    mean = torch.cat([img0, img1], 2).mean((1, 2, 3), keepdim=True)
    img0, img1 = img0 - mean, img1 - mean
    b, _, H, W = img0.shape
    fmap = _features(sd, torch.cat([img0, img1]))
    f0, f1 = fmap[:b], fmap[b:]
    ys, xs = torch.meshgrid(torch.arange(H // 8, dtype=img0.dtype), torch.arange(W // 8, dtype=img0.dtype), indexing="ij")
    coord = torch.stack([xs, ys])[None].expand(b, -1, -1, -1)

    def pyramid(x):
        out = []
        for i in range(1, 5):
            x = _cr(sd, f"encoder.pyramid{i}.1", _cr(sd, f"encoder.pyramid{i}.0", x, 2))
            out.append(x)
        return out

    p0, p1 = pyramid(img0), pyramid(img1)
    n, side = cfg.num_flows, cfg.skip_channels
    out = _decode(sd, "decoder4", torch.cat([p0[3], p1[3], torch.full_like(p0[3][:, :1], t)], 1), side)
    fl0, fl1, ft = out[:, 0:2], out[:, 2:4], out[:, 4:]
    for level, (update, sf, dec) in enumerate((("update4", None, "decoder3"), ("update3", 2, "decoder2"),
                                               ("update2", 4, None))):
        l0, l1 = (fl0, fl1) if sf is None else (_up(fl0, 1 / sf) / sf, _up(fl1, 1 / sf) / sf)
        corr = _corr_lookup(f0, f1, coord + l1 / t, coord + l0 / (1 - t), cfg.corr_levels, cfg.corr_radius)
        dft, dfl = _update(sd, update, cfg, ft, torch.cat([l0, l1], 1), corr, sf)
        fl0, fl1, ft = fl0 + dfl[:, :2], fl1 + dfl[:, 2:], ft + dft
        k = 2 - level                                      # the pyramid level at this resolution (1/8 -> index 2)
        x = torch.cat([ft, _warp(p0[k], fl0), _warp(p1[k], fl1), fl0, fl1], 1)
        if dec is not None:
            out = _decode(sd, dec, x, side)
            fl0, fl1, ft = out[:, 0:2] + 2 * _up(fl0, 2.0), out[:, 2:4] + 2 * _up(fl1, 2.0), out[:, 4:]
    out = _decode(sd, "decoder1", x, side)
    fl0 = out[:, :2 * n] + 2 * _up(fl0, 2.0).repeat(1, n, 1, 1)
    fl1 = out[:, 2 * n:4 * n] + 2 * _up(fl1, 2.0).repeat(1, n, 1, 1)
    mask = torch.sigmoid(out[:, 4 * n:5 * n])
    res = out[:, 5 * n:]
    cands = []
    for j in range(n):
        w0 = _warp(img0, fl0[:, 2 * j:2 * j + 2])
        w1 = _warp(img1, fl1[:, 2 * j:2 * j + 2])
        m = mask[:, j:j + 1]
        cands.append(m * w0 + (1 - m) * w1 + mean + res[:, 3 * j:3 * j + 3])
    stack = torch.cat(cands, 1)
    comb = _conv(sd, "comb_block.2", F.prelu(_conv(sd, "comb_block.0", stack), sd["comb_block.1.weight"]))
    return (torch.stack(cands, 0).mean(0) + comb).clamp(0, 1)


def reference_motion_smoothness(sd, cfg, frames_u8):
    """VBench's MotionSmoothness.motion_score, one pair at a time, on uint8 frames [F, 3, H, W]
    (its frames are HWC; the per-pixel arithmetic is the same)."""
    frames = [f.permute(1, 2, 0).numpy() for f in frames_u8]                     # HWC uint8, as cv2 gives
    inputs = [torch.tensor(f).permute(2, 0, 1)[None].double() / 255.0 for f in frames[0::2]]
    h, w = inputs[0].shape[-2:]
    ph = (((h // 16) + 1) * 16 - h) % 16
    pw = (((w // 16) + 1) * 16 - w) % 16
    pads = [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]
    inputs = [F.pad(x, pads, mode="replicate") for x in inputs]
    outs = [inputs[0]]
    for a, b in zip(inputs[:-1], inputs[1:]):
        outs += [reference_amt(sd, cfg, a, b), b]
    outs = [o[..., pads[2]:o.shape[-2] - pads[3], pads[0]:o.shape[-1] - pads[1]] for o in outs]
    outs = [(o * 255.).squeeze(0).permute(1, 2, 0).numpy().clip(0, 255).astype(np.uint8) for o in outs]
    real, interp = frames[1::2], outs[1::2]
    diffs = [np.mean(np.abs(real[i].astype(np.int32) - interp[i].astype(np.int32))) for i in range(len(interp))]
    return (255.0 - np.mean(np.array(diffs))) / 255.0, np.stack(interp)


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = AMT("tiny_amt").eval()
    with torch.no_grad():                # smaller flows: most predictions stay inside (0, 1), nothing clamps away
        for name, p in model.named_parameters():
            if name.startswith("decoder") and name.endswith(("convblock.2.weight", "convblock.2.bias")):
                p.mul_(0.3)
    return model


def _smooth_frames(n, h, w, seed=0):
    """uint8 frames of a moving smooth pattern (a real interpolation problem, not noise)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, h // 4 + 2, w // 4 + 2, generator=g)
    out = []
    for i in range(n):
        x = F.interpolate(base, size=(h + 8, w + 8), mode="bicubic", align_corners=False)
        out.append(x[..., i:i + h, i // 2:i // 2 + w])
    return (torch.cat(out).clamp(0, 1) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------- parity with the restatement

def test_amt_equals_reference():
    model = _tiny().double()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    img0, img1 = torch.rand(2, 3, 64, 96, dtype=torch.float64), torch.rand(2, 3, 64, 96, dtype=torch.float64)
    embt = torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64)
    with torch.no_grad():
        ours = model(img0, img1, embt)
        ref = reference_amt(sd, model.cfg, img0, img1)
    inside = ((ref > 0) & (ref < 1)).double().mean()
    assert inside > 0.5, f"only {inside:.2f} of the prediction is unclamped: the comparison would be weak"
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)


def test_amt_full_preset_runs_on_meta():
    with torch.device("meta"):
        model = AMT("amt_s")
        out = model(torch.empty(1, 3, 128, 128), torch.empty(1, 3, 128, 128), torch.empty(1, 1, 1, 1))
    assert out.shape == (1, 3, 128, 128)


def test_motion_smoothness_equals_reference():
    """VBench's whole computation: 7 frames of 60x90 (padded to 64x96), odd frames predicted in
    batches of 2 pairs, truncated to uint8 (equal to the one-pair-at-a-time restatement exactly),
    and the score."""
    model = _tiny().double()
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    frames = _smooth_frames(7, 60, 90)
    ref_score, ref_frames = reference_motion_smoothness(sd, model.cfg, frames)
    interp = interpolate_odd_frames(model, frames, batch_size=2)
    assert interp.dtype == torch.uint8 and interp.shape == (3, 3, 60, 90)
    assert torch.equal(interp.permute(0, 2, 3, 1), torch.from_numpy(ref_frames))
    score, mae = motion_smoothness(model, frames, batch_size=2)
    assert len(mae) == 3
    assert score == pytest.approx(ref_score, abs=1e-12)
    assert 0.5 < score < 1.0


def test_even_frame_count_leaves_the_last_frame_out():
    """With 8 frames the even ones are 0, 2, 4, 6: three predictions, for frames 1, 3, 5 (7 unused)."""
    model = _tiny()
    frames = _smooth_frames(8, 64, 64)
    interp = interpolate_odd_frames(model, frames)
    assert interp.shape[0] == 3
    score, mae = motion_smoothness_score(frames, interp)
    want = (frames[[1, 3, 5]].int() - interp.int()).abs().double().mean(dim=(1, 2, 3))
    assert mae == pytest.approx(want.tolist(), abs=1e-12)
    assert score == pytest.approx((255 - want.mean().item()) / 255, abs=1e-12)


# ---------------------------------------------------------------- integer steps, exactly

def test_padder_exactly():
    for h in list(range(1, 70)) + [480, 512, 576, 720, 1080]:
        for w in (1, 15, 16, 17, 90, 854, 1280):
            ph = (((h // 16) + 1) * 16 - h) % 16
            pw = (((w // 16) + 1) * 16 - w) % 16
            padder = InputPadder(h, w)
            assert padder.pad_ == (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
            assert (h + ph) % 16 == 0 and (w + pw) % 16 == 0
    x = torch.rand(1, 3, 37, 50)
    padder = InputPadder(37, 50)
    assert torch.equal(padder.unpad(padder.pad(x)), x)


def test_uint8_truncation_exactly():
    x = torch.cat([torch.rand(10000, dtype=torch.float64), torch.tensor([0.0, 1.0, 0.5, 1 / 255, 254.999 / 255])])
    want = (x.numpy() * 255.).clip(0, 255).astype(np.uint8)
    assert torch.equal(to_uint8_truncate(x), torch.from_numpy(want))
    x32 = x.float()
    assert torch.equal(to_uint8_truncate(x32), torch.from_numpy((x32 * 255.).numpy().clip(0, 255).astype(np.uint8)))


def test_correlation_bytes_is_the_pyramid_size():
    from minivid.eval.amt import BidirCorrBlock, correlation_bytes

    for name, (h, w) in (("tiny_amt", (60, 90)), ("tiny_amt", (64, 64)), ("amt_s", (128, 200))):
        cfg = AMT_PRESETS[name]
        ph, pw = -(-h // 16) * 2, -(-w // 16) * 2                    # padded to 16, then / 8
        f = torch.randn(1, 4, ph, pw)
        block = BidirCorrBlock(f, f, cfg.corr_levels, cfg.corr_radius)
        held = sum(t.numel() * t.element_size() for t in block.pyramid + block.pyramid_t)
        assert correlation_bytes(cfg, h, w) == held, (name, h, w)


# ---------------------------------------------------------------- bad input, files

def test_errors():
    model = _tiny()
    with pytest.raises(ValueError, match="at least 3 frames"):
        interpolate_odd_frames(model, torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        interpolate_odd_frames(model, torch.zeros(3, 3, 64, 64))
    with pytest.raises(ValueError, match="too small"):
        interpolate_odd_frames(model, torch.zeros(3, 3, 32, 64, dtype=torch.uint8))
    interpolate_odd_frames(model, torch.zeros(3, 3, 50, 64, dtype=torch.uint8))     # padded to 64: large enough
    with pytest.raises(ValueError, match="do not match"):
        motion_smoothness_score(torch.zeros(5, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 3, 8, 9, dtype=torch.uint8))


def test_load_strict_and_errors(tmp_path):
    model = _tiny()
    sd = model.state_dict()
    torch.save({"state_dict": sd, "epoch": 300}, tmp_path / "amt.pth")        # the release's layout
    loaded = load_amt(tmp_path / "amt.pth")
    frames = _smooth_frames(3, 64, 64)
    assert torch.equal(interpolate_odd_frames(loaded, frames), interpolate_odd_frames(model, frames))
    bad = {k: v for k, v in sd.items() if k != "comb_block.1.weight"}
    torch.save({"state_dict": bad}, tmp_path / "bad.pth")
    with pytest.raises(EncoderError, match=r"bad\.pth.*missing \(\d+\): .*comb_block\.1\.weight"):
        load_amt(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="amt-s.pth"):
        load_amt(tmp_path / "absent.pth")


def test_full_size_matches_manifest():
    """AMT('amt_s') on meta has exactly the names and shapes of the manifest derived from VBench's
    vendored networks/AMT-S.py Model(corr_radius=3, corr_lvls=4, num_flows=3) (cfgs/AMT-S.yaml)."""
    manifest = json.loads(MANIFEST.read_text())
    with torch.device("meta"):
        model = AMT("amt_s")
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = {k: v[0] for k, v in manifest["tensors"].items()}
    assert got == want
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["info"]["total_elements"]
    assert AMT_PRESETS["amt_s"].min_size == 128


# ---------------------------------------------------------------- `minivid eval` and the Evaluator

def test_eval_cli_motion_smoothness(tmp_path, monkeypatch, capsys):
    """`minivid eval` runs motion_smoothness from an amt-s.pth-layout file (here tiny, random): the
    number equals the library's on the same decoded frames; it is in the default set only when its
    weights are there; a missing file and too-small frames are clear errors."""
    from minivid.cli import main
    from minivid.eval.loading import default_metrics, load_evaluator, write_tiny_encoders
    from minivid.video import read_video, write_video

    files = write_tiny_encoders(tmp_path / "w")
    write_video(tmp_path / "v.mp4", _smooth_frames(5, 64, 80).float() / 127.5 - 1, fps=4)
    out = tmp_path / "m.json"
    assert main(["eval", str(tmp_path / "v.mp4"), "--amt", str(files["amt"]), "--metrics", "motion_smoothness",
                 "--quiet", "--json", str(out)]) == 0
    assert "motion_smoothness" in capsys.readouterr().out
    got = json.loads(out.read_text())["metrics"]["motion_smoothness"]
    want, mae = motion_smoothness(load_amt(files["amt"]), read_video(tmp_path / "v.mp4").add(1).mul(127.5).round().to(torch.uint8))
    assert got["value"] == pytest.approx(want, abs=1e-12) and got["per_frame_mae"] == pytest.approx(mae, abs=1e-12)
    assert got["frames_interpolated"] == 2 and got["encoder"] == "tiny_amt"
    ev = load_evaluator({"amt": files["amt"]}, ("motion_smoothness",))
    assert set(ev(read_video(tmp_path / "v.mp4"))) == {"motion_smoothness"}

    monkeypatch.chdir(tmp_path)                                    # no weights/ here
    assert "motion_smoothness" not in default_metrics({})
    assert "motion_smoothness" in default_metrics({"amt": files["amt"]})
    assert main(["eval", "v.mp4", "--metrics", "motion_smoothness"]) == 1
    err = capsys.readouterr().err
    assert "weights/amt-s.pth" in err and "lalala125/AMT" in err and "Traceback" not in err
    write_video(tmp_path / "small.mp4", torch.rand(3, 3, 32, 48) * 2 - 1, fps=4)
    assert main(["eval", "small.mp4", "--amt", str(files["amt"]), "--metrics", "motion_smoothness"]) == 1
    err = capsys.readouterr().err
    assert "too small" in err and "Traceback" not in err
