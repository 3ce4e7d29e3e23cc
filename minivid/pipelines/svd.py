"""Image-to-video with Stable Video Diffusion: condition on one image, EDM Euler sampling, temporal decoding.

    out = image_to_video(svd, image, num_frames=14, num_steps=25, generator=torch.Generator().manual_seed(0))
    out.frames      # [B, F, 3, H, W] in about [-1, 1]

The steps, in diffusers' StableVideoDiffusionPipeline order (so a seed gives the same video):

1. context = CLIP image embedding of the image; unconditional context = zeros;
2. ε_aug ~ N(0, I) (first draw of `generator`); conditioning latent = VAE mode of
   image + noise_aug_strength·ε_aug, unscaled, repeated over frames; unconditional = zeros;
3. added time ids (fps − 1, motion bucket id, noise_aug_strength) for both halves;
4. x_T = noise·√(σ_max² + 1), noise ~ N(0, I) (second draw) unless `latents` is given;
5. Euler steps over the Karras sigmas; at each step one UNet call on [uncond; cond], guidance
   with a scale rising linearly over frames from `min_guidance` to `max_guidance` (skipped
   when max_guidance ≤ 1, as diffusers does);
6. decode latents / 0.18215 with the temporal decoder (`decode_chunk_size` frames at a time).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from minivid.attention import step_clock
from minivid.samplers import (cfg_denoise, edm_denoiser, edm_init_noise, euler_sample, frame_guidance_scale,
                              karras_sigmas)
from minivid.svd import StableVideoDiffusion

__all__ = ["SVDConditioning", "SVDOutput", "condition", "video_denoiser", "image_to_video", "check_size"]


@dataclass
class SVDConditioning:
    """What the UNet is conditioned on, for B videos (the unconditional halves are zeros)."""

    image_embeds: Tensor     # [B, 1, D] CLIP image embedding
    latent: Tensor           # [B, 4, h, w] unscaled conditioning latent (noise-augmented image)
    added_time_ids: Tensor   # [B, 3] (fps − 1, motion bucket id, noise augmentation)


@dataclass
class SVDOutput:
    frames: Optional[Tensor]   # [B, F, 3, H, W] about [-1, 1] (None with decode=False)
    latents: Tensor            # [B, F, 4, h, w] final (scaled) latents


def check_size(svd: StableVideoDiffusion, height: int, width: int) -> None:
    """Sides must be positive multiples of the VAE's factor (8; the UNet takes any latent size, its
    upsamplers meet the size of the skip they are concatenated with, as in diffusers)."""
    m = svd.config.vae.downsample_factor
    if height % m or width % m or height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} is not a positive multiple of {m} (the VAE's downsampling)")


def condition(svd: StableVideoDiffusion, image: Tensor, fps: float = 7, motion_bucket_id: float = 127,
              noise_aug_strength: float = 0.02, generator: torch.Generator | None = None) -> SVDConditioning:
    """Steps 1–3: image [B, 3, H, W] in [-1, 1] -> SVDConditioning (draws ε_aug from `generator`)."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be [B, 3, H, W] in [-1, 1], got shape {tuple(image.shape)}")
    check_size(svd, *image.shape[-2:])
    image = image.to(svd.device, torch.float32)
    embeds = svd.encode_image(image)
    latent = svd.encode_condition(image, noise_aug_strength, generator)
    ids = svd.added_time_ids(fps, motion_bucket_id, noise_aug_strength, image.shape[0], svd.dtype, svd.device)
    return SVDConditioning(embeds.to(svd.dtype), latent.to(svd.dtype), ids)


def video_denoiser(svd: StableVideoDiffusion, cond: SVDConditioning, num_frames: int,
                   min_guidance: float = 1.0, max_guidance: float = 3.0) -> Callable[[Tensor, Tensor], Tensor]:
    """D(x, σ) for latents x [B, F, 4, h, w]: EDM preconditioning around the UNet, with SVD's frame-wise
    classifier-free guidance (one batched call on [uncond; cond]) unless max_guidance ≤ 1."""
    latent = cond.latent[:, None].expand(-1, num_frames, -1, -1, -1)          # [B, F, 4, h, w]

    def unet(x: Tensor, c_noise: Tensor, latent: Tensor, embeds: Tensor, ids: Tensor) -> Tensor:
        return svd.unet(torch.cat([x, latent.to(x.dtype)], dim=2), c_noise, embeds, ids)

    c = (latent, cond.image_embeds, cond.added_time_ids)
    if max_guidance <= 1.0:
        return edm_denoiser(lambda x, c_noise: unet(x, c_noise, *c))
    u = (torch.zeros_like(latent), torch.zeros_like(cond.image_embeds), cond.added_time_ids)
    scale = frame_guidance_scale(num_frames, min_guidance, max_guidance)
    return edm_denoiser(lambda x, c_noise: cfg_denoise(unet, x, c_noise, c, u, scale, frame_dim=1))


@torch.no_grad()
def image_to_video(
    svd: StableVideoDiffusion,
    image: Tensor,
    num_frames: int | None = None,
    num_steps: int = 25,
    min_guidance: float = 1.0,
    max_guidance: float = 3.0,
    fps: float = 7,
    motion_bucket_id: float = 127,
    noise_aug_strength: float = 0.02,
    decode_chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    latents: Tensor | None = None,
    callback: Callable[[int, Tensor, Tensor, Tensor], Optional[Tensor]] | None = None,
    progress: bool = True,
    decode: bool = True,
) -> SVDOutput:
    """Animate `image` [B, 3, H, W] (or [3, H, W]) in [-1, 1] into B videos of `num_frames` frames.

    num_frames defaults to the model's (14 for SVD, 25 for SVD-XT). `latents` [B, F, 4, h, w] fixes the
    initial noise (before the √(σ_max² + 1) scaling, as diffusers' `latents=`). `callback(i, σ_i, x, D)`
    runs after each Euler step (see minivid.samplers.euler_sample). Every UNet call carries `step` and
    `t` = σ of the step in its call state (`minivid.attention.step_clock`).
    """
    if image.ndim == 3:
        image = image[None]
    F = num_frames or svd.num_frames
    if F < 1:
        raise ValueError(f"num_frames must be >= 1, got {F}")
    cond = condition(svd, image, fps, motion_bucket_id, noise_aug_strength, generator)
    B, _, h, w = cond.latent.shape
    shape = (B, F, svd.config.vae.latent_channels, h, w)
    if latents is None:
        gen_device = generator.device if generator is not None else svd.device
        latents = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents must be {list(shape)}, got {list(latents.shape)}")
    sigmas = karras_sigmas(num_steps)
    x = edm_init_noise(latents.to(svd.device, torch.float32), sigmas).to(svd.dtype)
    denoise = step_clock(svd.unet, video_denoiser(svd, cond, F, min_guidance, max_guidance))   # step, t = σ
    x = euler_sample(denoise, x, sigmas, callback=callback, progress=progress)
    frames = svd.decode_latents(x, decode_chunk_size).float() if decode else None
    return SVDOutput(frames, x)
