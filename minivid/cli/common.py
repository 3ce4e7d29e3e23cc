"""Options shared by the jobs that load a model and read or write videos."""
from __future__ import annotations

import argparse

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_model_arguments(p: argparse.ArgumentParser, weights_help: str = "official checkpoint file or diffusers folder") -> None:
    p.add_argument("--weights", help=weights_help + " (omit with --tiny)")
    p.add_argument("--tiny", action="store_true", help="use a tiny random model instead of weights (a demo of the machinery: it makes no real images)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", help="output folder (default outputs/<job>-<time>/)")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def add_video_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", required=True, help="input video (mp4/gif/webm) or a folder of frames")
    p.add_argument("--frames", type=int, default=8, help="number of frames to read (default 8)")
    p.add_argument("--stride", type=int, default=1, help="take every n-th frame (default 1)")
    p.add_argument("--size", type=int, default=512, help="frames are resized and center-cropped to this size (multiple of 64; default 512)")
    p.add_argument("--fps", type=float, default=8, help="frame rate of the written videos (default 8)")


def require_weights(args: argparse.Namespace) -> None:
    if not args.weights and not args.tiny:
        raise ValueError("give --weights PATH (an official checkpoint or a diffusers folder; see weights/README.md) or --tiny")
