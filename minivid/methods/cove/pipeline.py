"""COVE: the editing pipeline, in the order of the paper's method section (§3.2–3.3, Appendix A, E).

    from minivid.methods.cove.pipeline import COVEConfig, edit_video
    out = edit_video(sd, frames, "a bear surfing", "a man surfing", COVEConfig())
    out.images            # edited frames [F, 3, H, W] in [-1, 1]
    out.correspondence    # Correspondence(idx [F, N, F, K], score, hw)

1. Encode the source frames with the VAE: Z = {z_i}, [F, 4, h, w].
2. Diffusion features (Eq. 4): each z_i noised to t = 261, one UNet pass, a decoder layer's output,
   L2-normalised per token (`features.diffusion_features`).
3. One-to-many correspondence (Eq. 5–10): windowed top-K between consecutive frames and chaining to
   every frame (`correspondence.correspondence`, l = 9, K = 3).
4. Correspondence-guided attention (Eq. 11–14) with temporal token merging (Eq. 12) on the
   self-attention layers (`attention.CorrespondenceGuidedAttention` on every `attn1`: CGA where the
   layer's grid is the correspondence grid, dense spatio-temporal attention as the mode says), for the
   inversion AND the sampling (Appendix E).
5. DDIM inversion, 100 steps (§4): the source latents to x_T, saving the injected features at the
   timesteps the first 40 sampling steps will use (`inject.FeatureBank`, FLATTEN's layers).
6. DDIM sampling, 50 steps, classifier-free guidance 7.5 with the edit prompt, from x_T; the first 40
   steps get the saved features (Appendix A: "at the first 40 timesteps, the diffusion features are
   saved during DDIM inversion and are further injected during denoising").
7. Decode the edited latents.

Inversion runs with the source prompt and guidance 1 (the conditional model alone, as DDIM inversion is
usually run); with an empty source prompt this is FLATTEN's inversion. The inversion has twice the steps
of the sampling, so x_T comes from a finer inversion than the sampling that starts from it, as in the
paper (and FLATTEN). Two details the paper leaves implicit (docs/cove.md, "Inversion"):
- which ε a step uses: Eq. 3 writes x_{t+1} from ε_θ(x_t), the model at the level the step starts
  from; diffusers' DDIMInverseScheduler and FLATTEN's code evaluate it at the step's TARGET timestep.
  `inversion_eps_at="target"` (default) is the latter, `"source"` is Eq. 3 (`samplers.ddim_invert`);
- the 100-step inversion climbs to t = 991 (levels 1, 11, …, 991) while the 50-step sampling starts
  at t = 981: x_T sits at ᾱ_991 and is denoised as if it were at ᾱ_981 (FLATTEN does the same). Every UNet call runs the F frames as one batch ([uncond; cond] = 2F under
guidance) inside `call_state(unet, frames=F)`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from minivid.attention import SPATIAL_SELF, Pattern, Processor, call_state, processors, step_clock
from minivid.pipelines.sd import Inversion
from minivid.samplers import cfg_denoise, ddim_invert, ddim_sample, ddim_timesteps

from .attention import MODES, CorrespondenceGuidedAttention
from .correspondence import Correspondence, correspondence
from .features import FEATURE_T, diffusion_features
from .inject import FeatureBank, injection_layers, match_timesteps

__all__ = ["COVEConfig", "COVEBlocks", "COVEResult", "edit_video", "STORE_DTYPES", "inversion_unet_timesteps",
           "injection_schedule", "cove_features", "cove_attention"]


STORE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class COVEConfig:
    """Every setting of a COVE edit; defaults are the paper's (§4, Appendix A) where it gives one."""

    # sampling (§4)
    inversion_steps: int = 100
    inversion_eps_at: str = "target"       # "target" (diffusers/FLATTEN) or "source" (Eq. 3: ε_θ(x_t))
    steps: int = 50
    guidance: float = 7.5
    negative_prompt: str = ""
    # diffusion features (Eq. 4)
    feature_t: int = FEATURE_T
    feature_layer: str = "auto"            # "auto" = output_blocks.8 on SD (see features.py)
    feature_prompt: str = "empty"          # "empty" (DIFT) or "source"
    feature_ensemble: int = 1
    # correspondence (Eq. 5-10)
    window: int = 9
    k: int = 3
    backend: str = "auto"                  # window_topk: Triton on CUDA, PyTorch elsewhere
    # correspondence-guided attention (Eq. 11-14)
    merge_ratio: float = 0.5
    mode: str = "sequential"               # see attention.py
    resolutions: str = "match"
    include_self: bool = True
    cga_in_inversion: bool = True          # Appendix E
    # feature injection (Appendix A, FLATTEN's layers)
    inject_steps: int = 40
    store_device: str = "cpu"
    store_dtype: str = "fp16"

    def __post_init__(self) -> None:
        if self.inversion_steps < 1 or self.steps < 1:
            raise ValueError("COVEConfig: inversion_steps and steps must be at least 1")
        if not 0 <= self.inject_steps <= self.steps:
            raise ValueError(f"COVEConfig: inject_steps must be in [0, steps={self.steps}], got {self.inject_steps}")
        if self.inversion_eps_at not in ("target", "source"):
            raise ValueError(f"COVEConfig: inversion_eps_at must be 'target' or 'source', got {self.inversion_eps_at!r}")
        if self.feature_prompt not in ("empty", "source"):
            raise ValueError(f"COVEConfig: feature_prompt must be 'empty' or 'source', got {self.feature_prompt!r}")
        if self.mode not in MODES:
            raise ValueError(f"COVEConfig: mode must be one of {MODES}, got {self.mode!r}")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"COVEConfig: window must be an odd integer >= 1, got {self.window}")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"COVEConfig: store_dtype must be one of {list(STORE_DTYPES)}, got {self.store_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class COVEResult(NamedTuple):
    images: Tensor | None              # edited frames [F, 3, H, W] in [-1, 1] (None with decode=False)
    latents: Tensor                    # edited latents [F, C, h, w]
    inversion: Inversion               # the source's inversion (x_T, trajectory, timesteps)
    correspondence: Correspondence     # idx/score [F, N, F, K] on the feature grid
    features: Tensor                   # diffusion features [F, h', w', D], unit vectors
    stats: dict[str, Any]              # seconds per stage, injection layers, bank memory, ...


