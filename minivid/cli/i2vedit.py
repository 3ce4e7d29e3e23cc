"""I2VEdit on the command line: `minivid tune --method i2vedit` (this part: the motion LoRAs).

    minivid tune --method i2vedit --weights svd.safetensors --video in.mp4 --out loras/
    minivid tune --method i2vedit --tiny --video in.mp4 --frames 5 --i2vedit-clip-length 3 --steps 4

The video (--frames frames, default 21 for I2VEdit, every --stride-th) is resized to --i2vedit-size
(default 512x896, the authors' training resolution; plain bilinear resize, no crop, as their
ResolutionControl) and split into clips of --i2vedit-clip-length frames overlapping by
--i2vedit-overlap (default 11 and 1, the authors' loader). One motion LoRA is tuned per clip into
`<out>/clip_<k>/tuned-<step>.safetensors` (every 50 steps, 300 steps; the edit uses step 250), with
AdamW's moments beside each checkpoint so a rerun with the same --out resumes. The job also writes
source_grid.png and record.json (losses, seconds per step, the clip ranges).
"""
from __future__ import annotations

import argparse
import logging

import torch

from minivid.cli.common import DTYPES, require_weights
from minivid.jobs import Job

log = logging.getLogger(__name__)

METHOD_NAME = "I2VEdit"
DEFAULT_FRAMES = 21                       # data.py: 2.5 fps over 0–8.4 s
DEFAULT_SIZE = {"full": (512, 896), "tiny": (32, 48)}


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW (e.g. 512x896), got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def add_tune_arguments(group: argparse._ArgumentGroup) -> None:
    """I2VEdit's tuning options."""
    group.add_argument("--i2vedit-size", type=_size,
                       help="HxW the frames are resized to for tuning (default 512x896, the authors'; --tiny 32x48); "
                            "--size is not used by I2VEdit")
    group.add_argument("--i2vedit-clip-length", type=int, default=11, help="frames per clip (default 11, the authors' code; the paper 14)")
    group.add_argument("--i2vedit-overlap", type=int, default=1, help="frames shared by consecutive clips (default 1)")
    group.add_argument("--i2vedit-rank", type=int, default=32, help="motion LoRA rank (default 32)")
    group.add_argument("--i2vedit-lora-layers", choices=["code", "paper"], default="code",
                       help="LoRA on every Linear of attn1, attn2, ff, ff_in of the temporal blocks (code, default) or on "
                            "their attention layers only (paper: \"the temporal attention layers\")")
    group.add_argument("--i2vedit-dropout", type=float, default=0.1, help="dropout on the LoRA branch output (default 0.1)")
    group.add_argument("--i2vedit-time-ids", choices=["official", "svd"], default="official",
                       help="added time ids while tuning: official = (fps 6, aug 0.02, motion 127) in the order the "
                            "authors' code passes them (default); svd = (6, 127, 0.02) in SVD's order")
    group.add_argument("--i2vedit-clips", help="tune only these clips, e.g. 0 or 0,2 (default: all)")


def _read_video(args: argparse.Namespace, svd, clip_length: int) -> torch.Tensor:
    from minivid.video import read_video, resize

    frames = read_video(args.video, num_frames=args.frames, stride=args.stride)
    if frames.shape[0] < clip_length:
        raise ValueError(f"{args.video}: {frames.shape[0]} frames (--frames {args.frames}, --stride {args.stride}), "
                         f"fewer than one clip of {clip_length} (--i2vedit-clip-length); read more frames "
                         f"(--frames {DEFAULT_FRAMES} is the authors' 2.5 fps × 8.4 s) or shorten the clips")
    size = args.i2vedit_size or DEFAULT_SIZE["tiny" if args.tiny else "full"]
    m = svd.config.downsample_factor
    if size[0] % m or size[1] % m:
        raise ValueError(f"--i2vedit-size {size[0]}x{size[1]}: both sides must be multiples of {m} (the VAE's downsampling)")
    return resize(frames, size)


