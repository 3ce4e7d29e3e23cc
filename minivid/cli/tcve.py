"""TCVE on the command line: `minivid tune --method tcve`, `minivid edit --method tcve`, `minivid demo --method tcve`.

    minivid tune --method tcve --weights sd-v1-4.ckpt --video clip.mp4 --prompt "a man surfing" \\
                 --frames 16 --stride 2 --size 480 --out tuned/
    minivid edit --method tcve --weights sd-v1-4.ckpt --tuned tuned/ --video clip.mp4 --frames 16 --stride 2 \\
                 --size 480 --prompt "a man surfing on a wave made of aurora borealis"

tune writes the tuned tensors (`tuned-<step>.safetensors`, optimizer moments beside them for a
resume), the source frame grid and record.json (losses, timings). edit writes edited.mp4, grid.png
(source row over edited row), side_by_side.mp4 and record.json. `--tuned` takes a checkpoint or a
tune folder (its newest checkpoint); the checkpoint says which ablation and layout it was tuned
with, so edit rebuilds that model. With `--tiny` the tiny random model is rebuilt from the seed the
checkpoint records, so tune and edit see the same base.
"""
from __future__ import annotations

import argparse
import logging
import math
from typing import TYPE_CHECKING

from minivid.cli.common import (
    DTYPES, check_demo_arguments, integer, fixed_batch_loss, load_sd, read_source, tiny_base, tuning_demo_results,
    tuning_summary, write_edit, print_hints,
)
from minivid.cli.method_options import TCVE_ABLATIONS

if TYPE_CHECKING:            # torch and the method load when a job runs: `minivid edit --help` imports neither
    import torch

    from minivid.jobs import Job

TAKES_TUNED = True                        # edit reads --tuned (the tensors of `minivid tune --method tcve`)

log = logging.getLogger(__name__)

METHOD_NAME = "TCVE"


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """TCVE's own options (edit; tune reads them too where its parser has them)."""
    group.add_argument("--tcve-ablation", choices=sorted(TCVE_ABLATIONS),
                       help="paper Tables II-III: no_temporal_unet, no_stu (plain sum), no_temporal_attention, "
                            "no_conv3d (default none; edit: the checkpoint's)")
    group.add_argument("--tcve-inversion-prompt", choices=["empty", "source"], default="empty",
                       help="DDIM-invert with the empty prompt (the authors' code, default) or with the source "
                            "prompt (--source-prompt, else the prompt the checkpoint was tuned on)")
    group.add_argument("--tcve-official-reshape", action="store_true",
                       help="the authors' up-level feature layout (a height mix-up; see docs/tcve.md)")
    group.add_argument("--tcve-vae-chunk", type=integer(1, 100_000), help="frames per VAE call (default: all at once)")


def _opt(args: argparse.Namespace, name: str, default=None):
    """A --tcve-* option, or its default when this command's parser does not have it."""
    value = getattr(args, f"tcve_{name}", None)
    return default if value is None else value


# ---------------------------------------------------------------- tune

def tune(args: argparse.Namespace, job: Job) -> dict:
    """`minivid tune --method tcve`: tune the temporal branch (and Tune-A-Video's set) on the source clip."""
    from minivid.methods.tcve.model import TCVEModel
    from minivid.methods.tcve.tune import tune_config, tune_tcve
    from minivid.tuning import frames_digest

    if args.dtype != "fp32":
        raise ValueError("TCVE tuning keeps the tuned tensors in float32: use --dtype fp32 with --autocast bf16|fp16 "
                         "for mixed precision")
    cfg = tune_config(steps=args.steps, lr=args.lr, autocast=args.autocast, checkpoint_every=args.checkpoint_every,
                      seed=args.seed, progress=args.progress)
    if cfg.steps < 1 or cfg.checkpoint_every < 1:
        raise ValueError("--steps and --checkpoint-every must be at least 1")
    with job.timed("load"):
        sd = load_sd(args, METHOD_NAME)
        frames = read_source(args, sd)
        model = TCVEModel.build(sd.unet, ablation=_opt(args, "ablation", "none"),
                                official_reshape=_opt(args, "official_reshape", False), seed=args.seed)
    trainable = model.trainable()
    log.info("TCVE tuning: %d trainable tensors (%.2fM values); %d steps at lr %g", len(trainable),
             sum(p.numel() for p in trainable.values()) / 1e6, cfg.steps, cfg.lr)
    with job.timed("tuning"):
        result = tune_tcve(sd, model, frames, args.prompt, cfg, job.dir, resume=not (args.no_resume or args.restart),
                           checkpointing=args.gradient_checkpointing, vae_chunk=_opt(args, "vae_chunk"),
                           meta={"base": tiny_base(args), "source": frames_digest(frames)})
    job.write_grid("source_grid.png", frames.cpu(), rows=["source"])
    if result.checkpoint is not None:
        job.add_output(result.checkpoint, keep=True)
    return {**tuning_summary(METHOD_NAME, result, frames), "tcve": model.settings, "tune": vars(cfg),
            "trainable_values": sum(p.numel() for p in trainable.values())}


