"""`minivid tune --method NAME ...`: one-shot tuning of a method on a source video (EI², TCVE, I2VEdit)."""
from __future__ import annotations

import argparse

from minivid.cli.common import (
    add_model_arguments, add_video_arguments, available_clis, integer, method_defaults, number, per_method_frames,
    run_method,
)
from minivid.cli.method_options import per_method

help = "one-shot tuning on a source video (EI², TCVE; I2VEdit's motion LoRAs)"


def tuning_clis() -> dict:
    """The methods whose CLI module has a `tune`."""
    return {name: mod for name, mod in available_clis().items() if hasattr(mod, "tune")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=list(tuning_clis()), help="the method to tune")
    p.add_argument("--prompt", help="a prompt describing the source video (EI², TCVE; I2VEdit takes none)")
    p.add_argument("--steps", type=integer(1, 10_000_000),
                   help=f"tuning steps (default: the method's: {per_method('steps')})")
    p.add_argument("--lr", type=number(0, 1, low_open=True),
                   help=f"learning rate in (0, 1] (default: the method's: {per_method('lr', fmt='{:g}')})")
    p.add_argument("--autocast", choices=["bf16", "fp16"], help="mixed precision for the forward pass")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass to save memory")
    p.add_argument("--checkpoint-every", type=integer(1, 10_000_000),
                   help=f"write the tuned tensors every n ≥ 1 steps (default: the method's: {per_method('checkpoint_every')})")
    p.add_argument("--restart", action="store_true",
                   help="start over in --out even if it holds a checkpoint of another run (its checkpoints are "
                        "moved into --out/previous-<n>/); without it, a checkpoint there is resumed when it is of "
                        "the same run (source, prompt, options, seed, base weights) and refused otherwise")
    p.add_argument("--no-resume", action="store_true", help="the same as --restart")
    add_model_arguments(p)
    add_video_arguments(p)
    per_method_frames(p, tuning_clis())               # resolved per method in run()
    for name, mod in tuning_clis().items():             # a method's tuning options, else its options
        add = getattr(mod, "add_tune_arguments", mod.add_arguments)
        default = getattr(mod, "DEFAULT_FRAMES", None)
        add(p.add_argument_group(f"{name} options", f"reads --frames {default} by default" if default else None))


def run(args: argparse.Namespace) -> int:
    """Under torchrun (W processes) the tuning is data-parallel (minivid.tuning, docs/distributed.md):
    rank 0 writes the job folder; the other ranks run the same job into a scratch folder they
    discard, printing nothing."""
    import contextlib
    import io
    import logging
    import tempfile

    from minivid import distributed

    method_defaults(args, " (a prompt describing the source video)")
    distributed.init()
    args.device = distributed.resolve_device(args.device)
    if distributed.is_main():
        return run_method(args, "tune")
    logging.getLogger("minivid").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix=f"minivid-rank{distributed.rank()}-") as scratch, \
            contextlib.redirect_stdout(io.StringIO()):
        args.out = scratch
        return run_method(args, "tune")
