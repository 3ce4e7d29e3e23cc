"""I2VEdit motion-LoRA tuning: the σ sampler and the loss against restatements of the authors'
train.py, the conditioning, resume = uninterrupted, gradient checkpointing, loading, clips."""
from __future__ import annotations

import math

import pytest
import torch

from minivid.methods.i2vedit.lora import LoRAError, attach_motion_lora
from minivid.methods.i2vedit.clips import clip_ranges
from minivid.methods.i2vedit.tune import (
    MotionTuneConfig, default_tune_config, load_motion_lora, lora_checkpoint, logsnr_cosine_interpolated,
    motion_loss, prepare_clip, sample_sigmas, training_time_ids, tune_clips, tune_motion_lora,
)
from minivid.svd import StableVideoDiffusion
from minivid.tuning import TuningError, save_trainable

from _builders import max_err


# ---------------------------------------------------------------- restatements of the authors' code

def official_rand_cosine_interpolated(shape, image_d, noise_d_low, noise_d_high, sigma_data=1., min_value=1e-3,
                                      max_value=1e3, device="cpu", dtype=torch.float32):
    """train.py `rand_cosine_interpolated` (with k-diffusion's `stratified_uniform`), restated; global RNG."""
    def logsnr_schedule_cosine(t, logsnr_min, logsnr_max):
        t_min = math.atan(math.exp(-0.5 * logsnr_max))
        t_max = math.atan(math.exp(-0.5 * logsnr_min))
        return -2 * torch.log(torch.tan(t_min + t * (t_max - t_min)))

    def logsnr_schedule_cosine_shifted(t, image_d, noise_d, logsnr_min, logsnr_max):
        shift = 2 * math.log(noise_d / image_d)
        return logsnr_schedule_cosine(t, logsnr_min - shift, logsnr_max - shift) + shift

    def logsnr_schedule_cosine_interpolated(t, image_d, noise_d_low, noise_d_high, logsnr_min, logsnr_max):
        logsnr_low = logsnr_schedule_cosine_shifted(t, image_d, noise_d_low, logsnr_min, logsnr_max)
        logsnr_high = logsnr_schedule_cosine_shifted(t, image_d, noise_d_high, logsnr_min, logsnr_max)
        return torch.lerp(logsnr_low, logsnr_high, t)

    logsnr_min = -2 * math.log(min_value / sigma_data)
    logsnr_max = -2 * math.log(max_value / sigma_data)
    n = shape[-1]
    offsets = torch.arange(0, n, 1, dtype=dtype, device=device)
    u = (offsets + torch.rand(shape, dtype=dtype, device=device)) / n
    logsnr = logsnr_schedule_cosine_interpolated(u, image_d, noise_d_low, noise_d_high, logsnr_min, logsnr_max)
    return torch.exp(-logsnr / 2) * sigma_data, u


def official_loss(unet, latents, refer_latents, image_embeds, scaling_factor=0.18215):
    """train.py `finetune_unet` (temporal LoRA branch, cached latents, no offset noise), restated.
    latents [B, F, 4, h, w] scaled; refer_latents [B, 1, 4, h, w] scaled; global RNG."""
    noise = torch.randn_like(latents)
    noise_1 = torch.randn_like(latents)
    bsz = latents.shape[0]
    sigmas, u = official_rand_cosine_interpolated([bsz], 64, 32, 64, 0.5, 0.002, 700)
    sigmas_reshaped = sigmas.clone()
    while len(sigmas_reshaped.shape) < len(latents.shape):
        sigmas_reshaped = sigmas_reshaped.unsqueeze(-1)
    train_noise_aug = 0.02
    conditional_latents = refer_latents / scaling_factor
    small_noise_latents = conditional_latents + noise_1[:, 0:1, :, :, :] * train_noise_aug
    conditional_latents = small_noise_latents[:, 0, :, :, :]
    noisy_latents = latents + noise * sigmas_reshaped
    timesteps = torch.Tensor([0.25 * sigma.log() for sigma in sigmas])
    inp_noisy_latents = noisy_latents / ((sigmas_reshaped**2 + 1) ** 0.5)
    # _get_add_time_ids(6, motion_values=[127], train_noise_aug): [fps, noise_aug] then the motion bucket
    added_time_ids = torch.cat([torch.tensor([6, train_noise_aug], dtype=torch.float32).repeat(bsz, 1),
                                torch.tensor([127.0]).view(-1, 1)], dim=1)
    conditional_latents = conditional_latents.unsqueeze(1).repeat(1, noisy_latents.shape[1], 1, 1, 1)
    inp_noisy_latents = torch.cat([inp_noisy_latents, conditional_latents], dim=2)
    target = latents
    model_pred = unet(inp_noisy_latents, timesteps, image_embeds, added_time_ids)
    sigmas = sigmas_reshaped
    c_out = -sigmas / ((sigmas**2 + 1)**0.5)
    c_skip = 1 / (sigmas**2 + 1)
    denoised_latents = model_pred * c_out + c_skip * noisy_latents
    weighing = (1 + sigmas ** 2) * (sigmas**-2.0)
    loss = torch.mean((weighing.float() * (denoised_latents.float() - target.float()) ** 2).reshape(target.shape[0], -1),
                      dim=1)
    return loss.mean()


