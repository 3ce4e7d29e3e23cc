"""`minivid benchmark DATASET --method M --out DIR`: a method over every (video, prompt) pair of a
benchmark set, each output scored with `minivid eval`'s metrics, and one table.

    minivid benchmark loveu-tgve-2023/ --method cove --weights weights/v2-1_512-ema-pruned.safetensors --out runs/
    torchrun --standalone --nproc_per_node=2 -m minivid benchmark plan.jsonl --methods ei2,tcve --tiny --out runs/

DATASET is a folder in LOVEU-TGVE-2023's layout (videos plus one CSV of prompts: "Video name", "Our GT
caption", one "<Kind> Change Caption" column per edit), such a CSV, or a JSONL plan of {"id", "video",
"prompt", "source_prompt", "first_frame"} objects. Every pair becomes an `edit --eval` item of the batch
machinery (minivid.cli.batch) in DIR/<method>/<id>/; EI² and TCVE first tune once per source video
(DIR/<method>/tune-<video>/, with the source caption as the tuning prompt). Items are shared over
torchrun's processes; a finished item is skipped on a rerun; a failing item is recorded and the others
go on. DIR/benchmark.json holds the settings, every item's record and the table (mean ± std per metric
and the number of pairs, each frame-consistency column naming its pair definition, the paper's number
beside where it reports that metric, marked not comparable when the run's setting differs from the
paper's); DIR/benchmark.md the table. Exit status 1 if an item failed.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

help = "run a method on every (video, prompt) of a dataset (LOVEU-TGVE CSV or JSONL), score them, write one table"
description = __doc__.split("\n\n", 1)[1] if __doc__ else help

METHODS = ("cove", "ei2", "tcve", "i2vedit")
TUNED = ("ei2", "tcve")          # methods that tune on the source video before editing


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter     # the description's example commands, one a line
    from minivid.cli.eval import add_eval_weights_arguments
    from minivid.eval.catalog import METRICS

    p.add_argument("dataset", help="a LOVEU-TGVE-2023-style folder (videos + one CSV of prompts), a .csv or a .jsonl plan")
    p.add_argument("--out", required=True, help="the benchmark folder: DIR/<method>/<id>/ per item, DIR/benchmark.json")
    p.add_argument("--method", "--methods", dest="methods", default="cove",
                   help=f"method(s), comma-separated, of {', '.join(METHODS)} (default cove)")
    p.add_argument("--weights", action="append", default=[], metavar="[METHOD=]PATH",
                   help="base weights for the methods (PATH), or for one method (METHOD=PATH); repeatable")
    p.add_argument("--tiny", action="store_true", help="tiny random models and encoders (the machinery, no meaning)")
    p.add_argument("--metrics", help=f"comma-separated subset of {', '.join(METRICS)} (default: every metric whose "
                                     f"weights are present)")
    p.add_argument("--limit", type=_positive, help="only the first N pairs of the dataset")
    p.add_argument("--frames", type=_positive, help="frames per video (default: each method's)")
    p.add_argument("--size", type=_positive, help="frame size (default: each method's)")
    p.add_argument("--steps", type=_positive, help="sampling steps (default: each method's)")
    p.add_argument("--tune-steps", type=_positive, help="tuning steps of EI²/TCVE (default: each method's)")
    p.add_argument("--seed", type=int, default=0, help="random seed of every item (default 0)")
    p.add_argument("--device", help="torch device (default: each process's, as batch chooses)")
    p.add_argument("--threads", type=_positive, help="CPU threads for torch in each process (default: 1 with --tiny, "
                                                      "else torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_eval_weights_arguments(p.add_argument_group("metric weights (as minivid eval)"), prefix="eval-")


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"--method: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--method: {text!r} names a method twice")
    return methods


def parse_weights(values: list[str], methods: list[str], tiny: bool) -> dict[str, str | None]:
    """method -> its base weights (None with --tiny)."""
    common, per = None, {}
    for v in values:
        name, sep, path = v.partition("=")
        if sep and name in METHODS:
            per[name] = path
        elif common is None:
            common = v
        else:
            raise ValueError(f"--weights: two paths for every method ({common}, {v}); use METHOD=PATH")
    if tiny:
        if values:
            raise ValueError("--tiny builds random models: leave out --weights")
        return {m: None for m in methods}
    out = {m: per.get(m, common) for m in methods}
    missing = [m for m, w in out.items() if not w]
    if missing:
        raise ValueError(f"--weights: no base weights for {', '.join(missing)} (give PATH, or METHOD=PATH; or --tiny)")
    for m, w in out.items():
        if not Path(w).exists():
            raise FileNotFoundError(f"--weights {m}={w}: no such file or folder")
    return out


def _tune_id(video: str) -> str:
    from minivid.eval.benchmark import ID

    return ("tune-" + ID.sub("-", Path(video).stem).strip("-"))[:128]


def plan_items(pairs, method: str, args: argparse.Namespace, weights: str | None,
               metrics: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(tuning items, edit items) of one method, as batch items {"id", "command", "args"}."""
    common: dict[str, Any] = {"method": method, "seed": args.seed, "quiet": True}
    for key in ("frames", "size", "device"):
        if getattr(args, key) is not None:
            common[key] = getattr(args, key)
    if args.tiny:
        common["tiny"] = True
    else:
        common["weights"] = weights
    tunes, edits, seen = [], [], {}
    for pair in pairs:
        edit = {**common, "video": pair.video, "prompt": pair.prompt, "eval": True}
        if args.steps is not None:
            edit["steps"] = args.steps
        if metrics is not None:
            edit["eval_metrics"] = metrics
        for key, path in args._eval_paths.items():
            if path:
                edit[f"eval_{key}"] = path
        if pair.source_prompt:
            edit["source_prompt"] = pair.source_prompt
        if method == "i2vedit":
            if not pair.first_frame:
                raise ValueError(f"{pair.where}: I2VEdit edits from an edited first frame: give \"first_frame\" for "
                                 f"every item (a JSONL plan); a CSV of prompts has none")
            edit["first_frame"] = pair.first_frame
            edit.pop("prompt")
            edit.pop("source_prompt", None)
        if method in TUNED:
            tid = _tune_id(pair.video)
            if (pair.video, pair.source_prompt) not in seen:
                if tid in {t["id"] for t in tunes}:
                    tid = f"{tid}-{len(tunes)}"
                seen[(pair.video, pair.source_prompt)] = tid
                tune = {**common, "video": pair.video, "prompt": pair.source_prompt or pair.prompt}
                if args.tune_steps is not None:
                    tune["steps"] = args.tune_steps
                tunes.append({"id": tid, "command": "tune", "args": tune})
            edit["tuned"] = str(Path(args.out) / method / seen[(pair.video, pair.source_prompt)])
        edits.append({"id": pair.id, "command": "edit", "args": edit})
    return tunes, edits