def inversion_unet_timesteps(inversion_steps: int, eps_at: str = "target", num_train: int = 1000) -> list[int]:
    """The timesteps the inversion calls the UNet at, in order: the target levels 1, 1+r, …, 1+(n−1)r
    (r = T // n; 991 for n = 100) with eps_at="target", each step's source level (0, 1, …, 1+(n−2)r) with
    "source" (Eq. 3). Same rule as `samplers.ddim_invert`."""
    ts = ddim_timesteps(inversion_steps, num_train).flip(0).tolist()
    if eps_at == "target":
        return ts
    r = num_train // inversion_steps
    return [max(min(t - r, num_train - 1), 0) for t in ts]


def injection_schedule(cfg: COVEConfig, num_train: int = 1000) -> dict[int, int]:
    """{sampling timestep: inversion UNet-call timestep whose features it receives} for the first
    `inject_steps` sampling steps: `inject.match_timesteps` for eps_at="target"; for "source" the same
    rule (exact where visited, else nearest, ties lower) over the timesteps that inversion visits."""
    if cfg.inversion_eps_at == "target":
        return match_timesteps(cfg.inversion_steps, cfg.steps, cfg.inject_steps, num_train)
    visited = inversion_unet_timesteps(cfg.inversion_steps, "source", num_train)
    return {t: min(visited, key=lambda s: (abs(s - t), s))
            for t in ddim_timesteps(cfg.steps, num_train)[:cfg.inject_steps].tolist()}


