"""Samplers: step-by-step parity with diffusers' DDIMScheduler / DDIMInverseScheduler (SD configuration)
and EulerDiscreteScheduler (SVD configuration), plus the defining properties of each piece."""
import copy

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, EulerDiscreteScheduler

from minivid import samplers as S

# SD 1.x / 2.x scheduler_config.json (DDIM with these settings is what SD pipelines build).
SD_DDIM = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
)
# stabilityai/stable-video-diffusion-img2vid(-xt) scheduler/scheduler_config.json (see docs/samplers.md).
SVD_EULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
    num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
    steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
)
PRED = {"eps": "epsilon", "v": "v_prediction"}


def fake_unet(x, t):
    """A fixed, deterministic, nonlinear stand-in for a UNet: depends on x and on the timestep."""
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.tanh(0.7 * x + t / 500.0) + 0.3 * torch.sin(1.3 * x - t / 97.0)


def fake_v_net(x_in, c_noise):
    return torch.tanh(0.8 * x_in + 0.3 * c_noise) + 0.2 * torch.sin(2.0 * x_in - c_noise)


def max_err(a_list, b_list):
    assert len(a_list) == len(b_list)
    return max((a - b).abs().max().item() for a, b in zip(a_list, b_list))


def max_rel_err(ref_list, b_list):
    """max over steps of max|a − b| / max|a| (the latents grow to ~700·noise at σ_max)."""
    assert len(ref_list) == len(b_list)
    return max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(ref_list, b_list))


# ---------------------------------------------------------------------------------------- schedule

