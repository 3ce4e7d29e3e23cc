"""I2VEdit's motion-LoRA tuning (§4.1 "Training Strategy", Eq. 4) on the shared engine `minivid.tuning`.

One LoRA per clip of the source video, trained to reproduce the clip under SVD's own conditioning on its
first frame (Eq. 4: L_motion = E ‖z₀ − z_θ(z_{t,σ}, t, c)‖²). As the authors' code does it (train.py
`train_motion_lora` / `finetune_unet`):

    z₀      = VAE posterior sample of the clip · 0.18215, drawn once ("caching latents")   [1, F, 4, h, w]
    c_σ     = VAE posterior sample of frame 0 (a second draw) + 0.02·ε'                     [1, 4, h, w]
    context = CLIP image embedding of source frame 0                                        [1, 1, D]
    ids     = (fps id 6, noise aug 0.02, motion bucket 127) — the order the code passes them, see below
    σ       ~ cosine-interpolated log-SNR (simple diffusion; image_d 64, noise_d 32 → 64, σ_data 0.5,
              σ in [0.002, 700]), `sample_sigmas`
    z_σ     = z₀ + σ·ε
    D       = c_skip·z_σ + c_out·F_θ([c_in·z_σ ; c_σ], c_noise, context, ids)
              c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1), c_in = 1/√(σ²+1), c_noise = ¼ ln σ
    loss    = mean( (1+σ²)/σ² · (D − z₀)² )

The code's `_get_add_time_ids` builds [fps, noise_aug] and appends the motion bucket, so the LoRA is
trained with the ids (6, 0.02, 127) in the UNet's (fps, motion, aug) slots; `time_ids_order="official"`
(the default) reproduces it, "svd" passes (6, 127, 0.02) as SVD was trained.

The engine owns AdamW (lr 5e-4, betas (0.9, 0.999), wd 1e-2, constant LR), the 300 steps, the
checkpoints (every 50; the authors use the one of step 250, `DEFAULT_USE_STEP`), resume and the
non-finite-loss stop. Checkpoint tensors carry the MotionLoRA's documented names (minivid.methods.
i2vedit.lora), so a tuning checkpoint is a LoRA file. Every random draw of a step (ε, ε', σ and the seed
of the LoRA's dropout masks) comes from the step's generator, so a resumed run repeats the same steps.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import pathlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from minivid import tuning
from minivid.methods.i2vedit.clips import clip_ranges
from minivid.methods.i2vedit.lora import (
    DEFAULT_DROPOUT, DEFAULT_RANK, DEFAULT_TARGETS, LoRAError, MotionLoRA, attach_motion_lora, read_lora_file,
)
from minivid.samplers import edm_loss_weight, edm_precondition, karras_sigmas
from minivid.tuning import TuneConfig, TuneResult

__all__ = [
    "METHOD", "SIGMA_MIN", "SIGMA_MAX", "SIGMA_DATA", "IMAGE_D", "NOISE_D_LOW", "NOISE_D_HIGH",
    "DEFAULT_STEPS", "DEFAULT_LR", "DEFAULT_CHECKPOINT_EVERY", "DEFAULT_USE_STEP", "CHECKPOINTED_BLOCKS",
    "MotionTuneConfig", "ClipData", "check_clip", "stratified_uniform", "logsnr_cosine_interpolated", "sample_sigmas",
    "default_tune_config", "training_time_ids", "prepare_clip", "motion_loss", "tune_motion_lora",
    "lora_checkpoint", "load_motion_lora", "tune_clips", "record_for_sigma", "skip_interval_source",
]

log = logging.getLogger(__name__)

METHOD = "i2vedit"

# train.py:567-572 (module constants of the authors' training script)
SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.002, 700.0, 0.5
IMAGE_D, NOISE_D_LOW, NOISE_D_HIGH = 64, 32, 64

# config/customize_train.yaml train_motion_lora_params; attention_matching_params.best_checkpoint_index
DEFAULT_STEPS, DEFAULT_LR, DEFAULT_CHECKPOINT_EVERY, DEFAULT_USE_STEP = 300, 5e-4, 50, 250
# gradient checkpointing: every spatial and every temporal transformer block
CHECKPOINTED_BLOCKS = ("*transformer_blocks.[0-9]", "*time_stack.[0-9]")
TIME_IDS_ORDERS = ("official", "svd")


@dataclass(frozen=True)
class MotionTuneConfig:
    """What the motion LoRA is and what it is conditioned on while it trains (defaults: the authors' code)."""

    rank: int = DEFAULT_RANK
    dropout: float = DEFAULT_DROPOUT
    targets: tuple[str, ...] = DEFAULT_TARGETS
    fps_id: float = 6.0                    # train.py finetune_unet: _get_add_time_ids(6, …)
    motion_bucket_id: float = 127.0        # data.py SingleClipDataset: motion_values = 127
    noise_aug: float = 0.02                # train_noise_aug
    time_ids_order: str = "official"       # "official": (fps, aug, motion) as the code passes them; "svd"
    lora_seed: int = 0                     # the draw of the LoRA's down weights

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.time_ids_order not in TIME_IDS_ORDERS:
            raise ValueError(f"time_ids_order must be one of {TIME_IDS_ORDERS}, got {self.time_ids_order!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MotionTuneConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def default_tune_config(device: torch.device | str = "cpu", **changes: Any) -> TuneConfig:
    """The authors' optimiser settings: AdamW lr 5e-4, betas (0.9, 0.999), wd 1e-2, eps 1e-8, constant LR,
    300 steps, checkpoints every 50. fp16 autocast on CUDA (their mixed_precision "fp16"), fp32 elsewhere."""
    autocast = "fp16" if torch.device(device).type == "cuda" else None
    base = dict(steps=DEFAULT_STEPS, lr=DEFAULT_LR, weight_decay=1e-2, betas=(0.9, 0.999), eps=1e-8,
                autocast=autocast, checkpoint_every=DEFAULT_CHECKPOINT_EVERY)
    return TuneConfig(**{**base, **changes})


# ---------------------------------------------------------------- σ: cosine-interpolated log-SNR

def stratified_uniform(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-diffusion's stratified U(0, 1) with one group: (i + u_i)/n, i = 0 … n−1 (float32, CPU)."""
    offsets = torch.arange(0, n, 1, dtype=torch.float32)
    return (offsets + torch.rand((n,), generator=generator, dtype=torch.float32)) / n


def _logsnr_cosine(t: torch.Tensor, logsnr_min: float, logsnr_max: float) -> torch.Tensor:
    t_min = math.atan(math.exp(-0.5 * logsnr_max))
    t_max = math.atan(math.exp(-0.5 * logsnr_min))
    return -2 * torch.log(torch.tan(t_min + t * (t_max - t_min)))


def _logsnr_cosine_shifted(t: torch.Tensor, image_d: float, noise_d: float, logsnr_min: float,
                           logsnr_max: float) -> torch.Tensor:
    shift = 2 * math.log(noise_d / image_d)
    return _logsnr_cosine(t, logsnr_min - shift, logsnr_max - shift) + shift


def logsnr_cosine_interpolated(t: torch.Tensor, image_d: float = IMAGE_D, noise_d_low: float = NOISE_D_LOW,
                               noise_d_high: float = NOISE_D_HIGH, sigma_min: float = SIGMA_MIN,
                               sigma_max: float = SIGMA_MAX, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """Simple diffusion's shifted cosine log-SNR, interpolated from noise_d_low to noise_d_high as t goes
    0 → 1 (t = 0: σ_min end, t = 1: σ_max end)."""
    logsnr_min = -2 * math.log(sigma_min / sigma_data)
    logsnr_max = -2 * math.log(sigma_max / sigma_data)
    low = _logsnr_cosine_shifted(t, image_d, noise_d_low, logsnr_min, logsnr_max)
    high = _logsnr_cosine_shifted(t, image_d, noise_d_high, logsnr_min, logsnr_max)
    return torch.lerp(low, high, t)


def sample_sigmas(n: int, generator: torch.Generator | None = None, image_d: float = IMAGE_D,
                  noise_d_low: float = NOISE_D_LOW, noise_d_high: float = NOISE_D_HIGH, sigma_min: float = SIGMA_MIN,
                  sigma_max: float = SIGMA_MAX, sigma_data: float = SIGMA_DATA) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ [n], u [n]): the authors' `rand_cosine_interpolated` (train.py:541): σ = σ_data·exp(−logsnr(u)/2)."""
    u = stratified_uniform(n, generator)
    logsnr = logsnr_cosine_interpolated(u, image_d, noise_d_low, noise_d_high, sigma_min, sigma_max, sigma_data)
    return torch.exp(-logsnr / 2) * sigma_data, u


# ---------------------------------------------------------------- conditioning and the loss

def training_time_ids(config: MotionTuneConfig, batch: int = 1, device: torch.device | str | None = None) -> torch.Tensor:
    """[B, 3] added time ids of training, in the order `config.time_ids_order` says."""
    c = config
    ids = [c.fps_id, c.noise_aug, c.motion_bucket_id] if c.time_ids_order == "official" else \
        [c.fps_id, c.motion_bucket_id, c.noise_aug]
    return torch.tensor([ids], dtype=torch.float32, device=device).repeat(batch, 1)


@dataclass
class ClipData:
    """A clip prepared for tuning: what stays fixed over the steps."""

    latents: torch.Tensor        # [1, F, 4, h, w] z₀: scaled VAE posterior sample of the clip
    cond_latent: torch.Tensor    # [1, 4, h, w] unscaled VAE posterior sample of frame 0 (before the 0.02·ε')
    image_embeds: torch.Tensor   # [1, 1, D] CLIP image embedding of frame 0
    time_ids: torch.Tensor       # [1, 3]
    extra: dict = field(default_factory=dict)


def check_clip(svd, frames: torch.Tensor) -> None:
    """A clip [F ≥ 2, 3, H, W] with sides the VAE takes, or a ValueError saying what is wrong."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [F, 3, H, W] in [-1, 1], got shape {tuple(frames.shape)}")
    if frames.shape[0] < 2:
        raise ValueError(f"a clip needs at least 2 frames to learn motion, got {frames.shape[0]}")
    m = svd.config.downsample_factor
    if frames.shape[-2] % m or frames.shape[-1] % m:
        raise ValueError(f"frame size {tuple(frames.shape[-2:])} is not a multiple of {m} (the VAE's downsampling)")


@torch.no_grad()
def prepare_clip(svd, frames: torch.Tensor, config: MotionTuneConfig | None = None, seed: int = 0,
                 vae_chunk: int | None = None) -> ClipData:
    """Encode a clip [F, 3, H, W] in [-1, 1] once: z₀ (a posterior sample · 0.18215), the conditioning
    latent (a second posterior sample of frame 0, unscaled: `refer_latents / scaling_factor`), CLIP of
    frame 0 (not truncated to uint8: the code does that only for inversion) and the time ids."""
    config = config or MotionTuneConfig()
    check_clip(svd, frames)
    device = svd.device
    vae_dtype = svd.vae.encoder.conv_in.weight.dtype
    g = torch.Generator().manual_seed(seed)
    x = frames.to(device, torch.float32)
    post = svd.vae.encode(x.to(vae_dtype), chunk=vae_chunk)                        # per frame
    mean, std = post.mean.float(), post.std.float()                                 # [F, 4, h, w]
    z0 = mean + std * torch.randn(mean.shape, generator=g).to(device)
    ref = mean[:1] + std[:1] * torch.randn(mean[:1].shape, generator=g).to(device)
    scale = svd.latent_scale
    # the code caches refer_latents = sample·0.18215 and conditions on refer_latents / 0.18215
    cond = (ref * scale) / scale
    embeds = svd.encode_image(x[:1]).float()                                        # [1, 1, D]
    return ClipData((z0 * scale)[None], cond, embeds, training_time_ids(config, 1, device),
                    {"frames": int(frames.shape[0]), "size": list(frames.shape[-2:])})


def record_for_sigma(sigma: float, steps: int = 25) -> int:
    """The inversion record a training step at σ reads for skip-interval attention, as the authors' code
    picks it: train.py 1049–1057 sets timestep = N − searchsorted([0, σ_{N−1}, …, σ_0], σ) clamped to
    [0, N − 1], and ConsistencyAttentionControl (use_inversion_attention) reads record N − 1 − timestep."""
    asc = karras_sigmas(steps).float().flip(0)                        # [0, σ_min, …, σ_max]
    i = int(torch.searchsorted(asc, torch.tensor([float(sigma)], dtype=torch.float32), right=False))
    timestep = min(max(steps - i, 0), steps - 1)
    return steps - 1 - timestep


def skip_interval_source(svd, clip0: torch.Tensor, steps: int = 25, seed: int = 23, blocks: Any = None):
    """Clip 0's inversion at the training size (motion LoRA off), whose temporal attn1 K/V a clip k ≥ 1
    attends to while its LoRA trains (main.py 267–312: `inverse_video` at `train_data` height/width into
    `consistency_train_controller`). Only the trajectory is kept; a training step recomputes the K/V of
    the record it reads (one batch-1 UNet call without gradients), bitwise what the inversion computed.
    `blocks` (`edit.I2VEditBlocks`, default the paper's): its inversion, perturbation and levels, as the
    edit uses them (SARP with `I2VEditConfig`'s defaults, the authors' settings)."""
    from minivid.methods.i2vedit.edit import I2VEditBlocks, I2VEditConfig

    blocks = I2VEditBlocks() if blocks is None else blocks
    if not isinstance(blocks, I2VEditBlocks):
        raise TypeError(f"skip_interval_source: blocks must be an I2VEditBlocks, got {type(blocks).__name__}")
    c = I2VEditConfig()
    return blocks.invert(svd, clip0, steps, torch.Generator().manual_seed(seed), c.sarp, c.sarp_noise, c.sarp_threshold,
                         controller=None, keep=None, kv_source=None, record_kv=False, lora=None, progress=False,
                         sigmas=blocks.sigmas(steps), perturb=blocks.perturb)


def _clip0_kv(svd, lora: MotionLoRA, ctl, inv, record: int) -> dict:
    """Clip 0's temporal attn1 K/V of inversion record `record`, recomputed in fp32 with the LoRA off."""
    from minivid.methods.i2vedit.invert import inversion_denoiser

    ctl.kv_source, ctl.kv_record = None, {}
    with torch.no_grad(), torch.autocast(svd.device.type, enabled=False), lora.disabled():
        inversion_denoiser(svd, inv.cond, inv.frames)(inv.trajectory[record], inv.levels[record])
    kv, ctl.kv_record = ctl.kv_record, None
    return kv


def motion_loss(svd, lora: MotionLoRA, data: ClipData, config: MotionTuneConfig | None = None,
                skip_interval: Any = None, controller: Any = None,
                ) -> Callable[[int, torch.Generator], torch.Tensor]:
    """loss_fn(step, generator) for `minivid.tuning.tune`: Eq. 4 as the authors' code computes it.

    Draws, in the code's order, ε [1, F, 4, h, w], ε' (its frame 0 augments the conditioning latent),
    u (→ σ), then the seed of the LoRA's dropout masks, all from `generator` (CPU).

    `skip_interval` (clips k ≥ 1 of the authors' recipe): clip 0's training-size inversion
    (`skip_interval_source`); every temporal attn1 then attends to [K_clip0; K], [V_clip0; V] with clip 0's
    K/V of the record `record_for_sigma(σ)` — `controller` is the MatchingController installed on the UNet
    (matching off) that does the concatenation."""
    config = config or MotionTuneConfig()
    if skip_interval is not None and controller is None:
        raise ValueError("motion_loss: skip-interval training needs the installed MatchingController")
    unet = svd.unet
    z0 = data.latents
    device = z0.device
    B, F = z0.shape[:2]

    def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(z0.shape, generator=gen).to(device)
        noise_1 = torch.randn(z0.shape, generator=gen).to(device)
        sigma, _ = sample_sigmas(B, gen)
        dropout_seed = int(torch.randint(0, 2**62, (1,), generator=gen))
        sigma = sigma.to(device)
        s = sigma.reshape(B, 1, 1, 1, 1)
        cond = data.cond_latent + config.noise_aug * noise_1[:, 0]                      # [1, 4, h, w]
        noisy = z0 + noise * s                                                           # z_σ
        c_skip, c_out, _, c_noise = edm_precondition(s)
        x = torch.cat([noisy / (s**2 + 1) ** 0.5, cond[:, None].expand(-1, F, -1, -1, -1)], dim=2)   # [B, F, 8, h, w]
        if skip_interval is not None:       # kept set until the next step: gradient checkpointing replays it
            controller.kv_source = _clip0_kv(svd, lora, controller, skip_interval,
                                             record_for_sigma(float(sigma[0]), skip_interval.steps))
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(dropout_seed)              # dropout masks: reproducible, recomputed alike
            pred = unet(x, c_noise.reshape(B), data.image_embeds, data.time_ids)
        denoised = pred * c_out + c_skip * noisy
        weight = edm_loss_weight(s)
        return torch.mean((weight.float() * (denoised.float() - z0.float()) ** 2).reshape(B, -1), dim=1).mean()

    return loss_fn


# ---------------------------------------------------------------- tuning one clip

def tune_motion_lora(
    svd,
    frames: torch.Tensor,
    out_dir: str | os.PathLike,
    config: MotionTuneConfig | None = None,
    cfg: TuneConfig | None = None,
    gradient_checkpointing: bool = False,
    resume: bool = True,
    meta: dict[str, Any] | None = None,
    lora: MotionLoRA | None = None,
    vae_chunk: int | None = None,
    skip_interval: Any = None,
) -> tuple[MotionLoRA, TuneResult]:
    """Attach a motion LoRA to `svd.unet` (or take `lora`, attached to it) and tune it on one clip
    [F, 3, H, W] in [-1, 1]. Checkpoints `out_dir/tuned-<step>.safetensors` (every 50 steps by default)
    hold the LoRA under its documented names, with AdamW's moments beside them; with `resume` the
    newest one there is continued. The frozen SVD may be in any dtype (bf16 weights halve its memory);
    the LoRA is float32 either way, and `cfg.autocast` runs the forward in mixed precision.
    `skip_interval`: clip 0's training-size inversion (`skip_interval_source`) for a clip k ≥ 1 of the
    authors' recipe: skip-interval cross-attention while training (see `motion_loss`).
    Returns the LoRA (eval mode, still attached) and the engine's result."""
    config = config or MotionTuneConfig()
    cfg = cfg or default_tune_config(svd.device)
    check_clip(svd, frames)
    if lora is None:
        lora = attach_motion_lora(svd.unet, config.rank, config.dropout, 1.0, config.targets, config.lora_seed)
    elif lora.unet is not svd.unet:
        raise ValueError("tune_motion_lora: `lora` must be attached to svd.unet")
    for p in svd.parameters():
        p.requires_grad_(False)
    data = prepare_clip(svd, frames, config, seed=cfg.seed, vae_chunk=vae_chunk)
    ctl = None
    if skip_interval is not None:
        from minivid.methods.i2vedit.matching import MatchingConfig, MatchingController, install, temporal_names

        if tuple(skip_interval.trajectory[0].shape[-2:]) != tuple(data.latents.shape[-2:]):
            raise ValueError(f"tune_motion_lora: clip 0's inversion has latents {tuple(skip_interval.trajectory[0].shape[-2:])}, "
                             f"this clip {tuple(data.latents.shape[-2:])}: skip-interval needs both at the training size")
        ctl = MatchingController(MatchingConfig(steps=skip_interval.steps, spatial=False, temporal=False),
                                 tuple(data.latents.shape[-2:]), int(data.latents.shape[1]), temporal_names(svd.unet))
    loss_fn = motion_loss(svd, lora, data, config, skip_interval, ctl)
    info = {
        "method": METHOD, "i2vedit": config.to_dict(), "lora": lora.describe(), **data.extra,
        "unet": {"model_channels": svd.config.unet.model_channels, "context_dim": svd.config.unet.context_dim},
        "base_fingerprint": tuning.base_fingerprint(svd.unet), **(meta or {}),
    }
    trainable = dict(lora.named_parameters())
    log.info("I2VEdit motion LoRA: %d layers, %.2fM parameters; %d steps at lr %g",
             len(lora.names), lora.num_parameters() / 1e6, cfg.steps, cfg.lr)
    with contextlib.ExitStack() as stack:
        if gradient_checkpointing:
            for pattern in CHECKPOINTED_BLOCKS:
                stack.enter_context(tuning.gradient_checkpointing(svd.unet, pattern))
        if ctl is not None:
            stack.enter_context(install(svd.unet, ctl))
            info["skip_interval"] = {"clip0_inversion_steps": skip_interval.steps}
        result = tuning.tune(lora, trainable, loss_fn, cfg, out_dir, resume, info)
    for p in lora.parameters():
        p.requires_grad_(False)
    return lora.eval(), result


def lora_checkpoint(path: str | os.PathLike, step: int | None = DEFAULT_USE_STEP) -> pathlib.Path:
    """The LoRA file to use from a tune folder: its `tuned-<step>` checkpoint (the authors use step 250),
    else the newest one (with a warning); a file is returned as is."""
    path = pathlib.Path(path)
    if path.is_dir() and step is not None:
        wanted = path / f"tuned-{step:06d}.safetensors"
        if wanted.is_file():
            return wanted
        newest = tuning.resolve_checkpoint(path)
        log.warning("%s has no checkpoint of step %d; using %s", path, step, newest.name)
        return newest
    return tuning.resolve_checkpoint(path)


def load_motion_lora(svd, path: str | os.PathLike, step: int | None = DEFAULT_USE_STEP, scale: float = 1.0,
                     rank: int | None = None) -> tuple[MotionLoRA, dict[str, Any]]:
    """Attach a motion LoRA to `svd.unet` and load it from a tune folder (checkpoint `step`), a tuning
    checkpoint, a `MotionLoRA.save` file, or the authors' list (.pt, with `rank`, default 32).
    Refuses another method's checkpoint and a LoRA of another rank or model (LoRAError)."""
    path = pathlib.Path(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        lora = attach_motion_lora(svd.unet, rank or DEFAULT_RANK, DEFAULT_DROPOUT, scale)
        try:
            lora.import_official(path)
        except LoRAError:
            lora.detach()
            raise
        return lora, {"path": str(path), "format": "official"}
    file = lora_checkpoint(path, step)
    meta = tuning.checkpoint_meta(file)
    if "method" in meta:
        tuning.require_method(meta, file, METHOD, "I2VEdit")
    config = MotionTuneConfig.from_dict(meta.get("i2vedit", {}))
    tensors = read_lora_file(file)
    ranks = sorted({t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")})
    file_rank = ranks[0] if len(ranks) == 1 else config.rank
    lora = attach_motion_lora(svd.unet, rank or file_rank, config.dropout, scale, config.targets)
    try:
        lora.load_tensors(tensors, str(file))
    except LoRAError:
        lora.detach()
        raise
    if meta.get("base_fingerprint"):
        meta["base_mismatch"] = tuning.check_base(meta, svd.unet, file)
    return lora, {**meta, "path": str(file)}


# ---------------------------------------------------------------- per clip

def tune_clips(svd, video: torch.Tensor, out_dir: str | os.PathLike, clip_length: int | None = None, overlap: int = 1,
               config: MotionTuneConfig | None = None, cfg: TuneConfig | None = None, recipe: str = "authors",
               skip_interval: bool | None = None, inversion_steps: int = 25, seed: int = 23, blocks: Any = None,
               **kwargs: Any) -> list[dict[str, Any]]:
    """One motion LoRA per clip of `video` [N, 3, H, W] (at the training size; clips as the edit's,
    `clips.clip_ranges` with the recipe's lengths): `out_dir/clip_<k>/tuned-<step>.safetensors`.
    The "authors" recipe tunes clip 0 for 300 steps and clips k ≥ 1 for 250 with skip-interval attention to
    clip 0's training-size inversion (`inversion_steps`, seeded `seed`), unless `cfg` fixes the steps or
    `skip_interval` is given. The LoRA of each clip is detached after its tuning, so the UNet is left as it came.
    `blocks` (`edit.I2VEditBlocks`): the inversion blocks of clip 0's training-size inversion (the edit's)."""
    from minivid.methods.i2vedit.clips import recipe_for

    def setting(k):
        r = recipe_for(k, recipe)
        return r.clip_len if clip_length is None else clip_length, r

    ranges = clip_ranges(video.shape[0], setting(0)[0], overlap, setting(1)[0])
    if any(e - s < 2 for s, e in ranges):
        raise ValueError(f"{video.shape[0]} frames split into clips {ranges}: a clip of one frame has no motion; "
                         f"read one frame more or less")
    meta = kwargs.pop("meta", None) or {}
    results, source = [], None
    for k, (s, e) in enumerate(ranges):
        r = setting(k)[1]
        skip = r.skip_interval if skip_interval is None else skip_interval
        ck = cfg or default_tune_config(svd.device, steps=r.tune_steps, checkpoint_every=r.checkpoint_every)
        if skip and k > 0 and source is None:
            source = skip_interval_source(svd, video[ranges[0][0]:ranges[0][1]], inversion_steps, seed, blocks)
        lora, result = tune_motion_lora(svd, video[s:e], pathlib.Path(out_dir) / f"clip_{k}", config, ck,
                                        meta={**meta, "clip": k, "clip_range": [s, e], "recipe": r.name,
                                              "skip_interval": bool(skip and k > 0)},
                                        skip_interval=source if (skip and k > 0) else None, **kwargs)
        lora.detach()
        results.append({"clip": k, "range": [s, e], "dir": str(pathlib.Path(out_dir) / f"clip_{k}"), "result": result,
                        "recipe": r.name, "skip_interval": bool(skip and k > 0), "steps": ck.steps})
    return results
