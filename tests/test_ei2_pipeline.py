"""EI² as a video model on the tiny SD: inflation (§4.1), STAM placement, one-shot tuning (§5) on the
shared engine, loading a tuned model, editing, and the `minivid tune/edit/demo --method ei2` jobs."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from minivid import tuning
from minivid.attention import call_state
from minivid.cli import main
from minivid.methods.ei2 import EI2Config, EI2Model, FFAMProcessor, inflate, load_tuned, set_stam_order, tune_video
from minivid.cli.ei2 import moving_squares
from minivid.methods.ei2.model import STAMBlockMixin, power_iteration
from minivid.methods.ei2.tune import diffusion_loss, encode_video, tuned_tensors
from minivid.models import StableDiffusion
from minivid.tuning import TuneConfig, TuningError
from minivid.unet import BasicTransformerBlock


def tiny():
    return StableDiffusion.from_config("tiny", seed=0)


def latents(B=1, F=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, F, 8, 8, generator=g), torch.randn(B, 77, 32, generator=g)


def blocks(unet):
    return {n: m for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)}


# ---------------------------------------------------------------- inflation (§4.1)

def test_one_frame_equals_the_image_unet():
    """One frame: FFAM is self-attention and STAM sees IC(z) = 0, so with b = 0 it adds nothing."""
    base, sd = tiny(), tiny()
    model = EI2Model(sd.unet, EI2Config(r=2))
    x, ctx = latents(B=2, F=1)
    with torch.no_grad():
        out = model(x, 500, ctx)                                          # [B, C, 1, h, w]
        ref = base.unet(x[:, :, 0], 500, ctx)
    assert out.shape == x.shape
    torch.testing.assert_close(out[:, :, 0], ref, atol=1e-5, rtol=1e-5)


def test_static_video_with_r1_equals_the_image_unet_per_frame():
    """F equal frames, r = 1: FFAM's keys are F copies of the frame's own (same softmax weights) and a
    static video passes STAM unchanged; convolutions and cross-attention act per frame."""
    # in float64: the video call and the per-frame call run kernels of other shapes (other summation
    # orders, other kernels on other CPUs: the float32 margin was 3.7x); two float64 orders differ by ~1e-13
    base, sd = tiny(), tiny()
    base.double(), sd.double()
    model = EI2Model(sd.unet, EI2Config(r=1))
    x, ctx = (t.double() for t in latents(B=1, F=1))
    with torch.no_grad():
        out = model(x.expand(1, 4, 4, 8, 8), 300, ctx)
        ref = base.unet(x[:, :, 0], 300, ctx)
    for f in range(4):
        torch.testing.assert_close(out[:, :, f], ref, atol=1e-10, rtol=0)


def test_video_layout_frames_mix_within_a_video_only():
    sd = tiny()
    model = EI2Model(sd.unet, EI2Config(r=2))
    x, ctx = latents(B=2, F=3)                                             # a different context per video
    with torch.no_grad():
        out = model(x, torch.tensor([100, 700]), ctx)
        flat = x.permute(0, 2, 1, 3, 4).reshape(6, 4, 8, 8)                # [(B·F), C, h, w], frame fastest
        with call_state(sd.unet, frames=3):
            ref = sd.unet(flat, torch.tensor([100] * 3 + [700] * 3), ctx.repeat_interleave(3, 0))
        torch.testing.assert_close(out.permute(0, 2, 1, 3, 4).reshape(6, 4, 8, 8), ref, atol=1e-5, rtol=1e-5)
        # videos independent: batch 2 vs batch 1 are kernels of other shapes, so compared in float64
        m64, x64, c64 = copy.deepcopy(model).double(), x.double(), ctx.double()
        torch.testing.assert_close(m64(x64[1:], 700, c64[1:]), m64(x64, torch.tensor([100, 700]), c64)[1:],
                                   atol=1e-10, rtol=0)
        y = x.clone()
        y[0, :, 2] += 1.0                                                  # change frame 2 of video 0
        moved = model(y, torch.tensor([100, 700]), ctx)
    assert (moved[0, :, 0] - out[0, :, 0]).abs().max() > 1e-4             # frame 0 sees frame 2 (FFAM, STAM)
    torch.testing.assert_close(moved[1], out[1], atol=1e-5, rtol=1e-5)


def test_inflation_keeps_names_and_adds_stam_and_ffam():
    sd = tiny()
    before = dict(sd.unet.state_dict())
    names = inflate(sd.unet, EI2Config(r=2))
    after = sd.unet.state_dict()
    assert names == list(blocks(sd.unet)) and names                       # every transformer block
    for k, v in before.items():
        assert torch.equal(after[k], v)                                    # originals unchanged, same names
    new = set(after) - set(before)
    assert new and all(".stam.attn." in k for k in new)
    assert {k.split(".stam.")[0] for k in new} == set(names)
    for name, block in blocks(sd.unet).items():
        assert isinstance(block, STAMBlockMixin)
        assert isinstance(block.attn1.processor, FFAMProcessor) and block.attn1.processor.r == 2
        assert not isinstance(block.attn2.processor, FFAMProcessor)
        assert not isinstance(block.stam.attn.processor, FFAMProcessor)
        assert block.stam.attn.name == f"{name}.stam.attn"
    with pytest.raises(ValueError, match="already"):
        inflate(sd.unet)


@pytest.mark.parametrize("order, expected", [
    ("ffam-stam-ca", ["attn1", "stam", "attn2", "ff"]),
    ("ffam-ca-stam", ["attn1", "attn2", "stam", "ff"]),
])
def test_placement_order(order, expected):
    sd = tiny()
    model = EI2Model(sd.unet, EI2Config(order=order))
    name, block = next(iter(blocks(sd.unet).items()))
    calls = []
    hooks = [getattr(block, part).register_forward_hook(lambda m, i, o, part=part: calls.append(part))
             for part in ("attn1", "stam", "attn2", "ff")]
    x, ctx = latents(F=2)
    with torch.no_grad():
        out = model(x, 10, ctx)
        assert calls == expected
        set_stam_order(sd.unet, "ffam-ca-stam" if order == "ffam-stam-ca" else "ffam-stam-ca")
        calls.clear()
        other = model(x, 10, ctx)
    for h in hooks:
        h.remove()
    assert calls == [expected[0], expected[2], expected[1], expected[3]]
    assert (other - out).abs().max() > 1e-5


def test_bad_configurations():
    with pytest.raises(ValueError, match="order"):
        EI2Config(order="stam-first")
    with pytest.raises(ValueError, match="r must"):
        EI2Config(r=0)
    sd = tiny()
    model = EI2Model(sd.unet, EI2Config(r=16))                              # 8×8 latents: r > the map
    x, ctx = latents(F=2)
    with pytest.raises(ValueError, match="r"):
        model(x, 10, ctx)
    with pytest.raises(ValueError, match="video latents"):
        model(x[:, :, 0], 10, ctx)


# ---------------------------------------------------------------- tuning (§5)

def tuning_setup(F=3, config=None):
    sd = tiny()
    clip = moving_squares(F, 32)
    model = EI2Model(sd.unet, config or EI2Config())
    mean, std = encode_video(sd, clip)
    with torch.no_grad():
        ctx = sd.encode_prompt(["squares"])
    return sd, clip, model, mean, std, ctx


def test_trainable_tensors_are_the_papers():
    sd, *_ = tuning_setup()
    params, buffers = tuned_tensors(sd.unet)
    n_blocks = len(blocks(sd.unet))
    assert len([k for k in params if k.endswith("attn1.to_q.weight")]) == n_blocks
    assert len([k for k in params if k.endswith("attn2.to_q.weight")]) == n_blocks
    stam = {k.split(".stam.")[1] for k in params if ".stam." in k}
    assert stam == {"attn.to_q.weight", "attn.to_k.weight", "attn.to_v.parametrizations.weight.original",
                    "attn.to_out.0.parametrizations.weight.original", "attn.to_out.0.bias"}
    assert len(params) == n_blocks * 7
    assert {k.split(".stam.")[1] for k in buffers} == {
        "attn.to_v.parametrizations.weight.0._u", "attn.to_v.parametrizations.weight.0._v",
        "attn.to_out.0.parametrizations.weight.0._u", "attn.to_out.0.parametrizations.weight.0._v"}


def test_tuning_lowers_the_loss_and_moves_only_the_trainable_tensors(tmp_path):
    sd, clip, model, mean, std, ctx = tuning_setup()
    before = {k: v.clone() for k, v in sd.state_dict().items()}            # UNet, VAE, text encoder
    params, buffers = tuned_tensors(sd.unet)
    loss_fn = diffusion_loss(model, mean, ctx, sd.schedule, sd.prediction, std)
    fixed = lambda step, gen: loss_fn(step, torch.Generator().manual_seed(7))   # noqa: E731  one batch
    res = tuning.tune(sd.unet, params, fixed, TuneConfig(steps=6, lr=1e-3, progress=False), tmp_path, buffers=buffers)
    assert res.losses[-1] < 0.95 * res.losses[0], res.losses
    changed = {k for k, v in sd.state_dict().items() if not torch.equal(v, before[k])}
    tuned = {"unet." + k for k in (*params, *buffers)}
    assert changed == tuned                                                 # all of them, nothing else
    saved = load_file(str(res.checkpoint))
    assert set(saved) == set(params) | set(buffers)                        # trainables + STAM buffers only


def test_resume_continues_the_same_run(tmp_path):
    clip = moving_squares(3, 32)
    cfg = dict(lr=1e-3, checkpoint_every=2, progress=False, seed=3)
    a = tiny()
    tune_video(a, clip, "squares", tmp_path / "a", cfg=TuneConfig(steps=4, **cfg))
    b = tiny()
    tune_video(b, clip, "squares", tmp_path / "b", cfg=TuneConfig(steps=2, **cfg))
    c = tiny()                                                              # a new process: fresh model, resume
    _, res = tune_video(c, clip, "squares", tmp_path / "b", cfg=TuneConfig(steps=4, **cfg))
    assert res.start_step == 2 and len(res.losses) == 2
    sa, sc = a.unet.state_dict(), c.unet.state_dict()
    for k in sa:
        torch.testing.assert_close(sc[k], sa[k], atol=1e-6, rtol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    sd, clip, model, mean, std, ctx = tuning_setup(F=2)
    params, _ = tuned_tensors(sd.unet)
    tuning.freeze_all_but(sd.unet, params)
    sd.unet.train()
    power_iteration(sd.unet)                    # the tuning step's refresh; the forwards below keep W̄ fixed
    loss_fn = diffusion_loss(model, mean, ctx, sd.schedule, sd.prediction, std, refresh=False)

    def grads():
        for p in params.values():
            p.grad = None
        loss_fn(0, torch.Generator().manual_seed(1)).backward()
        return {k: p.grad.clone() for k, p in params.items()}

    plain = grads()
    with tuning.gradient_checkpointing(sd.unet, "*transformer_blocks.[0-9]") as wrapped:
        assert len(wrapped) == len(blocks(sd.unet))
        with pytest.raises(KeyError, match="frame count"):              # the recomputation runs in backward:
            grads()                                                     # outside EI2Model's call_state
        with call_state(sd.unet, frames=2):                             # what tune_video holds
            ckpt = grads()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=1e-5)


def test_autocast_and_gradient_checkpointing_options(tmp_path):
    sd = tiny()
    model, res = tune_video(sd, moving_squares(2, 32), "squares", tmp_path, gradient_checkpointing=True,
                            cfg=TuneConfig(steps=2, lr=1e-3, autocast="bf16", progress=False))
    assert all(torch.isfinite(torch.tensor(res.losses)))
    _, buffers = tuned_tensors(sd.unet)
    assert all(b.dtype == torch.float32 for b in buffers.values())
    assert all(not p.requires_grad for p in sd.unet.parameters()) and not model.training
    half = StableDiffusion.from_config("tiny", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        tune_video(half, moving_squares(2, 32), "squares", tmp_path / "half")


def test_load_tuned_reproduces_the_tuned_model(tmp_path):
    a = tiny()
    model_a, res = tune_video(a, moving_squares(3, 32), "squares", tmp_path,
                              config=EI2Config(r=1, order="ffam-ca-stam"),
                              cfg=TuneConfig(steps=2, lr=1e-3, progress=False))
    b = tiny()
    model_b, meta = load_tuned(b, tmp_path)                                 # a folder: its newest checkpoint
    assert meta["method"] == "ei2" and meta["step"] == 2 and meta["prompt"] == "squares"
    assert model_b.config == EI2Config(r=1, order="ffam-ca-stam")
    assert not model_b.training
    x, ctx = latents(F=3)
    with torch.no_grad():
        torch.testing.assert_close(model_b(x, 400, ctx), model_a(x, 400, ctx), atol=0, rtol=0)


def test_load_tuned_refuses_other_methods_and_sizes(tmp_path):
    a = tiny()
    _, res = tune_video(a, moving_squares(2, 32), "squares", tmp_path / "ok",
                        cfg=TuneConfig(steps=1, progress=False))
    tensors = load_file(str(res.checkpoint))
    tuning._atomic_save(tensors, tmp_path / "other.safetensors", {"step": "1", "meta": json.dumps({"method": "tcve"})})
    with pytest.raises(TuningError, match="'tcve'.*not EI²"):
        load_tuned(tiny(), tmp_path / "other.safetensors")
    key = next(k for k in tensors if k.endswith("attn2.to_q.weight"))
    bigger = {**tensors, key: torch.zeros(tensors[key].shape[0] * 2, tensors[key].shape[1])}
    meta = {"step": "1", "meta": json.dumps({"method": "ei2"})}
    save_file(bigger, str(tmp_path / "size.safetensors"), metadata=meta)
    with pytest.raises(TuningError, match="other shapes"):
        load_tuned(tiny(), tmp_path / "size.safetensors")
    partial = {k: v for k, v in tensors.items() if ".stam." not in k}
    save_file(partial, str(tmp_path / "partial.safetensors"), metadata=meta)
    with pytest.raises(TuningError, match="missing"):
        load_tuned(tiny(), tmp_path / "partial.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tuned"):
        load_tuned(tiny(), tmp_path / "empty")


# ---------------------------------------------------------------- command line, end to end

@pytest.fixture(scope="module")
def source_video(tmp_path_factory):
    from minivid.video import write_video

    return write_video(tmp_path_factory.mktemp("ei2") / "squares.mp4", moving_squares(4, 32), fps=4)


def test_tune_then_edit_end_to_end(tmp_path, source_video):
    common = ["--method", "ei2", "--video", str(source_video), "--tiny", "--frames", "3"]
    assert main(["tune", *common, "--prompt", "two squares", "--steps", "2", "--checkpoint-every", "1",
                 "--out", str(tmp_path / "tune")]) == 0
    rec = json.loads((tmp_path / "tune" / "record.json").read_text())
    assert (tmp_path / "tune" / "tuned-000002.safetensors").is_file()
    assert rec["results"]["steps"] == 2 and len(rec["results"]["losses"]) == 2
    assert rec["settings"]["prompt"] == "two squares" and "tuning" in rec["timings_s"]
    assert main(["tune", *common, "--prompt", "two squares", "--steps", "3", "--out", str(tmp_path / "tune")]) == 0
    rec = json.loads((tmp_path / "tune" / "record.json").read_text())
    assert rec["results"]["start_step"] == 2 and len(rec["results"]["losses"]) == 1       # resumed in the folder

    assert main(["edit", *common, "--tuned", str(tmp_path / "tune"), "--prompt", "two circles", "--steps", "2",
                 "--ei2-r", "1", "--out", str(tmp_path / "edit")]) == 0
    out = tmp_path / "edit"
    for name in ("edited.mp4", "grid.png", "side_by_side.mp4", "record.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    rec = json.loads((out / "record.json").read_text())
    res = rec["results"]
    assert res["source_prompt"] == "two squares" and res["prompt"] == "two circles"   # the tuning prompt by default
    assert res["steps"] == 2 and res["guidance"] == 7.5 and res["ei2"]["r"] == 1 and res["tuned_step"] == 3
    assert not res["base_mismatch"]
    assert rec["settings"]["tuned"] == str(tmp_path / "tune")
    assert {"load", "edit (inversion + sampling)", "total"} <= set(rec["timings_s"])


def test_edit_refuses_a_checkpoint_of_another_method(tmp_path, source_video, capsys):
    tuning._atomic_save({"x": torch.zeros(1)}, tmp_path / "tcve.safetensors",
                        {"step": "1", "meta": json.dumps({"method": "tcve"})})
    common = ["--method", "ei2", "--video", str(source_video), "--tiny", "--frames", "2", "--prompt", "p"]
    assert main(["edit", *common, "--tuned", str(tmp_path / "tcve.safetensors"), "--out", str(tmp_path / "e")]) == 1
    assert "not EI²" in capsys.readouterr().err
    assert main(["edit", *common, "--out", str(tmp_path / "e2")]) == 1
    assert "--tuned" in capsys.readouterr().err


def test_demo(tmp_path):
    assert main(["demo", "--method", "ei2", "--frames", "3", "--size", "32", "--steps", "2",
                 "--out", str(tmp_path)]) == 0
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["results"]["loss_fixed_batch_after"] < rec["results"]["loss_fixed_batch_before"]
    assert {"edited.mp4", "grid.png", "side_by_side.mp4"} <= set(rec["outputs"])