# ---------------------------------------------------------------- edit

def edit(args: argparse.Namespace, job: Job) -> dict:
    """`minivid edit --method tcve --tuned CKPT`: DDIM-invert the source, sample under the edit prompt."""
    from minivid.methods.tcve.edit import EDIT_GUIDANCE, EDIT_STEPS, edit_tcve
    from minivid.methods.tcve.model import TCVEModel
    from minivid.methods.tcve.tune import load_tuned
    from minivid.tuning import checkpoint_meta, resolve_checkpoint

    meta: dict = {}
    if args.tuned:
        path = resolve_checkpoint(args.tuned)
        meta = checkpoint_meta(path)
    else:
        log.warning("no --tuned checkpoint: editing with the untuned TCVE model (at initialisation it is SD with "
                    "sparse-causal attention); run `minivid tune --method tcve` first for TCVE")
    ablation = _opt(args, "ablation", meta.get("ablation") or "none")
    official = _opt(args, "official_reshape", False) or bool(meta.get("official_reshape", False))
    with job.timed("load"):
        sd = load_sd(args, METHOD_NAME, tiny_seed=(meta.get("base") or {}).get("tiny_seed"))
        frames = read_source(args, sd)
        model = TCVEModel.build(sd.unet, ablation=ablation, official_reshape=official)
        info = load_tuned(model, path) if args.tuned else {}
    model.eval()
    inversion = _opt(args, "inversion_prompt", "empty")
    source_prompt = args.source_prompt or info.get("prompt", "")
    steps = args.steps or EDIT_STEPS
    guidance = EDIT_GUIDANCE if args.guidance is None else args.guidance
    with job.timed("edit (inversion + sampling)"):
        out = edit_tcve(sd, model, frames, args.prompt, source_prompt, inversion_prompt=inversion, steps=steps,
                        guidance=guidance, vae_chunk=_opt(args, "vae_chunk"), dtype=DTYPES[args.dtype],
                        progress=args.progress)
    write_edit(job, frames, out.images, fps=args.fps)
    return {
        "tuned": info.get("path"), "tuned_step": info.get("step"), "tuned_prompt": info.get("prompt"),
        "inversion_prompt": source_prompt if inversion == "source" else "", "prompt": args.prompt,
        "steps": steps, "guidance": guidance, "tcve": model.settings,
        "frames": int(frames.shape[0]), "size": list(frames.shape[-2:]),
        "base_mismatch": bool(info.get("base_mismatch", False)),
    }


# ---------------------------------------------------------------- demo

DEMO_TUNE_STEPS = 4
DEMO_LR = 1e-3
DEMO_HINTS = ["minivid tune --method tcve --weights sd-v1-4.ckpt --video CLIP --prompt ... --out TUNED",
              "minivid edit --method tcve --tuned TUNED --weights sd-v1-4.ckpt --video CLIP --prompt ..."]
DEMO_SOURCE = "a white ball rolling over a sunset"
DEMO_PROMPT = "an orange planet drifting across a night sky"


