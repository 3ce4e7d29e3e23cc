"""Smooth Area Random Perturbation (SARP, §4.2 Eq. 5) and EDM inversion of a source clip (§4.2 Eq. 6).

    x = sarp(video, generator=g)                          # noise in the smooth areas
    inv = invert_clip(svd, clip, generator=g)             # trajectory, conditioning, inverted noise

SARP (the authors' `SmoothAreaRandomDetection`): Sobel |g_x| + |g_y| of every channel of the [-1, 1]
pixels (3×3 kernels, zero padding), averaged over the channels; where that mean is ≤ 0.001 (all three
channels) add 0.005·N(0, 1); clamp to [-1, 1]. It is applied to the clip and to both conditioning copies
of frame 0 (the authors concatenate [firstframe, keyframe, video] and perturb them together).

Inversion (the authors' `euler_loop`): the clip's VAE latents (posterior SAMPLE × 0.18215, as their
`tensor_to_vae_latent`) are integrated by Euler steps of the probability-flow ODE from
σ_start = σ_min²/σ₂₃ up to σ_max, evaluating D at σ_start, σ₂₄, …, σ₁ (never at σ_max), with the
conditioning of `conditioning.inversion_condition`, no classifier-free guidance, fp32, and the motion
LoRA off. The result x_N is divided by √(σ_max² + 1) (`Inversion.noise`), because the editing pipeline
multiplies its starting latent by that again.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from minivid.attention import step_clock
from minivid.samplers import edm_denoiser, edm_inversion_sigmas, edm_invert, karras_sigmas
from minivid.svd import StableVideoDiffusion

from .conditioning import InversionCondition, inversion_condition
from .matching import MatchingController, captured_bytes

__all__ = ["SOBEL_X", "SOBEL_Y", "sobel_magnitude", "sarp_mask", "sarp", "Inversion", "inversion_denoiser",
           "invert_clip", "lora_off"]

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
SOBEL_Y = SOBEL_X.t().contiguous()


def sobel_magnitude(video: Tensor) -> Tensor:
    """[..., C, H, W] -> [..., 1, H, W]: mean over channels of |g_x| + |g_y| (per channel, zero padding)."""
    shape = video.shape
    x = video.reshape(-1, 1, *shape[-2:]).float()                    # every channel on its own
    kx = SOBEL_X.to(x.device).view(1, 1, 3, 3)
    ky = SOBEL_Y.to(x.device).view(1, 1, 3, 3)
    g = F.conv2d(x, kx, padding=1).abs() + F.conv2d(x, ky, padding=1).abs()
    return g.reshape(shape).mean(dim=-3, keepdim=True)


def sarp_mask(video: Tensor, threshold: float = 0.001) -> Tensor:
    """The smooth-area mask M_sarp, bool of video's shape (the same for the three channels)."""
    return (sobel_magnitude(video) <= threshold).expand_as(video)


def sarp(video: Tensor, noise_scale: float = 0.005, threshold: float = 0.001,
         generator: torch.Generator | None = None) -> Tensor:
    """Eq. 5: (x + α·ε)·M_sarp + x·(1 − M_sarp), then clamped to [-1, 1]. video [..., 3, H, W] in [-1, 1]."""
    mask = sarp_mask(video, threshold)
    gen_device = generator.device if generator is not None else video.device
    eps = torch.randn(video.shape, generator=generator, device=gen_device, dtype=video.dtype).to(video.device)
    return torch.where(mask, video + noise_scale * eps, video).clamp(-1, 1)


@dataclass
class Inversion:
    """What editing needs from the inversion of one clip."""

    trajectory: list[Tensor]        # [x_0 (clean), …, x_N]; x_i [1, F, 4, h, w] fp32 is the input of step i
    levels: Tensor                  # [N + 1] ascending: σ_start, σ_{N−1}, …, σ_0 = σ_max; step i at levels[i]
    cond: InversionCondition
    noise: Tensor                   # x_N / √(σ_max² + 1), the authors' `latents=` for the editing pipeline
    records: dict[int, dict[str, dict[str, Tensor]]] = field(default_factory=dict)   # "stored" mode
    kv: dict[int, dict[str, tuple[Tensor, Tensor]]] = field(default_factory=dict)    # skip-interval (clip 0)

    @property
    def steps(self) -> int:
        return len(self.levels) - 1

    @property
    def frames(self) -> int:
        return self.trajectory[0].shape[1]

    def nbytes(self) -> int:
        """What the recompute mode keeps: the trajectory and the conditioning."""
        return sum(t.numel() * t.element_size() for t in self.trajectory) + self.cond.nbytes()

    def records_nbytes(self) -> int:
        return captured_bytes(self.records)