def test_schedule_matches_diffusers_exactly():
    ref = DDIMScheduler(**SD_DDIM)
    assert torch.equal(S.SD_SCHEDULE.betas, ref.betas)
    assert torch.equal(S.SD_SCHEDULE.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(S.SD_SCHEDULE.final_alpha_cumprod, ref.final_alpha_cumprod)
    # ldm computes the same schedule in float64, diffusers in float32: ᾱ_t is a product of t float32
    # factors, each multiplication rounding by ≤ u = 2⁻²⁴, so the float32 product is within γ_t ≈ t·u
    # relative of the float64 one (1000·u = 6e-5 at t = 1000; measured 9.5e-7, so the bound is not tight,
    # but a fixed 1e-6 was within 5 % of what this CPU gives)
    ldm = S.DDPMSchedule.scaled_linear(compute_dtype=torch.float64)
    u = torch.finfo(torch.float32).eps / 2
    gamma = torch.arange(1, 1001, dtype=torch.float64) * u * 1.01                # γ_t, + the rounding of β
    assert ((ldm.alphas_cumprod.double() - ref.alphas_cumprod.double()).abs() <= gamma * ref.alphas_cumprod).all()
    assert not torch.equal(ldm.alphas_cumprod, ref.alphas_cumprod)
    assert float(S.DDPMSchedule.scaled_linear(set_alpha_to_one=True).alpha_bar(-1)) == 1.0


@pytest.mark.parametrize("n", [1, 7, 10, 50, 100, 1000])
def test_ddim_timesteps_leading(n):
    ref = DDIMScheduler(**SD_DDIM)
    ref.set_timesteps(n)
    assert torch.equal(S.ddim_timesteps(n), ref.timesteps)


def test_ddim_timesteps_rejects_bad_counts():
    for n in (0, 1001):
        with pytest.raises(ValueError, match="num_steps"):
            S.ddim_timesteps(n)


# ---------------------------------------------------------------------------------------- DDIM

@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("n", [10, 50, 100])
def test_ddim_sampling_parity(prediction, n):
    x_T = torch.randn(2, 4, 8, 8)
    ref = DDIMScheduler(prediction_type=PRED[prediction], **SD_DDIM)
    ref.set_timesteps(n)
    x, ref_x, ref_x0 = x_T.clone(), [], []
    for t in ref.timesteps:
        out = ref.step(fake_unet(x, t), t, x)
        x = out.prev_sample
        ref_x.append(x)
        ref_x0.append(out.pred_original_sample)

    got_x, got_x0, got_t = [], [], []

    def record(i, t, x, pred_x0):
        got_t.append(int(t))
        got_x.append(x)
        got_x0.append(pred_x0)

    final = S.ddim_sample(fake_unet, x_T.clone(), n, prediction=prediction, callback=record, progress=False)
    assert got_t == ref.timesteps.tolist()
    assert max_err(ref_x, got_x) <= 1e-6
    assert max_err(ref_x0, got_x0) <= 1e-6
    assert torch.equal(final, got_x[-1])


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("n", [10, 50, 100])
def test_ddim_inversion_parity(prediction, n):
    x_0 = torch.randn(2, 4, 8, 8)
    ref = DDIMInverseScheduler(prediction_type=PRED[prediction], **SD_DDIM)
    ref.set_timesteps(n)
    x, ref_x, model_ts = x_0.clone(), [], []
    for t in ref.timesteps:
        x = ref.step(fake_unet(x, t), t, x).prev_sample
        ref_x.append(x)

    def denoise(x, t):
        model_ts.append(int(t))
        return fake_unet(x, t)

    x_T, traj = S.ddim_invert(denoise, x_0.clone(), n, prediction=prediction, progress=False, return_trajectory=True)
    assert model_ts == ref.timesteps.tolist()  # ε evaluated at the target timestep: 1, 1+r, …
    assert len(traj) == n + 1 and traj[0] is not None and torch.equal(traj[0], x_0)
    assert max_err(ref_x, traj[1:]) <= 1e-6
    assert torch.equal(x_T, traj[-1])


def exact_eps_model(target, schedule=S.SD_SCHEDULE):
    """The ε a perfect model would predict if all data were the single point `target`."""

    def denoise(x, t):
        ab = schedule.alpha_bar(t)
        return S.eps_from_x0(x, target, ab)

    return denoise


def test_ddim_pred_x0_is_exact_for_a_perfect_model():
    target = torch.randn(1, 4, 8, 8)
    seen = []
    S.ddim_sample(exact_eps_model(target), torch.randn(1, 4, 8, 8), 20,
                  callback=lambda i, t, x, x0: seen.append(x0), progress=False)
    assert max_err([target] * 20, seen) < 1e-4


def test_ddim_inversion_source_variant_round_trips():
    """With ε evaluated at the latent's own level ("source") and a perfect model, inversion followed by
    sampling returns the input (the level sequence of inversion is the sampling grid reversed)."""
    target = torch.randn(1, 4, 8, 8)
    ab0 = S.SD_SCHEDULE.alpha_bar(0)
    x_start = ab0**0.5 * target + (1 - ab0) ** 0.5 * torch.randn(1, 4, 8, 8)
    model_ts = []

    def denoise(x, t):
        model_ts.append(int(t))
        return exact_eps_model(target)(x, t)

    x_T = S.ddim_invert(denoise, x_start, 25, eps_at="source", progress=False)
    assert model_ts == [0] + S.ddim_timesteps(25).flip(0).tolist()[:-1]
    back = S.ddim_sample(exact_eps_model(target), x_T, 25, progress=False)
    assert (back - x_start).abs().max() < 1e-4
    with pytest.raises(ValueError, match="eps_at"):
        S.ddim_invert(denoise, x_start, 5, eps_at="middle", progress=False)


def test_ddim_callback_can_replace_latents():
    def force_zero(i, t, x, x0):
        return torch.zeros_like(x) if i == 2 else None

    seen = []
    S.ddim_sample(lambda x, t: torch.ones_like(x), torch.randn(1, 4, 4, 4), 5,
                  callback=lambda i, t, x, x0: seen.append(x.clone()) or force_zero(i, t, x, x0), progress=False)
    # step 3 starts from zeros: x' = √ᾱ'·x̂0 + √(1−ᾱ')·1 with x̂0 = −√(1−ᾱ)/√ᾱ, the same everywhere.
    assert seen[3].std() == 0


# ---------------------------------------------------------------------------------------- noise, targets

@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_add_noise_and_training_target_match_diffusers(prediction):
    ref = DDIMScheduler(**SD_DDIM)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(S.add_noise(x0, noise, t), ref.add_noise(x0, noise, t))
    assert S.q_sample is S.add_noise
    want = noise if prediction == "eps" else ref.get_velocity(x0, noise, t)
    assert torch.allclose(S.training_target(x0, noise, t, prediction), want, atol=1e-6, rtol=0)


def test_prediction_conversions_are_consistent():
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ab = S.SD_SCHEDULE.alpha_bar_like(torch.tensor([100, 900]), x0)
    x = ab**0.5 * x0 + (1 - ab) ** 0.5 * eps
    v = S.v_from_eps_x0(eps, x0, ab)
    for got, want in [(S.x0_from_eps(x, eps, ab), x0), (S.eps_from_x0(x, x0, ab), eps),
                      (S.x0_from_v(x, v, ab), x0), (S.eps_from_v(x, v, ab), eps)]:
        assert torch.allclose(got, want, atol=1e-4)
    with pytest.raises(ValueError, match="prediction"):
        S.split_prediction(v, x, ab, "sample")


# ---------------------------------------------------------------------------------------- guidance

def test_cfg_one_batched_call_equals_two_calls():
    calls = []

    def model(x, t, ctx, extra=None):
        calls.append(x.shape[0])
        out = fake_unet(x, t.reshape(-1, 1, 1, 1) if t.ndim else t) * ctx.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return out if extra is None else out + extra.reshape(-1, 1, 1, 1)

    x, t = torch.randn(2, 4, 8, 8), torch.tensor(500)
    cond, uncond = torch.randn(2, 77, 16), torch.randn(2, 77, 16)
    want = S.guidance(model(x, t, uncond), model(x, t, cond), 7.5)
    calls.clear()
    got = S.cfg_denoise(model, x, t, cond, uncond, 7.5)
    assert calls == [4] and torch.allclose(got, want, atol=1e-5)

    e_c, e_u = torch.randn(2), torch.randn(2)
    want = S.guidance(model(x, t, uncond, e_u), model(x, t, cond, e_c), 3.0)
    assert torch.allclose(S.cfg_denoise(model, x, t, (cond, e_c), (uncond, e_u), 3.0), want, atol=1e-5)
    got = S.cfg_denoise(model, x, torch.tensor([500, 500]), {"ctx": cond, "extra": e_c},
                        {"ctx": uncond, "extra": e_u}, 3.0)
    assert torch.allclose(got, want, atol=1e-5)
    calls.clear()
    assert torch.allclose(S.cfg_denoise(model, x, t, cond, uncond, 1.0), model(x, t, cond))
    assert calls == [2, 2]  # scale 1: one call of batch 2 (plus the reference call)


def test_frame_guidance_matches_svd_pipeline():
    F = 14
    scale = S.frame_guidance_scale(F, 1.0, 2.5)
    assert torch.equal(scale, torch.linspace(1.0, 2.5, F))
    u, c = torch.randn(2, F, 4, 8, 8), torch.randn(2, F, 4, 8, 8)
    diffusers_scale = scale.unsqueeze(0).repeat(2, 1)[..., None, None, None]  # pipeline's _append_dims
    assert torch.equal(S.guidance(u, c, scale, frame_dim=1), u + diffusers_scale * (c - u))


# ---------------------------------------------------------------------------------------- EDM (SVD)

@pytest.mark.parametrize("n", [10, 25, 50])
def test_karras_sigmas_and_c_noise_match_svd_scheduler(n):
    ref = EulerDiscreteScheduler(**SVD_EULER)
    ref.set_timesteps(n)
    sigmas = S.karras_sigmas(n)
    assert torch.equal(sigmas, ref.sigmas)
    assert torch.equal(S.edm_precondition(sigmas[:-1]).c_noise, ref.timesteps)
    noise = torch.randn(5)
    assert torch.equal(S.edm_init_noise(noise, sigmas), noise * ref.init_noise_sigma)


@pytest.mark.parametrize("n", [10, 25, 50])
def test_euler_sampling_parity_with_svd_scheduler(n):
    noise = torch.randn(1, 3, 4, 8, 8)  # [B, F, C, h, w]
    ref = EulerDiscreteScheduler(**SVD_EULER)
    ref.set_timesteps(n)
    x, ref_x, ref_in = noise * ref.init_noise_sigma, [], []
    for t in ref.timesteps:
        x_in = ref.scale_model_input(x, t)
        ref_in.append((x_in, t))
        x = ref.step(fake_v_net(x_in, t), t, x).prev_sample
        ref_x.append(x)

    got_in, got_x = [], []

    def net(x_in, c_noise):
        got_in.append((x_in, c_noise))
        return fake_v_net(x_in, c_noise)

    sigmas = S.karras_sigmas(n)
    S.euler_sample(S.edm_denoiser(net), S.edm_init_noise(noise, sigmas), sigmas,
                   callback=lambda i, s, x, d: got_x.append(x), progress=False)
    assert max_rel_err(ref_x, got_x) <= 1e-6
    assert max_rel_err([a for a, _ in ref_in], [a for a, _ in got_in]) <= 1e-6  # scale_model_input
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ref_in, got_in))  # c_noise == "timestep"
    assert (ref_x[-1] - got_x[-1]).abs().max() <= 1e-6


