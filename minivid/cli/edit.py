"""`minivid edit --method NAME ...`: edit a video with one of the methods."""
from __future__ import annotations

import argparse

from minivid.cli.common import add_model_arguments, add_video_arguments, run_method
from minivid.methods import METHODS, available_clis

help = "edit a video with COVE, EI², TCVE or I2VEdit"
NO_PROMPT = ("i2vedit",)      # methods guided by an edited first frame instead of a prompt


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=list(METHODS), help="; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    p.add_argument("--prompt", help="the edit prompt (all methods but I2VEdit)")
    p.add_argument("--source-prompt", default="", help="a prompt describing the source video")
    p.add_argument("--tuned", help="tuned tensors from `minivid tune` (EI², TCVE)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the method's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the method's)")
    add_model_arguments(p)
    add_video_arguments(p)
    p.set_defaults(frames=None)                       # resolved per method in run(): I2VEdit reads 21
    for name, mod in available_clis().items():
        mod.add_arguments(p.add_argument_group(f"{name} options"))
    from minivid.cli import i2vedit_edit

    i2vedit_edit.add_arguments(p.add_argument_group("i2vedit options"))


def run(args: argparse.Namespace) -> int:
    if args.method not in NO_PROMPT and not args.prompt:
        raise ValueError(f"--method {args.method} needs --prompt")
    if args.frames is None:
        args.frames = 21 if args.method == "i2vedit" else 8     # I2VEdit: 2.5 fps over 8.4 s, two clips of 11
    return run_method(args, "edit")
