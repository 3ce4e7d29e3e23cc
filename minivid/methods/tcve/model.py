"""The TCVE video model (§IV-B): SD 1.4's UNet made a Tune-A-Video model, with the temporal branch beside it.

    spatial branch   the frozen SD UNet applied to the frames as one batch [(B·F), 4, H, W], with
                     Tune-A-Video's sparse-causal self-attention and temporal attention
                     (minivid.methods.tuneavideo; processors and a block subclass on the unmodified UNet)
    temporal branch  the temporal UNet over frames and one STU per fusion point (stu.TemporalBranch),
                     fused into the UNet's block outputs by scoped hooks

`TCVEModel` holds both as two children, `unet` and `branch`, so that one module names every tensor
the tuning engine selects (`unet.…attn1.to_q.weight`, `branch.stus.0.conv_3d.weight`, ...) and one
checkpoint carries them. The UNet stays the caller's module (e.g. `sd.unet`): the pipelines of
minivid.pipelines.sd keep calling it, and run TCVE while `model.attached()` is open:

    model = TCVEModel.build(sd.unet)                   # inflates sd.unet in place, builds the branch
    with model.attached(frames=F):
        eps = sd.unet(z_t, t, context)                 # z_t: [(B·F), 4, H, W], whole videos, frames contiguous
    eps = model(z_t, t, context, frames=F)             # the same, as one call

At initialisation every temporal part is the identity (zero-initialised temporal-attention output
and 3-D convolutions), so the model equals the UNet with sparse-causal self-attention alone, and
for single frames it equals plain SD (tests/test_tcve_pipeline.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import torch
import torch.nn as nn

from minivid.attention import call_state
from minivid.methods import tuneavideo
from minivid.methods.tcve.stu import ABLATIONS, TemporalBranch

__all__ = ["TRAINABLE", "TCVEModel"]

# What TCVE tunes (authors' `video_editing.py`): Tune-A-Video's set on the UNet (attn1.to_q,
# attn2.to_q, attn_temp) and the whole temporal branch. Globs over TCVEModel's parameter names.
TRAINABLE = tuple(f"unet.{g}" for g in tuneavideo.TRAINABLE) + ("branch.*",)


class TCVEModel(nn.Module):
    """SD UNet (Tune-A-Video-inflated) + TCVE temporal branch: x [(B·F), 4, H, W], t, context -> [(B·F), 4, H, W]."""

    def __init__(self, unet: nn.Module, branch: TemporalBranch):
        super().__init__()
        self.unet = unet
        self.branch = branch
        self._depth = 0                                   # open `attached` contexts (hooks installed once)

    @classmethod
    def build(
        cls,
        unet: nn.Module,
        *,
        ablation: str = "none",
        sparse: bool = True,
        official_reshape: bool = False,
        zero_bias: bool = True,
        seed: int = 0,
    ) -> "TCVEModel":
        """Inflate `unet` in place (Tune-A-Video) and build the temporal branch for its config.

        ablation: a key of stu.ABLATIONS (paper Tables II–III). sparse=False keeps plain per-frame
        self-attention (not TCVE; useful to study the branch alone). official_reshape: the authors'
        up-level feature layout (see stu.TemporalBranch). zero_bias=False: the authors' initialisation
        of the temporal-attention output biases (random; the model is then not exactly SD at init).
        The branch's random initialisation is drawn from `seed`, on the UNet's device and dtype.
        """
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown TCVE ablation {ablation!r}; choose from {sorted(ABLATIONS)}")
        ref = next(unet.parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tuneavideo.inflate_for_tuneavideo(unet, sparse=sparse, zero_bias=zero_bias)
            branch = TemporalBranch.for_unet(
                unet.cfg, ablation=ablation, official_reshape=official_reshape, zero_bias=zero_bias
            )
        return cls(unet, branch.to(device=ref.device, dtype=ref.dtype))

    @property
    def settings(self) -> dict[str, Any]:
        """What a checkpoint must agree on to load into this model (stored with the tuned tensors)."""
        return {
            "method": "tcve",
            "unet": dataclasses.asdict(self.unet.cfg),
            "ablation": self.branch.ablation,
            "official_reshape": self.branch.official_reshape,
        }

    def trainable(self) -> dict[str, nn.Parameter]:
        """The tensors TCVE tunes, by name (see TRAINABLE)."""
        from minivid.tuning import select_parameters

        return select_parameters(self, list(TRAINABLE))

    @contextlib.contextmanager
    def attached(self, frames: int | None = None) -> Iterator["TCVEModel"]:
        """Scoped: every call of `self.unet` runs as TCVE (branch fused; frame count F if given).

        Re-entrant: nested blocks install the branch's hooks once; an inner `frames` overrides the
        outer for its duration. Without `frames`, F comes from an enclosing `call_state(unet, frames=F)`
        (as minivid.pipelines.sd sets it).
        """
        state = call_state(self.unet, frames=frames) if frames is not None else contextlib.nullcontext()
        with contextlib.ExitStack() as stack:
            if self._depth == 0:
                stack.enter_context(self.branch.attach(self.unet))
            self._depth += 1
            stack.callback(self._leave)
            stack.enter_context(state)
            yield self

    def _leave(self) -> None:
        self._depth -= 1

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int, context: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """One TCVE denoiser call on whole videos x [(B·F), 4, H, W] (F from `frames` or the call state)."""
        with self.attached(frames):
            return self.unet(x, t, context)
