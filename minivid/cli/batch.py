"""`minivid batch PLAN.jsonl --out DIR`: many jobs in one process, or shared over torchrun's processes.

Each line of the plan is one job, the matching subcommand run in-process into `DIR/<id>/`:

    {"id": "surf-bear", "command": "edit", "args": {"method": "ei2", "tuned": "tuned/", "video": "surf.mp4",
                                                    "prompt": "a bear surfing", "weights": "sd-v1-4.ckpt"}}

`args` are the subcommand's options by name (`"source_prompt"` or `"source-prompt"`; `true` for a flag,
a list for several values); `--out` is the item's folder. Under `torchrun --nproc_per_node=W` rank r
takes items r, r+W, … (`minivid.distributed.shard`); each process loads a weights file once and gives
every item its own copy. An item whose folder holds a finished record.json is skipped, so a rerun
after a crash does only what is left (a tune item without a record resumes from its checkpoint). A
item whose options changed since its finished run (compared with its record's settings) runs
again. A failing item writes `error.json` into its folder and is marked failed in `DIR/batch.json`; the others
go on. Rank 0 gathers `DIR/batch.json` (per item: rank, status, seconds, outputs, error) and shows a
progress bar over all items. Exit status 1 if an item failed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import time
import traceback
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

help = "run the jobs of a JSONL plan (edit, tune, invert, generate, animate), shared over torchrun's processes"
description = __doc__.split("\n\n", 1)[1] if __doc__ else help
log = logging.getLogger(__name__)

COMMANDS = ("edit", "tune", "invert", "generate", "animate")
SET_BY_BATCH = ("out", "threads")
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="a JSONL file: one {\"id\", \"command\", \"args\"} object per line")
    p.add_argument("--out", required=True, help="the batch folder: DIR/<id>/ per item and DIR/batch.json")
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress bar (also off when stderr is not a terminal; --no-progress: the old spelling)")
    from minivid.cli.common import THREADS

    p.add_argument("--threads", type=THREADS, help="CPU threads for torch in each process, in [1, 4096] "
                                                    "(default: torch's choice)")


# ---------------------------------------------------------------- the plan

def read_plan(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The items of a plan, checked: every line a JSON object with a folder-safe unique "id", a
    "command" among COMMANDS and an "args" object (options by name, without out/threads)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"batch plan {path} does not exist")
    items, seen = [], {}
    from minivid.jobs import jsonl_objects

    for where, item in jsonl_objects(path):
        n = int(where.rsplit(":", 1)[1])
        if set(item) - {"id", "command", "args"}:
            raise ValueError(f"{where}: expected {{\"id\", \"command\", \"args\"}}, got {json.dumps(item)[:80]}")
        item_id, command, args = str(item.get("id", "")), item.get("command"), item.get("args", {})
        if not ID.match(item_id) or item_id in ("batch.json",):
            raise ValueError(f"{where}: id {item.get('id')!r} must be letters, digits, '.', '_' or '-' "
                             f"(it names the item's folder)")
        if item_id in seen:
            raise ValueError(f"{where}: id {item_id!r} is already used on line {seen[item_id]}")
        if command not in COMMANDS:
            raise ValueError(f"{where}: command {command!r} is not one of {', '.join(COMMANDS)}")
        if not isinstance(args, dict):
            raise ValueError(f"{where}: args must be an object of options, got {type(args).__name__}")
        fixed = [k for k in args if k.replace("-", "_") in SET_BY_BATCH]
        if fixed:
            raise ValueError(f"{where}: {', '.join(fixed)} is set by batch (--out DIR gives DIR/<id>/; --threads "
                             f"applies to the whole batch)")
        seen[item_id] = n
        items.append({"id": item_id, "command": command, "args": args, "line": n})
    if not items:
        raise ValueError(f"{path}: the plan has no items")
    return items


def to_argv(item: dict[str, Any], folder: Path) -> list[str]:
    """The subcommand's command line of an item: options by name; true = a flag, false/null = left
    out, a list = several values."""
    argv = [item["command"]]
    for key, value in item["args"].items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv + ["--out", str(folder)]


def finished(folder: Path) -> dict[str, Any] | None:
    """The record of a finished job in `folder` (record.json readable and not marked failed), or None."""
    try:
        record = json.loads((folder / "record.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("status") in ("failed", "interrupted"):
        return None
    return record


# settings a record holds that are not the item's choice (set per run by minivid or batch)
_NOT_COMPARED = {"out", "threads", "progress", "quiet", "no_progress", "verbose", "device"}


def changed_settings(record: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The options whose value in the item's command line differs from the finished record's settings
    (as tuning resume compares a checkpoint's run): such an item is run again, not skipped. Options
    left unset (None: the method resolves them when it runs) are not compared."""
    settings = record.get("settings")
    if not isinstance(settings, dict):
        return ["(the record has no settings)"]
    now = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in _NOT_COMPARED and v is not None}
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731 - tuples as lists, paths as text
    return sorted(k for k in now if norm(now[k]) != norm(settings.get(k, False if now[k] is False else None)))


# ---------------------------------------------------------------- one item

