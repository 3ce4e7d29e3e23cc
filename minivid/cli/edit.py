"""`minivid edit --method NAME ...`: edit a video with one of the methods.

`--eval` then scores the edited.mp4 (against the source clip) with `minivid eval`'s metrics, as part of
the same job (its folder still locked, the video still staged), and the job's one record.json holds
them under results.eval; the weights it needs are checked before the edit starts. When the scoring
fails, the edit is still written, its record says why under results.eval.error, and the exit code is 1.
"""
from __future__ import annotations

import argparse

from minivid.cli.common import (
    GUIDANCE, STEPS, add_model_arguments, add_video_arguments, available_clis, method_defaults, per_method_frames,
    run_method,
)
from minivid.methods import METHODS

help = "edit a video with COVE, EI², TCVE or I2VEdit"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=list(METHODS), help="; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    p.add_argument("--prompt", help="the edit prompt (all methods but I2VEdit)")
    p.add_argument("--source-prompt", default="", help="a prompt describing the source video")
    p.add_argument("--tuned", help="tuned tensors from `minivid tune` (EI², TCVE)")
    p.add_argument("--steps", type=STEPS, help="sampling steps, 1..1000 (default: the method's)")
    p.add_argument("--guidance", type=GUIDANCE, help="classifier-free guidance scale in [0, 100] (default: the method's)")
    add_model_arguments(p)
    add_video_arguments(p)
    add_eval_arguments(p.add_argument_group("evaluation (--eval)"))
    clis = available_clis()
    per_method_frames(p, clis)                        # resolved per method in run() (DEFAULT_FRAMES)
    for name, mod in clis.items():
        mod.add_arguments(p.add_argument_group(f"{name} options"))


def add_eval_arguments(group) -> None:
    from minivid.cli.eval import add_eval_weights_arguments
    from minivid.eval.catalog import METRICS

    group.add_argument("--eval", action="store_true",
                       help="score edited.mp4 with `minivid eval`'s metrics (prompt = --prompt, source = --video) and "
                            "add them to record.json (results.eval); with --tiny, tiny random encoders")
    add_eval_weights_arguments(group, prefix="eval-")
    group.add_argument("--eval-metrics", help=f"metrics of --eval, a comma-separated subset of {', '.join(METRICS)} "
                                              f"(default: every metric whose weights are present)")


def run(args: argparse.Namespace) -> int:
    method_defaults(args)
    if not getattr(args, "eval", False):
        return run_method(args, "edit")
    import sys

    from minivid.cli.eval import choose_metrics, format_skipped, weights_paths

    # every weights file the metrics need, before the edit runs
    metrics, skipped = choose_metrics(args.eval_metrics, args.prompt, weights_paths(args, "eval-"), args.tiny,
                                      option="--eval-metrics")
    if skipped:
        print(format_skipped(skipped), file=sys.stderr)
    args._eval_skipped = skipped
    # the scoring is part of the edit's job: it reads the staged edited.mp4 while the job holds the folder's
    # lock, and its results go into the one record.json the job writes (minivid.outputs' writer)
    failed: list[str] = []

    def then(job, results: dict) -> dict:
        try:
            return {"eval": score_edit(args, metrics, job, results)}
        except Exception as e:       # noqa: BLE001 - the edit is done and kept; the record says why it has no metrics
            if getattr(args, "verbose", False):
                raise
            failed.append(f"{type(e).__name__}: {e}")
            return {"eval": {"error": failed[0]}}

    code = run_method(args, "edit", then=then)
    if failed:
        print(f"minivid edit: error: --eval failed after the edit ({failed[0]}); the edit is written, its "
              f"record.json has results.eval.error instead of metrics", file=sys.stderr)
        return 1
    return code


def score_edit(args: argparse.Namespace, metrics: tuple[str, ...], job, results: dict) -> dict:
    """Score the job's edited.mp4 (still in its staging folder) against the source clip: results.eval of its
    record (timings_s.eval: the time it took)."""
    from pathlib import Path

    from minivid.cli.eval import build_evaluator, evaluate_videos, format_table
    from minivid.video import read_video

    with job.timed("eval"):
        evaluator = build_evaluator(args, metrics, prefix="eval-")
        edited = read_video(job.stage / "edited.mp4")
        sampled = (results.get("sampling") or {}).get("source_frames")
        if sampled:              # the method sampled the source itself (I2VEdit: over time): score those frames
            from minivid.cli.i2vedit import _read_frames

            source = _read_frames(Path(args.video), sampled)
        else:
            source = read_video(args.video, num_frames=args.frames, stride=args.stride)
        result = {"video": "edited.mp4", "source_video": args.video, "prompt": args.prompt, "tiny": bool(args.tiny),
                  **evaluate_videos(evaluator, edited, args.prompt, source)}
    if getattr(args, "_eval_skipped", None):
        result["skipped"] = args._eval_skipped
    print(format_table(result["metrics"], result["source"]["metrics"]))
    print("the metrics are in the job's record.json (results.eval)")
    return result
