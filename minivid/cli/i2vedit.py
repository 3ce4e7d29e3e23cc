"""I2VEdit on the command line: `minivid tune --method i2vedit` (the motion LoRAs, one per clip),
`minivid edit --method i2vedit` and `minivid demo --method i2vedit`.

Tuning:

    minivid tune --method i2vedit --weights svd.safetensors --video in.mp4 --out loras/
    minivid tune --method i2vedit --tiny --video in.mp4 --frames 5 --i2vedit-clip-length 3 --steps 4

The source is sampled over time as the authors' loader does (data.py: np.linspace over the video's
frames): with the default recipe "authors", clip 0 takes 11 frames at 2.5 fps and every later clip 16
frames at 7 fps, continuing from the frame the previous clip ended on (--frames in all, default 26: two
clips). --sample-fps F samples every clip at F fps; --sample-fps 0 (or --stride N) reads consecutive
(every N-th) frames. The frames are resized to --i2vedit-size (default 512x896, the authors' training
resolution; plain bilinear resize, no crop, as their ResolutionControl). One motion LoRA is tuned per clip
into `<out>/clip_<k>/tuned-<step>.safetensors` (clip 0: 300 steps; clips >= 1: 250 steps with
skip-interval attention to clip 0's inversion at the training size; checkpoints every 50; the edit uses
step 250), with AdamW's moments beside each checkpoint so a rerun with the same --out resumes. The job
also writes source_grid.png and record.json (losses, seconds per step, the clip ranges, the source frames).

Editing:

    minivid edit --method i2vedit --weights weights/svd.safetensors --video in.mp4 --first-frame edited.png \
        [--lora DIR] [--preset local|global|shape]

The source video is read at its own size, sampled as for tuning (default: clip 0 at 2.5 fps, 11 frames;
clips >= 1 at 7 fps, 16 frames, with skip-interval attention to clip 0; 26 frames), edited clip by clip at
--i2vedit-size (576x1024, SVD's; --tiny: 32x48) and written back at the source size: edited.mp4,
grid.png (source row over edited row), side_by_side.mp4, matching_mask.png (the spatial matching
mask M of clip 0 per layer — rows — and step — columns — over its middle frame) and record.json
(every setting, the clips, the source-attention store's bytes, timings, peak memory). The edited first
frame may come from any image editor; one of another size is resized to the source's (and the record
says so). `--lora DIR`: the motion LoRA per clip from `minivid tune --method i2vedit` (DIR/clip_<k>).
`--tiny` runs a tiny random SVD: every stage runs, nothing real is edited.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from minivid.cli.common import CHUNK, DTYPES, FPS, SEED, integer, number, print_hints, require_weights, write_edit
from minivid.cli.method_options import (
    I2VEDIT, I2VEDIT_CLIPS, I2VEDIT_INVERT_DTYPES, I2VEDIT_LAYER_SETS, I2VEDIT_PRESETS, I2VEDIT_RECIPES,
    I2VEDIT_STORES, I2VEDIT_TIME_IDS_ORDERS, I2VEDIT_TUNE,
)

if TYPE_CHECKING:            # torch and the method load when a job runs: `minivid edit --help` imports neither
    import torch

    from minivid.jobs import Job

log = logging.getLogger(__name__)

METHOD_NAME = "I2VEdit"
DEFAULT_FRAMES = 26                       # the authors' recipe: clip 0 (11 frames at 2.5 fps) + clip 1 (16 at 7 fps)
DEFAULT_CHECKPOINT_EVERY = I2VEDIT_TUNE["checkpoint_every"]    # the authors' (minivid.methods.i2vedit.tune)
TAKES_PROMPT = False                      # guided by an edited first frame, not a prompt
DEMO_MODELS = ()                          # `minivid demo --method i2vedit` builds a tiny SVD: --model does not apply
DEMO_HINTS = ["minivid edit --method i2vedit --weights svd.safetensors --video CLIP --first-frame EDITED.png"]
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
    add_recipe_arguments(group)
    group.add_argument("--i2vedit-rank", type=integer(1, 65_536), default=I2VEDIT_TUNE["rank"],
                       help=f"motion LoRA rank (default {I2VEDIT_TUNE['rank']})")
    group.add_argument("--i2vedit-lora-layers", choices=["code", "paper"], default="code",
                       help="LoRA on every Linear of attn1, attn2, ff, ff_in of the temporal blocks (code, default) or on "
                            "their attention layers only (paper: \"the temporal attention layers\")")
    group.add_argument("--i2vedit-dropout", type=number(0, 1), default=I2VEDIT_TUNE["dropout"],
                       help=f"dropout on the LoRA branch output (default {I2VEDIT_TUNE['dropout']})")
    group.add_argument("--i2vedit-time-ids", choices=I2VEDIT_TIME_IDS_ORDERS, default=I2VEDIT_TIME_IDS_ORDERS[0],
                       help="added time ids while tuning: official = (fps 6, aug 0.02, motion 127) in the order the "
                            "authors' code passes them (default); svd = (6, 127, 0.02) in SVD's order")
    group.add_argument("--i2vedit-clips", help="tune only these clips, e.g. 0 or 0,2 (default: all)")


def add_recipe_arguments(group: argparse._ArgumentGroup) -> None:
    """The clip recipe and the frame sampling, shared by tune and edit (they must agree on the clips)."""
    first, later = I2VEDIT_CLIPS["first"], I2VEDIT_CLIPS["subsequent"]
    group.add_argument("--i2vedit-recipe", choices=I2VEDIT_RECIPES, default=I2VEDIT["recipe"],
                       help=f"authors (default): clip 0 with the first config ({first['length']} frames at "
                            f"{first['sample_fps']:g} fps, fps id {first['output_fps'] - 1}), clips >= 1 with the "
                            f"subsequent-clip config ({later['length']} frames at {later['sample_fps']:g} fps, fps id "
                            f"{later['output_fps'] - 1}, skip-interval attention in editing and LoRA tuning, "
                            f"{later['tune_steps']} tuning steps); uniform: every clip with the first config")
    group.add_argument("--sample-fps", type=number(0, 1000),
                       help=f"read the source at this many frames per second, over time as the authors' loader (default: "
                            f"the recipe's, {first['sample_fps']:g} for clip 0 and {later['sample_fps']:g} after); "
                            f"0: consecutive frames (--stride N: every N-th)")
    group.add_argument("--i2vedit-clip-length", type=integer(1, 100_000),
                       help=f"frames per clip, every clip (default: the recipe's, {first['length']} for clip 0 and "
                            f"{later['length']} after)")
    group.add_argument("--i2vedit-overlap", type=integer(0, 100_000), default=I2VEDIT["overlap"],
                       help=f"frames shared by consecutive clips (default {I2VEDIT['overlap']})")


def _plan(args: argparse.Namespace):
    """Which source frames each clip reads (minivid.methods.i2vedit.clips.plan_frames), before any loading."""
    from minivid.methods.i2vedit.clips import plan_frames
    from minivid.video import probe_video

    path = Path(args.video)
    fps, total = 0.0, None
    if path.is_dir():
        from minivid.video import _list_images
        total = len(_list_images(path))
    else:
        info = probe_video(path)
        fps = info.fps
        total = max(1, int(round(info.duration * info.fps))) if info.fps and info.duration else None
    if total is None:                                     # no duration in the metadata: count the frames
        from minivid.video import _decode
        _, it = _decode(path)
        total = sum(1 for _ in it)
    time_based = fps > 0 and args.stride == 1 and (args.sample_fps is None or args.sample_fps > 0)
    return plan_frames(total, fps if time_based else None, args.frames, args.i2vedit_recipe, args.i2vedit_overlap,
                       args.i2vedit_clip_length, args.sample_fps or None, args.stride), fps, total


def _read_frames(path: Path, indices: list[int]) -> torch.Tensor:
    """The frames `indices` (ascending) of a video file or image folder -> [F, 3, H, W] in [-1, 1]."""
    import numpy as np

    from minivid.video import VideoError, _decode, _list_images, _read_image_u8, from_uint8

    if path.is_dir():
        files = _list_images(path)
        return from_uint8(np.stack([_read_image_u8(files[i]) for i in indices]))
    wanted, kept, seen = set(indices), {}, 0
    _, frames = _decode(path)
    try:
        for i, frame in enumerate(frames):
            seen = i + 1
            if i in wanted:
                kept[i] = frame
                if len(kept) == len(wanted):
                    break
    finally:
        frames.close()
    if len(kept) < len(wanted):
        raise VideoError(f"{path}: has {seen} frames, the sampling asked for frame {max(wanted)}")
    return from_uint8(np.stack([kept[i] for i in indices]))


def _read_video(args: argparse.Namespace, svd=None):
    """(frames [T, 3, H, W] at the source size, the FramePlan, fps)."""
    plan, fps, _ = _plan(args)
    frames = _read_frames(Path(args.video), plan.indices)
    return frames, plan, fps


def _check_memory(svd, ranges, size: tuple[int, int], device) -> None:
    """The memory check (cli.common.check_job_memory) at the size the clips will run: the longest clip at
    --i2vedit-size, before anything is resized to it."""
    from minivid.cli.common import check_job_memory

    n = max(e - s for s, e in ranges)
    check_job_memory(svd, n, *size, device, what=f"a clip of {n} frame(s) at --i2vedit-size {size[0]}x{size[1]}",
                     hint="use a smaller --i2vedit-size or shorter clips (--i2vedit-clip-length)")


def _resize_for_tuning(args: argparse.Namespace, svd, frames: torch.Tensor) -> torch.Tensor:
    from minivid.video import resize

    size = args.i2vedit_size or DEFAULT_SIZE["tiny" if args.tiny else "full"]
    m = svd.config.downsample_factor
    if size[0] % m or size[1] % m:
        raise ValueError(f"--i2vedit-size {size[0]}x{size[1]}: both sides must be multiples of {m} (the VAE's downsampling)")
    return resize(frames, size)


def _sampling_record(plan, fps: float) -> dict:
    return {"mode": plan.mode, "source_fps": fps, "sample_fps_per_clip": plan.sample_fps,
            "source_frames": plan.indices, "source_frames_per_clip": plan.clip_sources()}


def _load_svd(args: argparse.Namespace, tiny_note: str = "its outputs are not meaningful", dtype: torch.dtype | None = None):
    """The SVD of --weights (or a tiny random one with --tiny) in `dtype` (default --dtype) on --device."""
    import torch

    from minivid.svd import StableVideoDiffusion

    from minivid.cli.common import record_ran

    require_weights(args)
    dtype = dtype or DTYPES[args.dtype]
    # what ran, in the job's record; the seeds labelled (--seed: the tiny model's weights and the tuning's
    # draws; --i2vedit-seed: the edit's sampling noise, the authors' 23)
    seeds = {"tiny_model_weights": None if args.weights else args.seed}
    if getattr(args, "command", None) == "tune":
        seeds["tuning"] = args.seed
    else:
        from minivid.methods.i2vedit import I2VEditConfig

        given = getattr(args, "i2vedit_seed", None)
        seeds["edit_sampling_noise"] = I2VEditConfig().seed if given is None else given
    record_ran(model=args.weights or "tiny SVD (random weights)", weights_dtype=str(dtype).removeprefix("torch."),
               device=str(args.device), seeds={k: v for k, v in seeds.items() if v is not None})
    if args.weights:
        return StableVideoDiffusion.load(args.weights, device=args.device, dtype=dtype,
                                         allow_nonfinite=getattr(args, "allow_nonfinite", False))
    log.warning("--tiny: a tiny SVD with RANDOM weights (seed %d); %s", args.seed, tiny_note)
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
    """`minivid tune --method i2vedit`: one motion LoRA per clip, into `<job>/clip_<k>/`. With the authors'
    recipe clip 0 trains 300 steps, clips k >= 1 250 steps with skip-interval attention to clip 0's
    inversion at the training size (an extra inversion of clip 0, 25 steps)."""
    from minivid.cli.common import tuning_summary
    from minivid.tuning import frames_digest
    from minivid.methods.i2vedit.clips import recipe_for
    from minivid.methods.i2vedit.tune import (DEFAULT_CHECKPOINT_EVERY, MotionTuneConfig, default_tune_config,
                                              skip_interval_source, tune_motion_lora)

    every = args.checkpoint_every or DEFAULT_CHECKPOINT_EVERY
    if (args.steps is not None and args.steps < 1) or every < 1:
        raise ValueError("--steps and --checkpoint-every must be at least 1")
    if args.i2vedit_rank < 1 or not 0 <= args.i2vedit_dropout <= 1:
        raise ValueError("--i2vedit-rank must be at least 1 and --i2vedit-dropout in [0, 1]")
    plan, fps, _ = _plan(args)                          # the clips, before any loading
    ranges = plan.ranges
    if any(e - s < 2 for s, e in ranges):
        raise ValueError(f"{len(plan.indices)} frames split into clips {ranges}: a clip of one frame has no motion; "
                         f"read one frame more or less (--frames)")
    chosen = _clip_selection(args.i2vedit_clips, len(ranges))
    with job.timed("load"):
        svd = _load_svd(args, "its zero-initialised output layers keep the LoRA's gradients at zero, so the tuning shows the machinery only")
        _check_memory(svd, ranges, args.i2vedit_size or DEFAULT_SIZE["tiny" if args.tiny else "full"], args.device)
        video = _resize_for_tuning(args, svd, _read_frames(Path(args.video), plan.indices))
    targets = ("ff_in", "attn1", "attn2", "ff") if args.i2vedit_lora_layers == "code" else ("attn1", "attn2")
    config = MotionTuneConfig(rank=args.i2vedit_rank, dropout=args.i2vedit_dropout, targets=targets,
                              time_ids_order=args.i2vedit_time_ids)
    base = {"weights": args.weights or "tiny", "tiny_seed": None if args.weights else args.seed}
    clips, source, cfgs = [], None, {}
    for k in chosen:
        s, e = ranges[k]
        recipe = recipe_for(k, args.i2vedit_recipe)
        changes = dict(steps=args.steps or recipe.tune_steps, checkpoint_every=every, seed=args.seed,
                       progress=args.progress)
        if args.lr:
            changes["lr"] = args.lr
        if args.autocast:
            changes["autocast"] = args.autocast
        cfg = cfgs[k] = default_tune_config(svd.device, **changes)
        skip = recipe.skip_interval and k > 0
        if skip and source is None:
            s0, e0 = ranges[0]
            with job.timed("clip 0 inversion for skip-interval"):
                source = skip_interval_source(svd, video[s0:e0])
        with job.timed(f"tuning clip {k}"):
            lora, result = tune_motion_lora(
                svd, video[s:e], job.dir / f"clip_{k}", config, cfg,
                gradient_checkpointing=args.gradient_checkpointing, resume=not (args.no_resume or args.restart),
                meta={"base": base, "clip": k, "clip_range": [s, e], "video": str(args.video),
                      "source": frames_digest(video[s:e]), "recipe": recipe.name, "skip_interval": skip,
                      "source_frames": plan.indices[s:e]},
                skip_interval=source if skip else None)
        lora.detach()
        summary = tuning_summary(f"{METHOD_NAME} clip {k} [{s}, {e})", result, video[s:e])
        clips.append({"clip": k, "range": [s, e], "dir": f"clip_{k}", "recipe": recipe.name, "skip_interval": skip,
                      "steps": cfg.steps, "source_frames": plan.indices[s:e], **summary})
    job.write_grid("source_grid.png", video.cpu(), cols=min(len(video), ranges[0][1]))
    first_cfg = cfgs[chosen[0]]
    return {"clips": clips, "clip_ranges": [list(r) for r in ranges], "size": list(video.shape[-2:]),
            "frames": int(video.shape[0]), "i2vedit": config.to_dict(), "recipe": args.i2vedit_recipe,
            "sampling": _sampling_record(plan, fps),
            "tune": {**vars(first_cfg), "betas": list(first_cfg.betas)}, "use_step": 250}


# ---------------------------------------------------------------- editing and the demo

FULL_SIZE, TINY_SIZE = (576, 1024), (32, 48)

# option -> I2VEditConfig field
_FIELDS = {
    "preset": "preset", "i2vedit_layer_set": "layer_set", "i2vedit_compare": "compare",
    "i2vedit_store": "store", "i2vedit_clip_length": "clip_len", "i2vedit_overlap": "overlap",
    "i2vedit_output_fps": "output_fps", "i2vedit_recipe": "recipe", "i2vedit_invert_dtype": "invert_dtype",
    "i2vedit_decode_chunk": "decode_chunk", "i2vedit_seed": "seed",
}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """I2VEdit's editing options; unset ones take I2VEditConfig's defaults (the authors' code; shown from
    minivid.cli.method_options, which holds the same values without importing torch)."""
    d, PRESETS = argparse.Namespace(**I2VEDIT), I2VEDIT_PRESETS
    group.add_argument("--first-frame", help="I2VEdit: the edited first frame (png/jpg, from any image editor)")
    group.add_argument("--lora", help="I2VEdit: folder of motion LoRAs from `minivid tune --method i2vedit` (one per clip)")
    group.add_argument("--i2vedit-lora-step", type=integer(0, 10_000_000), default=I2VEDIT_TUNE["use_step"],
                       help=f"tuning checkpoint of each clip's LoRA (default {I2VEDIT_TUNE['use_step']}, the authors'; "
                            f"the newest if absent)")
    group.add_argument("--i2vedit-lora-scale", type=number(-100, 100), default=1.0, help="motion LoRA scale (default 1)")
    group.add_argument("--preset", choices=sorted(PRESETS),
                       help="I2VEdit temporal attention stages (β1, β2): " +
                            ", ".join(f"{k} {v}" for k, v in PRESETS.items()) + f" (default {d.preset})")
    group.add_argument("--i2vedit-size", help="working size HxW (default 576x1024; --tiny 32x48)")
    group.add_argument("--i2vedit-layer-set", choices=I2VEDIT_LAYER_SETS,
                       help="temporal layers copied in the middle stage: official (the code: input_blocks.7/.8, "
                            "middle_block, output_blocks.3/.4) or paper (every layer at downscale >= 4)")
    group.add_argument("--i2vedit-compare", choices=[">=", ">"], help="M = 1 where D >= thr (code, default) or > (paper)")
    group.add_argument("--i2vedit-mask-thr", type=number(0, 1), nargs=2, metavar=("FIRST", "LAST"),
                       help=f"matching threshold ramped over the frames (default {d.mask_thr[0]} {d.mask_thr[1]})")
    group.add_argument("--i2vedit-store", choices=I2VEDIT_STORES,
                       help="source attention: recompute at every edit step (default) or keep what editing reads")
    group.add_argument("--i2vedit-no-matching", action="store_true", help="edit without attention matching")
    add_recipe_arguments(group)
    group.add_argument("--i2vedit-skip-interval", choices=["on", "off"],
                       help="skip-interval cross-attention of clips >= 1 to clip 0's temporal K/V (default: the recipe's, "
                            "on for clips >= 1 with the authors' recipe)")
    group.add_argument("--i2vedit-output-fps", type=FPS, help="fps the video is conditioned on, every clip; fps id = this - 1 "
                                                              "(default: the recipe's, 5 for clip 0 and 7 after)")
    group.add_argument("--i2vedit-invert-dtype", choices=I2VEDIT_INVERT_DTYPES,
                       help="inversion and recomputed source attention in fp32 (default, as the authors; the weights are "
                            "loaded in fp32 and the edit's UNet runs in --dtype under autocast) or in the edit's --dtype "
                            "(the weights are then loaded in --dtype: half the memory)")
    group.add_argument("--i2vedit-decode-chunk", type=CHUNK, help=f"frames decoded at a time (default {d.decode_chunk})")
    group.add_argument("--i2vedit-seed", type=SEED, help=f"seed of the per-clip generators (default {d.seed})")


def _config(args: argparse.Namespace):
    from minivid.methods.i2vedit import I2VEditConfig

    kw = {field: getattr(args, opt) for opt, field in _FIELDS.items() if getattr(args, opt, None) is not None}
    if getattr(args, "steps", None):
        kw["steps"] = args.steps
    if getattr(args, "guidance", None):
        kw["max_guidance"] = args.guidance
    if getattr(args, "i2vedit_mask_thr", None):
        kw["mask_thr"] = tuple(args.i2vedit_mask_thr)
    if getattr(args, "i2vedit_no_matching", False):
        kw["matching"] = False
    if getattr(args, "i2vedit_skip_interval", None):
        kw["skip_interval"] = args.i2vedit_skip_interval == "on"
    kw["edit_dtype"] = DTYPES[getattr(args, "dtype", "fp32") or "fp32"]
    return I2VEditConfig(**kw)


def _parse_size(text: str | None, default: tuple[int, int]) -> tuple[int, int]:
    if not text:
        return default
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--i2vedit-size must be HxW, e.g. 576x1024, got {text!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"--i2vedit-size {text}: both sides must be positive")
    return h, w


def _lora_for_clip(args: argparse.Namespace, svd, ranges):
    """(clip k -> attached motion LoRA, [what was loaded per clip]) from --lora DIR (DIR/clip_<k>, a
    `minivid tune --method i2vedit` job folder), or (None, []). Every clip's LoRA is loaded once here and
    detached, so a missing clip, another method's checkpoint or a LoRA of another rank or model is an
    error before any compute."""
    if not args.lora:
        return None, []
    from minivid.methods.i2vedit.tune import load_motion_lora

    folder = Path(args.lora)
    if not folder.is_dir():
        raise FileNotFoundError(f"--lora {folder}: no such folder (expected the job folder of `minivid tune "
                                f"--method i2vedit`, with one LoRA per clip in clip_<k>/)")
    missing = [k for k in range(len(ranges)) if not (folder / f"clip_{k}").is_dir()]
    if missing:
        raise FileNotFoundError(f"--lora {folder}: no motion LoRA for clip(s) {missing} of {ranges} (expected "
                                f"{folder}/clip_<k>/ from `minivid tune --method i2vedit` with the same clips)")
    step, scale = args.i2vedit_lora_step, args.i2vedit_lora_scale
    loaded = []
    for k in range(len(ranges)):
        lora, meta = load_motion_lora(svd, folder / f"clip_{k}", step=step, scale=scale)
        lora.detach()
        loaded.append({"clip": k, "path": meta.get("path"), "rank": lora.rank, "step": meta.get("step"),
                       "base_mismatch": meta.get("base_mismatch", False)})
    return (lambda k: load_motion_lora(svd, folder / f"clip_{k}", step=step, scale=scale)[0]), loaded


def _read_inputs(args: argparse.Namespace):
    """(video [T, 3, H, W], first frame [3, H, W], notes): errors before any compute."""
    from minivid.methods.i2vedit.edit import resize_frames
    from minivid.video import read_image

    if not args.first_frame:
        raise ValueError("--method i2vedit needs --first-frame EDITED.png: the source's first frame, edited with "
                         "any image editor")
    from minivid.checks import input_path

    first_path = input_path(args.first_frame, "--first-frame", folder_ok=False)
    if args.lora and not Path(args.lora).is_dir():
        raise FileNotFoundError(f"--lora {args.lora}: no such folder (expected the job folder of `minivid tune "
                                f"--method i2vedit`, with one LoRA per clip in clip_<k>/)")
    video, plan, fps = _read_video(args)
    first = read_image(first_path)
    notes = []
    if tuple(first.shape[-2:]) != tuple(video.shape[-2:]):
        msg = (f"the edited first frame is {first.shape[-2]}x{first.shape[-1]}, the video "
               f"{video.shape[-2]}x{video.shape[-1]}: resized to the video's size")
        print(f"note: {msg}")                 # once (not also as a log warning)
        notes.append(msg)
        first = resize_frames(first, tuple(video.shape[-2:]))
    if plan.mode == "frames" and args.stride == 1 and (args.sample_fps is None):
        notes.append(f"{args.video}: no frame rate known: consecutive frames read (--sample-fps needs a video file)")
    return video, first, notes, plan, fps


def _check(svd, cfg, video, work):
    from minivid.methods.i2vedit import clip_ranges
    from minivid.pipelines.svd import check_size

    m = svd.config.vae.downsample_factor
    if work[0] % m or work[1] % m:
        raise ValueError(f"--i2vedit-size {work[0]}x{work[1]} is not a multiple of {m} (the VAE's downsampling)")
    check_size(svd, *work)
    try:
        ranges = cfg.ranges(video.shape[0])
    except ValueError as e:
        raise ValueError(f"{e} (read {video.shape[0]} frames: --frames N reads more)") from None
    _check_memory(svd, ranges, work, svd.device)
    return ranges


def _outputs(job: Job, source, result, fps: float) -> dict:
    import torch

    from minivid.methods.i2vedit.visualize import mask_legend, mask_picture, row_label

    write_edit(job, source, result.frames, fps=fps)
    clip0 = result.clips[0]
    info = {}
    if clip0.masks:
        from minivid.methods.i2vedit.edit import resize_frames

        # drawn over the SOURCE frame (at the edit's size): where the edit was allowed to depart from it
        s0, e0 = result.ranges[0]
        under = resize_frames(source[s0:e0].float(), tuple(clip0.frames.shape[-2:])).clamp(-1, 1).cpu()
        tiles, rows, cols = mask_picture(clip0.masks, clip0.layer_hw, under)
        frame = clip0.frames.shape[0] // 2
        job.write_grid("matching_mask.png", tiles, rows=[row_label(n) for n in rows],
                       numbers=[f"step {s}" for s in cols], legend=mask_legend(),
                       title=f"spatial matching mask M (Eq. 8) of clip 0 over source frame {frame}: rows = attn1 layers")
        info = {"matching_mask": {"rows_layers": rows, "columns_steps": cols,
                                  "frame": clip0.frames.shape[0] // 2,
                                  "mean_M_per_step": {s: round(float(torch.stack(
                                      [m.float().mean() for (n, st), m in clip0.masks.items() if st == s]).mean()), 4)
                                      for s in cols}}}
    return info


def _clip_records(result, plan=None, loras=None) -> list[dict]:
    """What ran, per clip: frame range and source frames, recipe, skip-interval, LoRA, dtypes."""
    out = []
    for k, c in enumerate(result.clips):
        s, e = result.ranges[k]
        entry = {"clip": k, "frames": [s, e], **{key: v for key, v in c.info.items() if key not in ("clip", "frames")}}
        if plan is not None:
            entry["source_frames"] = plan.indices[s:e]
            entry["sample_fps"] = plan.sample_fps[k] if k < len(plan.sample_fps) else None
        if loras:
            entry["lora"] = loras[k]["path"] if k < len(loras) else None
        out.append(entry)
    return out


def _results(svd, cfg, result, video, work, notes, seconds) -> dict:
    import torch

    from minivid.methods.i2vedit import store_bytes
    from minivid.methods.i2vedit.edit import DTYPE_NAMES

    m = svd.config.vae.downsample_factor
    frames0 = result.ranges[0][1] - result.ranges[0][0]
    est = store_bytes(svd.config.unet, (work[0] // m, work[1] // m), frames0, cfg.steps, cfg.matching_config())
    return {
        "config": {k: (DTYPE_NAMES.get(v, str(v)) if isinstance(v, torch.dtype) else v) for k, v in cfg.__dict__.items()},
        "clips": [list(r) for r in result.ranges], "source_size": list(video.shape[-2:]), "work_size": list(work),
        "frames": int(result.frames.shape[0]),
        "store_bytes_clip0_measured": result.store_bytes,
        "store_bytes_per_clip_estimate": {k: v["per_clip"] for k, v in est.items()},
        "seconds_per_clip": round(seconds / len(result.ranges), 3),
        "notes": notes,
    }


def edit(args: argparse.Namespace, job: Job) -> dict:
    """`minivid edit --method i2vedit`."""
    import torch

    from minivid.methods.i2vedit import edit_video

    from minivid.methods.i2vedit.edit import DTYPE_NAMES, check_store_budget

    cfg = _config(args)
    video, first, notes, plan, fps = _read_inputs(args)
    work = _parse_size(args.i2vedit_size, TINY_SIZE if args.tiny else FULL_SIZE)
    # the authors' precision split: fp32 weights, inversion and source attention in fp32, the edit's UNet
    # in --dtype under autocast; --i2vedit-invert-dtype edit loads the weights in --dtype
    with job.timed("load"):
        svd = _load_svd(args, dtype=torch.float32 if cfg.invert_dtype == "fp32" else None)
    ranges = _check(svd, cfg, video, work)
    budget = check_store_budget(svd, cfg, work, ranges)
    lora_for_clip, loras = _lora_for_clip(args, svd, ranges)
    inv_dtype, edit_dtype = cfg.dtypes(svd.dtype)
    print(f"I2VEdit: {video.shape[0]} frames {video.shape[-2]}x{video.shape[-1]} in clips {ranges} (recipe {cfg.recipe}, "
          f"source frames sampled {'over time' if plan.mode == 'time' else 'by index'}), edited at "
          f"{work[0]}x{work[1]}, {cfg.steps} steps, preset {cfg.preset}{f' {cfg.beta}' if cfg.beta else ''}, store {cfg.store}, inversion "
          f"{DTYPE_NAMES[inv_dtype]}, edit {DTYPE_NAMES[edit_dtype]}{', no LoRA' if lora_for_clip is None else ''}")
    t0 = time.perf_counter()
    with job.timed("edit"):
        result = edit_video(svd, video.to(svd.device), first.to(svd.device), cfg, work_size=work,
                            lora_for_clip=lora_for_clip, progress=args.progress)
    seconds = time.perf_counter() - t0
    info = _outputs(job, video, result, args.fps)
    with job.timed("store estimate"):
        results = _results(svd, cfg, result, video, work, notes, seconds)
    return {**results, **info,
            "clips_run": _clip_records(result, plan, loras), "sampling": _sampling_record(plan, fps),
            "stored_budget": budget,
            "model": svd.load_info.get("detected", "tiny (random)"), "lora": args.lora, "loras": loras}


# ---------------------------------------------------------------- the demo

def moving_shapes(frames: int, height: int, width: int) -> torch.Tensor:
    """A synthetic clip [F, 3, H, W] in [-1, 1]: a red disc moving right and a blue bar moving down over a
    flat grey top (a smooth area for SARP) and a gradient bottom; whole-pixel motion."""
    import torch

    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    background = torch.where(ys < height / 2, torch.full_like(ys, 0.2), (xs / width) * 0.8 - 0.5).expand(3, height, width)
    r, step = max(2, height // 6), max(1, width // (3 * max(frames - 1, 1)))
    clip = []
    for f in range(frames):
        img = background.clone()
        disc = (ys - height // 3) ** 2 + (xs - width // 5 - f * step) ** 2 <= r * r
        img[:, disc] = torch.tensor([0.9, -0.8, -0.8])[:, None]
        y0 = height // 8 + f * max(1, height // (3 * max(frames - 1, 1)))
        img[:, y0:y0 + max(2, height // 8), width * 2 // 3: width * 2 // 3 + width // 6] = torch.tensor([-0.8, -0.6, 0.9]).view(3, 1, 1)
        clip.append(img)
    return torch.stack(clip)


def recolour(frame: torch.Tensor) -> torch.Tensor:
    """The demo's 'image editor': the red disc becomes green (channels of reddish pixels rotated)."""
    import torch

    out = frame.clone()
    red = (frame[0] > 0.5) & (frame[1] < 0) & (frame[2] < 0)
    out[:, red] = torch.tensor([-0.8, 0.9, -0.8])[:, None]
    return out