def randomize_lora_(lora, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))
    return lora


def tiny_svd(seed: int = 0) -> StableVideoDiffusion:
    """The tiny random SVD with its UNet's zero-initialised output layers randomised too (with them at zero
    the temporal blocks, and so the LoRA, do not reach the output)."""
    torch.manual_seed(seed)
    svd = StableVideoDiffusion.from_config("tiny")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in svd.unet.named_parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return svd


def clip(frames: int = 3, h: int = 32, w: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(frames, 3, h, w, generator=g) * 2 - 1)


def fast_cfg(**changes):
    return default_tune_config("cpu", **{"progress": False, **changes})


# ---------------------------------------------------------------- σ

@pytest.mark.parametrize("n, seed", [(1, 0), (1, 7), (4, 3)])
def test_sigma_sampler_is_bitwise_the_authors(n, seed):
    ours, u = sample_sigmas(n, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    theirs, u_theirs = official_rand_cosine_interpolated([n], 64, 32, 64, 0.5, 0.002, 700)
    assert torch.equal(u, u_theirs) and torch.equal(ours, theirs)


def test_sigma_range_ends_and_median():
    ends = torch.exp(-logsnr_cosine_interpolated(torch.tensor([0.0, 1.0], dtype=torch.float64)) / 2) * 0.5
    assert ends[0].item() == pytest.approx(700.0, rel=1e-9) and ends[1].item() == pytest.approx(0.002, rel=1e-9)
    s, _ = sample_sigmas(20000, torch.Generator().manual_seed(0))
    assert float(s.min()) >= 0.002 * (1 - 1e-5) and float(s.max()) <= 700 * (1 + 1e-5)
    # u = 1/2: both shifted schedules at their midpoint; logsnr(1/2) = lerp(low, high, 1/2)
    mid = float(torch.exp(-logsnr_cosine_interpolated(torch.tensor([0.5], dtype=torch.float64)) / 2) * 0.5)
    assert float(s.median()) == pytest.approx(mid, rel=0.05)


# ---------------------------------------------------------------- conditioning and loss

def test_conditioning_is_the_authors():
    svd = tiny_svd()
    frames = clip(4)
    data = prepare_clip(svd, frames, seed=5)
    with torch.no_grad():
        post = svd.vae.encode(frames)
        g = torch.Generator().manual_seed(5)
        z0 = (post.mean + post.std * torch.randn(post.mean.shape, generator=g)) * 0.18215
        ref = post.mean[:1] + post.std[:1] * torch.randn(post.mean[:1].shape, generator=g)
        embeds = svd.encode_image(frames[:1])
    assert max_err(data.latents[0], z0) <= 1e-6
    # the conditioning latent is the authors' round trip (ref·0.18215)/0.18215: two float32 roundings, so
    # within γ₂·|ref| = 2u/(1 − 2u)·|ref| elementwise on any CPU (a fixed 1e-6 is 1-4 ulps of the |ref| ≈ 2-8 seen)
    u = 2.0 ** -24
    assert ((data.cond_latent - ref).abs() <= 2 * u / (1 - 2 * u) * ref.abs()).all()
    assert torch.equal(data.image_embeds, embeds) and data.image_embeds.shape == (1, 1, 32)
    assert torch.equal(data.time_ids, torch.tensor([[6.0, 0.02, 127.0]]))     # the code's order
    assert torch.equal(training_time_ids(MotionTuneConfig(time_ids_order="svd")), torch.tensor([[6.0, 127.0, 0.02]]))
    with pytest.raises(ValueError, match="time_ids_order"):
        MotionTuneConfig(time_ids_order="x")


@pytest.mark.parametrize("seed", [0, 11])
def test_loss_equals_the_authors_loss(seed):
    svd = tiny_svd()
    lora = randomize_lora_(attach_motion_lora(svd.unet))            # eval: dropout off in both
    data = prepare_clip(svd, clip(3), seed=1)
    ours = motion_loss(svd, lora, data)(0, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)                                         # their draws: noise, noise_1, σ (global RNG)
    with torch.no_grad():
        theirs = official_loss(svd.unet, data.latents, (data.cond_latent * 0.18215)[:, None], data.image_embeds)
    assert abs(float(ours.detach()) - float(theirs)) <= 1e-5 * abs(float(theirs))
    assert float(ours.detach()) > 0


def test_engine_settings_are_the_authors():
    cfg = default_tune_config("cpu")
    assert (cfg.steps, cfg.lr, cfg.betas, cfg.weight_decay, cfg.eps, cfg.checkpoint_every) == \
        (300, 5e-4, (0.9, 0.999), 1e-2, 1e-8, 50)
    assert cfg.autocast is None and default_tune_config("cuda").autocast == "fp16"


# ---------------------------------------------------------------- tuning

def test_tuning_trains_only_the_lora_and_resume_equals_uninterrupted(tmp_path):
    frames = clip(3)
    svd = tiny_svd()
    unet_before = {k: v.clone() for k, v in svd.unet.state_dict().items()}
    a, res_a = tune_motion_lora(svd, frames, tmp_path / "a", cfg=fast_cfg(steps=4, checkpoint_every=2))
    assert len(res_a.losses) == 4 and all(math.isfinite(v) for v in res_a.losses)
    after = svd.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in unet_before.items())          # the base is untouched
    assert any(torch.count_nonzero(a.branch(n).lora_up.weight) for n in a.names)  # up moved off zero
    tuned_a = {k: v.clone() for k, v in a.tensors().items()}

    svd_b = tiny_svd()
    b, _ = tune_motion_lora(svd_b, frames, tmp_path / "b", cfg=fast_cfg(steps=2, checkpoint_every=2))
    b.detach()
    svd_c = tiny_svd()                       # a fresh process: a fresh LoRA, resumed from the checkpoint
    c, res_c = tune_motion_lora(svd_c, frames, tmp_path / "b", cfg=fast_cfg(steps=4, checkpoint_every=2))
    assert res_c.start_step == 2 and res_c.losses == res_a.losses[2:]
    # same per-step draws (dropout masks included) and restored AdamW moments: the same run
    assert all(max_err(c.tensors()[k], v) <= 1e-7 for k, v in tuned_a.items())


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    frames = clip(3)
    runs = []
    for gc in (False, True):
        svd = tiny_svd()
        lora, res = tune_motion_lora(svd, frames, tmp_path / f"gc{gc}", cfg=fast_cfg(steps=1),
                                     gradient_checkpointing=gc)
        runs.append((res.losses, {k: v.clone() for k, v in lora.tensors().items()}))
    assert runs[0][0] == runs[1][0]
    # dropout masks are replayed in the recomputation: equal updates up to summation order
    assert all(max_err(runs[0][1][k], v) <= 1e-6 for k, v in runs[1][1].items())