def test_euler_with_frame_guidance_parity():
    """SVD pipeline: guidance on the v output with per-frame scales, then the Euler step."""
    n, F = 25, 4
    noise, image_cond = torch.randn(1, F, 4, 8, 8), torch.randn(1, F, 4, 8, 8)
    scale = S.frame_guidance_scale(F, 1.0, 3.0)

    def unet(x_in, c_noise, cond):  # cond: the image latent concatenated on channels
        return fake_v_net(x_in + 0.5 * cond, c_noise)

    ref = EulerDiscreteScheduler(**SVD_EULER)
    ref.set_timesteps(n)
    x, ref_x = noise * ref.init_noise_sigma, []
    for t in ref.timesteps:
        x_in = ref.scale_model_input(torch.cat([x] * 2), t)
        v_u, v_c = unet(x_in, t, torch.cat([torch.zeros_like(image_cond), image_cond])).chunk(2)
        v = v_u + scale.reshape(1, F, 1, 1, 1) * (v_c - v_u)
        x = ref.step(v, t, x).prev_sample
        ref_x.append(x)

    got_x = []
    model_fn = lambda x_in, c: S.cfg_denoise(unet, x_in, c, image_cond, torch.zeros_like(image_cond), scale, frame_dim=1)
    sigmas = S.karras_sigmas(n)
    S.euler_sample(S.edm_denoiser(model_fn), S.edm_init_noise(noise, sigmas), sigmas,
                   callback=lambda i, s, x, d: got_x.append(x), progress=False)
    assert max_rel_err(ref_x, got_x) <= 1e-6


