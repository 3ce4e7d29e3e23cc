"""`minivid eval VIDEO`: the automatic metrics the four papers report, from minivid's own encoders.

    minivid eval edited.mp4 --prompt "a cat in the snow" --source source.mp4 --json metrics.json

CLIP textual alignment (needs --prompt) and frame consistency (CLIP ViT-L/14, or OpenCLIP
ViT-H/14 with --clip), subject consistency (DINO ViT-B/16) and aesthetic quality (LAION's predictor
on CLIP ViT-L/14), and, when their weights are in weights/, motion smoothness (AMT-S) and imaging
quality (MUSIQ); definitions and sources in docs/eval.md. The weights are looked for in weights/
(see weights/README.md). With --source the same metrics of the source video are shown beside.
`--tiny` uses tiny RANDOM encoders (the machinery only: the numbers mean nothing); `--write-tiny
DIR` writes such encoders in the official file layouts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

help = ("score a video with the papers' metrics (CLIP text alignment / frame consistency, subject consistency, "
        "aesthetic quality, motion smoothness, imaging quality, PickScore)")


def default_device() -> str:
    """cuda when torch sees a GPU, else cpu (asked only when a job runs: `--help` imports no torch)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_eval_weights_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """One option per encoder of minivid.eval.loading.DEFAULT_FILES (--clip, --dino, --aesthetic, --pickscore, ...;
    with `prefix`, e.g. "eval-" for `minivid edit --eval`)."""
    from minivid.eval.catalog import FILES

    helps = {"amt": "AMT-S frame interpolation (amt-s.pth), for motion_smoothness",
             "musiq": "MUSIQ trained on SPAQ (musiq_spaq_ckpt-358bb6af.pth), for imaging_quality",
             "clip": "CLIP: a transformers CLIP folder (config.json + model.safetensors: any ViT, e.g. B/32, B/16, "
                     "L/14, L/14-336), transformers' ViT-L/14 model.safetensors, or OpenCLIP ViT-H/14"}
    for key, (path, what) in FILES.items():
        p.add_argument(f"--{prefix}{key}", metavar="WEIGHTS", dest=f"{prefix.replace('-', '_')}{key}",
                       help=f"{helps.get(key, what)} (default {path})")


def weights_paths(args: argparse.Namespace, prefix: str = "") -> dict[str, str | None]:
    """The encoder files the options name (None: the default in weights/)."""
    from minivid.eval.catalog import FILES

    key = prefix.replace("-", "_")
    return {k: getattr(args, f"{key}{k}", None) for k in FILES}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minivid.eval.catalog import METRICS

    p.add_argument("video", nargs="?", help="the video to score (mp4/gif/webm, or a folder of frames)")
    p.add_argument("--prompt", help="the edit prompt (for CLIP textual alignment)")
    p.add_argument("--source", help="the source video: its metrics are shown beside for reference")
    add_eval_weights_arguments(p)
    p.add_argument("--metrics",
                   help=f"comma-separated subset of {', '.join(METRICS)} (default: every metric whose weights are "
                        f"present, naming the others; text alignment and PickScore need --prompt)")
    from minivid.cli.common import FRAMES, THREADS, integer, torch_device

    p.add_argument("--frames", type=FRAMES, help="number of frames to read, ≥ 1 (default: all)")
    p.add_argument("--stride", type=integer(1, 10_000), default=1, help="take every n-th frame, ≥ 1 (default 1)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--device", type=torch_device, help="torch device (default cuda when there is a GPU, else cpu)")
    p.add_argument("--threads", type=THREADS,
                   help="CPU threads for torch, in [1, 4096] (default: 1 with --tiny on the CPU, else torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--tiny", action="store_true",
                   help="tiny RANDOM encoders instead of weights (tests and trying the command: the numbers mean nothing)")
    p.add_argument("--write-tiny", metavar="DIR",
                   help="write tiny random encoders in the official layouts to DIR (tiny-clip.safetensors, "
                        "tiny-openclip.safetensors, tiny-dino.pth, tiny-aesthetic.pth) and exit")


def parse_metrics(text: str | None, prompt: str | None) -> tuple[str, ...]:
    """The metrics --metrics names (None: all), less those that need a prompt when there is none."""
    from minivid.eval.catalog import METRICS, NEEDS_PROMPT

    names = tuple(METRICS) if text is None else tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(f"--metrics: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(METRICS)}")
    if prompt is None:
        names = tuple(m for m in names if m not in NEEDS_PROMPT)
        if not names:
            raise ValueError(f"{' and '.join(NEEDS_PROMPT)} need --prompt")
    return names


def choose_metrics(text: str | None, prompt: str | None, paths: dict[str, str | None], tiny: bool,
                   option: str = "--metrics") -> tuple[tuple[str, ...], dict[str, str]]:
    """(the metrics to compute, {metric left out: why}), decided before anything is loaded.

    Named with --metrics: every one must have its weights (FileNotFoundError listing all that are
    missing). By default: every metric whose weights are present; the others are named with the
    missing file. With --tiny every metric runs (tiny random encoders)."""
    from minivid.eval.loading import available, check_files
    from minivid.eval.catalog import METRICS, NEEDS_PROMPT

    metrics = parse_metrics(text, prompt)
    skipped = {m: "needs --prompt" for m in METRICS if m in NEEDS_PROMPT and prompt is None
               and (text is None or m in text)}
    if tiny:
        if text is None:
            from minivid.eval.catalog import RUN_WHEN_PRESENT

            metrics = tuple(m for m in metrics if m not in RUN_WHEN_PRESENT)
        return metrics, skipped
    if text is not None:
        check_files(paths, metrics, option=option)
        return metrics, skipped
    present, missing = available(paths, metrics)
    if not present:                                         # nothing can run: every missing file, with its source
        try:
            check_files(paths, metrics, option=option)
        except FileNotFoundError as e:
            files = str(e).split("\n", 1)[-1]
            raise FileNotFoundError("no metric can run: the weights of every metric are missing (put them where "
                                    "named, see weights/README.md; --tiny tries the machinery with random "
                                    f"encoders):\n{files}") from None
    return present, {**missing, **skipped}


