"""Stable Diffusion pipelines: text-to-image, DDIM inversion and reconstruction, for images and videos.

    out = text_to_image(sd, "a red fox in the snow", steps=50, guidance=7.5, seed=0)   # out.images, out.latents
    inv = invert(sd, images, prompt="a fox", steps=50)                                  # inv.noise, inv.trajectory
    rec = reconstruct(sd, inv, prompt="a fox")                                          # rec.images ≈ images
    inv = invert_video(sd, frames, prompt="a man surfing", steps=50)                    # frames [F, 3, H, W]
    out = edit_video(sd, frames, prompt="a bear surfing", source_prompt="a man surfing")

Every function is a thin loop over minivid.samplers (DDIM with SD's leading spacing, classifier-free
guidance as ONE batched UNet call on [uncond; cond], as diffusers does), so its latents equal
diffusers' StableDiffusionPipeline for the same initial noise. What methods hook into:

- `callback(i, t, x, pred_x0) -> x or None` after every step (replace x to steer the sampler);
- attention processors / capture / inject (minivid.attention) around any call;
- every UNet call carries `step` (the sampler step, from 0 in each loop) and `t` (its timestep) in the
  call state (`ctx.state["step"]`, `ctx.state["t"]`);
- video calls run the frames as one batch [(B·F)] inside `call_state(unet, frames=F)`, so
  processors that mix frames know F; `chunk=n` runs n frames per UNet call instead (exact only for
  frame-independent models, i.e. without such processors).

Noise is drawn in float32 on the CPU from the given generator (or `seed`) and moved, so a seed
gives the same image on every device. Latents stay float32 between steps; the UNet computes in its
own dtype, or under autocast when `dtype` differs from it. All functions run under torch.no_grad().
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from minivid.attention import call_state, step_clock
from minivid.samplers import StepCallback, cfg_denoise, ddim_invert, ddim_sample, ddim_timesteps

__all__ = [
    "Generation", "Inversion", "Edit", "text_to_image", "sample", "invert", "reconstruct",
    "invert_video", "sample_video", "reconstruct_video", "edit_video", "initial_noise", "psnr",
]

Prompt = Union[str, Sequence[str]]


class Generation(NamedTuple):
    images: Optional[Tensor]   # [B, 3, H, W] in [-1, 1], float32 (None with decode=False)
    latents: Tensor            # [B, C, h, w] scaled latents x_0, float32


class Inversion(NamedTuple):
    noise: Tensor              # x_T [B, C, h, w]: start sampling here with the same number of steps
    latents: Tensor            # x_0: the encoded input (scaled latents)
    trajectory: list[Tensor]   # [x_0, x_{t_1}, …, x_T], n + 1 latents; sampling step i starts from trajectory[n − i]
    timesteps: Tensor          # the n timesteps climbed, ascending (1, 1 + r, …)


class Edit(NamedTuple):
    images: Optional[Tensor]   # edited frames [F, 3, H, W]
    latents: Tensor            # edited latents [F, C, h, w]
    inversion: Inversion       # the source's inversion (with the source prompt)


# ---------------------------------------------------------------- helpers

def _prompts(prompt: Prompt, n: int | None = None, what: str = "prompt") -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if n is not None and len(prompts) == 1:
        prompts = prompts * n
    if n is not None and len(prompts) != n:
        raise ValueError(f"{what}: {len(prompts)} prompts for a batch of {n}")
    return prompts


def _compute(sd, dtype: torch.dtype | None):
    """Autocast when a compute dtype other than the model's is asked for."""
    if dtype is None or dtype == sd.dtype:
        return contextlib.nullcontext()
    return torch.autocast(device_type=sd.device.type, dtype=dtype)


def _generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator | None:
    if generator is not None and seed is not None:
        raise ValueError("give a generator or a seed, not both")
    return torch.Generator().manual_seed(seed) if seed is not None else generator