def _denoiser(sd, cond: Tensor, uncond: Tensor, guidance: float, frames: int, bank: FeatureBank | None
              ) -> Callable[[Tensor, Tensor], Tensor]:
    """denoise(x, t): one guided UNet call on the F frames, with the call state (frames, step, t) and
    the bank's clock set."""
    def denoise(x: Tensor, t: Tensor) -> Tensor:
        clock = bank.at(int(t)) if bank is not None else contextlib.nullcontext()
        with call_state(sd.unet, frames=frames), clock:
            c, u = cond.expand(x.shape[0], -1, -1), uncond.expand(x.shape[0], -1, -1)
            return cfg_denoise(sd.unet, x, t, c, u, guidance).float()
    return step_clock(sd.unet, denoise)


# ---------------------------------------------------------------- the blocks, with the paper's defaults

def cove_features(sd, latents: Tensor, cfg: COVEConfig, source_prompt: str, generator: torch.Generator) -> Tensor:
    """The default feature pass: Eq. 4 with the config's timestep, layer, prompt and ensemble
    (`features.diffusion_features`, which runs the plain image model whatever is installed)."""
    return diffusion_features(sd, latents, t=cfg.feature_t, layer=cfg.feature_layer, generator=generator,
                              prompt=source_prompt if cfg.feature_prompt == "source" else "",
                              ensemble=cfg.feature_ensemble)


def cove_attention(corr: Correspondence, cfg: COVEConfig, dense: Processor | None = None) -> Processor:
    """The default attention of both passes: CGA (Eq. 11-14) in the config's mode, with COVE's dense
    spatio-temporal attention (or `dense`) as its frame-mixing half."""
    return CorrespondenceGuidedAttention(corr, k=cfg.k, merge_ratio=cfg.merge_ratio, mode=cfg.mode,
                                        resolutions=cfg.resolutions, include_self=cfg.include_self, dense=dense)


@dataclass(frozen=True)
class COVEBlocks:
    """The blocks `edit_video` is made of, each defaulting to the paper's, so another combination is a
    few lines of configuration:

    - `features(sd, latents [F, C, h, w], cfg, source_prompt, generator) -> [F, h', w', D]`, unit
      vectors (stage 2, Eq. 4);
    - `attention(correspondence, cfg) -> processor`, installed on `layers` (default: the spatial
      self-attention layers, `SPATIAL_SELF`) during the inversion (if `cfg.cga_in_inversion`) and the
      sampling (stages 4-6);
    - `invert` and `sample`, the sampler loops, with the signatures of `samplers.ddim_invert`
      (called with eps_at=, progress=, return_trajectory=True) and `samplers.ddim_sample` (progress=).

    CGA inside an EI²-inflated model, FFAM as its dense half:

        with inflated(sd.unet, EI2Config(r=2)):
            blocks = COVEBlocks(attention=lambda corr, cfg: cove_attention(corr, cfg, dense=FFAMProcessor(2)))
            out = edit_video(sd, frames, prompt, source_prompt, COVEConfig(), blocks=blocks)
    """

    features: Callable[..., Tensor] = cove_features
    attention: Callable[[Correspondence, COVEConfig], Processor] = cove_attention
    layers: Pattern = SPATIAL_SELF
    invert: Callable[..., Any] = ddim_invert
    sample: Callable[..., Tensor] = ddim_sample


def _autocast(sd, dtype: torch.dtype | None):
    if dtype is None or dtype == sd.dtype:
        return contextlib.nullcontext()
    return torch.autocast(device_type=sd.device.type, dtype=dtype)