def test_load_picks_step_250_and_refuses_bad_checkpoints(tmp_path):
    svd = tiny_svd()
    lora = randomize_lora_(attach_motion_lora(svd.unet, rank=4))
    params = dict(lora.named_parameters())
    meta = {"method": "i2vedit", "i2vedit": MotionTuneConfig(rank=4).to_dict()}
    save_trainable(tmp_path / "tuned-000250.safetensors", params, 250, meta=meta)
    with torch.no_grad():
        for p in params.values():
            p.mul_(2)
    save_trainable(tmp_path / "tuned-000300.safetensors", params, 300, meta=meta)
    expected = {k: v / 2 for k, v in lora.tensors().items()}
    lora.detach()
    assert lora_checkpoint(tmp_path).name == "tuned-000250.safetensors"
    loaded, info = load_motion_lora(svd, tmp_path)
    assert info["step"] == 250 and loaded.rank == 4
    assert all(torch.equal(loaded.tensors()[k], v) for k, v in expected.items())
    loaded.detach()
    # another method's checkpoint
    other = tmp_path / "ei2"
    save_trainable(other / "tuned-000010.safetensors", params, 10, meta={"method": "ei2"})
    with pytest.raises(TuningError, match="not I2VEdit"):
        load_motion_lora(svd, other)
    # another rank (the file says 4; asked for 8) and another model
    with pytest.raises(LoRAError, match="rank 4; this one has rank 8"):
        load_motion_lora(svd, tmp_path / "tuned-000250.safetensors", rank=8)
    assert getattr(svd.unet, "_motion_lora", None) is None           # a failed load leaves no LoRA behind
    bigger = StableVideoDiffusion(__import__("dataclasses").replace(
        svd.config, unet=svd.config.unet.__class__.preset("tiny", transformer_depth=2)))
    with pytest.raises(LoRAError, match="not a motion LoRA of this model"):
        load_motion_lora(bigger, tmp_path)