def i2vedit_inversion_reference(net, x0, n):
    """The official I2VEdit Euler inversion loop (i2vedit/utils/euler_utils.py, `euler_loop`), restated on
    top of diffusers' scheduler: start one geometric step below σ_min, walk the sigmas upwards, evaluate
    the v-network at the current level."""
    sched = EulerDiscreteScheduler(**SVD_EULER)
    sched.set_timesteps(n)
    s0 = sched.sigmas[-2] * sched.sigmas[-2] / sched.sigmas[-3]
    timesteps = torch.cat([sched.timesteps[1:], torch.tensor([0.25 * s0.log()])])
    sigmas = copy.deepcopy(sched.sigmas)
    sigmas[-1] = s0
    x, out = x0.clone(), []
    for i in range(n):
        t, sigma, sigma_next = timesteps[n - i - 1], sigmas[n - i], sigmas[n - i - 1]
        v = net(x / (sigma**2 + 1) ** 0.5, t)
        pred_x0 = v * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        x = x + (sigma_next - sigma) * (x - pred_x0) / sigma
        out.append(x)
    return out


@pytest.mark.parametrize("n", [10, 25])
def test_edm_inversion_matches_i2vedit(n):
    x0 = torch.randn(1, 3, 4, 8, 8)
    ref = i2vedit_inversion_reference(fake_v_net, x0, n)
    seen_sigmas = []
    x_T, traj = S.edm_invert(S.edm_denoiser(fake_v_net), x0, S.karras_sigmas(n), progress=False,
                             return_trajectory=True, callback=lambda i, s, x, d: seen_sigmas.append(float(s)))
    assert max_rel_err(ref, traj[1:]) <= 1e-6
    levels = S.edm_inversion_sigmas(S.karras_sigmas(n))
    assert seen_sigmas == levels[:-1].tolist() and float(levels[-1]) == 700.0
    assert torch.all(levels[1:] > levels[:-1])  # strictly ascending, from below σ_min to σ_max


def test_edm_denoiser_and_loss_weight_properties():
    """A perfect v-network for a point mass x* makes D(x, σ) = x* at every σ; λ(σ)·c_out² = 1."""
    target = torch.randn(2, 4, 8, 8)
    noise = torch.randn(2, 4, 8, 8)

    def perfect_v(x_in, c_noise):
        sigma = torch.exp(4 * c_noise)
        c_skip, c_out, c_in, _ = S.edm_precondition(sigma)
        return (target - c_skip * (x_in / c_in)) / c_out

    D = S.edm_denoiser(perfect_v)
    for sigma in S.karras_sigmas(10)[:-1]:
        assert torch.allclose(D(target + sigma * noise, sigma), target, atol=1e-3 * max(1.0, float(sigma)))
    sigma = torch.tensor([0.01, 1.0, 100.0])
    assert torch.allclose(S.edm_loss_weight(sigma) * S.edm_precondition(sigma).c_out ** 2, torch.ones(3))
    with pytest.raises(ValueError, match="n >= 2"):
        S.karras_sigmas(1)
