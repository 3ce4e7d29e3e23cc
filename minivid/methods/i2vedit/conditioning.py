"""What the SVD UNet is conditioned on at each stage of I2VEdit (read from the authors' code).

    inv = inversion_condition(svd, firstframe, keyframe, generator)        # §4.2, EDM inversion: no CFG
    ed = edit_condition(svd, edited_first, generator, fps_id=4)              # §4.2, editing: CFG halves

Inversion (the authors' `init_image` / `euler_loop`):
  - both images (two SARP-perturbed copies of source frame 0) are cast to uint8 by TRUNCATION,
    ``((x + 1)/2·255).to(uint8)``, as the authors' PIL round trip does, then back to [-1, 1];
  - context = CLIP image embedding of the first copy ("firstframe");
  - ONE ε ~ N(0, I) of the image's shape; latent of slot 0 (frame 0) = VAE mode of (keyframe + 0.02·ε),
    latent of the other F − 1 frames = VAE mode of (firstframe + 0.02·ε), both unscaled;
  - added time ids (8, 127, 0.02): the fps id 8 is passed as the id itself (not fps − 1), fp32.

Editing (the authors' P2P pipeline):
  - context = CLIP of the edited first frame (clip k ≥ 1: of the previous clip's decoded last frame),
    zeros for the unconditional half;
  - latent = VAE mode of the edited frame (clip k ≥ 1: the previous clip's last latent / 0.18215, not
    re-encoded), then + 0.02·ε on the conditional half only (ε: the second of a [2, 4, h, w] draw, as the
    authors' pipeline draws one for both halves and keeps the second); zeros for the unconditional half;
  - added time ids (fps_id, 127, 0.02) with fps_id = output_fps − 1 (the pipeline subtracts 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from minivid.pipelines.svd import SVDConditioning
from minivid.svd import StableVideoDiffusion

__all__ = ["InversionCondition", "uint8_truncate", "inversion_condition", "edit_condition",
           "INVERSION_FPS_ID", "MOTION_BUCKET_ID", "NOISE_AUG"]

INVERSION_FPS_ID = 8          # euler_utils.py: _get_add_time_ids(8, 127, 0.02, ...), the id itself
MOTION_BUCKET_ID = 127
NOISE_AUG = 0.02


def uint8_truncate(image: Tensor) -> Tensor:
    """[-1, 1] -> uint8 by truncation (torch's float -> uint8 cast, as the authors' PIL conversion) -> [-1, 1]."""
    u8 = ((image.float() + 1) / 2 * 255).to(torch.uint8)
    return u8.float() / 255 * 2 - 1


@dataclass
class InversionCondition:
    """The inversion's conditioning (batch 1, no unconditional half)."""

    image_embeds: Tensor     # [1, 1, D]  CLIP of the truncated first frame
    key_latent: Tensor       # [1, 4, h, w] unscaled, from the keyframe copy: frame 0's slot
    first_latent: Tensor     # [1, 4, h, w] unscaled, from the firstframe copy: the other frames' slots
    added_time_ids: Tensor   # [1, 3] (8, 127, 0.02)

    def latent(self, frames: int) -> Tensor:
        """[1, F, 4, h, w]: the conditioning latent of every frame (the authors' `skip = 1`)."""
        return torch.cat([self.key_latent[:, None], self.first_latent[:, None].expand(-1, frames - 1, -1, -1, -1)], 1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.image_embeds, self.key_latent, self.first_latent, self.added_time_ids))


@torch.no_grad()
def inversion_condition(svd: StableVideoDiffusion, firstframe: Tensor, keyframe: Tensor,
                        generator: torch.Generator | None = None, noise_aug: float = NOISE_AUG,
                        fps_id: float = INVERSION_FPS_ID) -> InversionCondition:
    """firstframe, keyframe: [1, 3, H, W] in [-1, 1] (the two SARP copies of source frame 0)."""
    dev = svd.device
    first = uint8_truncate(firstframe).to(dev)
    key = uint8_truncate(keyframe).to(dev)
    embeds = svd.encode_image(first).float()
    gen_device = generator.device if generator is not None else dev
    eps = torch.randn(key.shape, generator=generator, device=gen_device, dtype=torch.float32).to(dev)
    key_latent = svd.encode_condition(key, noise_aug, noise=eps).float()       # VAE mode of key + 0.02·ε
    first_latent = svd.encode_condition(first, noise_aug, noise=eps).float()   # the same ε
    ids = torch.tensor([[fps_id, MOTION_BUCKET_ID, noise_aug]], dtype=torch.float32, device=dev)
    return InversionCondition(embeds, key_latent, first_latent, ids)


@torch.no_grad()
def edit_condition(svd: StableVideoDiffusion, image: Tensor, generator: torch.Generator | None = None,
                   fps_id: float = 4, previous_latent: Tensor | None = None,
                   noise_aug: float = NOISE_AUG) -> SVDConditioning:
    """The conditional half of the edit's conditioning (`minivid.pipelines.svd.video_denoiser` adds the
    zero unconditional half). image [1, 3, H, W] in [-1, 1]: the edited first frame, or for clip k ≥ 1
    the previous clip's decoded last frame; previous_latent [1, 4, h, w]: that clip's last SCALED latent."""
    dev = svd.device
    image = image.to(dev, torch.float32)
    embeds = svd.encode_image(image)
    if previous_latent is None:
        latent = svd.vae.encode(image.to(svd.vae.encoder.conv_in.weight.dtype)).mode().float()
    else:
        latent = previous_latent.to(dev, torch.float32) / svd.latent_scale
    gen_device = generator.device if generator is not None else dev
    eps = torch.randn((2, *latent.shape[1:]), generator=generator, device=gen_device, dtype=torch.float32)[1:]
    latent = latent + noise_aug * eps.to(dev)
    ids = torch.tensor([[fps_id, MOTION_BUCKET_ID, noise_aug]], dtype=svd.dtype, device=dev)
    return SVDConditioning(embeds.to(svd.dtype), latent.to(svd.dtype), ids)
