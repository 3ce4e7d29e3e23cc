"""The I2VEdit editing pipeline (§4.2 appearance refinement, §4.1 long videos), clip by clip.

    result = edit_video(svd, video, edited_first_frame, I2VEditConfig(preset="local"))
    result.frames        # [T, 3, H, W] in [-1, 1], the source's frame count and size

Per clip (`edit_clip`), top to bottom:
1. EDM inversion of the SARP-perturbed source clip (invert.py), motion LoRA off, recording what the
   matching reads ("stored") or only the trajectory ("recompute", the default);
2. the editing conditioning (conditioning.py): CLIP of the edited first frame, its VAE mode + 0.02·ε on
   the conditional half, fps id = output_fps − 1; clip k ≥ 1: the previous clip's last latent / 0.18215
   (not re-encoded) and CLIP of its decoded last frame;
3. EDM Euler sampling from the inverted noise × √(σ_max² + 1), classifier-free guidance rising over the
   frames (linspace(1, 2, F)), the motion LoRA on, the matching processors on (matching.py): at edit step
   j the source attention of inversion record N−1−j — recomputed by one batch-1 UNet call with the LoRA
   off on the trajectory's x_{N−1−j} at its level, or read from the stored records;
4. decoding in chunks of 8 frames.
Each of these blocks is an argument (`I2VEditBlocks`, defaults the paper's): the inversion and its
perturbation, the conditioning and denoiser, the attention on the spatial and temporal attn1 layers,
the levels and the sampler loop.
`edit_video` splits the video into clips (clips.py, 11 frames overlapping by 1), writes the overlap frame
once, and returns the frames at the source's size.

The authors' recipe (`I2VEditConfig.recipe="authors"`, clips.py): clip 0 with their first config
(11 frames, fps id 4), clips k ≥ 1 with their subsequent-clip config (16 frames, fps id 6, skip-interval
cross-attention): temporal attn1 keys/values [K_clip0; K] and [V_clip0; V], with clip 0's inversion K/V
(same inversion step) during inversion and clip 0's editing K/V (same edit step) during editing. Clip 0
keeps its temporal K/V of every step in memory when a later clip reads them.

Precision (the authors': fp32 inversion, fp16 edit under autocast, fp32 latents): the model holds fp32
weights, the inversion and the recomputed source attention run in fp32, the edit's UNet calls under
autocast to `edit_dtype`, the sampler state stays fp32; `invert_dtype="edit"` inverts in the edit dtype.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from minivid.attention import SPATIAL_SELF, TEMPORAL_SELF, Pattern, Processor, call_state, select_layers, step_clock
from minivid.pipelines.svd import check_size, video_denoiser
from minivid.samplers import edm_init_noise, euler_sample, karras_sigmas
from minivid.svd import StableVideoDiffusion

from .clips import RECIPES, ClipRecipe, clip_ranges, recipe_for
from .conditioning import edit_condition
from .invert import Inversion, invert_clip, inversion_denoiser, lora_off, sarp
from .matching import (PRESETS, MatchingConfig, MatchingController, SpatialMatching, StopForward, TemporalMatching,
                       keep_for)

__all__ = ["I2VEditConfig", "I2VEditBlocks", "ClipEdit", "EditResult", "edit_clip", "edit_video", "source_attention",
           "quantize", "resize_frames"]

log = logging.getLogger(__name__)
STORES = ("recompute", "stored")


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
INVERT_DTYPES = ("fp32", "edit")


@dataclass(frozen=True)
class I2VEditConfig:
    """Every default is the authors' code's (docs/i2vedit.md gives the source of each).

    `recipe` "authors": clip 0 with the first config's settings (11 frames, fps id 4, skip-interval off),
    clips k ≥ 1 with the subsequent-clip config's (16 frames, fps id 6, skip-interval on) — clips.FIRST,
    clips.SUBSEQUENT; "uniform": every clip with the first config's. `clip_len`, `output_fps` and
    `skip_interval` override the recipe for every clip when set.

    Precision (the authors invert in fp32 and edit in fp16 under autocast with fp32 latents): the model
    holds fp32 weights; `edit_dtype` (None: the model's dtype) is the compute dtype of the edit's UNet
    calls (autocast when it differs from the model's); `invert_dtype` "fp32" runs the inversion and the
    recomputed source attention in fp32, "edit" in `edit_dtype`. The sampler state stays fp32."""

    steps: int = 25
    preset: str = "local"                          # (β₁, β₂): local (0.5, 0.8), global (0.8, 0.9), shape (0.4, 0.5)
    beta: Optional[tuple[float, float]] = None     # overrides the preset
    layer_set: str = "official"                    # middle-stage temporal layers: "official" | "paper"
    mask_thr: tuple[float, float] = (0.35, 0.35)   # ramped over the frames
    compare: str = ">="                            # M = 1 where D ≥ thr (code); ">" is the paper's Eq. 8
    matching: bool = True
    store: str = "recompute"                       # "recompute" | "stored"
    recipe: str = "authors"                        # "authors" | "uniform" (clips.py)
    clip_len: Optional[int] = None                 # None: the recipe's (11 for clip 0, 16 after)
    overlap: int = 1
    skip_interval: Optional[bool] = None           # None: the recipe's (off for clip 0, on after)
    min_guidance: float = 1.0
    max_guidance: float = 2.0
    output_fps: Optional[float] = None             # None: the recipe's (5, then 7); fps id = output_fps − 1
    sarp: bool = True
    sarp_noise: float = 0.005
    sarp_threshold: float = 0.001
    decode_chunk: int = 8
    seed: int = 23                                 # a CPU generator seeded per clip
    record_masks: bool = True
    edit_dtype: Optional[torch.dtype] = None       # None: the model's dtype
    invert_dtype: str = "fp32"                     # "fp32" | "edit"
    store_budget: Optional[int] = None             # stored mode: host bytes allowed (None: 80 % of MemAvailable)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"I2VEditConfig: preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.store not in STORES:
            raise ValueError(f"I2VEditConfig: store must be one of {STORES}, got {self.store!r}")
        if self.steps < 2:
            raise ValueError(f"I2VEditConfig: steps must be at least 2, got {self.steps}")
        if self.recipe not in RECIPES:
            raise ValueError(f"I2VEditConfig: recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.invert_dtype not in INVERT_DTYPES:
            raise ValueError(f"I2VEditConfig: invert_dtype must be one of {INVERT_DTYPES}, got {self.invert_dtype!r}")
        if self.edit_dtype is not None and self.edit_dtype not in DTYPE_NAMES:
            raise ValueError(f"I2VEditConfig: edit_dtype must be one of {list(DTYPE_NAMES.values())}, got {self.edit_dtype}")
        self.matching_config()                     # validates beta, layer_set, compare

    def matching_config(self) -> MatchingConfig:
        return MatchingConfig(steps=self.steps, beta=tuple(self.beta or PRESETS[self.preset]), layer_set=self.layer_set,
                              mask_thr=tuple(self.mask_thr), compare=self.compare, record_masks=self.record_masks)

    def clip_settings(self, k: int) -> ClipRecipe:
        """The settings clip k runs with: the recipe's, with this config's overrides."""
        r = recipe_for(k, self.recipe)
        return replace(r, clip_len=self.clip_len or r.clip_len,
                       output_fps=r.output_fps if self.output_fps is None else self.output_fps,
                       skip_interval=r.skip_interval if self.skip_interval is None else self.skip_interval)

    def ranges(self, num_frames: int) -> list[tuple[int, int]]:
        return clip_ranges(num_frames, self.clip_settings(0).clip_len, self.overlap, self.clip_settings(1).clip_len)

    def dtypes(self, model_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
        """(inversion dtype, edit dtype) for a model holding `model_dtype` weights."""
        edit = self.edit_dtype or model_dtype
        return (torch.float32 if self.invert_dtype == "fp32" else edit), edit


# ---------------------------------------------------------------- the blocks, with the paper's defaults

# how edit_clip calls each block (positional count, keywords): checked when the blocks are made
_CALLS: dict[str, tuple[int, tuple[str, ...], str]] = {
    "invert": (7, ("controller", "keep", "kv_source", "record_kv", "lora", "progress", "sigmas", "perturb"),
               "invert(svd, clip, steps, generator, use_sarp, sarp_noise, sarp_threshold, *, controller, keep, "
               "kv_source, record_kv, lora, progress, sigmas, perturb) -> Inversion"),
    "perturb": (4, (), "perturb(stack, noise_scale, threshold, generator) -> stack"),
    "condition": (3, ("fps_id", "previous_latent"),
                  "condition(svd, first_frame [1, 3, H, W], generator, *, fps_id, previous_latent) -> SVDConditioning"),
    "denoiser": (5, (), "denoiser(svd, cond, frames, min_guidance, max_guidance) -> D(x, sigma)"),
    "spatial": (2, (), "spatial(inner, controller) -> processor (q, k, v, ctx) -> out"),
    "temporal": (2, (), "temporal(inner, controller) -> processor (q, k, v, ctx) -> out"),
    "sigmas": (1, (), "sigmas(steps) -> [steps + 1] descending levels ending in 0"),
    "sample": (3, ("progress",), "sample(denoise, x, sigmas, *, progress) -> x_0"),
}


def _check_pattern(name: str, pattern: Any) -> None:
    ok = (isinstance(pattern, str) or callable(pattern)
          or (isinstance(pattern, (list, tuple)) and pattern and all(isinstance(p, str) for p in pattern)))
    if not ok:
        raise TypeError(f"I2VEditBlocks.{name} must be a layer pattern (a glob such as SPATIAL_SELF, a non-empty list "
                        f"of globs or names, or a predicate (name, module) -> bool), got {pattern!r}")


@dataclass(frozen=True)
class I2VEditBlocks:
    """The blocks `edit_clip` / `edit_video` are made of, each defaulting to the paper's (Ouyang et al.,
    "I2VEdit: First-Frame-Guided Video Editing via Image-to-Video Diffusion Models", arXiv:2405.16537, §4.2)
    as the authors' code runs it, so another combination is a few lines of configuration:

    - `invert` (default `invert.invert_clip`): the EDM inversion of the clip (Eq. 6), called as
      `invert(svd, clip, steps, generator, use_sarp, sarp_noise, sarp_threshold, controller=, keep=,
      kv_source=, record_kv=, lora=, progress=, sigmas=, perturb=)` and returning an `invert.Inversion`;
    - `perturb` (default `invert.sarp`, Eq. 5): `perturb(stack, noise_scale, threshold, generator)`, the
      perturbation of the source before inversion, used when the config's `sarp` is on;
    - `condition` (default `conditioning.edit_condition`) and `denoiser` (default
      `pipelines.svd.video_denoiser`): the editing conditioning and D(x, σ) with its guidance;
    - `spatial(inner, controller) -> processor`, pushed on `spatial_layers` (default `SPATIAL_SELF`, SVD's 16
      spatial self-attention layers) for the whole clip: inversion, recomputed source attention, edit
      (default `matching.SpatialMatching`, Eq. 7–9); `inner` runs what lies beneath (the layer's
      processor), `controller` is the `MatchingController` (phase, step, source attention);
    - `temporal(inner, controller) -> processor` on `temporal_layers` (default `TEMPORAL_SELF`): the
      temporal attention selector (β₁, β₂) and skip-interval attention (default `matching.TemporalMatching`;
      a replacement that ignores the controller turns both off);
    - `sigmas(steps) -> [steps + 1]` (default `samplers.karras_sigmas`): the levels of the edit and, climbed
      in reverse, of the inversion (edit step j reads inversion record N−1−j, so both use the same ones);
    - `sample(denoise, x, sigmas, progress=)` (default `samplers.euler_sample`): the edit's sampler loop;
      with matching or skip-interval on, each call of `denoise` is one edit step (at most `steps` calls).

    Every UNet call of the clip runs inside `call_state(svd.unet, frames=F)`, with `step` and `t` (σ)
    set per sampler step, so a video processor (`minivid.attention.frame_count`) works on SVD's spatial
    layers. EI²'s FFAM on the spatial layers, I2VEdit's temporal matching kept:

        blocks = I2VEditBlocks(spatial=lambda inner, ctl: FFAMProcessor(2))
        result = edit_video(svd, video, first_frame, I2VEditConfig(), blocks=blocks)

    Bad blocks are refused when made (not callable, or not callable as above) or, before any compute,
    by `check(unet)` (patterns that select nothing, or spatial and temporal layers that overlap).
    """

    invert: Callable[..., Inversion] = invert_clip
    perturb: Callable[..., Tensor] = sarp
    condition: Callable[..., Any] = edit_condition
    denoiser: Callable[..., Callable[[Tensor, Tensor], Tensor]] = video_denoiser
    spatial: Callable[[Processor, MatchingController], Processor] = SpatialMatching
    spatial_layers: Pattern = SPATIAL_SELF
    temporal: Callable[[Processor, MatchingController], Processor] = TemporalMatching
    temporal_layers: Pattern = TEMPORAL_SELF
    sigmas: Callable[[int], Tensor] = karras_sigmas
    sample: Callable[..., Tensor] = euler_sample

    def __post_init__(self) -> None:
        for name, (npos, kws, usage) in _CALLS.items():
            fn = getattr(self, name)
            if not callable(fn):
                raise TypeError(f"I2VEditBlocks.{name} must be callable as {usage}; got {fn!r}")
            try:
                sig = inspect.signature(fn)
            except (TypeError, ValueError):          # a builtin without a signature: trust it
                continue
            try:
                sig.bind(*([None] * npos), **{k: None for k in kws})
            except TypeError as e:
                hint = (" (to install a processor p, pass `lambda inner, ctl: p`)"
                        if name in ("spatial", "temporal") else "")
                raise TypeError(f"I2VEditBlocks.{name} must be callable as {usage}; "
                                f"{getattr(fn, '__name__', type(fn).__name__)}{sig} is not ({e}){hint}") from None
        _check_pattern("spatial_layers", self.spatial_layers)
        _check_pattern("temporal_layers", self.temporal_layers)

    def check(self, unet: torch.nn.Module) -> tuple[list[str], list[str]]:
        """The (spatial, temporal) layers the blocks go on; raises, before any compute, when a pattern
        selects nothing or the two sets overlap (e.g. a bare "*attn1" also matches SVD's temporal layers)."""
        spatial = select_layers(unet, self.spatial_layers, "I2VEditBlocks.spatial_layers")
        temporal = select_layers(unet, self.temporal_layers, "I2VEditBlocks.temporal_layers")
        both = sorted(set(spatial) & set(temporal))
        if both:
            raise ValueError(f"I2VEditBlocks: spatial_layers and temporal_layers both select {len(both)} layers "
                             f"(e.g. {both[0]}); a layer gets one of the two blocks (SPATIAL_SELF / TEMPORAL_SELF "
                             f"separate them)")
        return list(spatial), list(temporal)

    @contextlib.contextmanager
    def install(self, unet: torch.nn.Module, ctl: MatchingController) -> Iterator[MatchingController]:
        """`spatial` and `temporal` pushed on their layers (`minivid.attention.wrap_processors`) for the block."""
        from minivid.attention import wrap_processors

        def made(block: str):
            make = getattr(self, block)

            def wrap(inner: Processor) -> Processor:
                proc = make(inner, ctl)
                if not callable(proc):
                    raise TypeError(f"I2VEditBlocks.{block}(inner, controller) must return a processor "
                                    f"(q, k, v, ctx) -> out, got {proc!r}")
                return proc
            return wrap

        with wrap_processors(unet, self.spatial_layers, made("spatial")), \
                wrap_processors(unet, self.temporal_layers, made("temporal")):
            yield ctl

    def describe(self) -> dict[str, str]:
        """{block: name} of every block (the record says what ran)."""
        def name(v: Any) -> str:
            if isinstance(v, str):
                return v
            if isinstance(v, (list, tuple)):
                return ", ".join(map(str, v))
            mod, qual = getattr(v, "__module__", None), getattr(v, "__qualname__", None)
            return f"{mod}.{qual}" if mod and qual else repr(v)
        return {f.name: name(getattr(self, f.name)) for f in fields(self)}


@dataclass
class ClipEdit:
    latents: Tensor                                  # [1, F, 4, h, w] final scaled latents
    frames: Tensor                                   # [F, 3, H, W] decoded, at the working size
    inversion: Inversion
    masks: dict[tuple[str, int], Tensor] = field(default_factory=dict)   # (layer, step) -> M [F, N]
    layer_hw: dict[str, tuple[int, int]] = field(default_factory=dict)
    copied: dict[int, list[str]] = field(default_factory=dict)           # step -> temporal layers copied
    edit_kv: dict[int, dict[str, tuple[Tensor, Tensor]]] = field(default_factory=dict)   # skip-interval
    info: dict = field(default_factory=dict)         # what ran: recipe, skip-interval, LoRA, dtypes (the record)


@dataclass
class EditResult:
    frames: Tensor                                   # [T, 3, H, W] at the source size
    ranges: list[tuple[int, int]]
    clips: list[ClipEdit]
    store_bytes: dict[str, int]                      # measured on clip 0: "recompute" (trajectory) and "stored"


def quantize(frames: Tensor) -> Tensor:
    """[-1, 1] -> uint8 (rounded, as the authors' PIL output) -> [-1, 1]."""
    u8 = ((frames.float().clamp(-1, 1) + 1) / 2 * 255).round()
    return u8 / 255 * 2 - 1


def resize_frames(frames: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, antialiased resize of [..., 3, H, W] (the authors' ResolutionControl); identity at the same size."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    shape = frames.shape
    out = F.interpolate(frames.reshape(-1, *shape[-3:]).float(), size=size, mode="bilinear", antialias=True,
                        align_corners=False)
    return out.reshape(*shape[:-2], *size)


def source_attention(svd: StableVideoDiffusion, inv: Inversion, ctl: MatchingController, edit_step: int,
                     lora: Any = None, kv_source: dict | None = None) -> dict[str, dict[str, Tensor]]:
    """The recompute mode: the source attention that edit step j reads — inversion record N−1−j — from
    one batch-1 UNet call on the trajectory's x_{N−1−j} at levels[N−1−j], motion LoRA off. Bitwise what
    the inversion computed there. The call ends after the last layer the step reads (in the order the
    controller saw the layers called), since nothing after it is used."""
    r = inv.steps - 1 - edit_step
    denoise = inversion_denoiser(svd, inv.cond, inv.frames)
    saved = (ctl.phase, ctl.keep, ctl.kv_source, ctl.kv_record)
    ctl.phase, ctl.captured, ctl.keep = "record", {}, keep_for(edit_step, ctl)
    ctl.kv_source, ctl.kv_record = kv_source, None
    ctl.stop_after = ctl.last_needed(ctl.keep) if ctl.order else None   # the rest of the UNet is not needed
    try:
        with lora_off(lora):
            denoise(inv.trajectory[r], inv.levels[r])
    except StopForward:
        pass
    finally:
        ctl.phase, ctl.keep, ctl.kv_source, ctl.kv_record = saved
        ctl.stop_after = None
    captured, ctl.captured = ctl.captured, {}
    return captured


def kv_home(device: torch.device) -> torch.device | None:
    """Where clip 0 keeps the temporal K/V that skip-interval attention in every later clip reads: the
    host, for a model on an accelerator (16 temporal layers' K and V of every inversion and edit step:
    at 576×1024 and 14 frames, fp32, ~2.9 GB per inversion step, twice that per guided edit step, 25 steps
    of each: more than a GPU holds beside the model); None (where they are computed) on the CPU. Each step's K/V go back to the model's device when a later clip reads them."""
    return torch.device("cpu") if torch.device(device).type != "cpu" else None


def compute_dtype(svd: StableVideoDiffusion, dtype: torch.dtype):
    """Autocast to `dtype` when it differs from the model's weights; explicitly no autocast otherwise
    (so an fp32 computation inside an autocast region stays fp32)."""
    if dtype == svd.dtype:
        return torch.autocast(svd.device.type, enabled=False)
    return torch.autocast(svd.device.type, dtype=dtype)


@torch.no_grad()
def edit_clip(
    svd: StableVideoDiffusion,
    clip: Tensor,
    first_frame: Tensor,
    cfg: I2VEditConfig = I2VEditConfig(),
    lora: Any = None,
    previous_latent: Tensor | None = None,
    clip0: ClipEdit | None = None,
    is_first: bool = True,
    progress: bool = True,
    settings: ClipRecipe | None = None,
    record_kv: bool = False,
    blocks: I2VEditBlocks = I2VEditBlocks(),
) -> ClipEdit:
    """Edit one clip [F, 3, H, W] (working size, [-1, 1]) given its first frame's edit [3, H, W] (clip k ≥ 1:
    the previous clip's decoded last frame, with `previous_latent` [1, 4, h, w] its last scaled latent).
    `lora`: an attached motion LoRA (its `.disabled()` turns it off for inversion and recomputation) or None.
    `settings`: this clip's recipe (default `cfg.clip_settings(0 if is_first else 1)`); `clip0`: clip 0's
    result, for skip-interval attention in clips k ≥ 1; `record_kv`: clip 0 keeps its temporal K/V of
    every step for them (`edit_video` asks for it when a later clip uses skip-interval). `blocks`
    replaces the inversion, the perturbation, the conditioning, the denoiser, the attention on the
    spatial or temporal layers, the levels or the sampler loop (`I2VEditBlocks`)."""
    if not isinstance(blocks, I2VEditBlocks):
        raise TypeError(f"edit_clip: blocks must be an I2VEditBlocks, got {type(blocks).__name__}")
    if clip.ndim != 4 or clip.shape[1] != 3:
        raise ValueError(f"edit_clip: clip must be [F, 3, H, W], got shape {tuple(clip.shape)}")
    if first_frame.shape[-3:] != clip.shape[-3:]:
        raise ValueError(f"edit_clip: first frame {tuple(first_frame.shape[-3:])} and clip frames "
                         f"{tuple(clip.shape[-3:])} differ in size")
    check_size(svd, *clip.shape[-2:])
    _, temporal_layers = blocks.check(svd.unet)
    settings = settings or cfg.clip_settings(0 if is_first else 1)
    inv_dtype, edit_dtype = cfg.dtypes(svd.dtype)
    if inv_dtype == torch.float32 and svd.dtype != torch.float32:
        raise ValueError(f"edit_clip: the model holds {DTYPE_NAMES.get(svd.dtype, svd.dtype)} weights, so the inversion "
                         f"cannot run in fp32; load it in fp32 and set edit_dtype (the edit then runs under autocast, "
                         f"as the authors' code), or invert in the edit dtype (invert_dtype='edit')")
    Fr, N = clip.shape[0], cfg.steps
    m = svd.config.vae.downsample_factor
    latent_hw = (clip.shape[-2] // m, clip.shape[-1] // m)
    use_kv = settings.skip_interval and not is_first
    if use_kv and (clip0 is None or not clip0.inversion.kv):
        raise ValueError("edit_clip: skip-interval attention for a clip k >= 1 needs clip 0's result with its K/V "
                         "(edit clip 0 with record_kv=True, or use edit_video)")
    need_ctl = cfg.matching or use_kv or record_kv
    mcfg = cfg.matching_config()
    if not cfg.matching:
        mcfg = replace(mcfg, spatial=False, temporal=False)
    ctl = MatchingController(mcfg, latent_hw, Fr, temporal_layers)
    stored = cfg.matching and cfg.store == "stored"
    if stored and svd.device.type != "cpu":
        ctl.record_to = torch.device("cpu")        # the stored records live on the host (docs: "The store")
    if record_kv:
        ctl.kv_to = kv_home(svd.device)            # clip 0's K/V of every step, read by every later clip

    sigmas = blocks.sigmas(N)
    # the blocks' processors stay on for the whole clip (they pass through while the controller is "off");
    # every UNet call sees the clip's frame count in its call state
    with call_state(svd.unet, frames=Fr), blocks.install(svd.unet, ctl):
        # 1. inversion (its own generator, as the authors' global RNG is separate from the edit's)
        inv_gen = torch.Generator().manual_seed(cfg.seed)
        keep = (lambda i: keep_for(N - 1 - i, ctl)) if stored else None
        with compute_dtype(svd, inv_dtype):
            inv = blocks.invert(svd, clip, N, inv_gen, cfg.sarp, cfg.sarp_noise, cfg.sarp_threshold,
                                controller=ctl if need_ctl else None, keep=keep,
                                kv_source=clip0.inversion.kv if use_kv else None, record_kv=record_kv,
                                lora=lora, progress=progress, sigmas=sigmas, perturb=blocks.perturb)

        # 2. conditioning of the edit
        gen = torch.Generator().manual_seed(cfg.seed)
        cond = blocks.condition(svd, first_frame[None], gen, fps_id=settings.output_fps - 1,
                                previous_latent=previous_latent)
        base = blocks.denoiser(svd, cond, Fr, cfg.min_guidance, cfg.max_guidance)

        # 3. sampling with attention matching; the UNet in the edit dtype, the latents in fp32
        count = [0]
        edit_kv: dict[int, dict] = {}

        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            j = count[0]
            count[0] += 1
            if not need_ctl:
                with compute_dtype(svd, edit_dtype):
                    return base(x, sigma)
            if j >= N:
                raise RuntimeError(f"edit_clip: the sampler called the denoiser more than steps = {N} times; with "
                                   f"matching or skip-interval on, each call is one edit step (step j reads inversion "
                                   f"record N-1-j), so I2VEditBlocks.sample must call it once per level")
            if cfg.matching:
                if stored:
                    ctl.source = inv.records.get(N - 1 - j, {})
                else:
                    with compute_dtype(svd, inv_dtype):
                        ctl.source = source_attention(svd, inv, ctl, j, lora,
                                                      clip0.inversion.kv[N - 1 - j] if use_kv else None)
            ctl.phase, ctl.step = "match", j
            ctl.kv_source = clip0.edit_kv[j] if use_kv else None
            ctl.kv_record = {} if record_kv else None
            try:
                with compute_dtype(svd, edit_dtype):
                    return base(x, sigma)
            finally:
                if record_kv:
                    edit_kv[j] = ctl.kv_record
                ctl.phase, ctl.source, ctl.kv_source, ctl.kv_record = "off", {}, None, None

        x = edm_init_noise(inv.noise.to(svd.device, torch.float32), sigmas)     # the sampler state stays fp32
        x = blocks.sample(step_clock(svd.unet, denoise), x, sigmas, progress=progress)

    # 4. decode in chunks
    frames = svd.decode_latents(x.to(svd.dtype), cfg.decode_chunk).float()[0]
    info = {"recipe": settings.name, "clip_len": settings.clip_len, "output_fps": settings.output_fps,
            "fps_id": settings.output_fps - 1, "skip_interval": bool(use_kv), "records_kv_for_later_clips": bool(record_kv),
            "lora": lora is not None, "inversion_dtype": DTYPE_NAMES[inv_dtype], "edit_dtype": DTYPE_NAMES[edit_dtype],
            "weights_dtype": DTYPE_NAMES.get(svd.dtype, str(svd.dtype)), "sampler_dtype": "fp32", "store": cfg.store,
            "blocks": "the paper's" if blocks == I2VEditBlocks() else blocks.describe()}
    return ClipEdit(x, frames, inv, dict(ctl.masks), dict(ctl.hw), dict(ctl.copied), edit_kv, info)


def host_budget() -> int:
    """80 % of the host memory available now (MemAvailable), the stored mode's default budget."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(0.8 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    return int(0.8 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_store_budget(svd: StableVideoDiffusion, cfg: I2VEditConfig, work: tuple[int, int],
                       ranges: list[tuple[int, int]]) -> dict[str, int] | None:
    """The stored mode keeps one clip's records on the host: refuse, before any compute, a clip whose
    records exceed `cfg.store_budget` (default `host_budget()`). Returns {"bytes", "budget"} or None."""
    if not (cfg.matching and cfg.store == "stored"):
        return None
    from .matching import store_bytes

    m = svd.config.vae.downsample_factor
    frames = max(e - s for s, e in ranges)
    need = int(store_bytes(svd.config.unet, (work[0] // m, work[1] // m), frames, cfg.steps,
                           cfg.matching_config())["stored"]["per_clip"])
    budget = cfg.store_budget if cfg.store_budget is not None else host_budget()
    if need > budget:
        raise MemoryError(f"--i2vedit-store stored keeps {need / 1e9:.2f} GB of source attention per {frames}-frame clip "
                          f"at {work[0]}x{work[1]} on the host, over the budget of {budget / 1e9:.2f} GB; use the "
                          f"default recompute store (kept: the inversion trajectory only) or raise the budget")
    return {"bytes": need, "budget": budget}


def edit_video(
    svd: StableVideoDiffusion,
    video: Tensor,
    first_frame: Tensor,
    cfg: I2VEditConfig = I2VEditConfig(),
    work_size: tuple[int, int] | None = None,
    lora_for_clip: Callable[[int], Any] | None = None,
    progress: bool = True,
    keep_clips: bool = False,
    blocks: I2VEditBlocks = I2VEditBlocks(),
) -> EditResult:
    """Edit video [T, 3, H, W] in [-1, 1] from its edited first frame [3, H', W'] (resized to H×W when it
    differs; the caller says so). Clips as `cfg.ranges` (the recipe's lengths, overlapping by `cfg.overlap`),
    clip k with `cfg.clip_settings(k)`; each clip is edited at `work_size` (default: the source size) and
    the result resized back to H×W. The stored mode's host budget is checked before any compute.

    `lora_for_clip(k)` attaches clip k's motion LoRA and returns its handle (detached after the clip), or
    returns None. `keep_clips=False` drops each clip's inversion once it is used (except clip 0's K/V with
    skip-interval). `blocks`: the blocks every clip is edited with (`I2VEditBlocks`), checked before any
    compute."""
    if not isinstance(blocks, I2VEditBlocks):
        raise TypeError(f"edit_video: blocks must be an I2VEditBlocks, got {type(blocks).__name__}")
    if video.ndim != 4 or video.shape[1] != 3:
        raise ValueError(f"edit_video: video must be [T, 3, H, W] in [-1, 1], got shape {tuple(video.shape)}")
    if first_frame.ndim != 3 or first_frame.shape[0] != 3:
        raise ValueError(f"edit_video: first frame must be [3, H, W], got shape {tuple(first_frame.shape)}")
    size = tuple(video.shape[-2:])
    work = tuple(work_size or size)
    check_size(svd, *work)
    blocks.check(svd.unet)
    ranges = cfg.ranges(video.shape[0])                                  # raises on a video shorter than a clip
    check_store_budget(svd, cfg, work, ranges)
    record_kv = len(ranges) > 1 and any(cfg.clip_settings(k).skip_interval for k in range(1, len(ranges)))
    if tuple(first_frame.shape[-2:]) != size:
        log.warning("edit_video: the edited first frame is %dx%d, the video %dx%d: resized to the video's size",
                    *first_frame.shape[-2:], *size)
    first = resize_frames(first_frame.float(), size)
    first = resize_frames(first, work)
    out: list[Tensor] = []
    clips: list[ClipEdit] = []
    store: dict[str, int] = {}
    prev_latent, prev_frame, clip0 = None, first, None
    for k, (s, e) in enumerate(ranges):
        clip = resize_frames(video[s:e].float(), work)
        handle = lora_for_clip(k) if lora_for_clip is not None else None
        try:
            res = edit_clip(svd, clip, prev_frame, cfg, handle, prev_latent, clip0, is_first=(k == 0), progress=progress,
                            settings=cfg.clip_settings(k), record_kv=(k == 0 and record_kv), blocks=blocks)
        finally:
            if handle is not None and lora_for_clip is not None and hasattr(handle, "detach"):
                handle.detach()
        res.info.update(clip=k, frames=[s, e])
        if k == 0:
            store = {"recompute": res.inversion.nbytes(), "stored": res.inversion.records_nbytes()}
            clip0 = res
        frames = res.frames.clamp(-1, 1)
        out.append(resize_frames(frames if k == 0 else frames[cfg.overlap:], size).cpu())
        prev_latent = res.latents[:, -1]
        prev_frame = quantize(frames[-1])
        if not keep_clips and k > 0:
            res.inversion.trajectory, res.inversion.records = [], {}
        clips.append(res)
    return EditResult(torch.cat(out), ranges, clips, store)
