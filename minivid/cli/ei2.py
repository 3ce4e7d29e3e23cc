"""EI² on the command line: `minivid tune --method ei2`, `minivid edit --method ei2`, `minivid demo --method ei2`.

    minivid tune --method ei2 --video clip.mp4 --prompt "a man surfing" --weights sd-v1-4.ckpt --out tuned/
    minivid edit --method ei2 --tuned tuned/ --video clip.mp4 --prompt "a bear surfing" --weights sd-v1-4.ckpt

tune writes the tuned tensors (`tuned-<step>.safetensors`, with optimizer moments beside them for a
resume), the source frame grid and record.json; edit writes edited.mp4, grid.png (source row over
edited row), side_by_side.mp4 and record.json. `--tuned` takes a checkpoint or a tune folder (its
newest checkpoint); the checkpoint says how the model was inflated (r, STAM order) and what prompt
it was tuned on (the default source prompt). With `--tiny` the tiny random model is rebuilt from the
seed the checkpoint records, so tune and edit see the same base.
"""
from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from minivid.cli.common import (
    DTYPES, check_demo_arguments, integer, fixed_batch_loss, load_sd, read_source, tiny_base, tuning_demo_results,
    tuning_summary, write_edit, print_hints,
)
from minivid.cli.method_options import BACKENDS, EI2, EI2_ORDERS, EI2_TUNE

if TYPE_CHECKING:            # torch and the method load when a job runs: `minivid edit --help` imports neither
    import torch

    from minivid.jobs import Job
    from minivid.methods.ei2.model import EI2Config

log = logging.getLogger(__name__)

METHOD_NAME = "EI²"
TAKES_TUNED = True                        # edit reads --tuned (the tensors of `minivid tune --method ei2`)

DEFAULT_TUNE_STEPS = EI2_TUNE["steps"]
DEFAULT_LR = EI2_TUNE["lr"]


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """EI²'s own options (edit; tune reads them too where its parser has them)."""
    group.add_argument("--ei2-r", type=integer(1, 64),
                       help=f"FFAM pooling ratio of the other frames (default {EI2['r']}; edit: the checkpoint's)")
    group.add_argument("--ei2-order", choices=EI2_ORDERS,
                       help=f"where STAM sits: ffam-stam-ca (the paper's) or ffam-ca-stam (App. B.1) (default "
                            f"{EI2['order']}; edit: the checkpoint's)")
    group.add_argument("--ei2-ffam-backend", choices=BACKENDS,
                       help=f"FFAM attention: Triton on CUDA, PyTorch elsewhere (auto), or forced (default {EI2['ffam_backend']})")


def _config(args: argparse.Namespace, saved: EI2Config | None = None) -> EI2Config:
    """The EI² configuration: `saved` (a checkpoint's) or the default, changed by the options given."""
    from minivid.methods.ei2.model import EI2Config

    base = saved or EI2Config()
    changes = {k: v for k, v in (("r", getattr(args, "ei2_r", None)), ("order", getattr(args, "ei2_order", None)),
                                 ("ffam_backend", getattr(args, "ei2_ffam_backend", None))) if v is not None}
    if saved is not None:
        for key in ("r", "order"):
            if key in changes and changes[key] != getattr(saved, key):
                log.warning("EI²: %s=%r given, the checkpoint was tuned with %r", key, changes[key], getattr(saved, key))
    return EI2Config(**{**base.to_dict(), **changes})


# ---------------------------------------------------------------- tune

def tune(args: argparse.Namespace, job: Job) -> dict:
    """`minivid tune --method ei2`: tune the inflated model on the source video; the checkpoint goes into the job folder."""
    from minivid.methods.ei2.tune import tune_video
    from minivid.tuning import TuneConfig, frames_digest

    steps = args.steps or DEFAULT_TUNE_STEPS
    if steps < 1 or args.checkpoint_every < 1:
        raise ValueError("--steps and --checkpoint-every must be at least 1")
    with job.timed("load"):
        sd = load_sd(args, METHOD_NAME)
        frames = read_source(args, sd)
    config = _config(args)
    cfg = TuneConfig(steps=steps, lr=args.lr or DEFAULT_LR, autocast=args.autocast,
                     checkpoint_every=args.checkpoint_every, seed=args.seed, progress=args.progress)
    with job.timed("tuning"):
        _, result = tune_video(sd, frames, args.prompt, job.dir, config, cfg,
                               gradient_checkpointing=args.gradient_checkpointing, resume=not (args.no_resume or args.restart),
                               meta={"base": tiny_base(args), "source": frames_digest(frames)})
    job.write_grid("source_grid.png", frames.cpu(), rows=["source"])
    if result.checkpoint is not None:
        job.add_output(result.checkpoint, keep=True)
    return {**tuning_summary(METHOD_NAME, result, frames), "ei2": config.to_dict(), "tune": vars(cfg)}


# ---------------------------------------------------------------- edit

