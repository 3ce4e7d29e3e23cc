"""MUSIQ (VBench imaging quality) against a restatement of pyiqa 0.1.16's MUSIQ and VBench 0.1.5's
imaging_quality.py.

pyiqa cannot be installed here (it needs torchvision), so the oracle is an independent restatement
in plain functional code (`reference_musiq` below): patches through F.unfold as pyiqa cuts them,
attention written out with pyiqa's masked_fill(-1e3), the state dict read by name. Both run in
float64 on a tiny random MUSIQ, so they agree to rounding (1e-9 on scores of order 1).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minivid.eval.encoders import EncoderError
from minivid.eval.musiq import (
    MUSIQ, MUSIQ_PRESETS, hashed_positions, imaging_quality, load_musiq, multiscale_patches, musiq_resized_size,
    score_frames, vbench_imaging_quality_preprocess, vbench_imaging_size,
)

MANIFEST = Path(__file__).resolve().parents[1] / "weights" / "manifests" / "musiq-spaq.json"


# ---------------------------------------------------------------- the restatement (oracle)

def _tf_same_pad(x, k, s):
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
    pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def _std_conv(sd, name, x, stride):
    w = sd[name + ".weight"]
    w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
    return F.conv2d(_tf_same_pad(x, w.shape[-1], stride), w, None, stride)


def _gn(sd, name, x, eps):
    return F.group_norm(x, 32, sd[name + ".weight"], sd[name + ".bias"], eps)


def _reference_patches(image, cfg):
    """pyiqa's get_multiscale_patches: [n, L, 3pp + 3] with (hash, scale, mask) in the last three."""
    n, c, h, w = image.shape
    p, outs = cfg.patch_size, []
    sizes = sorted(cfg.longer_side_lengths)
    for scale_id, longer in enumerate(sizes + [None]):
        if longer is None:
            img, rh, rw, max_len = image, h, w, -1
        else:
            ratio = longer / max(h, w)
            rh, rw = round(h * ratio), round(w * ratio)
            img = F.interpolate(image, (rh, rw), mode="bicubic", align_corners=False)
            max_len = int(math.ceil(longer / p) ** 2)
        patches = F.unfold(_tf_same_pad(img, p, p), p, stride=p)              # (n, c·p·p, count)
        ch, cw = math.ceil(rh / p), math.ceil(rw / p)
        hashes = torch.tensor([(i * cfg.grid // ch) * cfg.grid + (j * cfg.grid // cw)
                               for i in range(ch) for j in range(cw)], dtype=image.dtype)
        extra = torch.stack([hashes, torch.full_like(hashes, scale_id), torch.ones_like(hashes)])
        out = torch.cat([patches, extra[None].expand(n, -1, -1)], dim=1)
        if max_len >= 0:
            out = torch.cat([out, torch.zeros(n, out.shape[1], max_len, dtype=out.dtype)], -1)[..., :max_len]
        outs.append(out)
    return torch.cat(outs, -1).transpose(1, 2)


def reference_musiq(sd, cfg, images):
    """MUSIQ score of images [n, 3, H, W] in [0, 1], written from pyiqa's MUSIQ.forward."""
    x = _reference_patches((images - 0.5) * 2, cfg)
    b, L, _ = x.shape
    pos, scale, mask = x[..., -3].long(), x[..., -2].long(), x[..., -1]
    p = cfg.patch_size
    t = x[..., :-3].reshape(-1, 3, p, p)
    t = F.relu(_gn(sd, "gn_root", _std_conv(sd, "conv_root", t, 2), 1e-6))
    t = F.max_pool2d(_tf_same_pad(t, 3, 2), 3, 2)
    sc = _gn(sd, "block1.gn_proj", _std_conv(sd, "block1.conv_proj", t, 1), 1e-4)
    y = F.relu(_gn(sd, "block1.gn1", _std_conv(sd, "block1.conv1", t, 1), 1e-4))
    y = F.relu(_gn(sd, "block1.gn2", _std_conv(sd, "block1.conv2", y, 1), 1e-4))
    t = F.relu(_gn(sd, "block1.gn3", _std_conv(sd, "block1.conv3", y, 1), 1e-4) + sc)
    t = F.linear(t.permute(0, 2, 3, 1).reshape(b, L, -1), sd["embedding.weight"], sd["embedding.bias"])
    pre = "transformer_encoder."
    t = t + sd[pre + "posembed_input.position_emb"][0][pos] + sd[pre + "scaleembed_input.scale_emb"][scale]
    t = torch.cat([sd[pre + "cls"].repeat(b, 1, 1), t], 1)
    m = torch.cat([torch.ones(b, 1, dtype=mask.dtype), mask], 1)
    m2 = m[:, None, :, None] * m[:, None, None, :]
    heads, D = cfg.heads, cfg.width
    for i in range(cfg.layers):
        blk = f"{pre}transformer.encoderblock_{i}."
        lin = lambda v, n: F.linear(v, sd[blk + n + ".weight"], sd[blk + n + ".bias"])     # noqa: E731
        y = F.layer_norm(t, (D,), sd[blk + "norm1.weight"], sd[blk + "norm1.bias"], 1e-6)
        q, k, v = (lin(y, "attention." + n).reshape(b, -1, heads, D // heads).permute(0, 2, 1, 3)
                   for n in ("query", "key", "value"))
        att = (q @ k.transpose(-2, -1)) * (D // heads) ** -0.5
        att = att.masked_fill(m2 == 0, -1e3).softmax(-1)
        t = t + lin((att @ v).transpose(1, 2).reshape(b, -1, D), "attention.out")
        y = F.layer_norm(t, (D,), sd[blk + "norm2.weight"], sd[blk + "norm2.bias"], 1e-6)
        t = t + lin(F.gelu(lin(y, "mlp.fc1")), "mlp.fc2")
    t = F.layer_norm(t, (D,), sd[pre + "encoder_norm.weight"], sd[pre + "encoder_norm.bias"], 1e-6)
    return F.linear(t[:, 0], sd["head.weight"], sd["head.bias"])[:, 0]


def _tiny(seed=0):
    torch.manual_seed(seed)
    model = MUSIQ("tiny_musiq").eval()
    with torch.no_grad():                 # random, not the init's zeros/ones, so every term counts
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".gn" in name or "norm" in name or name == "transformer_encoder.cls":
                param.add_(0.2 * torch.randn_like(param))
    return model


# ---------------------------------------------------------------- parity with the restatement

@pytest.mark.parametrize("hw", [(20, 56), (45, 45), (70, 33)])
def test_musiq_equals_reference(hw):
    """Scores of a tiny random MUSIQ equal the restated pyiqa forward: non-square frames (padded,
    masked tokens), square, and taller-than-wide; two images in one batch."""
    model = _tiny().double()
    images = torch.rand(2, 3, *hw, dtype=torch.float64)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ours = model(images)
        ref = reference_musiq(sd, model.cfg, images)
    assert ours.shape == (2,)
    assert ref.abs().min() > 1e-3          # not a degenerate zero
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=0)


def test_padding_tokens_are_masked():
    """A shorter sequence (a wide image at the small scale) is padded; the score does not depend on
    what stands in the padded tokens' places."""
    model = _tiny().double()
    images = torch.rand(1, 3, 20, 56, dtype=torch.float64)
    patches, spatial, scale, mask = multiscale_patches((images - 0.5) * 2, model.cfg)
    assert not mask.all()
    with torch.no_grad():
        a = model.score_patches(patches, spatial, scale, mask)
        noisy = torch.where(mask[..., None], patches, torch.randn_like(patches))
        b = model.score_patches(noisy, spatial, scale, mask)
    torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


# ---------------------------------------------------------------- integer preprocessing, exactly

def test_patches_and_positions_equal_reference_exactly():
    cfg = MUSIQ_PRESETS["tiny_musiq"]
    for hw in [(20, 56), (45, 45), (70, 33), (16, 16), (17, 100)]:
        image = torch.randn(2, 3, *hw, dtype=torch.float64)
        ref = _reference_patches(image, cfg)
        patches, spatial, scale, mask = multiscale_patches(image, cfg)
        assert torch.equal(patches, ref[..., :-3]), hw
        assert torch.equal(spatial, ref[..., -3].long()), hw
        assert torch.equal(scale, ref[..., -2].long()), hw
        assert torch.equal(mask, ref[..., -1].bool()), hw


def test_hashed_positions_are_the_integer_nearest_map():
    """torch's 'nearest' grid G -> count equals floor(i·G / count) for every count up to 200."""
    for grid in (4, 10):
        for ch in range(1, 201, 7):
            for cw in (1, 3, 10, 16, 33, 200):
                want = torch.tensor([(i * grid // ch) * grid + (j * grid // cw) for i in range(ch) for j in range(cw)])
                assert torch.equal(hashed_positions(grid, ch, cw), want), (grid, ch, cw)


SIZES = [(720, 1280), (1080, 1920), (480, 854), (576, 1024), (512, 512), (513, 512), (512, 768), (768, 512),
         (360, 640), (1024, 1024), (719, 1279), (600, 2000), (2160, 3840), (1000, 513)]


def test_vbench_frame_size_exactly():
    """VBench imaging_quality.transform 'longer': resize only when the longer side exceeds 512, to
    (int(scale·h), int(scale·w)), scale = 512./max(h, w)."""
    for h, w in SIZES + [(h, w) for h in range(500, 1500, 37) for w in range(300, 2000, 91)]:
        if max(h, w) > 512:
            scale = 512. / max(h, w)
            want = (int(scale * h), int(scale * w))
        else:
            want = (h, w)
        assert vbench_imaging_size(h, w) == want, (h, w)
    assert vbench_imaging_size(720, 1280) == (288, 512)
    assert vbench_imaging_size(1080, 1920) == (288, 512)
    assert vbench_imaging_size(480, 854) == (287, 512)


def test_musiq_scale_sizes_exactly():
    for h, w in SIZES + [(h, w) for h in range(30, 600, 13) for w in range(30, 600, 29)]:
        for longer in (224, 384):
            r = longer / max(h, w)
            assert musiq_resized_size(h, w, longer) == (round(h * r), round(w * r)), (h, w, longer)
    assert musiq_resized_size(288, 512, 224) == (126, 224)


def test_vbench_preprocess():
    frames = torch.randint(0, 256, (2, 3, 600, 1000), dtype=torch.uint8)
    out = vbench_imaging_quality_preprocess(frames)
    ref = F.interpolate(frames.float(), size=(int(512. / 1000 * 600), 512), mode="bilinear",
                        align_corners=False) / 255.
    assert out.shape == (2, 3, 307, 512) and torch.equal(out, ref)
    small = torch.randint(0, 256, (1, 3, 300, 500), dtype=torch.uint8)
    assert torch.equal(vbench_imaging_quality_preprocess(small), small.float() / 255.)
    with pytest.raises(ValueError, match="uint8"):
        vbench_imaging_quality_preprocess(frames.float())


def test_imaging_quality_scaling():
    model = _tiny()
    frames = torch.randint(0, 256, (3, 3, 40, 56), dtype=torch.uint8)
    scores = score_frames(model, frames, batch_size=2)
    with torch.no_grad():
        each = torch.cat([model(f[None].float() / 255.) for f in frames])
    torch.testing.assert_close(scores, each, atol=1e-5, rtol=1e-5)
    value, per_frame = imaging_quality(scores)
    assert value == pytest.approx(sum(per_frame) / 3 / 100, abs=1e-9)


# ---------------------------------------------------------------- files

def test_load_strict_and_errors(tmp_path):
    model = _tiny()
    sd = model.state_dict()
    path = tmp_path / "musiq.pth"
    torch.save({"module." + k: v for k, v in sd.items()}, path)     # a data-parallel prefix, as pyiqa accepts
    loaded = load_musiq(path)
    images = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), atol=0, rtol=0)
    bad = dict(sd)
    bad.pop("transformer_encoder.cls")
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(EncoderError, match=r"bad\.pth.*missing \(\d+\): transformer_encoder\.cls"):
        load_musiq(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="musiq_spaq_ckpt-358bb6af.pth"):
        load_musiq(tmp_path / "absent.pth")


def test_full_size_matches_manifest():
    """MUSIQ('musiq_spaq') on meta has exactly the names and shapes of the manifest derived from
    pyiqa's MUSIQ(pretrained_model_path=...) (the model VBench builds)."""
    manifest = json.loads(MANIFEST.read_text())
    with torch.device("meta"):
        model = MUSIQ("musiq_spaq")
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    want = {k: v[0] for k, v in manifest["tensors"].items()}
    assert got == want
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["info"]["total_elements"]


# ---------------------------------------------------------------- `minivid eval` and the Evaluator

def test_eval_cli_imaging_quality(tmp_path, monkeypatch, capsys):
    """`minivid eval` runs imaging_quality from a musiq_spaq-layout file (here tiny, random): equal to
    the library's on the same decoded frames; in the default set only when its weights are there."""
    from minivid.cli import main
    from minivid.eval.loading import default_metrics, write_tiny_encoders
    from minivid.video import read_video, write_video

    files = write_tiny_encoders(tmp_path / "w")
    write_video(tmp_path / "v.mp4", torch.rand(3, 3, 40, 56) * 2 - 1, fps=4)
    out = tmp_path / "m.json"
    assert main(["eval", str(tmp_path / "v.mp4"), "--musiq", str(files["musiq"]), "--metrics", "imaging_quality",
                 "--quiet", "--json", str(out)]) == 0
    got = json.loads(out.read_text())["metrics"]["imaging_quality"]
    frames = read_video(tmp_path / "v.mp4").add(1).mul(127.5).round().to(torch.uint8)
    want, per_frame = imaging_quality(score_frames(load_musiq(files["musiq"]), frames))
    assert got["value"] == pytest.approx(want, abs=1e-9) and got["per_frame_score"] == pytest.approx(per_frame, abs=1e-6)
    assert got["encoder"] == "tiny_musiq"

    monkeypatch.chdir(tmp_path)
    assert "imaging_quality" not in default_metrics({})
    assert "imaging_quality" in default_metrics({"musiq": files["musiq"]})
    assert main(["eval", "v.mp4", "--metrics", "imaging_quality"]) == 1
    err = capsys.readouterr().err
    assert "weights/musiq_spaq_ckpt-358bb6af.pth" in err and "IQA-PyTorch" in err and "Traceback" not in err
