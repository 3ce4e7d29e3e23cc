"""TCVE as a whole on the tiny SD: identity at initialisation, ablations, tuning, editing, the CLI.

"Plain SD per frame" at initialisation, stated precisely (TCVEModel = Tune-A-Video-inflated UNet +
temporal branch, built on an SD UNet):
- the temporal parts (Tune-A-Video's temporal attention, every STU) add exactly zero at
  initialisation, so for any frame count the model equals the UNet with sparse-causal
  self-attention alone, and with per-frame self-attention (sparse=False) it equals plain SD on
  every frame;
- a one-frame "video" is plain SD (sparse-causal attention of one frame is self-attention).
Sparse-causal attention itself changes frames ≥ 1 (they attend to frames 0 and f-1): that is
Tune-A-Video's spatial branch, not an initialisation effect.
"""
import json

import pytest
import torch
from safetensors import safe_open

from minivid.attention import call_state, processors
from minivid.cli import main
from minivid.cli.tcve import rolling_ball
from minivid.methods.tcve.edit import edit_tcve
from minivid.methods.tcve.model import TRAINABLE, TCVEModel
from minivid.methods.tcve.stu import ABLATIONS
from minivid.methods.tcve.tune import (
    CHECKPOINT_GLOB, diffusion_loss, encode_video, load_tuned, resolve_checkpoint, tune_config, tune_tcve,
)
from minivid.methods.tuneavideo import sparse_causal
from minivid.models import StableDiffusion
from minivid.tuning import TuningError, gradient_checkpointing, save_trainable
from minivid.video import write_video

F = 3                                             # frames of the test clips (32×32 px, 8×8 latents)


def tiny(seed: int = 0) -> StableDiffusion:
    return StableDiffusion.from_config("tiny", seed=seed)