def test_bad_inputs_fail_before_compute(tmp_path):
    svd = tiny_svd()
    with pytest.raises(ValueError, match="at least 2 frames"):
        tune_motion_lora(svd, clip(1), tmp_path, cfg=fast_cfg(steps=1))
    with pytest.raises(ValueError, match="multiple of"):
        tune_motion_lora(svd, clip(3, 30, 44), tmp_path, cfg=fast_cfg(steps=1))


# ---------------------------------------------------------------- clips

def test_tuning_uses_the_edits_clip_split():
    # one split for tuning and editing (clips.clip_ranges, tested in the edit's tests)
    assert clip_ranges(21, 11, 1) == [(0, 11), (10, 21)] and clip_ranges(25, 14, 1) == [(0, 14), (13, 25)]
    assert clip_ranges(22, 11, 1) == [(0, 11), (10, 21), (20, 22)]
    from minivid.methods.i2vedit import tune

    assert tune.clip_ranges is clip_ranges


def test_tune_clips_writes_one_lora_per_clip_and_leaves_the_unet_clean(tmp_path):
    svd = tiny_svd()
    out = tune_clips(svd, clip(5), tmp_path, clip_length=3, overlap=1, cfg=fast_cfg(steps=1))
    assert [r["range"] for r in out] == [[0, 3], [2, 5]]
    assert (tmp_path / "clip_0" / "tuned-000001.safetensors").is_file()
    assert (tmp_path / "clip_1" / "tuned-000001.safetensors").is_file()
    assert getattr(svd.unet, "_motion_lora", None) is None
    with pytest.raises(ValueError, match="one frame"):
        tune_clips(svd, clip(4), tmp_path / "x", clip_length=3, overlap=0, cfg=fast_cfg(steps=1))


# ---------------------------------------------------------------- the command line

def _moving_disc_video(path, frames=5, h=40, w=56):
    from minivid.video import write_video

    y = torch.linspace(-1, 1, h)[:, None].expand(h, w)
    x = torch.linspace(-1, 1, w)[None].expand(h, w)
    clip_ = [torch.stack([((x - (-0.5 + 0.2 * f)) ** 2 + y ** 2 < 0.1).float() * 2 - 1, 0.5 * x, 0.5 * y])
             for f in range(frames)]
    return write_video(path, torch.stack(clip_), fps=5)


