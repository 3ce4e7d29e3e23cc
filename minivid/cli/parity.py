"""`minivid parity WEIGHTS`: minivid's components against diffusers/transformers built from the same file.

The comparison itself lives in minivid.parity (the one module that imports the oracles, lazily);
this module parses the options, prints the table and sets the exit status (1 when a component fails).
"""
from __future__ import annotations

import argparse

help = "compare each component with diffusers/transformers built from the same weights (needs the [parity] extra)"
description = ("Build the same model with diffusers/transformers from WEIGHTS (an official SD 1.x/2.x or SVD/SVD-XT "
               "single file, or a diffusers folder; offline, with diffusers' own single-file converters), run every "
               "component on the same seeded inputs and print max abs / max relative difference, the worst element, "
               "time and peak-memory ratios and pass/fail against the dtype's tolerance. Exit status 1 when a "
               "component fails. Needs diffusers and transformers: pip install 'minivid[parity]'.")


def _pair(text: str) -> tuple[int, int]:
    try:
        parts = [int(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W (e.g. 256,256), got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected H,W with positive sides, got {text!r}")
    return parts[0], parts[1]


def _numbers(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    from minivid.cli import source_constant

    TOLERANCES = source_constant("minivid.parity", "TOLERANCES")     # read, not imported: minivid.parity imports torch

    p.add_argument("weights", help="an official single file (.safetensors/.ckpt) or a diffusers folder")
    p.add_argument("--components", help="comma-separated subset of unet,vae,text (SD) or unet,vae,image (SVD); "
                                        "default all")
    p.add_argument("--size", type=_pair, help="H,W in pixels of the UNet/VAE inputs (default 256,256 SD; 128,128 SVD)")
    p.add_argument("--frames", type=int, default=4, help="SVD clip length (default 4)")
    p.add_argument("--dtype", choices=list(TOLERANCES), default="fp32",
                   help="compute dtype of both sides; tolerance on max relative difference: "
                        + ", ".join(f"{k} {v:g}" for k, v in TOLERANCES.items()))
    p.add_argument("--timesteps", type=_numbers,
                   help="the UNet batch, one per sample: SD DDPM timesteps (default 999,500,1); SVD EDM sigmas "
                        "(default 700,1,0.002)")
    p.add_argument("--reference", help="build the oracle from this file/folder instead (same model), e.g. to check a "
                                       "converted copy against the original")
    p.add_argument("--diffusers-eps", action="store_true",
                   help="SVD: keep diffusers' GroupNorm eps 1e-6 in its ResBlocks (default: sgm's 1e-5, as minivid)")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per call after one warm-up, best taken (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    from minivid import parity
    from minivid.cli.common import show_progress

    comps = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    report = parity.run_parity(args.weights, comps, size=args.size, frames=args.frames, dtype=args.dtype,
                               device=args.device, timesteps=args.timesteps, seed=args.seed, repeat=args.repeat,
                               reference=args.reference, diffusers_eps=args.diffusers_eps,
                               progress=show_progress(args))
    print(parity.render(report))
    if args.json:
        print(f"wrote {parity.write_json(report, args.json)}")
    return 0 if report.passed else 1