def _perturb_temporal_parts(model: TCVEModel) -> None:
    """Un-zero the zero-initialised outputs (as tuning would), so the temporal parts act."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "conv_3d" in n or "attn_temp.to_out" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------- identity at initialisation

def test_one_frame_is_plain_sd():
    sd, base = tiny(), tiny()
    model = TCVEModel.build(sd.unet)
    x, t, ctx = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900]), torch.randn(3, 77, 32)
    with torch.no_grad():
        out = model(x, t, ctx, frames=1)                                       # three one-frame videos
        ref = base.unet(x, t, ctx)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_temporal_parts_are_exactly_zero_at_init():
    sd, base = tiny(), tiny()
    model = TCVEModel.build(sd.unet)
    B = 2                                                                      # e.g. the two CFG halves
    x, ctx = torch.randn(B * F, 4, 8, 8), torch.randn(B, 77, 32).repeat_interleave(F, 0)
    with torch.no_grad():
        out = model(x, 400, ctx, frames=F)
        with processors(base.unet, "*attn1", sparse_causal), call_state(base.unet, frames=F):
            ref = base.unet(x, 400, ctx)                                       # the UNet with sparse-causal attention alone
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # and frame 0 of each video, which attends only to itself, is plain SD (up to the rounding of duplicated
    # keys), in float64: batched and per-frame calls run kernels of other shapes (other summation orders, and other kernels on other CPUs: float32 margins were 3.5x here); two float64 orders differ by ~1e-13
    import copy

    m64, b64 = copy.deepcopy(model).double(), copy.deepcopy(base.unet).double()
    with torch.no_grad():
        torch.testing.assert_close(m64(x.double(), 400, ctx.double(), frames=F)[::F],
                                   b64(x[::F].double(), 400, ctx[::F].double()), atol=1e-10, rtol=0)

    _perturb_temporal_parts(model)                                             # once tuned, they act
    with torch.no_grad():
        assert (model(x, 400, ctx, frames=F) - ref).abs().max() > 1e-3


def test_without_sparse_attention_every_frame_is_plain_sd_at_init():
    sd, base = tiny(), tiny()
    model = TCVEModel.build(sd.unet, sparse=False)
    x, ctx = torch.randn(2 * F, 4, 8, 8), torch.randn(2 * F, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 700, ctx, frames=F), base.unet(x, 700, ctx), atol=1e-6, rtol=0)


def test_attached_is_scoped_and_reentrant():
    sd = tiny()
    model = TCVEModel.build(sd.unet)
    _perturb_temporal_parts(model)
    x, ctx = torch.randn(2 * F, 4, 8, 8), torch.randn(2 * F, 77, 32)
    with torch.no_grad():
        once = model(x, 300, ctx, frames=F)
        with model.attached(frames=F):
            nested = model(x, 300, ctx)                                        # the branch is fused once, not twice
            via_unet = sd.unet(x, 300, ctx)
    torch.testing.assert_close(nested, once, atol=0, rtol=0)
    torch.testing.assert_close(via_unet, once, atol=0, rtol=0)
    assert not sd.unet._forward_hooks and not sd.unet._forward_pre_hooks and not sd.unet.middle_block._forward_hooks
    with pytest.raises(KeyError, match="call_state"):                         # outside: a video model needs F
        sd.unet(x, 300, ctx)


# ---------------------------------------------------------------- what trains

def test_trainable_tensors_are_the_authors():
    model = TCVEModel.build(tiny().unet)
    names = set(model.trainable())
    block = "unet.input_blocks.1.1.transformer_blocks.0"
    assert {f"{block}.attn1.to_q.weight", f"{block}.attn2.to_q.weight", f"{block}.attn_temp.to_out.0.weight"} <= names
    assert not {f"{block}.attn1.to_k.weight", f"{block}.norm_temp.weight", f"{block}.ff.net.2.weight"} & names
    branch = {n for n, _ in model.named_parameters() if n.startswith("branch.")}
    assert branch and branch <= names                                          # the whole temporal branch
    assert not any(n.startswith("unet.") and not any(k in n for k in ("to_q", "attn_temp")) for n in names)
    assert TRAINABLE[-1] == "branch.*"


def test_tuning_lowers_the_loss_and_moves_only_the_trainable_tensors(tmp_path):
    sd = tiny()
    model = TCVEModel.build(sd.unet)
    clip = rolling_ball(F, 32)
    mean, _ = encode_video(sd, clip)
    context = sd.encode_prompt(["a ball"])
    fixed = diffusion_loss(model, mean, context, F, sd.schedule, sd.prediction)   # posterior mean, fixed draws
    with torch.no_grad():
        before = float(fixed(0, torch.Generator().manual_seed(5)))

    def snapshot():
        parts = {"model": model, "vae": sd.vae, "text": sd.text_encoder}
        return {f"{p}.{k}": v.clone() for p, m in parts.items() for k, v in m.state_dict().items()}

    state = snapshot()
    result = tune_tcve(sd, model, clip, "a ball", tune_config(steps=5, lr=1e-3, progress=False), tmp_path)
    with torch.no_grad():
        after = float(fixed(0, torch.Generator().manual_seed(5)))
    assert after < before
    trainable = set(model.trainable())
    moved = {k.removeprefix("model.") for k, v in snapshot().items() if not torch.equal(v, state[k])}
    assert moved and moved <= trainable
    assert any("conv_3d" in k for k in moved) and any("attn1.to_q" in k for k in moved)
    # the checkpoint holds the trainable tensors only, with the model's settings
    with safe_open(str(result.checkpoint), "pt") as f:
        assert set(f.keys()) == trainable
        meta = json.loads(f.metadata()["meta"])
    assert meta["method"] == "tcve" and meta["ablation"] == "none" and meta["config"]["grad_clip"] == 1.0


def test_paper_settings():
    cfg = tune_config()
    assert (cfg.steps, cfg.lr, cfg.weight_decay, cfg.grad_clip) == (100, 3e-5, 1e-2, 1.0)
    assert tune_config(steps=7, lr=None).lr == 3e-5


def test_resume_continues_the_same_run(tmp_path):
    runs = {}
    for name, plan in (("straight", [2]), ("resumed", [1, 2])):
        sd = tiny()
        model = TCVEModel.build(sd.unet)
        for steps in plan:
            tune_tcve(sd, model, rolling_ball(F, 32), "a ball", tune_config(steps=steps, lr=1e-3, progress=False),
                      tmp_path / name)
            if steps != plan[-1]:                                              # a new process: fresh model, then resume
                sd = tiny()
                model = TCVEModel.build(sd.unet)
        runs[name] = {k: v.detach().clone() for k, v in model.trainable().items()}
    for k, v in runs["straight"].items():
        torch.testing.assert_close(runs["resumed"][k], v, atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        sd = tiny()
        model = TCVEModel.build(sd.unet)
        _perturb_temporal_parts(model)
        mean, _ = encode_video(sd, rolling_ball(F, 32))
        loss_fn = diffusion_loss(model, mean, sd.encode_prompt(["a ball"]), F, sd.schedule, sd.prediction)
        with model.attached(frames=F):
            if checkpointing:
                with gradient_checkpointing(model, CHECKPOINT_GLOB) as wrapped:
                    assert len(wrapped) == 11                                  # every transformer block of the tiny UNet
                    loss_fn(0, torch.Generator().manual_seed(3)).backward()
            else:
                loss_fn(0, torch.Generator().manual_seed(3)).backward()
        grads.append({n: p.grad.clone() for n, p in model.trainable().items() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


def test_tuning_needs_float32_trainables(tmp_path):
    sd = StableDiffusion.from_config("tiny", dtype=torch.bfloat16)
    model = TCVEModel.build(sd.unet)
    with pytest.raises(ValueError, match="float32"):
        tune_tcve(sd, model, rolling_ball(F, 32), "a ball", tune_config(steps=1), tmp_path)


# ---------------------------------------------------------------- ablations (Tables II-III)

@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_ablations_run_through_the_full_model(ablation):
    sd, base = tiny(), tiny()
    model = TCVEModel.build(sd.unet, ablation=ablation)
    has_tu, has_ta, has_conv = ABLATIONS[ablation]
    assert (model.branch.temporal_unet is not None) == has_tu
    assert all((s.attn_temp is not None) == has_ta and (s.conv_3d is not None) == has_conv for s in model.branch.stus)
    x, ctx = torch.randn(2 * F, 4, 8, 8), torch.randn(2 * F, 77, 32)
    with torch.no_grad():
        init = model(x, 500, ctx, frames=F)
        with processors(base.unet, "*attn1", sparse_causal), call_state(base.unet, frames=F):
            ref = base.unet(x, 500, ctx)
    # the zero-initialised 3-D conv makes a variant the identity at init; without it (no_stu, no_conv3d)
    # the temporal feature is added from the start: X_spa + λ·X_tem'(^att)
    assert ((init - ref).abs().max() <= 1e-6) == has_conv
    _perturb_temporal_parts(model)
    out = model(x, 500, ctx, frames=F)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    trainable = model.trainable()
    got = {n for n, p in trainable.items() if p.grad is not None and p.grad.any()}
    assert any(n.startswith("branch.") for n in got)
    if has_tu:
        assert any(n.startswith("branch.temporal_unet.") for n in got)        # the temporal UNet is reached


# ---------------------------------------------------------------- editing

def test_edit_runs_tcve_in_both_passes():
    sd = tiny()
    model = TCVEModel.build(sd.unet)
    _perturb_temporal_parts(model)
    calls = []
    hook = model.branch.temporal_unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    steps = 2
    out = edit_tcve(sd, model, rolling_ball(F, 32), "a red ball", "a ball", steps=steps, progress=False)
    hook.remove()
    assert out.images.shape == (F, 3, 32, 32) and torch.isfinite(out.images).all()
    # inversion: one video per call, no guidance; sampling: [uncond; cond] = two whole videos per call
    S = 8 * 8
    assert calls == [(S, 4, F)] * steps + [(2 * S, 4, F)] * steps
    assert not sd.unet._forward_hooks and not sd.unet._forward_pre_hooks


def test_untuned_edit_equals_sd_with_sparse_causal_attention():
    """The whole pipeline at initialisation: the temporal parts change nothing."""
    sd, base = tiny(), tiny()
    model = TCVEModel.build(sd.unet)
    clip = rolling_ball(F, 32)
    out = edit_tcve(sd, model, clip, "a red ball", steps=2, progress=False)
    from minivid.pipelines.sd import edit_video

    with processors(base.unet, "*attn1", sparse_causal):
        ref = edit_video(base, clip, "a red ball", "", steps=2, guidance=12.5, progress=False)
    torch.testing.assert_close(out.latents, ref.latents, atol=1e-5, rtol=1e-5)


def test_inversion_prompt_option():
    sd = tiny()
    model = TCVEModel.build(sd.unet)
    clip = rolling_ball(F, 32)
    empty = edit_tcve(sd, model, clip, "x", "a ball", steps=1, progress=False)
    source = edit_tcve(sd, model, clip, "x", "a ball", inversion_prompt="source", steps=1, progress=False)
    assert (empty.inversion.noise - source.inversion.noise).abs().max() > 1e-4
    with pytest.raises(ValueError, match="inversion_prompt"):
        edit_tcve(sd, model, clip, "x", inversion_prompt="target", steps=1)
    with pytest.raises(ValueError, match="sd.unet"):
        edit_tcve(tiny(), model, clip, "x", steps=1)


# ---------------------------------------------------------------- checkpoints of other methods and sizes

def test_load_tuned_refuses_other_methods_sizes_and_ablations(tmp_path):
    model = TCVEModel.build(tiny().unet)
    path = save_trainable(tmp_path / "tcve" / "tuned-000001.safetensors", model.trainable(), 1, meta=model.settings)
    assert resolve_checkpoint(tmp_path / "tcve") == path

    other = save_trainable(tmp_path / "ei2.safetensors", {"x": torch.zeros(1)}, 1, meta={"method": "ei2"})
    with pytest.raises(TuningError, match="'ei2', not TCVE"):
        load_tuned(model, other)
    with pytest.raises(TuningError, match="another size"):
        load_tuned(TCVEModel.build(StableDiffusion.from_config("tiny_sd2").unet), path)
    with pytest.raises(TuningError, match="ablation='none'"):
        load_tuned(TCVEModel.build(tiny().unet, ablation="no_conv3d"), path)
    bare = save_trainable(tmp_path / "bare.safetensors", {"unet.nope": torch.zeros(1)}, 1, meta=model.settings)
    with pytest.raises(TuningError, match="unknown to the model"):
        load_tuned(model, bare)
    with pytest.raises(FileNotFoundError):
        load_tuned(model, tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="no tuned"):
        resolve_checkpoint(tmp_path)
    info = load_tuned(TCVEModel.build(tiny().unet), path)
    assert info["step"] == 1 and not info["base_mismatch"]


# ---------------------------------------------------------------- command line, end to end

@pytest.fixture
def source_video(tmp_path):
    return str(write_video(tmp_path / "clip.mp4", rolling_ball(4, 32)))


def test_tune_then_edit_end_to_end(tmp_path, source_video):
    common = ["--tiny", "--video", source_video, "--frames", "4", "--size", "32"]
    tuned = tmp_path / "tuned"
    assert main(["tune", "--method", "tcve", "--prompt", "a ball", "--steps", "2", "--out", str(tuned), *common]) == 0
    record = json.loads((tuned / "record.json").read_text())["results"]
    assert record["steps"] == 2 and len(record["losses"]) == 2 and record["frames"] == 4
    assert (tuned / "tuned-000002.safetensors").is_file() and (tuned / "source_grid.png").is_file()
    # a second run in the same folder resumes after the last checkpoint
    assert main(["tune", "--method", "tcve", "--prompt", "a ball", "--steps", "3", "--out", str(tuned), *common]) == 0
    assert json.loads((tuned / "record.json").read_text())["results"]["start_step"] == 2

    edited = tmp_path / "edited"
    assert main(["edit", "--method", "tcve", "--tuned", str(tuned), "--prompt", "a red ball", "--steps", "2",
                 "--tcve-inversion-prompt", "source", "--out", str(edited), *common]) == 0
    for name in ("edited.mp4", "grid.png", "side_by_side.mp4", "record.json"):
        assert (edited / name).is_file(), name
    rec = json.loads((edited / "record.json").read_text())
    assert rec["results"]["tuned_step"] == 3 and rec["results"]["inversion_prompt"] == "a ball"
    assert rec["results"]["guidance"] == 12.5 and rec["settings"]["method"] == "tcve"


def test_edit_refuses_a_checkpoint_of_another_method(tmp_path, source_video, capsys):
    ckpt = save_trainable(tmp_path / "ei2" / "tuned-000001.safetensors", {"x": torch.zeros(1)}, 1, meta={"method": "ei2"})
    rc = main(["edit", "--method", "tcve", "--tiny", "--tuned", str(ckpt), "--video", source_video, "--frames", "4",
               "--size", "32", "--prompt", "x", "--steps", "1", "--out", str(tmp_path / "out")])
    assert rc == 1 and "not TCVE" in capsys.readouterr().err


def test_tune_refuses_half_precision(tmp_path, source_video, capsys):
    rc = main(["tune", "--method", "tcve", "--tiny", "--dtype", "bf16", "--video", source_video, "--prompt", "x",
               "--out", str(tmp_path / "t")])
    assert rc == 1 and "--autocast" in capsys.readouterr().err


def test_demo(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--method", "tcve", "--size", "32", "--frames", "3", "--steps", "2", "--out", str(out)]) == 0
    rec = json.loads((out / "record.json").read_text())
    assert "random weights" in rec["results"]["note"]
    assert rec["results"]["loss_fixed_batch_after"] < rec["results"]["loss_fixed_batch_before"]
    for name in ("source.mp4", "edited.mp4", "grid.png", "side_by_side.mp4"):
        assert (out / name).is_file(), name