def test_cli_tune_writes_a_lora_per_clip_and_resumes(tmp_path, capsys):
    import json

    from minivid.cli import main

    video = _moving_disc_video(tmp_path / "in.mp4")
    out = tmp_path / "job"
    argv = ["tune", "--method", "i2vedit", "--tiny", "--video", str(video), "--frames", "5", "--sample-fps", "0",
            "--i2vedit-clip-length", "3", "--i2vedit-size", "16x24", "--steps", "1", "--out", str(out)]
    assert main(argv) == 0
    rec = json.loads((out / "record.json").read_text())["results"]
    assert rec["clip_ranges"] == [[0, 3], [2, 5]] and rec["size"] == [16, 24]
    assert rec["i2vedit"]["rank"] == 32 and rec["tune"]["lr"] == 5e-4 and rec["tune"]["checkpoint_every"] == 50
    for k in (0, 1):
        assert (out / f"clip_{k}" / "tuned-000001.safetensors").is_file()
    loaded, info = load_motion_lora(tiny_svd(), out / "clip_1")
    assert info["clip"] == 1 and info["clip_range"] == [2, 5] and info["base"]["tiny_seed"] == 0
    # the same --out with more steps resumes each clip
    assert main(argv[:-4] + ["--steps", "2", "--i2vedit-clips", "1", "--out", str(out)]) == 0
    rec = json.loads((out / "record.json").read_text())["results"]
    assert [c["clip"] for c in rec["clips"]] == [1] and rec["clips"][0]["start_step"] == 1
    # the paper's reading: LoRA on the temporal attention layers only; loading follows the checkpoint
    paper = tmp_path / "paper"
    assert main(argv[:-4] + ["--steps", "1", "--i2vedit-lora-layers", "paper", "--i2vedit-clips", "0",
                             "--out", str(paper)]) == 0
    lora, _ = load_motion_lora(tiny_svd(), paper / "clip_0")
    assert lora.targets == ("attn1", "attn2") and all(".attn" in n for n in lora.names)


@pytest.mark.parametrize("extra, message", [
    (["--frames", "2"], "fewer than one clip"),
    (["--i2vedit-size", "15x24"], "multiples of"),
    (["--i2vedit-size", "big"], None),
    (["--i2vedit-clips", "7"], "clips 0..1"),
    (["--i2vedit-overlap", "3"], "overlap"),
])
def test_cli_tune_bad_inputs(tmp_path, capsys, extra, message):
    from minivid.cli import main

    video = _moving_disc_video(tmp_path / "in.mp4")
    argv = ["tune", "--method", "i2vedit", "--tiny", "--video", str(video), "--frames", "5", "--sample-fps", "0",
            "--i2vedit-clip-length", "3", "--i2vedit-size", "16x24", "--steps", "1", "--out", str(tmp_path / "o")]
    if message is None:                      # rejected by option parsing: usage error, exit 2
        assert main(argv + extra) == 2
        assert "--i2vedit-size" in capsys.readouterr().err
        return
    assert main(argv + extra) == 1
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("clip_*/tuned-*"))


def test_fp16_autocast_runs_with_loss_scaling(tmp_path):
    # the engine scales fp16 losses (GradScaler); on the CPU too, where torch autocasts fp16
    svd = tiny_svd()
    lora, res = tune_motion_lora(svd, clip(3), tmp_path, cfg=fast_cfg(steps=2, autocast="fp16"))
    assert all(math.isfinite(v) for v in res.losses)
    assert any(torch.count_nonzero(lora.branch(n).lora_up.weight) for n in lora.names)
    assert all(p.dtype == torch.float32 for p in lora.parameters())


def test_bf16_base_weights_train_an_fp32_lora(tmp_path):
    svd = tiny_svd().to(torch.bfloat16)
    lora, res = tune_motion_lora(svd, clip(3), tmp_path, cfg=fast_cfg(steps=2))
    assert all(math.isfinite(v) for v in res.losses)
    assert all(p.dtype == torch.float32 for p in lora.parameters())
    assert any(torch.count_nonzero(lora.branch(n).lora_up.weight) for n in lora.names)
