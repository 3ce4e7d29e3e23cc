"""Samplers: the VP (DDPM) schedule, DDIM sampling and inversion, classifier-free guidance, and the EDM
Euler sampler and inversion that SVD uses.

Samplers only ever see a `denoise` callable, never a UNet (kjsman style), so they are independent of the
models and easy to test:

- DDIM:  ``denoise(x, t) -> model output`` (ε or v, as `prediction` says), t a 0-d int64 tensor;
- EDM:   ``denoise(x, sigma) -> D(x, σ)``, the denoised estimate, σ a 0-d float32 tensor.
  `edm_denoiser` builds such a D from a raw network call ``F(c_in·x, c_noise)`` with SVD's
  preconditioning.

Every convention below is the one diffusers uses for Stable Diffusion (DDIMScheduler /
DDIMInverseScheduler) and for Stable Video Diffusion (EulerDiscreteScheduler); docs/samplers.md gives the
equations and the facts verified in diffusers' source. Parity with diffusers is tested step by step.
Every loop stops at the first non-finite latent with `minivid.checks.NonFiniteError` (loop, step, hint).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm import tqdm

from minivid.checks import step_done

Prediction = Literal["eps", "v"]
StepCallback = Callable[[int, Tensor, Tensor, Tensor], Optional[Tensor]]

__all__ = [
    "DDPMSchedule", "SD_SCHEDULE",
    "x0_from_eps", "eps_from_x0", "x0_from_v", "eps_from_v", "v_from_eps_x0", "split_prediction",
    "add_noise", "q_sample", "training_target",
    "ddim_timesteps", "DDIMStep", "ddim_move", "ddim_step", "ddim_sample", "ddim_invert",
    "guidance", "cfg_denoise", "frame_guidance_scale",
    "karras_sigmas", "EDMScalings", "edm_precondition", "edm_denoiser", "edm_init_noise", "euler_step",
    "euler_sample", "edm_inversion_sigmas", "edm_invert", "edm_loss_weight", "sigma_from_alpha_bar",
]


# --------------------------------------------------------------------------------------------------
# The VP schedule (DDPM betas) shared by SD 1.x / 2.x
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DDPMSchedule:
    """Discrete variance-preserving schedule: x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, t = 0 … T−1.

    `set_alpha_to_one` decides ᾱ "before t = 0", used by the last DDIM step and the first inversion step:
    SD's configuration uses False, i.e. ᾱ_0 itself (diffusers `final_alpha_cumprod`/`initial_alpha_cumprod`).
    """

    betas: Tensor  # [T] float32
    alphas_cumprod: Tensor  # [T] float32, ᾱ_t
    set_alpha_to_one: bool = False

    @classmethod
    def scaled_linear(
        cls,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
        set_alpha_to_one: bool = False,
        compute_dtype: torch.dtype = torch.float32,
    ) -> "DDPMSchedule":
        """SD's betas = linspace(√β_start, √β_end, T)². The default float32 arithmetic is diffusers'
        (bit-exact); `compute_dtype=torch.float64` is ldm's (float64, stored as float32), ≤1e-6 apart."""
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=compute_dtype) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return cls(betas.float(), alphas_cumprod.float(), set_alpha_to_one)

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def final_alpha_cumprod(self) -> Tensor:
        """ᾱ used for a timestep < 0 (0-d)."""
        return torch.tensor(1.0) if self.set_alpha_to_one else self.alphas_cumprod[0]

    def alpha_bar(self, t: Union[int, Tensor]) -> Tensor:
        """ᾱ_t as a 0-d float32 tensor; t < 0 gives `final_alpha_cumprod`."""
        t = int(t)
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def alpha_bar_like(self, t: Tensor, like: Tensor) -> Tensor:
        """ᾱ at per-sample timesteps t [B], shaped [B, 1, …] to broadcast against `like`, in like's dtype."""
        ab = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)[t.to(like.device).long()]
        return ab.reshape(-1, *([1] * (like.ndim - 1)))


SD_SCHEDULE = DDPMSchedule.scaled_linear()


# ε / v / x_0 conversions. ab = ᾱ_t (any shape broadcastable to x). α_t = √ᾱ, σ_t = √(1−ᾱ), and
# v = α_t·ε − σ_t·x_0 (Salimans & Ho). Written in diffusers' operation order so results are bit-exact.

