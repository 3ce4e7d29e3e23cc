"""EI²'s one-shot tuning (§5) on the shared engine `minivid.tuning`, and loading what it saved.

"We keep the Autoencoder of LDM frozen and tune W_Q of the FFAM and CA Modules, and all parameters
of STAMs ... AdamW optimizer with a learning rate of 3e-5 for a total of 500 steps" (§5), on the
diffusion loss of the source video under its prompt (§4.1):

    x_0 ~ VAE posterior of the frames (scaled),  t ~ U{0, …, T−1} per video,  ε ~ N(0, I)
    loss = ‖ UNet(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t, text) − target ‖²,  target = ε (SD 1.4) or v (v-models)

One t per video, shared by its frames (as Tune-A-Video). The frames are encoded once; each step
draws x_0 from the stored posterior (mean + std·n, what a per-step `latent_dist.sample()` gives)
and the prompt is encoded once (the text encoder is frozen). Each step first refreshes STAM's
spectral norms (`model.power_iteration`), so gradient checkpointing recomputes the same forward.

The engine owns the rest: freezing, AdamW, autocast, the tqdm bar with the loss, checkpoints of
the trainable tensors (here with STAM's power-iteration buffers) as safetensors with resume, and a
clear stop on a non-finite loss. Checkpoint names are the UNet's own (`input_blocks.1.1.
transformer_blocks.0.stam.attn.to_q.weight`, ...); the metadata records the method, the EI²
configuration, the prompt and a fingerprint of the frozen base model, so `load_tuned` can refuse
a checkpoint of another method or model size and warn about another base model.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from safetensors import safe_open

from minivid import tuning
from minivid.attention import call_state
from minivid.methods.ei2.model import (
    BUFFER_PATTERNS, EI2Config, EI2Model, STAMBlockMixin, power_iteration, trainable_patterns,
)
from minivid.samplers import add_noise, training_target
from minivid.tuning import (
    TuneConfig, TuneResult, TuningError, base_fingerprint, check_base, checkpoint_meta, resolve_checkpoint,
)

__all__ = ["METHOD", "encode_video", "diffusion_loss", "tuned_tensors", "tune_video", "require_method", "load_tuned"]

log = logging.getLogger(__name__)

METHOD = "ei2"
CHECKPOINTED_BLOCKS = "*transformer_blocks.[0-9]"      # gradient checkpointing: each transformer block


# ---------------------------------------------------------------- the loss

@torch.no_grad()
def encode_video(sd, frames: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames [F, 3, H, W] in [-1, 1] -> the VAE posterior's (mean, std) as scaled video latents
    [1, C, F, h, w] (float32)."""
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [F, 3, H, W] in [-1, 1], got shape {tuple(frames.shape)}")
    mean, std = sd.encode_posterior(frames, chunk=chunk)                               # [F, C, h, w] each
    return mean.transpose(0, 1).unsqueeze(0), std.transpose(0, 1).unsqueeze(0)       # [1, C, F, h, w]


def diffusion_loss(
    model: EI2Model,
    mean: torch.Tensor,
    context: torch.Tensor,
    schedule,
    prediction: str,
    std: torch.Tensor | None = None,
    refresh: bool = True,
) -> Callable[[int, torch.Generator], torch.Tensor]:
    """loss_fn(step, generator) for `minivid.tuning.tune`: the ε-MSE (or v-MSE) of the video.

    mean/std: [B, C, F, h, w] scaled posterior (std None: x_0 = mean); context [B, M, D]. Every
    random draw (posterior sample, noise, t) comes from `generator` on the CPU, so a seeded
    generator gives the same batch on every device and a resumed run the same steps. `refresh`
    runs one spectral-norm power iteration first (tuning); False evaluates without changing the model.
    """
    B = mean.shape[0]
    T = schedule.num_train_timesteps

    def loss_fn(step: int, gen: torch.Generator) -> torch.Tensor:
        if refresh:
            power_iteration(model.unet)
        x0 = mean
        if std is not None:
            x0 = mean + std * torch.randn(mean.shape, generator=gen).to(mean.device)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        t = torch.randint(0, T, (B,), generator=gen).to(x0.device)                   # one t per video
        xt = add_noise(x0, noise, t, schedule)
        pred = model(xt, t, context)                                                   # [B, C, F, h, w]
        return F.mse_loss(pred.float(), training_target(x0, noise, t, prediction, schedule).float())

    return loss_fn


# ---------------------------------------------------------------- what is tuned and saved

def tuned_tensors(unet: torch.nn.Module, config: EI2Config | None = None) -> tuple[dict, dict]:
    """(trainable parameters, checkpointed buffers) of an inflated UNet, by their UNet-relative names."""
    params = tuning.select_parameters(unet, trainable_patterns(config))
    buffers = tuning.select_buffers(unet, list(BUFFER_PATTERNS))
    return params, buffers


