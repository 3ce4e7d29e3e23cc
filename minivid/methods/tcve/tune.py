"""TCVE one-shot tuning (§IV-C, §V-A) on the shared engine (minivid.tuning).

The source video and its prompt train the temporal branch (temporal UNet, STUs) and, as the
authors' code does on top of the paper, Tune-A-Video's set on the SD UNet (`attn1.to_q`,
`attn2.to_q`, `attn_temp`); everything else of SD is frozen. The objective is LDM's (Eq. 1):

    z_0 ~ q(z | video) (VAE posterior sample, per step)     t ~ U{0, …, T−1}, one per video
    ε ~ N(0, I),  z_t = √ᾱ_t·z_0 + √(1−ᾱ_t)·ε
    L = ‖model(z_t, t, text(prompt)) − target‖²             target = ε (SD 1.4), v for a v-model

with the model run on the whole video [(B·F), 4, h, w] (B = 1), so the sparse-causal, temporal
attention and the temporal branch see all F frames.

Settings (`tune_config()`, paper §V-A and the authors' config): AdamW, lr 3e-5 constant, 100
steps, weight decay 1e-2, gradient clipping at global norm 1.0. The engine supplies checkpoints
of the trainable tensors only (safetensors, with this model's `settings` in the metadata), exact
resume, NaN/inf stop with the last good checkpoint, and the progress bar.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Callable

import torch
import torch.nn.functional as F

from minivid.methods.tcve.model import TCVEModel
from minivid.samplers import DDPMSchedule, Prediction, add_noise, training_target
from minivid.tuning import (
    TuneConfig, TuneResult, TuningError, base_fingerprint, check_base, checkpoint_meta, gradient_checkpointing,
    load_trainable, require_method, resolve_checkpoint, tune,
)

__all__ = [
    "TCVE_TUNING", "CHECKPOINT_GLOB", "tune_config", "encode_video", "diffusion_loss", "tune_tcve", "load_tuned",
]

TCVE_TUNING = dict(steps=100, lr=3e-5, weight_decay=1e-2, grad_clip=1.0)

# modules recomputed in the backward pass with gradient checkpointing: every transformer block
CHECKPOINT_GLOB = "unet.*transformer_blocks.[0-9]"


def tune_config(**changes) -> TuneConfig:
    """TuneConfig with TCVE's settings (paper §V-A), optionally changed (None values are ignored)."""
    return TuneConfig(**{**TCVE_TUNING, **{k: v for k, v in changes.items() if v is not None}})