def edit(args: argparse.Namespace, job: Job) -> dict:
    """`minivid edit --method ei2 --tuned CKPT`: invert the source with the source prompt, sample with the edit prompt."""
    from minivid.methods.ei2.edit import DEFAULT_GUIDANCE, DEFAULT_STEPS
    from minivid.methods.ei2.edit import edit as ei2_edit
    from minivid.methods.ei2.tune import load_tuned, require_method
    from minivid.methods.ei2.model import EI2Config
    from minivid.tuning import checkpoint_meta

    if not args.tuned:
        raise ValueError("EI² edits with a tuned model: run `minivid tune --method ei2 ...` first and pass "
                         "--tuned <its folder or checkpoint>")
    meta = require_method(checkpoint_meta(args.tuned), args.tuned)
    saved = EI2Config.from_dict(meta.get("ei2", {}))
    tiny_seed = (meta.get("base") or {}).get("tiny_seed")
    config = _config(args, saved)
    with job.timed("load"):
        sd = load_sd(args, METHOD_NAME, tiny_seed=tiny_seed)
        frames = read_source(args, sd)
        _, info = load_tuned(sd, args.tuned, config)
    source_prompt = args.source_prompt or info.get("prompt", "")
    steps = args.steps or DEFAULT_STEPS
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    with job.timed("edit (inversion + sampling)"):
        out = ei2_edit(sd, frames, args.prompt, source_prompt, steps, guidance, dtype=DTYPES[args.dtype],
                       progress=args.progress)
    write_edit(job, frames, out.images, fps=args.fps)
    return {
        "tuned": info["path"], "tuned_step": info.get("step"), "tuned_prompt": info.get("prompt"),
        "source_prompt": source_prompt, "prompt": args.prompt, "steps": steps, "guidance": guidance,
        "ei2": config.to_dict(), "frames": int(frames.shape[0]), "size": list(frames.shape[-2:]),
        "base_mismatch": bool(info.get("base_mismatch", False)),
    }


# ---------------------------------------------------------------- demo

def moving_squares(frames: int, size: int) -> torch.Tensor:
    """A synthetic clip [F, 3, size, size] in [-1, 1]: a red square sliding right and a blue one
    sliding down over a vertical grey gradient."""
    import torch

    ys = torch.linspace(-0.6, 0.2, size).view(1, size, 1).expand(3, size, size)
    side = max(2, size // 4)
    clip = []
    for f in range(frames):
        img = ys.clone()
        p = round(f * (size - side) / max(frames - 1, 1))
        img[:, size // 8: size // 8 + side, p: p + side] = torch.tensor([0.9, -0.8, -0.8]).view(3, 1, 1)
        img[:, p: p + side, size // 2: size // 2 + side] = torch.tensor([-0.8, -0.6, 0.9]).view(3, 1, 1)
        clip.append(img)
    return torch.stack(clip)


DEMO_TUNE_STEPS = 6
DEMO_LR = 1e-3
DEMO_HINTS = ["minivid tune --method ei2 --weights sd-v1-4.ckpt --video CLIP --prompt ... --out TUNED",
              "minivid edit --method ei2 --weights sd-v1-4.ckpt --tuned TUNED --video CLIP --prompt ..."]
DEMO_SOURCE = "a red square and a blue square moving"
DEMO_PROMPT = "a green circle and a yellow star moving"


def demo(args: argparse.Namespace, job: Job) -> dict:
    """`minivid demo --method ei2`: EI² end to end on the tiny random model and a synthetic clip.

    Inflation, a few tuning steps (lr 1e-3 instead of the paper's 3e-5, so the loss moves within
    them), then inversion + editing. A random model makes no real edits: the output shows that every
    stage runs; the tuning loss on a fixed batch, before and after, shows the tuning works.
    """
    import torch

    from minivid.methods.ei2.edit import edit as ei2_edit
    from minivid.methods.ei2.model import EI2Config, EI2Model
    from minivid.methods.ei2.tune import diffusion_loss, encode_video, tune_video
    from minivid.models import StableDiffusion
    from minivid.tuning import TuneConfig

    check_demo_arguments(args)
    job.ran(model=args.model, frames=args.frames, size=[args.size, args.size], dtype=args.dtype, device=str(args.device))
    print("minivid demo --method ei2: a tiny model with RANDOM weights and a synthetic clip (moving squares).\n"
          "A random model makes no real edits (expect coloured noise); the demo runs every EI² stage: "
          f"inflation (FFAM + STAM), {DEMO_TUNE_STEPS} tuning steps, DDIM inversion and editing.")
    with job.timed("build"):
        sd = StableDiffusion.from_config(args.model, device=args.device, seed=args.seed)
        clip = moving_squares(args.frames, args.size).to(sd.device)
        model = EI2Model(sd.unet, EI2Config(r=2))
    with torch.no_grad():
        mean, std = encode_video(sd, clip)
        fixed = diffusion_loss(model, mean, sd.encode_prompt([DEMO_SOURCE]), sd.schedule, sd.prediction, refresh=False)
    before = fixed_batch_loss(fixed)
    with job.timed("tuning"):
        _, result = tune_video(sd, clip, DEMO_SOURCE, job.path("tuning"), model=model,
                               cfg=TuneConfig(steps=DEMO_TUNE_STEPS, lr=DEMO_LR, seed=args.seed, progress=args.progress))
    after = fixed_batch_loss(fixed)
    # tuning trains float32 tensors (as the authors' mixed-precision training keeps its master weights);
    # --dtype then casts the tuned model for inversion and editing, as `minivid edit --dtype` loads it
    sd.to(DTYPES[args.dtype]), model.to(DTYPES[args.dtype])
    with job.timed("edit"):
        out = ei2_edit(sd, clip, DEMO_PROMPT, DEMO_SOURCE, steps=args.steps, progress=args.progress)
    job.write_video("source.mp4", clip.cpu())
    write_edit(job, clip, out.images)
    print(f"tuning loss on a fixed batch: {before:.4f} before, {after:.4f} after {DEMO_TUNE_STEPS} steps "
          f"(lr {DEMO_LR:g}); edit: {args.steps} DDIM steps, CFG 7.5, '{DEMO_SOURCE}' -> '{DEMO_PROMPT}'")
    print_hints(DEMO_HINTS)
    return tuning_demo_results(before, after, result)
