"""`minivid edit --method NAME ...`: edit a video with one of the methods."""
from __future__ import annotations

import argparse

from minivid.cli.common import GUIDANCE, STEPS, add_model_arguments, add_video_arguments, available_clis, run_method
from minivid.methods import METHODS

help = "edit a video with COVE, EI² or TCVE"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=list(METHODS), help="; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    p.add_argument("--prompt", required=True, help="the edit prompt")
    p.add_argument("--source-prompt", default="", help="a prompt describing the source video")
    p.add_argument("--tuned", help="tuned tensors from `minivid tune` (EI², TCVE)")
    p.add_argument("--steps", type=STEPS, help="sampling steps, 1..1000 (default: the method's)")
    p.add_argument("--guidance", type=GUIDANCE, help="classifier-free guidance scale in [0, 100] (default: the method's)")
    add_model_arguments(p)
    add_video_arguments(p)
    for name, mod in available_clis().items():
        mod.add_arguments(p.add_argument_group(f"{name} options"))


def run(args: argparse.Namespace) -> int:
    return run_method(args, "edit")
