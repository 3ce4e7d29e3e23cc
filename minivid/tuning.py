"""One-shot tuning engine shared by EI² and TCVE.

A method says WHICH tensors train (`trainable`) and HOW the loss of one step is
computed (`loss_fn(step, generator) -> scalar`); the engine owns everything else:
freezing, AdamW, optional autocast (fp16 with a GradScaler) and gradient clipping, a tqdm bar with the
loss, checkpoints of the trainable tensors only (safetensors, written atomically)
with their optimizer moments for an exact resume, and a clear stop on a NaN/inf
loss that keeps the last good checkpoint.

Loading what a method tuned is shared too: `resolve_checkpoint` (a file or a tune folder),
`checkpoint_meta` (what the run recorded), `require_method` (refuse another method's
checkpoint) and `base_fingerprint` / `check_base` (warn when the frozen base model differs).
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import pathlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

AUTOCAST = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TuningError(RuntimeError):
    """Tuning cannot go on (non-finite loss, unusable checkpoint)."""


@dataclass
class TuneConfig:
    """Optimiser and loop settings. Defaults are EI²'s (§5); TCVE overrides steps, clip, decay."""

    steps: int = 500
    lr: float = 3e-5
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = None        # max global grad norm, None = off
    autocast: str | None = None           # "bf16" | "fp16" | None
    checkpoint_every: int = 100           # also written at the last step
    seed: int = 0
    progress: bool = True


@dataclass
class TuneResult:
    losses: list[float]
    checkpoint: pathlib.Path | None
    start_step: int
    steps: int
    seconds: float
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- selection and freezing

def select_parameters(model: nn.Module, patterns: list[str]) -> dict[str, nn.Parameter]:
    """Parameters whose dotted name matches any glob in `patterns`; errors on a glob that matches nothing."""
    params = dict(model.named_parameters())
    chosen: dict[str, nn.Parameter] = {}
    for pat in patterns:
        hits = {n: p for n, p in params.items() if fnmatch.fnmatchcase(n, pat)}
        if not hits:
            raise ValueError(f"trainable pattern {pat!r} matches no parameter of {type(model).__name__}")
        chosen.update(hits)
    return chosen


def select_buffers(model: nn.Module, patterns: list[str]) -> dict[str, torch.Tensor]:
    """Buffers whose dotted name matches any glob (state that tuning changes without gradients,
    e.g. the power-iteration vectors of spectral normalisation); they are checkpointed too."""
    return {n: b for n, b in model.named_buffers() if any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def freeze_all_but(model: nn.Module, trainable: dict[str, nn.Parameter]) -> None:
    keep = {id(p) for p in trainable.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


# ---------------------------------------------------------------- checkpoints

def _atomic_save(tensors: dict[str, torch.Tensor], path: pathlib.Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_trainable(
    path: str | os.PathLike,
    trainable: dict[str, nn.Parameter],
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
    meta: dict | None = None,
    buffers: dict[str, torch.Tensor] | None = None,
) -> pathlib.Path:
    """Write the trainable tensors and `buffers` (and, beside them, the optimizer's moments) atomically."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"step": str(step), "meta": json.dumps(meta or {}, default=str)}
    _atomic_save({**trainable, **(buffers or {})}, path, info)
    if optimizer is not None:
        moments = {}
        for name, p in trainable.items():
            st = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in st:
                    t = st[key]
                    moments[f"{key}/{name}"] = t if torch.is_tensor(t) else torch.tensor(float(t))
        _atomic_save(moments, path.with_name(path.stem + ".optim.safetensors"), info)
    return path


def load_trainable(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    trainable: dict[str, nn.Parameter] | None = None,
) -> int:
    """Load tuned tensors (parameters or buffers) into `model`; all must exist there with equal
    shapes. Returns the step they were saved at."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tuned checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            step = int((f.metadata() or {}).get("step", 0))
    except Exception as e:  # safetensors raises several types for damaged files
        raise TuningError(f"{path}: not a readable safetensors checkpoint ({e})") from e
    params = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    missing = [k for k in tensors if k not in params]
    bad = [k for k in tensors if k in params and params[k].shape != tensors[k].shape]
    if missing or bad:
        raise TuningError(
            f"{path}: {len(missing)} tensors unknown to the model (first: {missing[:5]}), "
            f"{len(bad)} with other shapes (first: {bad[:5]}); was it tuned for another method or model size?"
        )
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t.to(params[k].dtype))
    optim_path = path.with_name(path.stem + ".optim.safetensors")
    if optimizer is not None and trainable is not None and optim_path.is_file():
        moments = load_file(str(optim_path))
        for name, p in trainable.items():
            st = {}
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if f"{key}/{name}" in moments:
                    st[key] = moments[f"{key}/{name}"].to(p.device)
            if st:
                optimizer.state[p] = st
    return step


def latest_checkpoint(out_dir: str | os.PathLike) -> pathlib.Path | None:
    found = sorted(pathlib.Path(out_dir).glob("tuned-*.safetensors"))
    found = [p for p in found if not p.name.endswith(".optim.safetensors")]
    return found[-1] if found else None


def resolve_checkpoint(path: str | os.PathLike) -> pathlib.Path:
    """A checkpoint file, or a `minivid tune` output folder (its newest checkpoint)."""
    path = pathlib.Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no tuned-*.safetensors checkpoint in this folder")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"tuned checkpoint {path} does not exist")
    return path


def checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata `tune` wrote into a checkpoint (file or tune folder): `{"config": TuneConfig as a
    dict, "method": ..., <the method's meta>}` plus "step"."""
    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises several types for damaged files
        raise TuningError(f"{path}: not a readable safetensors checkpoint ({e})") from e
    try:
        meta = json.loads(raw.get("meta", "{}"))
    except json.JSONDecodeError as e:
        raise TuningError(f"{path}: unreadable metadata ({e})") from e
    return {**meta, "step": int(raw.get("step", 0))}


def require_method(meta: dict[str, Any], path: str | os.PathLike, method: str, label: str) -> dict[str, Any]:
    """`meta` if the checkpoint is `method`'s (its metadata says "method"); a TuningError naming the
    method it belongs to otherwise. `label`: the method's name in messages (e.g. "EI²")."""
    found = meta.get("method")
    if found != method:
        raise TuningError(f"{path}: a checkpoint of {found or 'an unknown method'!r}, not {label}; tune one with "
                          f"`minivid tune --method {method}`" + (f" or edit with --method {found}" if found else ""))
    return meta


# ---------------------------------------------------------------- the frozen base model

# frozen SD UNet tensors whose mean |w| identifies the base model a checkpoint was tuned on
FINGERPRINT_TENSORS = ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight")


def base_fingerprint(unet: nn.Module) -> list[float]:
    """Mean |w| of a few frozen UNet tensors: equal (up to dtype rounding) for the same base model."""
    params = dict(unet.named_parameters())
    return [float(params[n].detach().double().abs().mean()) for n in FINGERPRINT_TENSORS if n in params]


def check_base(meta: dict[str, Any], unet: nn.Module, path: str | os.PathLike) -> bool:
    """True (and a warning) when the checkpoint's recorded `base_fingerprint` differs from `unet`'s by
    more than 1 %: it was tuned on another base model, and the edit uses the loaded base."""
    fingerprint = meta.get("base_fingerprint")
    here = base_fingerprint(unet)
    mismatch = bool(fingerprint) and any(abs(a - b) > 1e-2 * abs(a) for a, b in zip(fingerprint, here))
    if mismatch:
        log.warning("%s was tuned on another base model than the one loaded (frozen weights differ); "
                    "the edit uses the loaded base with the tuned tensors", path)
    return mismatch


# ---------------------------------------------------------------- gradient checkpointing

@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, pattern: str) -> Iterator[list[str]]:
    """Recompute the activations of modules matching `pattern` in the backward pass (scoped)."""
    from torch.utils.checkpoint import checkpoint

    mods = {n: m for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, pattern)}
    if not mods:
        raise ValueError(f"gradient_checkpointing: no module matches {pattern!r}")

    def wrap(fwd):
        def forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return fwd(*args, **kwargs)
            return checkpoint(fwd, *args, use_reentrant=False, **kwargs)
        return forward

    try:
        for m in mods.values():
            m.forward = wrap(m.forward)
        yield list(mods)
    finally:
        for m in mods.values():
            del m.forward  # the instance attribute shadowed the class method


