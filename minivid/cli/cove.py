"""COVE on the command line: `minivid edit --method cove`, `minivid demo --method cove`.

    minivid edit --method cove --video clip.mp4 --source-prompt "a man surfing" --prompt "a bear surfing" \
        --weights weights/v2-1_512-ema-pruned.safetensors

writes edited.mp4, grid.png (source row over edited row), side_by_side.mp4, correspondence.png (a
token of frame 0 and its K matches in every frame, Appendix C) and record.json (every setting, the
COVE configuration, stage timings, the feature bank's memory and the peak memory). COVE needs no
tuning; it runs on SD 2.1-base (the paper's and FLATTEN's model; SD 2.1-v also loads). `--tiny` runs
the tiny random SD 2-style model: every stage runs, nothing real is edited.
"""
from __future__ import annotations

import argparse
import logging
import math
from typing import TYPE_CHECKING

from minivid.cli.common import (
    DTYPES, STEPS, check_demo_arguments, integer, load_sd, number, read_source, relative_point, torch_device,
    write_edit, print_hints,
)
from minivid.cli.method_options import BACKENDS, COVE, COVE_FEATURE_PROMPTS, COVE_MODES, COVE_RESOLUTIONS, COVE_STORE_DTYPES

if TYPE_CHECKING:            # torch and the method load when a job runs: `minivid edit --help` imports neither
    import torch

    from minivid.jobs import Job
    from minivid.methods.cove.pipeline import COVEConfig

log = logging.getLogger(__name__)

# option -> COVEConfig field
_FIELDS = {
    "cove_window": "window", "cove_k": "k", "cove_merge_ratio": "merge_ratio", "cove_mode": "mode",
    "cove_resolutions": "resolutions", "cove_feature_layer": "feature_layer", "cove_feature_t": "feature_t",
    "cove_feature_prompt": "feature_prompt", "cove_inversion_steps": "inversion_steps",
    "cove_inject_steps": "inject_steps", "cove_store_device": "store_device", "cove_store_dtype": "store_dtype",
    "cove_backend": "backend",
}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """COVE's own options; unset ones take COVEConfig's defaults (the paper's; shown from
    minivid.cli.method_options, which holds the same values without importing torch)."""
    d = argparse.Namespace(**COVE)
    group.add_argument("--cove-window", type=integer(1, 999, odd=True), help=f"sliding window l, odd (default {d.window})")
    group.add_argument("--cove-k", type=integer(1, 1024), help=f"corresponding tokens per frame K (default {d.k})")
    group.add_argument("--cove-merge-ratio", type=number(0, 1, high_open=True),
                       help=f"temporal token merging ratio in [0, 1), 0 = off (default {d.merge_ratio})")
    group.add_argument("--cove-mode", choices=COVE_MODES,
                       help=f"how CGA combines with dense spatio-temporal attention (default {d.mode}: dense, "
                            "then CGA on its output, FLATTEN-style; dense_only = the paper's w/o CGA)")
    group.add_argument("--cove-resolutions", choices=COVE_RESOLUTIONS,
                       help="CGA at layers on the feature grid only (match, default) or at every layer (nearest)")
    group.add_argument("--cove-feature-layer",
                       help="decoder module whose output is the diffusion feature (default auto: output_blocks.8 "
                            "on SD, 640 channels at 1/8 of the input; output_blocks.11 is the final layer)")
    group.add_argument("--cove-feature-t", type=integer(0, 999), help=f"timestep of the feature pass (default {d.feature_t})")
    group.add_argument("--cove-feature-prompt", choices=COVE_FEATURE_PROMPTS,
                       help=f"prompt of the feature pass (default {d.feature_prompt})")
    group.add_argument("--cove-inversion-steps", type=STEPS, help=f"DDIM inversion steps (default {d.inversion_steps})")
    group.add_argument("--cove-inject-steps", type=integer(0, 1000),
                       help=f"sampling steps that get the inversion's features, 0 = none (default {d.inject_steps}; "
                            f"with another --steps, the same {d.inject_steps}/{d.steps} of them)")
    group.add_argument("--cove-store-device", type=torch_device, help=f"where saved features wait for injection (default {d.store_device})")
    group.add_argument("--cove-store-dtype", choices=COVE_STORE_DTYPES, help=f"dtype of saved features (default {d.store_dtype})")
    group.add_argument("--cove-backend", choices=BACKENDS, help=f"window_topk backend (default {d.backend})")
    group.add_argument("--cove-point", type=relative_point, help="relative point 'y,x' of frame 0 for the correspondence picture (default 0.5,0.5)")