def initial_noise(sd, batch: int, height: int, width: int, generator: torch.Generator | None = None,
                  seed: int | None = None) -> Tensor:
    """Unit Gaussian latents [batch, C, height/f, width/f] in float32, drawn on the generator's device
    (the CPU for a seed) and moved to the model's device."""
    f = sd.config.downsample_factor
    if height % f or width % f or height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive multiples of {f} (the VAE's downsampling), "
                         f"got {height}x{width}")
    generator = _generator(generator, seed)
    shape = (batch, sd.config.vae.embed_dim, height // f, width // f)
    where = generator.device if generator is not None else "cpu"
    return torch.randn(shape, generator=generator, device=where, dtype=torch.float32).to(sd.device)


def _denoiser(sd, cond: Tensor, uncond: Tensor, guidance: float, chunk: int | None = None,
              frames: int | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """denoise(x, t) -> UNet output with classifier-free guidance, in float32.

    cond/uncond [B, 77, D] match x's batch. With `chunk`, the batch runs `chunk` elements per call;
    `frames` is put in the processors' call state (per call: the frames that call sees), and every
    call carries `step` (the sampler step, from 0) and `t` (its timestep) there too (`step_clock`)."""
    def run(x: Tensor, t: Tensor, c: Tensor, u: Tensor) -> Tensor:
        state = {"frames": x.shape[0]} if frames is not None else {}
        with call_state(sd.unet, **state):
            return cfg_denoise(sd.unet, x, t, c, u, guidance).float()

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        if chunk is None or chunk >= x.shape[0]:
            return run(x, t, cond, uncond)
        pieces = [run(x[i:i + chunk], t, cond[i:i + chunk], uncond[i:i + chunk]) for i in range(0, x.shape[0], chunk)]
        return torch.cat(pieces)
    return step_clock(sd.unet, denoise)


def _contexts(sd, prompt: Prompt, negative_prompt: Prompt, batch: int, repeat: int = 1) -> tuple[Tensor, Tensor]:
    """(cond, uncond) [batch·repeat, 77, D]: each prompt repeated `repeat` times in a row (diffusers'
    num_images_per_prompt order)."""
    prompts = _prompts(prompt, batch)
    negatives = _prompts(negative_prompt, batch, "negative_prompt")
    cond = sd.encode_prompt(prompts).repeat_interleave(repeat, dim=0)
    uncond = sd.encode_prompt(negatives).repeat_interleave(repeat, dim=0)
    return cond, uncond


# ---------------------------------------------------------------- images

@torch.no_grad()
def sample(sd, noise: Tensor, prompt: Prompt = "", negative_prompt: Prompt = "", steps: int = 50,
           guidance: float = 7.5, callback: StepCallback | None = None, progress: bool = True,
           dtype: torch.dtype | None = None, chunk: int | None = None, frames: int | None = None) -> Tensor:
    """DDIM from x_T = `noise` [B, C, h, w] to x_0 (scaled latents, float32) under `prompt`."""
    cond, uncond = _contexts(sd, prompt, negative_prompt, noise.shape[0])
    denoise = _denoiser(sd, cond, uncond, guidance, chunk, frames)
    with _compute(sd, dtype):
        return ddim_sample(denoise, noise.to(sd.device, torch.float32), steps, sd.schedule, sd.prediction,
                           callback=callback, progress=progress)


@torch.no_grad()
def text_to_image(sd, prompt: Prompt, negative_prompt: Prompt = "", steps: int = 50, guidance: float = 7.5,
                  height: int | None = None, width: int | None = None, num_images: int = 1,
                  generator: torch.Generator | None = None, seed: int | None = None, latents: Tensor | None = None,
                  dtype: torch.dtype | None = None, callback: StepCallback | None = None, progress: bool = True,
                  decode: bool = True, decode_chunk: int | None = None) -> Generation:
    """Prompts -> images. `num_images` per prompt (in a row); `latents` [B·n, C, h, w] replaces the
    drawn noise (then height/width follow it). Returns images (if `decode`) and the final latents."""
    prompts = _prompts(prompt)
    B = len(prompts) * num_images
    if latents is None:
        height = height or sd.config.image_size
        width = width or sd.config.image_size
        latents = initial_noise(sd, B, height, width, generator, seed)
    elif latents.shape[0] != B:
        raise ValueError(f"latents: batch {latents.shape[0]}, expected {len(prompts)} prompts × {num_images} = {B}")
    cond, uncond = _contexts(sd, prompts, negative_prompt, len(prompts), num_images)
    denoise = _denoiser(sd, cond, uncond, guidance)
    with _compute(sd, dtype):
        x0 = ddim_sample(denoise, latents.to(sd.device, torch.float32), steps, sd.schedule, sd.prediction,
                         callback=callback, progress=progress)
    return Generation(sd.decode_latents(x0, decode_chunk) if decode else None, x0)


@torch.no_grad()
def invert(sd, images: Tensor | None = None, prompt: Prompt = "", steps: int = 50, guidance: float = 1.0,
           negative_prompt: Prompt = "", latents: Tensor | None = None, callback: StepCallback | None = None,
           progress: bool = True, dtype: torch.dtype | None = None, chunk: int | None = None,
           frames: int | None = None, vae_chunk: int | None = None) -> Inversion:
    """DDIM inversion of images [B, 3, H, W] in [-1, 1] (or of given scaled `latents`) to x_T.

    The VAE posterior mean is inverted. guidance 1 (default) inverts with the conditional model alone,
    as DDIM inversion is usually run; other values use classifier-free guidance against
    `negative_prompt`. The ε of each step is the model's at the TARGET timestep (diffusers'
    DDIMInverseScheduler); see minivid.samplers.ddim_invert."""
    if (images is None) == (latents is None):
        raise ValueError("invert: give images or latents")
    x0 = sd.encode_images(images, chunk=vae_chunk) if latents is None else latents.to(sd.device, torch.float32)
    cond, uncond = _contexts(sd, prompt, negative_prompt, x0.shape[0])
    denoise = _denoiser(sd, cond, uncond, guidance, chunk, frames)
    with _compute(sd, dtype):
        noise, trajectory = ddim_invert(denoise, x0, steps, sd.schedule, sd.prediction, callback=callback,
                                        progress=progress, return_trajectory=True)
    return Inversion(noise, x0, trajectory, ddim_timesteps(steps, sd.schedule.num_train_timesteps).flip(0))


@torch.no_grad()
def reconstruct(sd, inversion: Inversion | Tensor, prompt: Prompt = "", steps: int | None = None,
                guidance: float = 1.0, negative_prompt: Prompt = "", callback: StepCallback | None = None,
                progress: bool = True, dtype: torch.dtype | None = None, decode: bool = True,
                chunk: int | None = None, frames: int | None = None, vae_chunk: int | None = None) -> Generation:
    """Sample back from an inversion's x_T (same prompt, steps and guidance give ≈ the input)."""
    noise = inversion.noise if isinstance(inversion, Inversion) else inversion
    if steps is None:
        if not isinstance(inversion, Inversion):
            raise ValueError("reconstruct: give steps when passing a noise tensor")
        steps = len(inversion.trajectory) - 1
    x0 = sample(sd, noise, prompt, negative_prompt, steps, guidance, callback, progress, dtype, chunk, frames)
    return Generation(sd.decode_latents(x0, vae_chunk) if decode else None, x0)


# ---------------------------------------------------------------- videos: frames as one batch

def _check_frames(frames: Tensor) -> None:
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [F, 3, H, W] in [-1, 1], got shape {tuple(frames.shape)}")


@torch.no_grad()
def invert_video(sd, frames: Tensor, prompt: str = "", steps: int = 50, guidance: float = 1.0,
                 negative_prompt: str = "", chunk: int | None = None, vae_chunk: int | None = None,
                 callback: StepCallback | None = None, progress: bool = True,
                 dtype: torch.dtype | None = None) -> Inversion:
    """DDIM inversion of a clip [F, 3, H, W]: all frames in one batch under one prompt (latents [F, C, h, w])."""
    _check_frames(frames)
    return invert(sd, frames, prompt, steps, guidance, negative_prompt, callback=callback, progress=progress,
                  dtype=dtype, chunk=chunk, frames=frames.shape[0], vae_chunk=vae_chunk)


@torch.no_grad()
def sample_video(sd, noise: Tensor, prompt: str, negative_prompt: str = "", steps: int = 50, guidance: float = 7.5,
                 chunk: int | None = None, vae_chunk: int | None = None, callback: StepCallback | None = None,
                 progress: bool = True, dtype: torch.dtype | None = None, decode: bool = True) -> Generation:
    """DDIM from per-frame noise [F, C, h, w] (e.g. an inversion) under one prompt -> frames [F, 3, H, W]."""
    x0 = sample(sd, noise, prompt, negative_prompt, steps, guidance, callback, progress, dtype, chunk,
                frames=noise.shape[0])
    return Generation(sd.decode_latents(x0, vae_chunk) if decode else None, x0)


@torch.no_grad()
def reconstruct_video(sd, inversion: Inversion, prompt: str = "", guidance: float = 1.0, **kwargs) -> Generation:
    """The inverted clip sampled back with its own prompt and steps: ≈ the source frames."""
    return sample_video(sd, inversion.noise, prompt, steps=len(inversion.trajectory) - 1, guidance=guidance, **kwargs)


@torch.no_grad()
def edit_video(sd, frames: Tensor, prompt: str, source_prompt: str = "", steps: int = 50, guidance: float = 7.5,
               negative_prompt: str = "", inversion_guidance: float = 1.0, chunk: int | None = None,
               vae_chunk: int | None = None, callback: StepCallback | None = None,
               inversion_callback: StepCallback | None = None, progress: bool = True,
               dtype: torch.dtype | None = None, decode: bool = True) -> Edit:
    """Invert the clip with `source_prompt`, then sample from its x_T with `prompt` (the inversion-based
    editing loop Tune-A-Video-style methods start from). Hooks: `inversion_callback` during inversion,
    `callback` during sampling; processors set around the call see both passes."""
    inv = invert_video(sd, frames, source_prompt, steps, inversion_guidance, chunk=chunk, vae_chunk=vae_chunk,
                       callback=inversion_callback, progress=progress, dtype=dtype)
    out = sample_video(sd, inv.noise, prompt, negative_prompt, steps, guidance, chunk, vae_chunk, callback,
                       progress, dtype, decode)
    return Edit(out.images, out.latents, inv)


# ---------------------------------------------------------------- measures

def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image of [B, 3, H, W] pairs in [-1, 1] (peak = the full range)."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = ((a.float() - b.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))
