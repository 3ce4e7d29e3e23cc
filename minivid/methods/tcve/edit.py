"""TCVE editing (§IV-A Eq. 6, §IV-C, §V-A): DDIM inversion of the source, DDIM sampling under the edit prompt.

Both passes run the TUNED video model, i.e. the SD UNet with the Tune-A-Video blocks and the temporal
branch attached, on the whole clip per call ([F] frames, [2·F] under classifier-free guidance, one
video per guidance half), as the authors' pipeline does:

    z_T = DDIM_inv(E(video), prompt = "")            50 steps, no guidance (the authors' inversion prompt)
    z_0 = DDIM_smp(z_T, p_edit, guidance 12.5)      50 steps, unconditional = the empty prompt
    edited = D(z_0)

The loops are minivid.pipelines.sd (`edit_video`): its video calls put the frame count in the call
state, which the sparse-causal attention, the temporal attention and the branch read. The source
latent inverted is the VAE posterior mean (Tune-A-Video inverts a posterior sample of its last
training batch).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Literal

import torch

from minivid.attention import SPATIAL_SELF, Pattern, Processor, processors

from minivid.methods.tcve.model import TCVEModel
from minivid.samplers import StepCallback

__all__ = ["EDIT_STEPS", "EDIT_GUIDANCE", "INVERSION_PROMPTS", "edit_tcve"]

EDIT_STEPS = 50
EDIT_GUIDANCE = 12.5
INVERSION_PROMPTS = ("empty", "source")


def edit_tcve(
    sd,
    model: TCVEModel,
    frames: torch.Tensor,
    prompt: str,
    source_prompt: str = "",
    *,
    inversion_prompt: Literal["empty", "source"] = "empty",
    steps: int = EDIT_STEPS,
    guidance: float = EDIT_GUIDANCE,
    negative_prompt: str = "",
    vae_chunk: int | None = None,
    callback: StepCallback | None = None,
    inversion_callback: StepCallback | None = None,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    attention: Processor | None = None,
    layers: Pattern = SPATIAL_SELF,
    loop: Callable | None = None,
):
    """Edit a clip [F, 3, H, W] in [-1, 1] with the (tuned) TCVE `model` built on `sd.unet`.

    inversion_prompt: "empty" inverts with the empty prompt (the authors' code), "source" with
    `source_prompt`. Returns minivid.pipelines.sd.Edit (images [F, 3, H, W], latents, the inversion).

    The blocks, defaulting to the paper's: `attention`, a processor installed on `layers` for both
    passes (None: the model's own, sparse-causal attention on the spatial self-attention); `loop`,
    the inversion and sampling loop (None: `minivid.pipelines.sd.edit_video`, whose signature it takes).
    """
    from minivid.pipelines.sd import edit_video

    loop = loop or edit_video

    if inversion_prompt not in INVERSION_PROMPTS:
        raise ValueError(f"inversion_prompt must be one of {INVERSION_PROMPTS}, got {inversion_prompt!r}")
    if model.unet is not sd.unet:
        raise ValueError("edit_tcve: the TCVE model must be built on sd.unet (TCVEModel.build(sd.unet))")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    inv_prompt = source_prompt if inversion_prompt == "source" else ""
    scope = processors(sd.unet, layers, attention) if attention is not None else contextlib.nullcontext()
    with model.attached(), scope:
        return loop(sd, frames, prompt, inv_prompt, steps, guidance, negative_prompt, vae_chunk=vae_chunk,
                          callback=callback, inversion_callback=inversion_callback, progress=progress, dtype=dtype)