def demo(args: argparse.Namespace, job: Job) -> dict:
    """`minivid demo --method i2vedit`: I2VEdit end to end on a tiny random SVD and a synthetic clip.

    --frames frames (default 8) at --size × 1.5·--size pixels (default 32×48), cut into clips of 5
    overlapping by 1 (clips [0, 5) and [4, 8)), --steps EDM steps (the demo parser's default 20; the
    paper 25) of inversion and of editing with attention matching (preset local), the authors' recipe
    (clip 1 with the subsequent-clip settings: skip-interval attention, fps id 6). --dtype is the edit's
    compute dtype (fp32 weights, the inversion in fp32, the edit's UNet under autocast). The edited first
    frame is the source's with the red disc recoloured green. No motion LoRA (tuning is `minivid tune
    --method i2vedit`). A random model makes no real edits: the outputs show every stage running.
    """
    import torch

    from minivid.methods.i2vedit import I2VEditConfig, edit_video

    if args.steps < 2 or args.frames < 3 or args.size < 16 or args.size % 16:
        raise ValueError("--steps must be at least 2, --frames at least 3 and --size a multiple of 16")
    height, width = args.size, args.size * 3 // 2
    width -= width % 16
    clip_len = min(5, args.frames)
    cfg = I2VEditConfig(steps=args.steps, clip_len=clip_len, overlap=1,
                        edit_dtype=DTYPES[getattr(args, "dtype", None) or "fp32"])
    print("minivid demo --method i2vedit: a tiny SVD with RANDOM weights, a synthetic clip (moving shapes) and its "
          "first frame recoloured (red disc -> green).\nA random model makes no real edits (expect coloured noise); "
          f"the demo runs every I2VEdit stage: SARP, EDM inversion, attention matching (spatial mask, temporal "
          f"selector {cfg.preset} {cfg.matching_config().beta}) with the source attention recomputed at each "
          f"of {cfg.steps} edit steps, auto-regressive clips of {clip_len} frames (clip 1 with skip-interval "
          f"attention to clip 0), the edit's UNet in {getattr(args, 'dtype', None) or 'fp32'}.")
    job.ran(model="tiny SVD (random weights)", frames=args.frames, size=[height, width], dtype=getattr(args, "dtype", None) or "fp32",
            device=str(args.device), seeds={"model_weights": args.seed, "sampling_noise": cfg.seed})
    with job.timed("build"):
        torch.manual_seed(args.seed)
        from minivid.svd import StableVideoDiffusion

        svd = StableVideoDiffusion.from_config("tiny", device=args.device)
        video = moving_shapes(args.frames, height, width)
        first = recolour(video[0])
    t0 = time.perf_counter()
    with job.timed("edit"):
        result = edit_video(svd, video.to(svd.device), first.to(svd.device), cfg, progress=args.progress)
    seconds = time.perf_counter() - t0
    job.write_video("source.mp4", video)
    job.write_grid("first_frame.png", torch.stack([video[0], first]), rows=["first frame"],
                   numbers=["source", "edited"])
    info = _outputs(job, video, result, 8)
    with job.timed("store estimate"):
        results = _results(svd, cfg, result, video, (height, width), [], seconds)
    out = {**results, **info, "clips_run": _clip_records(result), "note": "random weights: the edit is not meaningful"}
    print(f"edited {result.frames.shape[0]} frames in clips {result.ranges} in {seconds:.1f} s; source-attention "
          f"store of clip 0: {result.store_bytes['recompute']} bytes kept (recompute) vs "
          f"{out['store_bytes_per_clip_estimate']['official']} for the authors' store")
    print_hints(DEMO_HINTS)
    return out