@torch.no_grad()
def edit_video(
    sd,
    frames: Tensor,
    prompt: str,
    source_prompt: str = "",
    config: COVEConfig = COVEConfig(),
    *,
    seed: int = 0,
    progress: bool = True,
    dtype: torch.dtype | None = None,
    vae_chunk: int | None = None,
    decode: bool = True,
    blocks: COVEBlocks = COVEBlocks(),
) -> COVEResult:
    """Edit `frames` [F, 3, H, W] (in [-1, 1]) from `source_prompt` to `prompt` with COVE.

    `seed` fixes the noise of the feature pass (the only random draw: DDIM inversion and sampling are
    deterministic). `dtype` runs the UNet under autocast in that dtype. See the module docstring for the
    stages; `stats` in the result holds their timings and what the feature bank kept. `blocks` replaces
    the feature pass, the attention the passes install or the sampler loops (`COVEBlocks`).
    """
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] < 2:
        raise ValueError(f"COVE: frames must be [F >= 2, 3, H, W] in [-1, 1], got {tuple(frames.shape)}")
    cfg, unet, Fr = config, sd.unet, frames.shape[0]
    stats: dict[str, Any] = {"seconds": {}}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        stats["seconds"][stage] = round(now - clock, 4)
        clock = now

    # 1. the source latents Z
    z = sd.encode_images(frames, chunk=vae_chunk)                               # [F, 4, h, w]
    lap("encode")

    # 2. diffusion features, Eq. 4
    generator = torch.Generator().manual_seed(seed)
    with _autocast(sd, dtype):
        feats = blocks.features(sd, z, cfg, source_prompt, generator)       # [F, h', w', D]
    lap("features")

    # 3. correspondence, Eq. 5-10
    corr = correspondence(feats, cfg.window, cfg.k, normalize=False, backend=cfg.backend)
    lap("correspondence")
    stats["feature_grid"], stats["feature_dim"] = list(corr.hw), int(feats.shape[-1])

    # 4. correspondence-guided attention on every self-attention layer, Eq. 11-14
    cga = blocks.attention(corr, cfg)
    resnets, attentions = injection_layers(unet)
    schedule = injection_schedule(cfg, sd.schedule.num_train_timesteps)
    bank = FeatureBank(resnets, attentions, schedule, cfg.store_device, STORE_DTYPES[cfg.store_dtype])
    stats["injection"] = {"resnets": resnets, "attentions": attentions,
                          "sampling_to_inversion_timestep": {str(k): v for k, v in schedule.items()}}
    inversion_attention = processors(unet, blocks.layers, cga) if cfg.cga_in_inversion else contextlib.nullcontext()

    # 5. DDIM inversion with CGA, saving the features to inject
    source = sd.encode_prompt([source_prompt])
    invert = _denoiser(sd, source, source, 1.0, Fr, bank)
    with inversion_attention, bank.recording(unet), _autocast(sd, dtype):
        x_T, trajectory = blocks.invert(invert, z, cfg.inversion_steps, sd.schedule, sd.prediction,
                                      eps_at=cfg.inversion_eps_at, progress=progress, return_trajectory=True)
    inversion = Inversion(x_T, z, trajectory, ddim_timesteps(cfg.inversion_steps, sd.schedule.num_train_timesteps).flip(0))
    stats["bank_bytes"], stats["bank_steps"] = bank.nbytes, len(bank.steps)
    lap("inversion")

    # 6. DDIM sampling with CGA and the source features injected in the first steps
    denoise = _denoiser(sd, sd.encode_prompt([prompt]), sd.encode_prompt([cfg.negative_prompt]), cfg.guidance, Fr, bank)
    with processors(unet, blocks.layers, cga), bank.injecting(unet), _autocast(sd, dtype):
        x0 = blocks.sample(denoise, x_T, cfg.steps, sd.schedule, sd.prediction, progress=progress)
    stats["injected_tensors"] = bank.injected
    lap("sampling")

    # 7. decode
    images = sd.decode_latents(x0, vae_chunk) if decode else None
    lap("decode")
    return COVEResult(images, x0, inversion, corr, feats, stats)
