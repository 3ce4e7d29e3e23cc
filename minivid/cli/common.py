"""What the jobs share: their options, loading the model they ask for, reading the source video,
and the outputs every edit writes. Used by the subcommands and by the methods' CLIs
(`minivid.methods.<name>.cli`), so each of those keeps only what its paper adds.
"""
from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path

import torch

from minivid.jobs import Job

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_SIZE = 512
TINY_PRESETS = {"sd1": "tiny", "sd2": "tiny_sd2"}    # the tiny random model of each SD generation
BASE_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x"}


# ---------------------------------------------------------------- options

def add_run_arguments(p: argparse.ArgumentParser, device: str | None = None) -> None:
    """--device, --seed, --out, --threads: what every job takes."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--device", default=device, help=f"torch device (default {device})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", help="output folder (default outputs/<job>-<time>/)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def add_model_arguments(p: argparse.ArgumentParser, weights_help: str = "official checkpoint file or diffusers folder") -> None:
    p.add_argument("--weights", help=weights_help + " (omit with --tiny)")
    p.add_argument("--tiny", action="store_true", help="use a tiny random model instead of weights (a demo of the machinery: it makes no real images)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="compute dtype (default fp32)")
    add_run_arguments(p)


def add_video_arguments(p: argparse.ArgumentParser, images: bool = False) -> None:
    """--video (required) and how it is read. images=True: a single image file is accepted too
    (one frame), and `--image` is the same option."""
    if images:
        p.add_argument("--video", "--image", dest="video", required=True,
                       help="input video (mp4/gif/webm), folder of frames, or a single image (png/jpg/...)")
    else:
        p.add_argument("--video", required=True, help="input video (mp4/gif/webm) or a folder of frames")
    p.add_argument("--frames", type=int, default=8, help="number of frames to read (default 8)")
    p.add_argument("--stride", type=int, default=1, help="take every n-th frame (default 1)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help=f"frames are resized and center-cropped to this size (multiple of 64; default {DEFAULT_SIZE}, "
                        f"with --tiny the tiny model's size)")
    p.add_argument("--fps", type=float, default=8, help="frame rate of the written videos (default 8)")


# ---------------------------------------------------------------- the model

def require_weights(args: argparse.Namespace) -> None:
    if not args.weights and not args.tiny:
        raise ValueError("give --weights PATH (an official checkpoint or a diffusers folder; see weights/README.md) or --tiny")


def load_sd(args: argparse.Namespace, method: str | None = None, base: str = "sd1", tiny_seed: int | None = None):
    """The StableDiffusion the options ask for: --weights PATH (--prediction where the parser has it),
    or with --tiny the tiny random model of `base`'s generation ("sd1" | "sd2"), seeded by `tiny_seed`
    (a tuned checkpoint's) or --seed. `method`: its name, to warn when the weights are not its base."""
    from minivid.models import StableDiffusion

    require_weights(args)
    dtype = DTYPES[args.dtype]
    if args.weights:
        sd = StableDiffusion.load(args.weights, device=args.device, dtype=dtype,
                                  prediction=getattr(args, "prediction", None))
        if method and sd.kind != base:
            log.warning("%s is built on %s; %s is an %s model", method, BASE_NAMES[base], args.weights,
                        BASE_NAMES.get(sd.kind, sd.kind))
        return sd
    seed = args.seed if tiny_seed is None else tiny_seed
    log.warning("--tiny: a tiny %s-style model with RANDOM weights (seed %d); its outputs are not meaningful",
                BASE_NAMES[base], seed)
    return StableDiffusion.from_config(TINY_PRESETS[base], device=args.device, dtype=dtype, seed=seed)


def tiny_base(args: argparse.Namespace) -> dict:
    """What a tuned checkpoint records about its base model, so edit rebuilds the same tiny model."""
    return {"weights": args.weights or "tiny", "tiny_seed": None if args.weights else args.seed}


# ---------------------------------------------------------------- the source video

def source_size(args: argparse.Namespace, sd) -> int:
    """--size; left at its default (or None) with --tiny, the tiny model's own size."""
    if args.size is None or (args.tiny and args.size == DEFAULT_SIZE):
        return sd.config.image_size if args.tiny else DEFAULT_SIZE
    return args.size


def read_source(args: argparse.Namespace, sd, images: bool = False) -> torch.Tensor:
    """The source clip [F, 3, H, W] in [-1, 1]: --frames frames every --stride of --video, resized to
    `source_size` and cropped to a multiple the model accepts. images=True: an image file is one frame."""
    from minivid.video import IMAGE_EXTENSIONS, fit, read_image, read_video

    path = Path(args.video)
    if images and path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
        frames = read_image(path)[None]
    else:
        frames = read_video(path, num_frames=args.frames, stride=args.stride)
    multiple = sd.config.downsample_factor * sd.config.unet.downsample_factor
    return fit(frames, source_size(args, sd), multiple=multiple, source=args.video)


# ---------------------------------------------------------------- handing over to a method

# Method CLIs that already live under minivid/cli/ (the agreed layout), by method name.
CLI_MODULES = {"i2vedit": "minivid.cli.i2vedit_edit"}


def run_method(args: argparse.Namespace, action: str, hint: str = "") -> int:
    """`minivid <action> --method NAME`: run `minivid.methods.<name>.cli.<action>(args, job)` in a job
    folder of its own and write its record. `hint`: what to do instead when the method has none."""
    from minivid.methods import method_cli

    try:
        mod = importlib.import_module(CLI_MODULES[args.method]) if args.method in CLI_MODULES else method_cli(args.method)
    except ModuleNotFoundError:
        mod = None
    if mod is None or not hasattr(mod, action):
        raise ValueError(f"method {args.method!r} has no {action} in this installation "
                         f"(minivid.methods.{args.method}.cli.{action}){hint}")
    job = Job(f"{action}-{args.method}", args.out, vars(args))
    results = getattr(mod, action)(args, job)
    record = job.finish(**(results or {}))
    print(f"wrote {job.dir} ({', '.join(job.record['outputs'])}); record: {record}")
    return 0


# ---------------------------------------------------------------- outputs

def write_edit(job: Job, source: torch.Tensor, edited: torch.Tensor, fps: float = 8) -> None:
    """What every edit writes: edited.mp4, grid.png (source row over edited row), side_by_side.mp4."""
    source, edited = source.cpu(), edited.cpu()
    with job.timed("write"):
        job.write_video("edited.mp4", edited, fps=fps)
        job.write_grid("grid.png", torch.cat([source, edited]), cols=len(source))
        job.write_side_by_side("side_by_side.mp4", source, edited, fps=fps)


def tuning_summary(label: str, result, frames: torch.Tensor) -> dict:
    """Print one line about a tuning run and return its record entries (`result`: a TuneResult)."""
    done = len(result.losses)
    print(f"{label} tuning: steps {result.start_step}..{result.steps} on {len(frames)} frames "
          f"{tuple(frames.shape[-2:])}; checkpoint {result.checkpoint}")
    return {
        "checkpoint": str(result.checkpoint), "start_step": result.start_step, "steps": result.steps,
        "frames": int(frames.shape[0]), "size": list(frames.shape[-2:]),
        "loss_first": result.losses[0] if done else None, "loss_last": result.losses[-1] if done else None,
        "losses": [round(v, 6) for v in result.losses],
        "seconds_per_step": round(result.seconds / done, 4) if done else None,
    }


# ---------------------------------------------------------------- the tuning methods' demos

def check_demo_arguments(args: argparse.Namespace) -> None:
    """A tuning demo needs at least one sampling step, two frames and a size the tiny models take."""
    if args.steps < 1 or args.frames < 2 or args.size < 16 or args.size % 16:
        raise ValueError("--steps must be at least 1, --frames at least 2 and --size a multiple of 16")


def fixed_batch_loss(loss_fn) -> float:
    """A tuning loss_fn(step, generator) evaluated on one fixed draw (noise, t, posterior sample), without
    gradients: the same batch before and after tuning shows whether the tuning works."""
    with torch.no_grad():
        return float(loss_fn(0, torch.Generator().manual_seed(1234)))


def tuning_demo_results(before: float, after: float, result) -> dict:
    """The record of a tuning demo: the loss on a fixed batch before and after tuning (`result`: a TuneResult)."""
    return {
        "loss_fixed_batch_before": round(before, 6), "loss_fixed_batch_after": round(after, 6),
        "tuning_losses": [round(v, 6) for v in result.losses], "checkpoint": str(result.checkpoint),
        "note": "random weights: the edit is not meaningful",
    }