def rolling_ball(frames: int, size: int) -> torch.Tensor:
    """A synthetic clip [F, 3, size, size] in [-1, 1]: a white disc moving left to right along an arc
    over a vertical orange-to-purple gradient."""
    import torch

    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    top, bottom = torch.tensor([0.9, 0.3, -0.4]), torch.tensor([-0.3, -0.7, 0.2])
    sky = top.view(3, 1, 1) * (1 - ys) + bottom.view(3, 1, 1) * ys                  # [3, S, S]
    clip = []
    for f in range(frames):
        s = f / max(frames - 1, 1)
        cx, cy = 0.15 + 0.7 * s, 0.6 - 0.3 * math.sin(math.pi * s)
        disc = (((xs - cx) ** 2 + (ys - cy) ** 2) < 0.12 ** 2).float()
        clip.append(sky * (1 - disc) + 0.95 * disc)
    return torch.stack(clip)


def demo(args: argparse.Namespace, job: Job) -> dict:
    """`minivid demo --method tcve`: TCVE end to end on the tiny random model and a synthetic clip.

    Inflation + temporal branch, a few tuning steps (lr 1e-3 instead of the paper's 3e-5, so the
    loss moves within them), then DDIM inversion (empty prompt) and editing (CFG 12.5). A random
    model makes no real edits: the output shows that every stage runs; the tuning loss on a fixed
    batch, before and after, shows that tuning works.
    """
    import torch

    from minivid.methods.tcve.edit import EDIT_GUIDANCE, edit_tcve
    from minivid.methods.tcve.model import TCVEModel
    from minivid.methods.tcve.tune import diffusion_loss, encode_video, tune_config, tune_tcve
    from minivid.models import StableDiffusion

    check_demo_arguments(args)
    job.ran(model=args.model, frames=args.frames, size=[args.size, args.size], dtype=args.dtype, device=str(args.device))
    print("minivid demo --method tcve: a tiny model with RANDOM weights and a synthetic clip (a rolling ball).\n"
          "A random model makes no real edits (expect coloured noise); the demo runs every TCVE stage: "
          f"Tune-A-Video inflation, temporal UNet + STUs, {DEMO_TUNE_STEPS} tuning steps, DDIM inversion and editing.")
    with job.timed("build"):
        sd = StableDiffusion.from_config(args.model, device=args.device, seed=args.seed)
        clip = rolling_ball(args.frames, args.size).to(sd.device)
        model = TCVEModel.build(sd.unet, seed=args.seed)
    mean, _ = encode_video(sd, clip)
    with torch.no_grad():
        fixed = diffusion_loss(model, mean, sd.encode_prompt([DEMO_SOURCE]), len(clip), sd.schedule, sd.prediction)
    before = fixed_batch_loss(fixed)
    with job.timed("tuning"):
        result = tune_tcve(sd, model, clip, DEMO_SOURCE, tune_config(steps=DEMO_TUNE_STEPS, lr=DEMO_LR, seed=args.seed,
                                                                     progress=args.progress), job.path("tuning"))
    after = fixed_batch_loss(fixed)
    # tuning trains float32 tensors (as the authors' mixed-precision training keeps its master weights);
    # --dtype then casts the tuned model for inversion and editing, as `minivid edit --dtype` loads it
    sd.to(DTYPES[args.dtype]), model.to(DTYPES[args.dtype])
    with job.timed("edit"):
        out = edit_tcve(sd, model, clip, DEMO_PROMPT, DEMO_SOURCE, steps=args.steps, progress=args.progress)
    job.write_video("source.mp4", clip.cpu())
    write_edit(job, clip, out.images)
    print(f"tuning loss on a fixed batch: {before:.4f} before, {after:.4f} after {DEMO_TUNE_STEPS} steps "
          f"(lr {DEMO_LR:g}); edit: {args.steps} DDIM steps, CFG {EDIT_GUIDANCE}, '{DEMO_SOURCE}' -> '{DEMO_PROMPT}'")
    print_hints(DEMO_HINTS)
    return tuning_demo_results(before, after, result)