def config_from_args(args: argparse.Namespace) -> COVEConfig:
    """COVEConfig from the --cove-* options (and --steps/--guidance) that were given."""
    from minivid.methods.cove.pipeline import COVEConfig

    changes = {field: getattr(args, opt) for opt, field in _FIELDS.items() if getattr(args, opt, None) is not None}
    if getattr(args, "steps", None) is not None:
        changes["steps"] = args.steps
    if getattr(args, "guidance", None) is not None:
        changes["guidance"] = args.guidance
    if "steps" in changes and "inject_steps" not in changes:       # keep the paper's 40 of 50
        changes["inject_steps"] = round(changes["steps"] * COVEConfig.inject_steps / COVEConfig.steps)
    return COVEConfig(**changes)


def _point(args: argparse.Namespace) -> tuple[float, float]:
    """--cove-point, parsed and checked by `relative_point`; default the frame's centre."""
    point = getattr(args, "cove_point", None)
    return relative_point(point) if isinstance(point, str) else (point or (0.5, 0.5))


def _write(job: Job, source: torch.Tensor, out, point: tuple[float, float], fps: float) -> None:
    """The outputs of every edit, and COVE's correspondence picture (Appendix C)."""
    from minivid.methods.cove.visualize import correspondence_legend, correspondence_picture

    write_edit(job, source, out.images, fps=fps)
    with job.timed("write"):
        job.write_grid("correspondence.png", correspondence_picture(source.cpu(), out.correspondence, point),
                       rows=["source"], legend=correspondence_legend(out.correspondence.k),
                       title=f"query: frame 0 at y,x = {point[0]:g},{point[1]:g}")


def _results(out, config: COVEConfig, frames: torch.Tensor, point: tuple[float, float]) -> dict:
    import torch

    corr = out.correspondence
    others = ~torch.eye(corr.frames, dtype=torch.bool, device=corr.score.device)[:, None, :]   # j != i, [F, 1, F]
    top1 = corr.score[..., 0].float()                                           # [F, N, F]
    mean_top1 = float((top1 * others).sum() / (others.sum() * top1.shape[1]))
    stats = dict(out.stats)
    return {
        "cove": config.to_dict(), "frames": int(frames.shape[0]), "size": list(frames.shape[-2:]),
        "stage_seconds": stats.pop("seconds"), **stats,
        "bank_megabytes": round(stats["bank_bytes"] / 2 ** 20, 3),
        "correspondence": {"grid": list(corr.hw), "k": corr.k, "point": list(point),
                           "mean_top1_score": round(mean_top1, 5)},
    }


def edit(args: argparse.Namespace, job: Job) -> dict:
    """`minivid edit --method cove`: correspondence on the source, inversion and sampling with CGA and injection."""
    from minivid.methods.cove.pipeline import edit_video

    config = config_from_args(args)
    point = _point(args)
    with job.timed("load"):
        sd = load_sd(args, "COVE", base="sd2")
        frames = read_source(args, sd)
    job.record["model"] = {"kind": sd.kind, "prediction": sd.prediction}
    with job.timed("edit"):
        out = edit_video(sd, frames, args.prompt, args.source_prompt, config, seed=args.seed, dtype=DTYPES[args.dtype],
                          progress=args.progress)
    _write(job, frames, out, point, args.fps)
    log.info("COVE: feature bank %.1f MB over %d inversion steps", out.stats["bank_bytes"] / 2 ** 20, out.stats["bank_steps"])
    return {"source_prompt": args.source_prompt, "prompt": args.prompt, **_results(out, config, frames, point)}


# ---------------------------------------------------------------- demo

DEMO_MODELS = ("tiny_sd2",)     # COVE is an SD 2 method: its demo runs on the SD 2-style tiny model only
DEMO_SIZE = 48                  # a 12x12 correspondence grid (minivid demo's --size default for COVE)
DEMO_HINTS = ["minivid edit --method cove --weights v2-1_512-ema-pruned.safetensors --video CLIP "
              "--source-prompt ... --prompt ..."]
