"""Feature injection (COVE Appendix A, following FLATTEN): source features saved during the DDIM
inversion replace the edit's own in the first sampling steps.

"At the first 40 timesteps, the diffusion features are saved during DDIM inversion and are further
injected during denoising." COVE names no layers; it follows FLATTEN's setup, whose code saves and
injects (diffusers names of SD 2.1-base):

- the residual branch of `up_blocks[1].resnets[0, 1]` and `up_blocks[2].resnets[0]` (the ResBlock's
  output after its second conv, before the skip is added);
- the self-attention Q and K of `up_blocks[1].attentions[1, 2]`, `up_blocks[2].attentions[0, 1, 2]`
  and `up_blocks[3].attentions[0]` (after the projections; V stays the edit's own).

In minivid's ldm names (`injection_layers`), diffusers `up_blocks[b].resnets[r]` is
`output_blocks.{3b + r}.0` and `attentions[a]` is `output_blocks.{3b + a}.1` (3 = num_res_blocks + 1):

| diffusers (FLATTEN) | ldm / minivid |
|---|---|
| up_blocks[1].resnets[0], [1] | output_blocks.3.0.out_layers, output_blocks.4.0.out_layers |
| up_blocks[2].resnets[0] | output_blocks.6.0.out_layers |
| up_blocks[1].attentions[1], [2] | output_blocks.4.1.transformer_blocks.*.attn1, output_blocks.5.1.… |
| up_blocks[2].attentions[0..2] | output_blocks.6.1.…, 7.1.…, 8.1.… |
| up_blocks[3].attentions[0] | output_blocks.9.1.transformer_blocks.*.attn1 |

FLATTEN's block indices refer to SD's four decoder levels; for a UNet with another number of levels
they count from the finest level (up block b becomes b + levels − 4), and sites that do not exist
there (a tiny test UNet has fewer levels and no attention on its coarsest one) are left out.

Which inversion step feeds which sampling step (`match_timesteps`): by the timestep the UNet was
called with, as FLATTEN does (`if t in timesteps`). minivid's inversion calls the UNet at the target
timestep of each step (1, 11, …, 991 for 100 steps); 50-step sampling calls it at 981, 961, …, 1,
all of which the 100-step inversion visits, so the match is exact. For step counts where a sampling
timestep is not visited, the nearest inversion timestep is used (ties: the lower one).

Memory: only the matched steps are kept (40 of the 100 inversion steps by default), each tensor moved
to `device` and cast to `dtype` as it is saved (default: CPU, float16). `FeatureBank.nbytes` reports
what is held. At SD 2.1 size, 512 px, per frame and kept step: Q+K 7.9 M values, resnet branches
1.3 M, i.e. 18 MB in float16; 10 frames × 40 steps ≈ 7.3 GB.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn

from minivid.attention import AttnContext, Processor, attention_layers, replace_outputs, wrap_processors
from minivid.samplers import ddim_timesteps

__all__ = ["FLATTEN_RESNETS", "FLATTEN_ATTENTIONS", "injection_layers", "match_timesteps", "FeatureBank"]

FLATTEN_RESNETS = ((1, 0), (1, 1), (2, 0))                                  # (up block, resnet) in diffusers
FLATTEN_ATTENTIONS = ((1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0))       # (up block, attention) in diffusers


def injection_layers(unet: nn.Module) -> tuple[list[str], list[str]]:
    """FLATTEN's injection sites in `unet`'s ldm names: (residual branches of ResBlocks, self-attention layers)."""
    cfg = unet.cfg
    per_level, shift = cfg.num_res_blocks + 1, len(cfg.channel_mult) - 4
    names = {n for n, _ in unet.named_modules()}
    resnets = []
    for b, r in FLATTEN_RESNETS:
        name = f"output_blocks.{(b + shift) * per_level + r}.0.out_layers"
        if b + shift >= 0 and name in names:
            resnets.append(name)
    attentions = []
    for b, a in FLATTEN_ATTENTIONS:
        if b + shift < 0:
            continue
        prefix = f"output_blocks.{(b + shift) * per_level + a}.1.transformer_blocks."
        attentions += sorted(attention_layers(unet, prefix + "*.attn1"))
    return resnets, attentions


def match_timesteps(inversion_steps: int, steps: int, inject_steps: int, num_train: int = 1000) -> dict[int, int]:
    """{sampling timestep: inversion timestep whose features it receives} for the first `inject_steps`
    sampling steps. Inversion calls the UNet at ddim_timesteps(inversion_steps); exact matches where
    they exist, else the nearest (ties: lower)."""
    if not 0 <= inject_steps <= steps:
        raise ValueError(f"inject_steps must be in [0, {steps}], got {inject_steps}")
    visited = ddim_timesteps(inversion_steps, num_train).tolist()
    out = {}
    for t in ddim_timesteps(steps, num_train)[:inject_steps].tolist():
        out[t] = min(visited, key=lambda s: (abs(s - t), s))
    return out


class FeatureBank:
    """Source features saved during inversion and injected during sampling, keyed by timestep.

    The pipeline sets `bank.t` (the timestep of the UNet call in progress, `bank.at(t)`) around
    every UNet call; `recording(unet)` saves at the inversion timesteps that `schedule`
    (`match_timesteps`) names, `injecting(unet)` replaces at the sampling timesteps it names.
    Saved tensors have the recording batch (the F frames); an injecting call whose batch is a
    multiple of it (classifier-free guidance runs [uncond; cond] = 2F) gets them repeated.
    """

    def __init__(self, resnets: list[str], attentions: list[str], schedule: dict[int, int],
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = torch.float16):
        self.resnets, self.attentions = list(resnets), list(attentions)
        self.schedule = dict(schedule)
        self.wanted = set(self.schedule.values())
        self.device, self.dtype = torch.device(device), dtype
        self.features: dict[int, dict[str, torch.Tensor]] = {}                  # t -> resnet name -> [F, C, h, w]
        self.qk: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}   # t -> attn name -> ([F, h, N, d],) * 2
        self.t: int | None = None
        self.injected = 0                                                      # tensors injected so far

    # ------------------------------------------------------------ the clock

    @contextlib.contextmanager
    def at(self, t: int) -> Iterator[None]:
        """Mark the UNet call that runs inside as the call at timestep `t`."""
        saved, self.t = self.t, int(t)
        try:
            yield
        finally:
            self.t = saved

    def _store(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach().to(self.device, self.dtype or x.dtype)

    @property
    def nbytes(self) -> int:
        tensors = [x for d in self.features.values() for x in d.values()]
        tensors += [x for d in self.qk.values() for pair in d.values() for x in pair]
        return sum(x.numel() * x.element_size() for x in tensors)

    @property
    def steps(self) -> list[int]:
        """The inversion timesteps saved so far, ascending."""
        return sorted(set(self.features) | set(self.qk))

    # ------------------------------------------------------------ recording (inversion)

    @contextlib.contextmanager
    def recording(self, unet: nn.Module) -> Iterator["FeatureBank"]:
        """Save the injection sites' features at the wanted inversion timesteps."""
        def keep(name: str, out: torch.Tensor) -> None:
            if self.t in self.wanted:
                self.features.setdefault(self.t, {})[name] = self._store(out)

        def wrap(inner: Processor) -> Processor:
            def record(q, k, v, ctx: AttnContext):
                if self.t in self.wanted:
                    self.qk.setdefault(self.t, {})[ctx.name] = (self._store(q), self._store(k))
                return inner(q, k, v, ctx)
            return record

        with contextlib.ExitStack() as stack:
            for name in self.resnets:
                stack.enter_context(replace_outputs(unet, name, keep))
            stack.enter_context(wrap_processors(unet, self.attentions, wrap))
            yield self

    # ------------------------------------------------------------ injection (sampling)

    def _saved(self, table: dict, name: str):
        source = self.schedule.get(self.t)
        if source is None:
            return None
        if source not in table or name not in table[source]:
            raise RuntimeError(f"FeatureBank: nothing saved for {name} at inversion timestep {source} "
                               f"(sampling timestep {self.t}); was the inversion recorded with this schedule?")
        return table[source][name]

    @staticmethod
    def _fit(saved: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.shape[0] % saved.shape[0] or like.shape[1:] != saved.shape[1:]:
            raise ValueError(f"FeatureBank: saved {tuple(saved.shape)} does not fit the call's {tuple(like.shape)}")
        saved = saved.to(like.device, like.dtype)
        return saved.repeat(like.shape[0] // saved.shape[0], *([1] * (saved.dim() - 1)))

    @contextlib.contextmanager
    def injecting(self, unet: nn.Module) -> Iterator["FeatureBank"]:
        """Replace the injection sites' features by the saved ones at the scheduled sampling timesteps."""
        def replace(name: str, out: torch.Tensor) -> torch.Tensor | None:
            saved = self._saved(self.features, name)
            if saved is None:
                return None
            self.injected += 1
            return self._fit(saved, out)

        def wrap(inner: Processor) -> Processor:
            def inject(q, k, v, ctx: AttnContext):
                saved = self._saved(self.qk, ctx.name)
                if saved is not None:
                    q, k = self._fit(saved[0], q), self._fit(saved[1], k)
                    self.injected += 2
                return inner(q, k, v, ctx)
            return inject

        with contextlib.ExitStack() as stack:
            for name in self.resnets:
                stack.enter_context(replace_outputs(unet, name, replace))
            stack.enter_context(wrap_processors(unet, self.attentions, wrap))
            yield self
