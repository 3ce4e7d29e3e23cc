"""torch.distributed on the CPU (gloo): a tiny tuning run and a 4-item batch at world size 1 and 2.

Each variant is a fresh command-line run (`python -m minivid ...`, or `torchrun --standalone
--nproc_per_node=2 -m minivid ...`), timed from the outside (wall time, start-up included), one
torch thread per process. Tuning: `minivid tune --method ei2 --tiny` (the tiny random SD model);
at world size W every step is W clips (each rank draws its own t and noise) and the gradients are
all-reduced, so the figure to compare is clips per second of the tuning loop (from record.json's
seconds per step). Batch: 4 `generate --tiny` items in one `minivid batch`; rank r takes items
r, r+W, …. World size 1 with 2 threads is the other way to use both cores.

On a GPU machine the same command runs with NCCL (one GPU per process); the scaling there is not
measured here (this machine has no GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import table, write_section  # noqa: E402


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=8, help="tuning steps (default 8)")
    p.add_argument("--frames", type=int, default=4, help="frames of the tuning clip (default 4, 32 px)")
    p.add_argument("--items", type=int, default=4, help="batch items (default 4)")
    p.add_argument("--item-steps", type=int, default=10, help="DDIM steps of each generate item (default 10)")
    p.add_argument("--two-threads", action="store_true",
                   help="also world size 1 with 2 threads (on a loaded machine OpenMP threads can stall badly)")


def _run(cmd: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def _launcher(world: int) -> list[str]:
    if world == 1:
        return [sys.executable, "-m", "minivid"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", "-m", "minivid"]


def run(args: argparse.Namespace) -> int:
    import torch

    from minivid.video import write_video

    torch.set_num_threads(1)                 # as the processes it times (the table header reports it)
    variants = [(1, 1)] + ([(1, 2)] if args.two_threads else []) + [(2, 1)]    # (world size, threads/process)
    rows_tune, rows_batch = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        clip = write_video(tmp / "clip.mp4", torch.rand(args.frames, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
        plan = tmp / "plan.jsonl"
        plan.write_text("".join(json.dumps({"id": f"g{i}", "command": "generate", "args": {
            "tiny": True, "prompt": f"item {i}", "steps": args.item_steps, "seed": i}}) + "\n" for i in range(args.items)))
        base_tune = base_batch = None
        for world, threads in variants:
            out = tmp / f"tune-{world}-{threads}"
            wall = _run(_launcher(world) + ["tune", "--method", "ei2", "--tiny", "--video", str(clip), "--frames",
                                            str(args.frames), "--steps", str(args.steps), "--prompt", "a clip",
                                            "--checkpoint-every", str(args.steps), "--threads", str(threads),
                                            "--out", str(out)], threads)
            per_step = json.loads((out / "record.json").read_text())["results"]["seconds_per_step"]
            clips_per_s = world / per_step
            base_tune = base_tune or clips_per_s
            rows_tune.append([world, threads, round(wall, 2), per_step, world, round(clips_per_s, 3),
                              round(clips_per_s / base_tune, 3)])
            out = tmp / f"batch-{world}-{threads}"
            wall = _run(_launcher(world) + ["batch", str(plan), "--out", str(out), "--threads", str(threads),
                                            "--no-progress"], threads)
            busy = max(r["seconds"] for r in json.loads((out / "batch.json").read_text())["ranks"])
            base_batch = base_batch or (wall, busy)
            rows_batch.append([world, threads, args.items, round(wall, 2), round(base_batch[0] / wall, 3),
                               round(busy, 2), round(base_batch[1] / busy, 3)])
    body = (
        f"CPU only, gloo, one fresh command-line run per variant (wall time includes start-up: Python, torch, "
        f"process group); torchrun --standalone --nproc_per_node=2 for world size 2. On a GPU machine the same "
        f"command uses NCCL; its scaling is not measured here (no GPU).\n\n"
        f"Tiny EI² tuning (`minivid tune --method ei2 --tiny`, {args.frames}×32×32 px clip, {args.steps} steps). "
        f"At world size W a step is W clips; speed-up = clips/s over the 1-process, 1-thread run.\n\n"
        + table(["world size", "threads/process", "wall s", "s / step", "clips / step", "clips / s", "speed-up"],
                rows_tune)
        + f"\n\nBatch of {args.items} `generate --tiny` items ({args.item_steps} DDIM steps each) in one "
          f"`minivid batch`; speed-up = the 1-process, 1-thread run's time over this run's, for the wall time "
          f"and for the items alone (the slowest rank's time over its items, from batch.json: no start-up).\n\n"
        + table(["world size", "threads/process", "items", "wall s", "speed-up (wall)", "items s",
                 "speed-up (items)"], rows_batch)
        + f"\n\nCommand: `minivid bench distributed --steps {args.steps} --items {args.items} --item-steps "
          f"{args.item_steps}{' --two-threads' if args.two_threads else ''} --write`."
    )
    print(body)
    if getattr(args, "write", False):
        write_section("torch.distributed on the CPU (gloo)", body)
    return 0