def _load_svd(args: argparse.Namespace):
    from minivid.svd import StableVideoDiffusion

    require_weights(args)
    dtype = DTYPES[args.dtype]
    if args.weights:
        return StableVideoDiffusion.load(args.weights, device=args.device, dtype=dtype)
    log.warning("--tiny: a tiny SVD with RANDOM weights (seed %d); its zero-initialised output layers keep "
                "the LoRA's gradients at zero, so the tuning shows the machinery only", args.seed)
    torch.manual_seed(args.seed)
    return StableVideoDiffusion.from_config("tiny", device=args.device, dtype=dtype)


def _clip_selection(text: str | None, n: int) -> list[int]:
    if not text:
        return list(range(n))
    try:
        chosen = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise ValueError(f"--i2vedit-clips must be clip indices like 0,2; got {text!r}") from None
    if any(k < 0 or k >= n for k in chosen):
        raise ValueError(f"--i2vedit-clips {text}: the video has clips 0..{n - 1}")
    return chosen


def tune(args: argparse.Namespace, job: Job) -> dict:
    """`minivid tune --method i2vedit`: one motion LoRA per clip, into `<job>/clip_<k>/`."""
    from minivid.cli.common import tuning_summary
    from minivid.methods.i2vedit.clips import clip_ranges
    from minivid.methods.i2vedit.tune import (DEFAULT_CHECKPOINT_EVERY, DEFAULT_STEPS, MotionTuneConfig,
                                              default_tune_config, tune_motion_lora)

    steps = args.steps or DEFAULT_STEPS
    every = args.checkpoint_every or DEFAULT_CHECKPOINT_EVERY
    if steps < 1 or every < 1:
        raise ValueError("--steps and --checkpoint-every must be at least 1")
    if args.i2vedit_rank < 1 or not 0 <= args.i2vedit_dropout <= 1:
        raise ValueError("--i2vedit-rank must be at least 1 and --i2vedit-dropout in [0, 1]")
    clip_ranges(args.frames, args.i2vedit_clip_length, args.i2vedit_overlap)   # the options, before any loading
    if args.tiny and not args.threads:
        torch.set_num_threads(1)   # the tiny model's small ops only lose time to thread synchronisation
    with job.timed("load"):
        svd = _load_svd(args)
        video = _read_video(args, svd, args.i2vedit_clip_length)
    ranges = clip_ranges(video.shape[0], args.i2vedit_clip_length, args.i2vedit_overlap)
    if any(e - s < 2 for s, e in ranges):
        raise ValueError(f"{video.shape[0]} frames split into clips {ranges}: a clip of one frame has no motion; "
                         f"read one frame more or less (--frames)")
    chosen = _clip_selection(args.i2vedit_clips, len(ranges))
    targets = ("ff_in", "attn1", "attn2", "ff") if args.i2vedit_lora_layers == "code" else ("attn1", "attn2")
    config = MotionTuneConfig(rank=args.i2vedit_rank, dropout=args.i2vedit_dropout, targets=targets,
                              time_ids_order=args.i2vedit_time_ids)
    changes = dict(steps=steps, checkpoint_every=every, seed=args.seed)
    if args.lr:
        changes["lr"] = args.lr
    if args.autocast:
        changes["autocast"] = args.autocast
    cfg = default_tune_config(svd.device, **changes)
    base = {"weights": args.weights or "tiny", "tiny_seed": None if args.weights else args.seed}
    clips = []
    for k in chosen:
        s, e = ranges[k]
        with job.timed(f"tuning clip {k}"):
            lora, result = tune_motion_lora(
                svd, video[s:e], job.dir / f"clip_{k}", config, cfg,
                gradient_checkpointing=args.gradient_checkpointing, resume=not args.no_resume,
                meta={"base": base, "clip": k, "clip_range": [s, e], "video": str(args.video)})
        lora.detach()
        summary = tuning_summary(f"{METHOD_NAME} clip {k} [{s}, {e})", result, video[s:e])
        clips.append({"clip": k, "range": [s, e], "dir": f"clip_{k}", **summary})
    job.write_grid("source_grid.png", video.cpu(), cols=min(len(video), args.i2vedit_clip_length))
    return {"clips": clips, "clip_ranges": [list(r) for r in ranges], "size": list(video.shape[-2:]),
            "frames": int(video.shape[0]), "i2vedit": config.to_dict(),
            "tune": {**vars(cfg), "betas": list(cfg.betas)}, "use_step": 250}