# ---------------------------------------------------------------- the loop

def tune(
    model: nn.Module,
    trainable: dict[str, nn.Parameter],
    loss_fn: Callable[[int, torch.Generator], torch.Tensor],
    cfg: TuneConfig,
    out_dir: str | os.PathLike,
    resume: bool = True,
    meta: dict | None = None,
    on_step: Callable[[int, float], None] | None = None,
    buffers: dict[str, torch.Tensor] | None = None,
) -> TuneResult:
    """Run `cfg.steps` AdamW steps of `loss_fn` on `trainable`; everything else stays frozen.

    Checkpoints go to `out_dir/tuned-<step>.safetensors`. With `resume`, the newest one
    there (and its optimizer moments) is loaded and the loop continues after its step.
    A non-finite loss raises TuningError after writing the current (still finite)
    tensors as the last good checkpoint.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    freeze_all_but(model, trainable)
    model.train()
    opt = torch.optim.AdamW(
        list(trainable.values()), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    meta = {"config": asdict(cfg), **(meta or {})}
    start = 0
    if resume and (ckpt := latest_checkpoint(out_dir)) is not None:
        start = load_trainable(ckpt, model, opt, trainable)
        log.info("resuming from %s (step %d)", ckpt, start)
    if cfg.autocast not in AUTOCAST:
        raise ValueError(f"autocast must be one of {list(AUTOCAST)}, not {cfg.autocast!r}")
    amp_dtype = AUTOCAST[cfg.autocast]
    device = next(iter(trainable.values())).device
    # fp16 needs loss scaling (its gradients underflow); a disabled scaler is a pass-through
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    gen = torch.Generator(device="cpu")
    losses: list[float] = []
    last: pathlib.Path | None = latest_checkpoint(out_dir)
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc="tuning", disable=not cfg.progress, initial=start, total=cfg.steps)
    for step in bar:
        gen.manual_seed(cfg.seed * 1_000_003 + step)  # per-step seed: a resumed run draws the same noise
        amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with amp:
            loss = loss_fn(step, gen)
        value = float(loss.detach())
        if not math.isfinite(value):
            last = save_trainable(out_dir / f"tuned-{step:06d}.safetensors", trainable, step, opt, meta, buffers)
            raise TuningError(
                f"loss became {value} at step {step + 1}/{cfg.steps}; tuning stopped. The last good "
                f"tensors (before this step) are in {last}. Try a lower learning rate, fp32 "
                f"(no --autocast) or another seed."
            )
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
        if on_step:
            on_step(step, value)
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            last = save_trainable(out_dir / f"tuned-{done:06d}.safetensors", trainable, done, opt, meta, buffers)
    model.eval()
    return TuneResult(losses, last, start, cfg.steps, time.perf_counter() - t0)