DEMO_SOURCE = "a red disc and a blue square moving"
DEMO_PROMPT = "a green disc and a yellow square moving"


def moving_shapes(frames: int, size: int) -> torch.Tensor:
    """A synthetic clip [F, 3, size, size] in [-1, 1]: a red disc moving right and a blue square moving
    down-left over a diagonal grey gradient; both move by a whole number of pixels per frame."""
    import torch

    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    background = ((ys + xs) / (2 * size) * 0.8 - 0.6).expand(3, size, size)
    r, side, step = size // 8, size // 4, max(1, size // (3 * max(frames - 1, 1)))
    clip = []
    for f in range(frames):
        img = background.clone()
        cy, cx = size // 4, size // 4 + f * step
        disc = (ys - cy) ** 2 + (xs - cx) ** 2 <= r * r
        img[:, disc] = torch.tensor([0.9, -0.8, -0.8])[:, None]
        y0, x0 = size // 2 + f * step, size - side - size // 8 - f * step
        img[:, y0:y0 + side, max(0, x0):x0 + side] = torch.tensor([-0.8, -0.6, 0.9]).view(3, 1, 1)
        clip.append(img)
    return torch.stack(clip)


def demo(args: argparse.Namespace, job: Job) -> dict:
    """`minivid demo --method cove`: COVE end to end on the tiny random SD 2-style model and a synthetic clip.

    The clip is `moving_shapes` at --size px (`minivid demo` fills an unset --size with DEMO_SIZE, 48: a
    12×12 correspondence grid, and refuses a --model other than tiny_sd2). Inversion and sampling both take
    --steps steps (the paper: 100 and 50; equal counts keep the demo well under a minute), injection the
    first 80 % of the sampling steps, as the paper's 40 of 50. A random model makes
    no real edits: the output shows every stage running (features, correspondence, CGA with merging in
    inversion and sampling, feature injection).
    """
    from minivid.methods.cove.pipeline import COVEConfig, edit_video
    from minivid.models import StableDiffusion

    model = args.model or DEMO_MODELS[0]
    check_demo_arguments(args, model)
    size = args.size
    job.ran(model=model, frames=args.frames, size=[size, size], dtype=args.dtype, device=str(args.device))
    config = COVEConfig(inversion_steps=args.steps, steps=args.steps, inject_steps=math.floor(0.8 * args.steps),
                        guidance=7.5)
    print("minivid demo --method cove: a tiny model with RANDOM weights and a synthetic clip (moving shapes).\n"
          "A random model makes no real edits (expect coloured noise); the demo runs every COVE stage: diffusion "
          f"features, windowed top-{config.k} correspondence (l={config.window}), correspondence-guided attention "
          f"with {config.merge_ratio:.0%} token merging in {config.inversion_steps} inversion and {config.steps} "
          f"sampling steps, and feature injection in the first {config.inject_steps}.")
    with job.timed("build"):
        sd = StableDiffusion.from_config(model, device=args.device, seed=args.seed, dtype=DTYPES[args.dtype])
        clip = moving_shapes(args.frames, size).to(sd.device)
    with job.timed("edit"):
        out = edit_video(sd, clip, DEMO_PROMPT, DEMO_SOURCE, config, seed=args.seed, progress=args.progress)
    point = (0.25, 0.25)                                     # the red disc's centre in frame 0
    job.write_video("source.mp4", clip.cpu())
    _write(job, clip, out, point, 8)
    results = _results(out, config, clip, point)
    print(f"correspondence on a {out.correspondence.hw[0]}x{out.correspondence.hw[1]} feature grid (d="
          f"{out.stats['feature_dim']}), mean top-1 cosine {results['correspondence']['mean_top1_score']:.3f}; "
          f"feature bank {results['bank_megabytes']:.2f} MB; stages (s): {out.stats['seconds']}")
    print_hints(DEMO_HINTS)
    return {"model": model, "source_prompt": DEMO_SOURCE, "prompt": DEMO_PROMPT, **results,
            "note": "random weights: the edit is not meaningful"}
