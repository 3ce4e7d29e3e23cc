"""EI²'s editing (§4.1, Fig. 2b): DDIM inversion of the source video with its prompt, then DDIM
sampling from the inverted noise with the edit prompt and classifier-free guidance 7.5 (§5).

Both passes run the tuned, inflated UNet (FFAM and STAM active; all frames as one batch under
`call_state(unet, frames=F)`) in eval mode, so STAM divides by its stored spectral norms. The loop
itself is `minivid.pipelines.sd.edit_video`.

    sd = StableDiffusion.load("weights/sd-v1-4.ckpt")
    load_tuned(sd, "outputs/tune-ei2-.../tuned-000500.safetensors")
    out = edit(sd, frames, "a bear surfing", source_prompt="a man surfing")   # out.images [F, 3, H, W]
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from minivid.attention import SPATIAL_SELF, Pattern, Processor, processors
from minivid.methods.ei2.blocks import FFAMProcessor
from minivid.methods.ei2.model import STAMBlockMixin
from minivid.pipelines.sd import Edit, edit_video

__all__ = ["edit", "DEFAULT_STEPS", "DEFAULT_GUIDANCE"]

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5


def _is_inflated(unet: torch.nn.Module) -> bool:
    return any(isinstance(m, STAMBlockMixin) or isinstance(getattr(m, "processor", None), FFAMProcessor)
               for m in unet.modules())


@torch.no_grad()
def edit(
    sd,
    frames: torch.Tensor,
    prompt: str,
    source_prompt: str = "",
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    negative_prompt: str = "",
    progress: bool = True,
    dtype: torch.dtype | None = None,
    vae_chunk: int | None = None,
    *,
    attention: Processor | None = None,
    layers: Pattern = SPATIAL_SELF,
    loop: Callable[..., Edit] = edit_video,
) -> Edit:
    """Edit frames [F, 3, H, W] in [-1, 1] with an inflated (normally tuned) `sd.unet`.

    Inversion uses `source_prompt` without guidance; sampling uses `prompt` with CFG `guidance`
    against `negative_prompt`. Returns the edited frames, their latents and the source's inversion.

    The blocks, defaulting to the paper's: `attention`, a processor installed on `layers` for both
    passes (None: the inflation's, FFAM on the spatial self-attention); `loop`, the inversion and
    sampling loop (`minivid.pipelines.sd.edit_video`'s signature).
    """
    if not _is_inflated(sd.unet):
        raise ValueError("EI² edit: the UNet is not inflated; use load_tuned(sd, checkpoint) or "
                         "tune_video(...) first")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    sd.unet.eval()
    scope = processors(sd.unet, layers, attention) if attention is not None else contextlib.nullcontext()
    with scope:
        return loop(sd, frames, prompt, source_prompt, steps, guidance, negative_prompt, progress=progress,
                    dtype=dtype, vae_chunk=vae_chunk)