def x0_from_eps(x: Tensor, eps: Tensor, ab: Tensor) -> Tensor:
    return (x - (1 - ab) ** 0.5 * eps) / ab**0.5


def eps_from_x0(x: Tensor, x0: Tensor, ab: Tensor) -> Tensor:
    return (x - ab**0.5 * x0) / (1 - ab) ** 0.5


def x0_from_v(x: Tensor, v: Tensor, ab: Tensor) -> Tensor:
    return ab**0.5 * x - (1 - ab) ** 0.5 * v


def eps_from_v(x: Tensor, v: Tensor, ab: Tensor) -> Tensor:
    return ab**0.5 * v + (1 - ab) ** 0.5 * x


def v_from_eps_x0(eps: Tensor, x0: Tensor, ab: Tensor) -> Tensor:
    return ab**0.5 * eps - (1 - ab) ** 0.5 * x0


def split_prediction(model_output: Tensor, x: Tensor, ab: Tensor, prediction: Prediction) -> tuple[Tensor, Tensor]:
    """(x̂_0, ε̂) from a model output that is ε or v."""
    if prediction == "eps":
        return x0_from_eps(x, model_output, ab), model_output
    if prediction == "v":
        return x0_from_v(x, model_output, ab), eps_from_v(x, model_output, ab)
    raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, schedule: DDPMSchedule = SD_SCHEDULE) -> Tensor:
    """Forward process q(x_t | x_0) at per-sample timesteps t [B] (diffusers `add_noise`)."""
    ab = schedule.alpha_bar_like(t.reshape(-1), x0)
    return ab**0.5 * x0 + (1 - ab) ** 0.5 * noise


q_sample = add_noise