def run_item(item: dict[str, Any], out: Path, rank: int) -> dict[str, Any]:
    """Run (or skip) one item in-process into out/<id>/; never raises for the item's own failure."""
    from minivid import distributed
    from minivid.cli import build_parser, common

    folder = out / item["id"]
    entry = {"id": item["id"], "command": item["command"], "rank": rank}
    error_file = folder / "error.json"
    t0 = time.perf_counter()
    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage):
            try:
                args = build_parser().parse_args(to_argv(item, folder))
            except SystemExit:
                raise ValueError(usage.getvalue().strip().splitlines()[-1]) from None
        record = finished(folder)
        if record is not None:
            changed = changed_settings(record, args)
            if not changed:
                return {**entry, "status": "skipped", "seconds": 0.0, "outputs": record.get("outputs", [])}
            log.warning("batch item %s: its options changed since the finished run in %s (%s): running it again",
                        item["id"], folder, ", ".join(changed))
        args.device = distributed.resolve_device(args.device)
        args.progress = False              # one bar over the items (rank 0), none inside them
        # an item is one process's job: its tuning does not all-reduce; a tiny item runs on one thread
        with distributed.local(), common.torch_threads(args):
            code = int(args._run(args) or 0)
        if code:
            raise RuntimeError(f"{item['command']} exited with status {code}")
        record = finished(folder) or {}
        with contextlib.suppress(FileNotFoundError):
            error_file.unlink()
        return {**entry, "status": "done", "seconds": round(time.perf_counter() - t0, 3),
                "outputs": record.get("outputs", [])}
    except Exception as e:  # one item's failure is recorded, the batch goes on
        message = f"{type(e).__name__}: {e}" if not isinstance(e, (ValueError, FileNotFoundError, RuntimeError)) else str(e)
        seconds = round(time.perf_counter() - t0, 3)
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            _write_json(error_file, {**entry, "status": "failed", "error": message, "seconds": seconds,
                                     "traceback": traceback.format_exc()})
        log.error("batch item %s (%s) failed: %s", item["id"], item["command"], message)
        return {**entry, "status": "failed", "seconds": seconds, "outputs": [], "error": message}


@contextlib.contextmanager
def _quiet(on: bool):
    if not on:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _write_json(path: Path, data: Any) -> None:
    from minivid.outputs import write_json

    write_json(path, data, default=str)


# ---------------------------------------------------------------- the batch

def run_items(items: list[dict[str, Any]], out: Path, progress: bool = True, desc: str = "batch",
              quiet_items: bool = False) -> list[dict[str, Any]]:
    """Run the items shared over torchrun's processes (rank r takes items r, r+W, ...) into out/<id>/;
    every rank returns every item's entry, in the items' order. Rank 0 shows one bar over all items;
    `quiet_items`: rank 0's items print nothing either (the others' never do)."""
    from minivid import distributed
    from minivid.cli import common
    from minivid.outputs import FolderLock

    rank, world = distributed.rank(), distributed.world_size()
    # one batch per folder: rank r of a second batch into `out` meets rank r's lock (each item's job
    # holds its own folder's lock too)
    with FolderLock(out, "--out", name=f".minivid-batch-{rank}.lock"):
        return _run_items(items, out, progress, desc, quiet_items, rank, world)


def _run_items(items, out, progress, desc, quiet_items, rank, world) -> list[dict[str, Any]]:
    from minivid import distributed
    from minivid.cli import common

    mine = distributed.shard(items, rank, world)
    others = len(items) - len(distributed.shard(items, 0, world))
    bar = tqdm(total=len(items), desc=f"{desc} ({world} process{'es' if world > 1 else ''})", unit="item",
               disable=not progress or rank != 0)
    counter = distributed.DoneCounter(others, lambda src: bar.update(1))
    common.MODEL_CACHE = {}
    results = []
    try:
        for item in mine:
            # the other ranks' items print nothing and show no bars (their records hold what they did;
            # warnings and errors still reach the log)
            with _quiet(rank != 0 or quiet_items):
                results.append(run_item(item, out, rank))
            if rank == 0:
                bar.update(1)
            else:
                counter.report()
    finally:
        common.MODEL_CACHE = None
    gathered = distributed.all_gather_object(results)
    counter.close()
    bar.close()
    order = {it["id"]: i for i, it in enumerate(items)}
    return sorted((e for res in gathered for e in res), key=lambda e: order[e["id"]])


def run(args: argparse.Namespace) -> int:
    from minivid import distributed
    from minivid.outputs import make_folder, resolve

    items = read_plan(args.plan)
    ctx = distributed.init()
    out = Path(args.out)
    resolve(out, "--out")
    make_folder(out, "--out")
    rank, world = distributed.rank(), distributed.world_size()
    from minivid.cli import common

    if rank != 0:
        logging.getLogger("minivid").setLevel(logging.WARNING)
    loads_before = common.MODEL_LOADS["count"]
    t0 = time.perf_counter()
    entries = run_items(items, out, progress=common.show_progress(args))
    per_rank = {"rank": rank, "items": sum(e["rank"] == rank for e in entries),
                "seconds": round(time.perf_counter() - t0, 3),
                "model_loads": common.MODEL_LOADS["count"] - loads_before, "device": str(ctx.device)}
    ranks = distributed.all_gather_object(per_rank)
    failed = [e["id"] for e in entries if e["status"] == "failed"]
    if rank == 0:
        counts = {s: sum(e["status"] == s for e in entries) for s in ("done", "skipped", "failed")}
        _write_json(out / "batch.json", {
            "plan": str(Path(args.plan).resolve()), "world_size": world, "items": entries, "counts": counts,
            "ranks": ranks,
        })
        print(f"batch: {counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed "
              f"over {world} process(es); {out / 'batch.json'}"
              + (f"; failed: {', '.join(failed)} (see their error.json)" if failed else ""))
    distributed.barrier()                  # no rank exits (torchrun stops the rest) before batch.json is written
    return 1 if failed else 0