def tune_video(
    sd,
    frames: torch.Tensor,
    prompt: str,
    out_dir: str | os.PathLike,
    config: EI2Config | None = None,
    cfg: TuneConfig | None = None,
    gradient_checkpointing: bool = False,
    resume: bool = True,
    meta: dict[str, Any] | None = None,
    inflation_seed: int = 0,
    sample_posterior: bool = True,
    vae_chunk: int | None = None,
    model: EI2Model | None = None,
) -> tuple[EI2Model, TuneResult]:
    """Inflate `sd.unet` in place (EI²'s blocks, `config`) and tune it on one video; or tune
    `model`, an EI2Model already inflated on `sd.unet` (its config is used).

    frames [F, 3, H, W] in [-1, 1]; prompt describes the video. `cfg` defaults to the paper's
    (AdamW, lr 3e-5, 500 steps); `cfg.autocast` "bf16"/"fp16" runs the forward in mixed precision
    (the weights stay float32). `gradient_checkpointing` recomputes each transformer block in the
    backward pass (which is why `call_state(unet, frames=F)` is held around the whole run).
    Checkpoints `out_dir/tuned-<step>.safetensors` hold the trainable tensors and STAM's
    power-iteration buffers; with `resume` the newest one there is continued.
    Returns the inflated model (eval mode) and the engine's result.
    """
    cfg = cfg or TuneConfig()
    if sd.dtype != torch.float32:
        raise ValueError(f"EI² tuning needs float32 weights (the model is {sd.dtype}); "
                         f"use autocast (bf16/fp16) for mixed precision")
    if model is None:
        config = config or EI2Config()
        model = EI2Model(sd.unet, config, seed=inflation_seed)
    elif model.unet is not sd.unet or model.config is None:
        raise ValueError("tune_video: `model` must be EI2Model(sd.unet, config), inflated from this sd")
    else:
        config = model.config
    params, buffers = tuned_tensors(sd.unet, config)
    with torch.no_grad():
        mean, std = encode_video(sd, frames, vae_chunk)
        context = sd.encode_prompt([prompt]).float()                                    # [1, 77, D]
    loss_fn = diffusion_loss(model, mean, context, sd.schedule, sd.prediction, std if sample_posterior else None)
    info = {
        "method": METHOD, "ei2": config.to_dict(), "prompt": prompt, "frames": int(frames.shape[0]),
        "size": list(frames.shape[-2:]),
        "unet": {"kind": sd.kind, "model_channels": sd.config.unet.model_channels},
        "base_fingerprint": base_fingerprint(sd.unet), "inflation_seed": inflation_seed,
        "sample_posterior": sample_posterior, **(meta or {}),
    }
    log.info("EI² tuning: %d trainable tensors (%.2fM values), %d buffers; %d steps at lr %g",
             len(params), sum(p.numel() for p in params.values()) / 1e6, len(buffers), cfg.steps, cfg.lr)
    # The frame count stays in the call state for the whole run: gradient checkpointing recomputes
    # the blocks during backward, after EI2Model.forward's own call_state scope has closed.
    with call_state(sd.unet, frames=int(frames.shape[0])), contextlib.ExitStack() as stack:
        if gradient_checkpointing:
            stack.enter_context(tuning.gradient_checkpointing(sd.unet, CHECKPOINTED_BLOCKS))
        result = tuning.tune(sd.unet, params, loss_fn, cfg, out_dir, resume, info, buffers=buffers)
    for p in sd.unet.parameters():
        p.requires_grad_(False)
    return model.eval(), result


# ---------------------------------------------------------------- loading a tuned model

def require_method(meta: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """`meta` if it is an EI² checkpoint's; a TuningError naming the method it belongs to otherwise."""
    return tuning.require_method(meta, path, METHOD, "EI²")


def load_tuned(sd, path: str | os.PathLike, config: EI2Config | None = None) -> tuple[EI2Model, dict[str, Any]]:
    """Inflate `sd.unet` as the checkpoint says (or as `config` overrides) and load the tuned tensors.

    Refuses a checkpoint of another method (its metadata names it), one that lacks EI²'s tuned
    tensors or has other shapes (another model size); warns when the frozen base model differs from
    the one it was tuned on. The model is left in eval mode (STAM's stored spectral norms, no power
    iteration), as editing needs. Returns the model and the checkpoint's metadata.
    """
    path = resolve_checkpoint(path)
    meta = require_method(checkpoint_meta(path), path)
    saved = EI2Config.from_dict(meta.get("ei2", {}))
    config = config or saved
    if config.stam != saved.stam:
        raise TuningError(f"{path}: tuned with stam={saved.stam}; cannot load with stam={config.stam}")
    if any(isinstance(m, STAMBlockMixin) for m in sd.unet.modules()):
        raise ValueError("load_tuned: the UNet is already inflated; load into a fresh model")
    model = EI2Model(sd.unet, config, seed=meta.get("inflation_seed", 0))
    params, buffers = tuned_tensors(sd.unet, config)
    with safe_open(str(path), "pt") as f:
        names = set(f.keys())
    missing = sorted((set(params) | set(buffers)) - names)
    if missing:
        raise TuningError(f"{path}: {len(missing)} of EI²'s tuned tensors or buffers are missing (first: {missing[:3]}); "
                          f"was it tuned for another method or model size?")
    tuning.load_trainable(path, sd.unet)
    meta["base_mismatch"] = check_base(meta, sd.unet, path)
    for p in sd.unet.parameters():
        p.requires_grad_(False)
    return model.eval(), {**meta, "path": str(path)}