def format_skipped(skipped: dict[str, str]) -> str:
    return "\n".join(f"skipped {m}: {why}" for m, why in skipped.items())


def build_evaluator(args: argparse.Namespace, metrics: tuple[str, ...], prefix: str = ""):
    """The Evaluator the options ask for (weights checked before anything is loaded)."""
    from minivid.eval.loading import load_evaluator, tiny_evaluator

    from minivid.cli.common import show_progress

    progress = show_progress(args)
    if args.tiny:
        return tiny_evaluator(metrics, seed=getattr(args, "seed", 0) or 0, device=args.device, progress=progress)
    return load_evaluator(weights_paths(args, prefix), metrics, device=args.device, progress=progress)


def _read(path: str, args: argparse.Namespace) -> torch.Tensor:
    from minivid.video import read_video

    return read_video(path, num_frames=args.frames, stride=args.stride)


def _check_output(path: Path, inputs: list[str | None]) -> None:
    from minivid.outputs import check_target, resolve

    target = resolve(path, "--json")
    for source in inputs:
        if source and (target == resolve(source) or resolve(source) in target.parents):
            raise FileExistsError(f"--json {path}: is (or lies inside) the input {source}; choose another --json file")
    check_target(path)


def write_json(path: str | Path, data: dict, inputs: list[str | None]) -> Path:
    """Write JSON through `minivid.outputs.write_json` (a fresh temporary file renamed into place); never
    onto an input."""
    from minivid.outputs import make_folder, write_json as write

    path = Path(path)
    _check_output(path, inputs)
    make_folder(path.parent, "--json's folder")
    return write(path, data, inputs=[i for i in inputs if i])


def format_table(results: dict[str, Any], source: dict[str, Any] | None = None) -> str:
    """One line per metric: value (and the source video's), the papers that report it."""
    from minivid.eval.catalog import METRICS

    rows = []
    for name, (_, papers) in METRICS.items():
        if name not in results:
            continue
        r = results[name]
        value = f"{r['value']:.4f}"
        src = f"{source[name]['value']:.4f}" if source and name in source else ""
        if name == "clip_frame_consistency":     # the pair definition each line uses (papers differ)
            rows.append((f"{name} (consecutive pairs)", value, src, "(none of the four papers)"))
            rows.append((f"{name} (all pairs)", f"{r['all_pairs']:.4f}",
                         f"{source[name]['all_pairs']:.4f}" if source and name in source else "",
                         "EI² (x100), TCVE, I2VEdit, LOVEU-TGVE"))
            continue
        rows.append((name, value, src, papers))
        if name == "clip_text_alignment":
            rows.append(("  (CLIP score, 100 x cos)", f"{r['clip_score']:.2f}",
                         f"{source[name]['clip_score']:.2f}" if source and name in source else "", ""))
    head = ("metric", "video", "source" if source is not None else "", "reported by")
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(4)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *rows]]
    return "\n".join(lines)


def evaluate_videos(evaluator, video: torch.Tensor, prompt: str | None, source: torch.Tensor | None = None) -> dict:
    out: dict[str, Any] = {"frames": int(video.shape[0]), "size": list(video.shape[-2:]), "metrics": evaluator(video, prompt)}
    if source is not None:
        out["source"] = {"frames": int(source.shape[0]), "size": list(source.shape[-2:]),
                         "metrics": evaluator(source, prompt)}
    if evaluator.clip is not None and video.shape[0] < 2:
        out["note"] = "one frame: the consistency metrics need at least two"
    return out


def run(args: argparse.Namespace) -> int:
    if args.write_tiny:
        from minivid.eval.loading import write_tiny_encoders

        for name, path in write_tiny_encoders(args.write_tiny).items():
            print(f"wrote {path} ({name}, tiny random weights)")
        return 0
    if not args.video:
        raise ValueError("give the VIDEO to score (or --write-tiny DIR)")
    if args.device is None:
        args.device = default_device()
    paths = weights_paths(args)
    if args.json:
        _check_output(Path(args.json), [args.video, args.source, *paths.values()])
    for path in (args.video, args.source):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
    # every weights file first, then the videos, then the encoders
    metrics, skipped = choose_metrics(args.metrics, args.prompt, paths, args.tiny)
    if skipped:
        print(format_skipped(skipped), file=sys.stderr)
    video = _read(args.video, args)
    source = _read(args.source, args) if args.source else None
    evaluator = build_evaluator(args, metrics)
    result = {"video": args.video, "source_video": args.source, "prompt": args.prompt, "tiny": bool(args.tiny),
              **evaluate_videos(evaluator, video, args.prompt, source)}
    if skipped:
        result["skipped"] = skipped
    if args.tiny:
        result["note_tiny"] = "tiny RANDOM encoders: the numbers mean nothing"
    print(f"{args.video}: {result['frames']} frames {result['size'][0]}x{result['size'][1]}"
          + (" (tiny random encoders: the numbers mean nothing)" if args.tiny else ""))
    print(format_table(result["metrics"], result["source"]["metrics"] if source is not None else None))
    if args.json:
        print(f"wrote {write_json(args.json, result, [args.video, args.source])}")
    return 0
