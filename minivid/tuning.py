"""One-shot tuning engine shared by EI² and TCVE.

A method says WHICH tensors train (`trainable`) and HOW the loss of one step is
computed (`loss_fn(step, generator) -> scalar`); the engine owns everything else:
freezing, AdamW, optional autocast (fp16 with a GradScaler) and gradient clipping, a tqdm bar with the
loss, checkpoints of the trainable tensors only (safetensors, written atomically)
with their optimizer moments for an exact resume of the same run (`run_fingerprint`:
another run's checkpoint is refused with the fields that differ), and a clear stop on a
NaN/inf loss that keeps the last good checkpoint. Under torch.distributed (`minivid.distributed`)
the loop is data-parallel: see `tune` and docs/distributed.md.

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

from minivid import distributed

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
    """Through `minivid.outputs.write_file`: a fresh temporary file (never a fixed, guessable name),
    renamed into place with the umask's mode."""
    from minivid.outputs import write_file

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_file(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


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
    if optimizer is not None and trainable is not None and not optim_path.is_file():
        log.warning("%s: no optimizer moments beside it (%s is missing): the resumed run starts AdamW's moments "
                    "afresh, so it will differ from an uninterrupted run", path, optim_path.name)
    if optimizer is not None and trainable is not None and optim_path.is_file():
        try:
            moments = load_file(str(optim_path))
        except Exception as e:  # safetensors raises several types for damaged files
            raise TuningError(f"{optim_path}: not a readable safetensors file of optimizer moments ({e}); the "
                              f"checkpoint {path.name} beside it can be resumed without it only by moving it "
                              f"away (AdamW's moments then start afresh)") from e
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


# ---------------------------------------------------------------- what defines a run (resume)

# keys of a checkpoint's metadata (dotted) that do not define the run: how long it goes, how often
# it saves, whether a bar shows, where the base file lies (its weights are compared by
# base_fingerprint), how many processes share the batch, and kernels chosen for speed
RESUME_IGNORED = ("config.steps", "config.checkpoint_every", "config.progress", "base.weights", "world_size",
                  "*.ffam_backend")


def frames_digest(frames: torch.Tensor) -> str:
    """A short digest of a source clip [F, 3, H, W] in [-1, 1] (its shape and 8-bit values): equal for
    the same frames read the same way, robust to last-bit float differences."""
    import hashlib

    q = ((frames.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()
    h = hashlib.sha256(str(tuple(q.shape)).encode())
    h.update(q.numpy().tobytes())
    return h.hexdigest()[:16]


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def run_fingerprint(meta: dict[str, Any]) -> dict[str, Any]:
    """What defines a tuning run, from the metadata `tune` writes into its checkpoints (dotted keys):
    the source frames' digest, the prompt, the method's options, the optimiser settings and seed,
    the base model's fingerprint. Not: RESUME_IGNORED (steps, checkpoint interval, ...)."""
    flat = _flat(json.loads(json.dumps(meta, default=str)))                   # tuples -> lists, as stored
    flat.pop("step", None)
    return {k: v for k, v in flat.items() if not any(fnmatch.fnmatchcase(k, p) for p in RESUME_IGNORED)}


def fingerprint_diff(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (saved, now)} of the fields in which two runs differ; the base fingerprints compare
    within 1 % (dtype rounding), everything else exactly."""
    a, b = run_fingerprint(saved), run_fingerprint(now)
    diff = {}
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if k == "base_fingerprint" and isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            if all(abs(u - v) <= 1e-2 * abs(u) for u, v in zip(x, y)):
                continue
        if x != y:
            diff[k] = (x, y)
    return diff


def _short(v: Any, width: int = 60) -> str:
    text = repr(v)
    return text if len(text) <= width else text[: width - 3] + "..."


def set_aside(out_dir: str | os.PathLike) -> pathlib.Path | None:
    """Move the checkpoints of `out_dir` (tuned-*.safetensors and their moments) into a new
    `out_dir/previous-<n>/`; returns that folder (None: there were none)."""
    out_dir = pathlib.Path(out_dir)
    found = sorted(out_dir.glob("tuned-*.safetensors"))
    if not found:
        return None
    n = 1
    while (out_dir / f"previous-{n}").exists():
        n += 1
    aside = out_dir / f"previous-{n}"
    aside.mkdir()
    for p in found:
        os.replace(p, aside / p.name)
    return aside


def check_resume(ckpt: pathlib.Path, meta: dict[str, Any], steps: int) -> int:
    """The step to resume `ckpt` at, or a TuningError when it cannot be: the checkpoint was tuned for
    another run (the message lists the fields that differ) or is already past `steps`."""
    saved = checkpoint_meta(ckpt)
    diff = fingerprint_diff(saved, meta)
    where = ckpt.parent
    if diff:
        fields = "; ".join(f"{k}: {_short(x)} (checkpoint) vs {_short(y)} (now)" for k, (x, y) in diff.items())
        raise TuningError(
            f"{where} holds another tuning run ({ckpt.name}); it differs in {len(diff)} field(s): {fields}. "
            f"A resume continues the same run: choose another output folder, or restart in this one "
            f"(`minivid tune --restart`, tune(..., resume=False)); the old checkpoints are then kept in "
            f"{where}/previous-<n>/")
    step = int(saved.get("step", 0))
    if step > steps:
        raise TuningError(
            f"{where}: the run is already at step {step} ({ckpt.name}), past the {steps} steps asked for; give "
            f"--steps {step} or more to go on from there, or restart (`minivid tune --restart`)")
    return step


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The seed of the generator a step's loss draws from (timesteps, noise, posterior samples) on
    process `rank`: a resumed run draws the same; rank 0 draws what a single process draws, and each
    other rank its own stream (distinct for fewer than 2**40 steps)."""
    return (seed * 1_000_003 + step + rank * (1 << 40)) % (1 << 63)


# ---------------------------------------------------------------- the loop

def _resume_or_restart(out_dir: pathlib.Path, model, opt, trainable, meta, cfg, resume: bool):
    """On rank 0: (start step, last checkpoint, folder the old checkpoints went to)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        return 0, None, None
    if not resume:
        aside = set_aside(out_dir)
        log.info("starting over in %s; the earlier checkpoints are in %s", out_dir, aside)
        return 0, None, aside
    check_resume(ckpt, meta, cfg.steps)
    start = load_trainable(ckpt, model, opt, trainable)
    log.info("resuming from %s (step %d)", ckpt, start)
    return start, ckpt, None


def _sync_start(trainable: dict[str, nn.Parameter], buffers: dict[str, torch.Tensor] | None,
                opt: torch.optim.Optimizer) -> None:
    """Make every rank's trainable tensors, buffers and AdamW moments rank 0's (after a resume, or
    differently initialised modules)."""
    with torch.no_grad():
        for t in [*trainable.values(), *(buffers or {}).values()]:
            distributed.broadcast_(t.data)
        has_state = distributed.broadcast_object([p in opt.state for p in trainable.values()])
        for p, has in zip(trainable.values(), has_state):
            if not has:
                opt.state.pop(p, None)
                continue
            if p not in opt.state or not opt.state[p]:
                opt.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p),
                                "step": torch.zeros((), dtype=torch.float32)}
            for key in ("exp_avg", "exp_avg_sq", "step"):
                distributed.broadcast_(opt.state[p][key])


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

    Checkpoints go to `out_dir/tuned-<step>.safetensors`. With `resume`, the newest one there (and
    its optimizer moments) is continued after its step, if it was tuned for the same run (what
    `run_fingerprint` of `meta` holds: source, prompt, options, seed, base model) and is not past
    `cfg.steps`; otherwise a TuningError says why. Without `resume`, earlier checkpoints are moved
    into `out_dir/previous-<n>/` and the run starts over. A non-finite loss raises TuningError after
    writing the current (still finite) tensors as the last good checkpoint.

    Under torch.distributed (`minivid.distributed.init()`, W > 1 processes) the run is data-parallel:
    every rank starts from rank 0's tensors, draws its own batch (`step_seed(seed, step, rank)`),
    and the gradients are averaged over the ranks (one bucketed all-reduce after backward) before
    the AdamW step, so the update is that of the mean loss over W draws; the losses reported are
    that mean. Only rank 0 writes checkpoints and shows the bar; a non-finite loss or an error on
    any rank stops every rank with the same TuningError. At W = 1 none of this runs.
    """
    out_dir = pathlib.Path(out_dir)
    world, rank = distributed.world_size(), distributed.rank()
    main = rank == 0
    if cfg.autocast not in AUTOCAST:
        raise ValueError(f"autocast must be one of {list(AUTOCAST)}, not {cfg.autocast!r}")
    freeze_all_but(model, trainable)
    model.train()
    opt = torch.optim.AdamW(
        list(trainable.values()), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    meta = {"config": asdict(cfg), **(meta or {})}
    if world > 1:
        meta["world_size"] = world
    start, last, _ = distributed.on_main(
        lambda: _resume_or_restart(out_dir, model, opt, trainable, meta, cfg, resume))
    if world > 1:
        _sync_start(trainable, buffers, opt)
    amp_dtype = AUTOCAST[cfg.autocast]
    device = next(iter(trainable.values())).device
    # fp16 needs loss scaling (its gradients underflow); a disabled scaler is a pass-through
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    gen = torch.Generator(device="cpu")
    losses: list[float] = []
    params = list(trainable.values())
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc="tuning", disable=not (cfg.progress and main), initial=start,
               total=cfg.steps)
    for step in bar:
        gen.manual_seed(step_seed(cfg.seed, step, rank))  # per-step seed: a resumed run draws the same noise
        amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        if world == 1:
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
        else:
            value = _parallel_step(step, cfg, loss_fn, gen, amp, opt, params, trainable, buffers, meta, out_dir,
                                   scaler)
        if cfg.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        losses.append(value)
        bar.set_postfix(loss=f"{value:.4f}")
        if on_step:
            on_step(step, value)
        done = step + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            last = out_dir / f"tuned-{done:06d}.safetensors"
            if main:
                save_trainable(last, trainable, done, opt, meta, buffers)
            distributed.barrier()
    model.eval()
    extra = {"world_size": world} if world > 1 else {}
    return TuneResult(losses, last, start, cfg.steps, time.perf_counter() - t0, extra)


def _parallel_step(step, cfg, loss_fn, gen, amp, opt, params, trainable, buffers, meta, out_dir, scaler) -> float:
    """One data-parallel step's loss and backward on this rank, the check that every rank's loss is
    finite (one small all-reduce of every rank's loss and error flag) and the gradient average.
    Returns the mean loss over the ranks."""
    world, rank = distributed.world_size(), distributed.rank()
    failure: BaseException | None = None
    opt.zero_grad(set_to_none=True)
    try:
        with amp:
            loss = loss_fn(step, gen)
        value = float(loss.detach())
        if math.isfinite(value):
            scaler.scale(loss).backward()      # fp16: scaled; the same scale on every rank
    except Exception as e:  # every rank must learn of it, or the others wait in the all-reduce
        failure, value = e, float("nan")
    P = len(params)
    flags = torch.zeros(2 * world + P, dtype=torch.float64)     # losses, error flags, which grads exist
    flags[rank], flags[world + rank] = value, float(failure is not None)
    flags[2 * world:] = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64)
    distributed.all_reduce_(flags)
    values = flags[:world].tolist()
    failed = [r for r in range(world) if flags[world + r] > 0]
    bad = [r for r, v in enumerate(values) if not math.isfinite(v) and r not in failed]
    if failed or bad:
        last = out_dir / f"tuned-{step:06d}.safetensors"
        if rank == 0:
            save_trainable(last, trainable, step, opt, meta, buffers)
        distributed.barrier()
        what = ", ".join([f"rank {r}: an error (see its log)" for r in failed]
                         + [f"rank {r}: loss {values[r]}" for r in bad])
        error = TuningError(
            f"tuning stopped at step {step + 1}/{cfg.steps} on all {world} ranks ({what}). The last good "
            f"tensors (before this step) are in {last}. Try a lower learning rate, fp32 (no --autocast) or "
            f"another seed.")
        if failure is not None:
            raise error from failure
        raise error
    grads = []
    for p, used in zip(params, flags[2 * world:].tolist()):
        if used:                                 # a tensor no rank's loss reached keeps grad None
            if p.grad is None:                   # reached on other ranks only: this rank adds zeros
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
    distributed.all_reduce_mean_(grads)
    return sum(values) / world