def training_target(
    x0: Tensor, noise: Tensor, t: Tensor, prediction: Prediction, schedule: DDPMSchedule = SD_SCHEDULE
) -> Tensor:
    """What the UNet regresses on in an ε-MSE / v-MSE tuning loop: ε, or v = √ᾱ·ε − √(1−ᾱ)·x_0."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        return v_from_eps_x0(noise, x0, schedule.alpha_bar_like(t.reshape(-1), x0))
    raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")


# --------------------------------------------------------------------------------------------------
# DDIM (η = 0) sampling and inversion
# --------------------------------------------------------------------------------------------------

def ddim_timesteps(num_steps: int, num_train: int = 1000, offset: int = 1) -> Tensor:
    """"Leading" spacing: t_i = i·(T // n) + offset for i = n−1 … 0 (descending), e.g. 981, 961, …, 1."""
    if not 1 <= num_steps <= num_train:
        raise ValueError(f"num_steps must be in [1, {num_train}], got {num_steps}")
    return (torch.arange(num_steps - 1, -1, -1, dtype=torch.int64) * (num_train // num_steps)) + offset


class DDIMStep(NamedTuple):
    prev_sample: Tensor  # x at the new noise level
    pred_x0: Tensor  # x̂_0 predicted at the old level


def ddim_move(x: Tensor, model_output: Tensor, ab_from: Tensor, ab_to: Tensor, prediction: Prediction) -> DDIMStep:
    """Deterministic DDIM update (Song et al. eq. 12, η = 0) from level ᾱ_from to ᾱ_to:
    x' = √ᾱ_to·x̂_0 + √(1−ᾱ_to)·ε̂. The same formula runs backwards (sampling) and forwards (inversion)."""
    pred_x0, pred_eps = split_prediction(model_output, x, ab_from, prediction)
    prev = ab_to**0.5 * pred_x0 + (1 - ab_to) ** 0.5 * pred_eps
    return DDIMStep(prev, pred_x0)


def ddim_step(
    model_output: Tensor,
    t: Union[int, Tensor],
    t_prev: Union[int, Tensor],
    x: Tensor,
    schedule: DDPMSchedule = SD_SCHEDULE,
    prediction: Prediction = "eps",
) -> DDIMStep:
    """One sampling step x_t -> x_{t_prev}; t_prev < 0 means "past the end" (ᾱ = final_alpha_cumprod)."""
    return ddim_move(x, model_output, schedule.alpha_bar(t), schedule.alpha_bar(t_prev), prediction)


def _progress(n: int, progress: bool, desc: str):
    return tqdm(range(n), disable=not progress, desc=desc, leave=False)


def ddim_sample(
    denoise: Callable[[Tensor, Tensor], Tensor],
    x_T: Tensor,
    num_steps: int,
    schedule: Optional[DDPMSchedule] = None,
    prediction: Prediction = "eps",
    timesteps: Optional[Tensor] = None,
    callback: Optional[StepCallback] = None,
    progress: bool = True,
) -> Tensor:
    """DDIM sampling from x_T (unit-variance noise, or an inverted latent) down to x_0.

    denoise(x, t) returns the model output (ε or v) for the whole batch; build guidance into it
    (`cfg_denoise`). After step i, callback(i, t_i, x_new, pred_x0) may return a replacement x.
    `timesteps` overrides the leading spacing (descending; each step goes to the next entry, the last one
    past the end). Returns x_0 (latents).
    """
    schedule = schedule or SD_SCHEDULE
    ts = ddim_timesteps(num_steps, schedule.num_train_timesteps) if timesteps is None else timesteps
    x = x_T
    for i in _progress(len(ts), progress, "DDIM"):
        t = int(ts[i])
        t_prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        t_in = torch.tensor(t, dtype=torch.int64, device=x.device)
        x, pred_x0 = ddim_step(denoise(x, t_in), t, t_prev, x, schedule, prediction)
        if callback is not None:
            replaced = callback(i, t_in, x, pred_x0)
            x = x if replaced is None else replaced
        step_done("DDIM sampling", i, len(ts), x)
    return x


def ddim_invert(
    denoise: Callable[[Tensor, Tensor], Tensor],
    x_0: Tensor,
    num_steps: int,
    schedule: Optional[DDPMSchedule] = None,
    prediction: Prediction = "eps",
    eps_at: Literal["target", "source"] = "target",
    callback: Optional[StepCallback] = None,
    progress: bool = True,
    return_trajectory: bool = False,
) -> Union[Tensor, tuple[Tensor, list[Tensor]]]:
    """DDIM inversion: run the deterministic update forwards, x_0 -> x_T.

    The levels climbed are the sampling grid in reverse: x_0 is taken to sit at ᾱ "before t = 0"
    (ᾱ_0 with set_alpha_to_one=False), then t = 1, 1+r, …, 1+(n−1)r (r = T // n; 981 for n = 50), so the
    result is a valid start for `ddim_sample` with the same n.

    eps_at="target" (default) is diffusers' DDIMInverseScheduler and the Tune-A-Video / null-text
    inversion code: the step from level t−r to t uses denoise(x, t), the model evaluated at the TARGET
    timestep on the latent of the level below. eps_at="source" is the textbook variant: denoise(x, t−r)
    (t = 0 for the first step).

    callback(i, t_i, x_new, pred_x0) runs after step i (t_i = target timestep) and may return a
    replacement x. With return_trajectory the result is (x_T, [x_0, x_{t_0}, …, x_T]) — n + 1 latents;
    sampling step i (timestep ddim_timesteps(n)[i]) starts from trajectory[n − i].
    """
    if eps_at not in ("target", "source"):
        raise ValueError(f"eps_at must be 'target' or 'source', got {eps_at!r}")
    schedule = schedule or SD_SCHEDULE
    ts = ddim_timesteps(num_steps, schedule.num_train_timesteps).flip(0)  # ascending 1, 1+r, …
    r = schedule.num_train_timesteps // num_steps
    x = x_0
    trajectory = [x_0]
    for i in _progress(num_steps, progress, "DDIM inversion"):
        t = int(ts[i])
        t_src = min(t - r, schedule.num_train_timesteps - 1)
        t_model = t if eps_at == "target" else max(t_src, 0)
        t_in = torch.tensor(t_model, dtype=torch.int64, device=x.device)
        out = denoise(x, t_in)
        x, pred_x0 = ddim_move(x, out, schedule.alpha_bar(t_src), schedule.alpha_bar(t), prediction)
        if callback is not None:
            replaced = callback(i, torch.tensor(t, dtype=torch.int64, device=x.device), x, pred_x0)
            x = x if replaced is None else replaced
        step_done("DDIM inversion", i, num_steps, x)
        trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


# --------------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------------

def guidance(uncond: Tensor, cond: Tensor, scale: Union[float, Tensor], frame_dim: Optional[int] = None) -> Tensor:
    """uncond + scale·(cond − uncond). A 1-D `scale` with frame_dim set is laid along that axis
    (SVD's per-frame guidance: [F] scales, latents [B, F, C, h, w], frame_dim=1)."""
    if frame_dim is not None and isinstance(scale, Tensor) and scale.ndim == 1:
        shape = [1] * cond.ndim
        shape[frame_dim] = scale.shape[0]
        scale = scale.to(device=cond.device, dtype=cond.dtype).reshape(shape)
    return uncond + scale * (cond - uncond)


Cond = Union[Tensor, Sequence[Tensor], dict]


def _cat2(a, b):
    if isinstance(a, Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: _cat2(a[k], b[k]) for k in a}
    return type(a)(_cat2(u, c) for u, c in zip(a, b))


def cfg_denoise(
    model_fn: Callable[..., Tensor],
    x: Tensor,
    t: Tensor,
    cond: Cond,
    uncond: Cond,
    scale: Union[float, Tensor],
    frame_dim: Optional[int] = None,
) -> Tensor:
    """Classifier-free guidance with ONE batched model call on [uncond; cond] (as diffusers does).

    cond/uncond are a tensor (model_fn(x, t, c)), a tuple of tensors (model_fn(x, t, *c)) or a dict
    (model_fn(x, t, **c)); each tensor is concatenated on the batch axis. A t with a batch axis is
    repeated; a 0-d t is shared. With scale == 1 the unconditional half is skipped.
    """
    if not isinstance(scale, Tensor) and scale == 1.0:
        return _call(model_fn, x, t, cond)
    t2 = torch.cat([t, t]) if isinstance(t, Tensor) and t.ndim > 0 else t
    out = _call(model_fn, torch.cat([x, x]), t2, _cat2(uncond, cond))
    out_uncond, out_cond = out.chunk(2)
    return guidance(out_uncond, out_cond, scale, frame_dim)


def _call(model_fn, x, t, c):
    if isinstance(c, Tensor):
        return model_fn(x, t, c)
    if isinstance(c, dict):
        return model_fn(x, t, **c)
    return model_fn(x, t, *c)


def frame_guidance_scale(num_frames: int, min_scale: float = 1.0, max_scale: float = 3.0) -> Tensor:
    """SVD's frame-wise guidance: scales rising linearly over frames, [F] float32 (sgm's
    LinearPredictionGuider, diffusers' torch.linspace(min, max, F)). Use with guidance(..., frame_dim=1)."""
    return torch.linspace(min_scale, max_scale, num_frames)


# --------------------------------------------------------------------------------------------------
# EDM (Karras et al.) as SVD uses it: VE sigmas, v-parameterised network, Euler sampler
# --------------------------------------------------------------------------------------------------

def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 700.0, rho: float = 7.0) -> Tensor:
    """σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0 … n−1, then a trailing 0:
    [n + 1] float32, descending. Computed in float64 then rounded, as diffusers does."""
    if n < 2:
        raise ValueError(f"karras_sigmas needs n >= 2 steps, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


class EDMScalings(NamedTuple):
    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def edm_precondition(sigma: Tensor) -> EDMScalings:
    """SVD's preconditioning (sgm VScalingWithEDMcNoise; v-parameterisation with σ_data = 1):
    c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1), c_in = 1/√(σ²+1), c_noise = ¼·ln σ."""
    return EDMScalings(
        1.0 / (sigma**2 + 1.0),
        -sigma / (sigma**2 + 1.0) ** 0.5,
        1.0 / (sigma**2 + 1.0) ** 0.5,
        0.25 * sigma.log(),
    )


def _expand(s: Tensor, x: Tensor) -> Tensor:
    """A 0-d or [B] per-sample value shaped to broadcast against x [B, …]."""
    return s if s.ndim == 0 else s.reshape(-1, *([1] * (x.ndim - 1)))


def edm_denoiser(model_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap a raw network call model_fn(c_in·x, c_noise) -> F into D(x, σ) = c_skip·x + c_out·F.

    σ is 0-d or [B]; c_noise is passed with σ's shape (diffusers passes it to the UNet as "timestep").
    Put image conditioning and guidance inside model_fn (e.g. via `cfg_denoise`).
    """

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        c_skip, c_out, c_in, c_noise = edm_precondition(sigma)
        out = model_fn(x * _expand(c_in, x), c_noise)
        return out * _expand(c_out, x) + x * _expand(c_skip, x)

    return denoise


def edm_init_noise(noise: Tensor, sigmas: Tensor) -> Tensor:
    """Starting latent for sampling: noise·√(σ_0² + 1). Both sgm (EulerEDMSampler.prepare_sampling_loop)
    and diffusers (init_noise_sigma with "leading" spacing) scale by √(σ_max²+1), not by σ_max."""
    return noise * (sigmas[0].to(noise.device) ** 2 + 1) ** 0.5


def euler_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """Euler step of the probability-flow ODE dx/dσ = (x − D)/σ, computed in float32."""
    x32 = x.float()
    derivative = (x32 - denoised.float()) / sigma
    return (x32 + derivative * (sigma_next - sigma)).to(x.dtype)


def euler_sample(
    denoise: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    callback: Optional[StepCallback] = None,
    progress: bool = True,
) -> Tensor:
    """Deterministic EDM Euler sampling (sgm EulerEDMSampler / diffusers EulerDiscreteScheduler, no churn).

    x is the latent at sigmas[0] (use `edm_init_noise` for fresh noise, or an `edm_invert` result);
    sigmas descending, ending in 0 (`karras_sigmas`). denoise(x, σ) -> D(x, σ). After step i,
    callback(i, σ_i, x_new, denoised) may return a replacement x.
    """
    sigmas = sigmas.to(device=x.device, dtype=torch.float32)
    for i in _progress(len(sigmas) - 1, progress, "Euler"):
        denoised = denoise(x, sigmas[i])
        x = euler_step(x, denoised, sigmas[i], sigmas[i + 1])
        if callback is not None:
            replaced = callback(i, sigmas[i], x, denoised)
            x = x if replaced is None else replaced
        step_done("Euler sampling", i, len(sigmas) - 1, x)
    return x


def edm_inversion_sigmas(sigmas: Tensor, sigma_start: Optional[float] = None) -> Tensor:
    """Ascending noise levels for inversion: the sampling sigmas reversed with the trailing 0 replaced by
    a start level (the clean latent cannot sit at σ = 0, where the ODE derivative is undefined).
    Default start σ_{n−1}²/σ_{n−2}, one geometric step below σ_min — I2VEdit's choice."""
    levels = sigmas[:-1] if float(sigmas[-1]) == 0.0 else sigmas
    if sigma_start is None:
        start = levels[-1] * levels[-1] / levels[-2]
    else:
        start = torch.tensor(float(sigma_start), dtype=levels.dtype)
    return torch.cat([start.reshape(1), levels.flip(0)])


def edm_invert(
    denoise: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    sigmas: Tensor,
    callback: Optional[StepCallback] = None,
    progress: bool = True,
    return_trajectory: bool = False,
    sigma_start: Optional[float] = None,
) -> Union[Tensor, tuple[Tensor, list[Tensor]]]:
    """EDM Euler inversion (I2VEdit): Euler steps of the same ODE in reverse, from the smallest σ up to
    σ_max, evaluating D at the CURRENT (lower) level; run it without guidance.

    sigmas are the sampling sigmas (`karras_sigmas(n)`); the result is the latent at sigmas[0] in the
    sampler's own units, directly usable as `euler_sample`'s x (I2VEdit divides by √(σ_max²+1) only
    because diffusers' pipeline multiplies its `latents` argument by init_noise_sigma again).
    callback(i, σ_i, x_new, denoised) runs after step i. With return_trajectory: (x_T, [x0, …, x_T]).
    """
    levels = edm_inversion_sigmas(sigmas, sigma_start).to(device=x0.device, dtype=torch.float32)
    x = x0
    trajectory = [x0]
    for i in _progress(len(levels) - 1, progress, "Euler inversion"):
        denoised = denoise(x, levels[i])
        x = euler_step(x, denoised, levels[i], levels[i + 1])
        if callback is not None:
            replaced = callback(i, levels[i], x, denoised)
            x = x if replaced is None else replaced
        step_done("Euler inversion", i, len(levels) - 1, x)
        trajectory.append(x)
    return (x, trajectory) if return_trajectory else x


def edm_loss_weight(sigma: Tensor) -> Tensor:
    """λ(σ) = (σ² + 1)/σ² — EDM weighting with σ_data = 1 (sgm VWeighting), for denoised-output MSE."""
    return (sigma**2 + 1) / sigma**2


def sigma_from_alpha_bar(ab: Tensor) -> Tensor:
    """The VE noise level of a VP level: σ = √((1 − ᾱ)/ᾱ) (x_VE = x_VP / √ᾱ)."""
    return ((1 - ab) / ab) ** 0.5