def lora_off(lora: Any):
    """`lora.disabled()` where a motion LoRA is attached, else a no-op."""
    return lora.disabled() if lora is not None else contextlib.nullcontext()


def inversion_denoiser(svd: StableVideoDiffusion, cond: InversionCondition, frames: int) -> Callable[[Tensor, Tensor], Tensor]:
    """D(x, σ) of the inversion: EDM preconditioning, the conditioning latent concatenated on channels, batch 1."""
    latent = cond.latent(frames)

    def unet(x: Tensor, c_noise: Tensor) -> Tensor:
        return svd.unet(torch.cat([x, latent.to(x.dtype)], dim=2), c_noise, cond.image_embeds, cond.added_time_ids)

    return edm_denoiser(unet)


@torch.no_grad()
def invert_clip(
    svd: StableVideoDiffusion,
    clip: Tensor,
    steps: int = 25,
    generator: torch.Generator | None = None,
    use_sarp: bool = True,
    sarp_noise: float = 0.005,
    sarp_threshold: float = 0.001,
    controller: MatchingController | None = None,
    keep: Callable[[int], Callable[[str, str, tuple[int, int]], bool]] | None = None,
    kv_source: dict[int, dict[str, tuple[Tensor, Tensor]]] | None = None,
    record_kv: bool = False,
    lora: Any = None,
    progress: bool = True,
    sigmas: Tensor | None = None,
    perturb: Callable[..., Tensor] = sarp,
) -> Inversion:
    """Invert clip [F, 3, H, W] (in [-1, 1], at the working size). Random draws from `generator`, in the
    authors' order: SARP noise, the VAE posterior sample, the conditioning's ε.

    With a `controller` installed on the UNet the inversion runs in its "record" phase (the authors'
    arithmetic: sdpa for spatial attn1, explicit probabilities for temporal attn1); `keep(i)` is the filter
    of inversion step i (None: keep nothing, the recompute mode), kept tensors go to `Inversion.records`.
    `kv_source[i]` (skip-interval, clips k ≥ 1) are clip 0's temporal K/V at step i; `record_kv` keeps this
    clip's (clip 0) in `Inversion.kv`. `sigmas`: the editing sampler's levels ([N + 1], descending, ending
    in 0; default `karras_sigmas(steps)`), which the inversion climbs in reverse. `perturb(stack,
    noise_scale, threshold, generator)`: the perturbation of [frame 0, frame 0, clip] (default SARP, Eq. 5).
    """
    if clip.ndim != 4 or clip.shape[1] != 3:
        raise ValueError(f"invert_clip: clip must be [F, 3, H, W] in [-1, 1], got shape {tuple(clip.shape)}")
    sigmas = karras_sigmas(steps) if sigmas is None else sigmas
    if sigmas.ndim != 1 or len(sigmas) != steps + 1:
        raise ValueError(f"invert_clip: {steps} steps need {steps + 1} sigmas, got shape {tuple(sigmas.shape)}")
    dev = svd.device
    clip = clip.to(dev, torch.float32)
    Fr = clip.shape[0]
    stack = torch.cat([clip[:1], clip[:1], clip])                     # [firstframe, keyframe, video]
    if use_sarp:
        stack = perturb(stack, sarp_noise, sarp_threshold, generator)
    firstframe, keyframe, video = stack[:1], stack[1:2], stack[2:]
    vae_dtype = svd.vae.encoder.conv_in.weight.dtype
    x0 = svd.vae.encode(video.to(vae_dtype)).sample(generator).float() * svd.latent_scale     # [F, 4, h, w]
    x0 = x0[None]
    cond = inversion_condition(svd, firstframe, keyframe, generator)
    levels = edm_inversion_sigmas(sigmas).float()
    inv = Inversion([], levels, cond, x0)
    base = inversion_denoiser(svd, cond, Fr)
    count = [0]

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        i = count[0]
        count[0] += 1
        if controller is None:
            return base(x, sigma)
        controller.phase = "record"
        controller.captured = {}
        controller.keep = keep(i) if keep is not None else (lambda name, kind, hw: False)
        controller.kv_source = kv_source[i] if kv_source is not None else None
        controller.kv_record = {} if record_kv else None
        try:
            out = base(x, sigma)
        finally:
            if controller.captured:
                inv.records[i] = controller.captured
            if record_kv:
                inv.kv[i] = controller.kv_record
            controller.phase, controller.captured, controller.kv_source, controller.kv_record = "off", {}, None, None
        return out

    with lora_off(lora):
        xN, trajectory = edm_invert(step_clock(svd.unet, denoise), x0, sigmas, progress=progress, return_trajectory=True)
    inv.trajectory = trajectory
    inv.noise = xN / (sigmas[0] ** 2 + 1) ** 0.5
    return inv