def _eval_of(folder: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((folder / "record.json").read_text())
    except (OSError, ValueError):
        return None
    return (record.get("results") or {}).get("eval") if isinstance(record, dict) else None


def run(args: argparse.Namespace) -> int:
    from minivid import distributed
    from minivid.cli import common
    from minivid.cli.batch import _write_json, run_items
    from minivid.cli.eval import choose_metrics, weights_paths
    from minivid.eval.benchmark import format_table, pair_dict, read_dataset, summarize

    # everything checked before any compute
    methods = parse_methods(args.methods)
    weights = parse_weights(args.weights, methods, args.tiny)
    pairs = read_dataset(args.dataset, args.limit)
    args._eval_paths = weights_paths(args, "eval-")
    metrics, skipped = choose_metrics(args.metrics, "prompt", args._eval_paths, args.tiny, option="--metrics")
    metrics_arg = ",".join(metrics)
    plans = {m: plan_items(pairs, m, args, weights[m], metrics_arg) for m in methods}
    ctx = distributed.init()
    rank, world = distributed.rank(), distributed.world_size()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = common.show_progress(args)                   # one bar per stage, on a terminal, not --quiet
    t0 = time.perf_counter()
    entries: dict[str, list[dict[str, Any]]] = {}
    for method, (tunes, edits) in plans.items():
        folder = out / method
        folder.mkdir(exist_ok=True)
        done: list[dict[str, Any]] = []
        if tunes:
            done += run_items(tunes, folder, progress=progress, desc=f"{method} tuning", quiet_items=True)
        failed_tunes = {t["id"] for t in done if t["status"] == "failed"}
        runnable = [e for e in edits if Path(e["args"].get("tuned", "")).name not in failed_tunes]
        blocked = [{"id": e["id"], "command": "edit", "rank": rank, "status": "failed", "seconds": 0.0, "outputs": [],
                    "error": f"its tuning {Path(e['args']['tuned']).name} failed"}
                   for e in edits if e not in runnable]
        done += run_items(runnable, folder, progress=progress, desc=f"{method} edits", quiet_items=True) + blocked
        entries[method] = done
    failed = [f"{m}/{e['id']}" for m, es in entries.items() for e in es if e["status"] == "failed"]
    if rank == 0:
        tables, counts, items = {}, {}, {}
        for method, es in entries.items():
            records = []
            for e in es:
                if e["command"] != "edit":
                    continue
                ev = _eval_of(out / method / e["id"]) if e["status"] != "failed" else None
                if ev is not None:
                    records.append(ev)
                items.setdefault(method, []).append({**e, "eval": ev})
            tables[method] = summarize(records, method, ran={"tiny": args.tiny, "frames": args.frames, "size": args.size})
            counts[method] = {"scored": len(records), "failed": sum(e["status"] == "failed" for e in es)}
        table_md = format_table(tables, counts)
        _write_json(out / "benchmark.json", {
            "dataset": str(Path(args.dataset).resolve()), "pairs": [pair_dict(p) for p in pairs],
            "methods": methods, "metrics": list(metrics), "skipped_metrics": skipped, "world_size": world,
            "device": str(ctx.device), "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "seconds": round(time.perf_counter() - t0, 3), "table": tables, "counts": counts, "items": items,
        })
        tmp = out / ".benchmark.md.tmp"
        tmp.write_text(f"# minivid benchmark: {args.dataset}\n\n{len(pairs)} pairs, methods {', '.join(methods)}"
                       f"{' (tiny random models: the numbers mean nothing)' if args.tiny else ''}\n\n{table_md}\n")
        tmp.replace(out / "benchmark.md")
        print(table_md)
        print(f"benchmark: {sum(c['scored'] for c in counts.values())} scored, {len(failed)} failed; "
              f"{out / 'benchmark.json'}" + (f"; failed: {', '.join(failed)} (see their error.json)" if failed else ""))
    distributed.barrier()
    return 1 if failed else 0