@torch.no_grad()
def encode_video(sd, frames: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior of a clip [F, 3, H, W] in [-1, 1], scaled: (mean, std), each [F, 4, h, w] float32."""
    return sd.encode_posterior(frames, chunk=chunk)


def diffusion_loss(
    model: TCVEModel,
    mean: torch.Tensor,
    context: torch.Tensor,
    frames: int,
    schedule: DDPMSchedule,
    prediction: Prediction = "eps",
    std: torch.Tensor | None = None,
) -> Callable[[int, torch.Generator], torch.Tensor]:
    """loss_fn(step, generator) for minivid.tuning.tune: Eq. 1 on whole videos.

    mean/std: scaled latents of B videos [(B·F), 4, h, w] (std None: use the mean, no posterior
    sampling); context: [B, M, D] text context, one per video. Noise, timesteps and posterior samples
    are drawn on the CPU from the engine's per-step generator, so a resumed run draws the same ones.
    """
    BF = mean.shape[0]
    if BF % frames:
        raise ValueError(f"diffusion_loss: {BF} latents are not whole videos of {frames} frames")
    B = BF // frames
    if context.shape[0] != B:
        raise ValueError(f"diffusion_loss: {context.shape[0]} text contexts for {B} videos")
    context = context.detach().repeat_interleave(frames, dim=0)                     # [(B·F), M, D]
    mean = mean.detach()
    std = None if std is None else std.detach()
    T = schedule.num_train_timesteps

    def randn(gen: torch.Generator) -> torch.Tensor:
        return torch.randn(mean.shape, generator=gen, dtype=torch.float32).to(mean.device)

    def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
        z0 = mean if std is None else mean + std * randn(gen)                       # [(B·F), 4, h, w]
        noise = randn(gen)
        t = torch.randint(0, T, (B,), generator=gen).repeat_interleave(frames).to(mean.device)   # [(B·F)]
        z_t = add_noise(z0, noise, t, schedule)
        target = training_target(z0, noise, t, prediction, schedule)
        pred = model(z_t, t, context, frames=frames)
        return F.mse_loss(pred.float(), target.float())

    return loss_fn


def tune_tcve(
    sd,
    model: TCVEModel,
    frames: torch.Tensor,
    prompt: str,
    cfg: TuneConfig | None = None,
    out_dir: str | os.PathLike = "tcve-tuned",
    *,
    resume: bool = True,
    checkpointing: bool = False,
    sample_latents: bool = True,
    vae_chunk: int | None = None,
    meta: dict | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TuneResult:
    """Tune `model` (built on `sd.unet`) on one clip [F, 3, H, W] in [-1, 1] described by `prompt`.

    cfg: tune_config() by default. checkpointing: recompute the transformer blocks' activations in
    the backward pass (CHECKPOINT_GLOB). sample_latents: draw z_0 from the VAE posterior every step,
    as Tune-A-Video's training loop (False: its mean). Checkpoints go to `out_dir/tuned-<step>.safetensors`.
    The trainable tensors must be float32 (mixed precision: `cfg.autocast`).
    """
    cfg = cfg or tune_config()
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [F, 3, H, W] in [-1, 1], got shape {tuple(frames.shape)}")
    trainable = model.trainable()
    low = sorted({str(p.dtype) for p in trainable.values() if p.dtype != torch.float32})
    if low:
        raise ValueError(f"TCVE tuning keeps the trained tensors in float32 (got {low}); load the model in "
                         f"float32 and use autocast (bf16/fp16) for mixed precision")
    mean, std = encode_video(sd, frames, vae_chunk)
    with torch.no_grad():
        context = sd.encode_prompt([prompt]).float()                                # [1, 77, D]
    loss_fn = diffusion_loss(model, mean, context, frames.shape[0], sd.schedule, sd.prediction,
                             std if sample_latents else None)
    info = {**model.settings, "frames": frames.shape[0], "size": list(frames.shape[-2:]), "prompt": prompt,
            "sample_latents": sample_latents, "base_fingerprint": base_fingerprint(model.unet), **(meta or {})}
    recompute = gradient_checkpointing(model, CHECKPOINT_GLOB) if checkpointing else contextlib.nullcontext()
    # the branch's hooks and the frame count stay in place for the whole loop: the engine's backward
    # pass (and recomputation under gradient checkpointing) runs outside loss_fn
    with model.attached(frames=frames.shape[0]), recompute:
        return tune(model, trainable, loss_fn, cfg, out_dir, resume=resume, meta=info, on_step=on_step)


# ---------------------------------------------------------------- tuned checkpoints

def _normalised(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))                                 # tuples -> lists, as stored


def load_tuned(model: TCVEModel, path: str | os.PathLike) -> dict:
    """Load a TCVE checkpoint (file or tune folder) into `model`; returns its metadata with "path", "step".

    Refuses, with the reason, a checkpoint of another method, of a UNet of another size or of
    another ablation / layout; then every tensor must exist in the model with its shape. Tuned on
    another base model (frozen weights differ): a warning and `base_mismatch` in the result.
    """
    path = resolve_checkpoint(path)
    meta = require_method(checkpoint_meta(path), path, "tcve", "TCVE")
    mine = _normalised(model.settings)
    theirs = {k: meta.get(k) for k in mine}
    if theirs["unet"] != mine["unet"]:
        stored = theirs["unet"] or {}
        diff = {k: (stored.get(k), v) for k, v in mine["unet"].items() if stored.get(k) != v}
        raise TuningError(f"{path}: tuned on a UNet of another size; (checkpoint, this model) differ in {diff}")
    for key in ("ablation", "official_reshape"):
        if theirs[key] != mine[key]:
            raise TuningError(f"{path}: tuned with {key}={theirs[key]!r}, this model has {key}={mine[key]!r}")
    step = load_trainable(path, model)
    return {**meta, "path": str(path), "step": step, "base_mismatch": check_base(meta, model.unet, path)}
