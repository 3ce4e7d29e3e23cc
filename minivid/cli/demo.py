"""`minivid demo`: the whole machinery end to end on a tiny random model, on the CPU, in seconds.

No weights needed. It builds a tiny Stable Diffusion with random weights, generates images from two
prompts, generates a short clip (noise interpolated between two seeds), DDIM-inverts the clip's
latents and reconstructs them, and writes everything with the reconstruction PSNR. A random model
makes no real images: the pictures are coloured noise. What the demo shows is that every stage runs
and that inversion followed by reconstruction gives the clip back (approximately: DDIM inversion
is first order, its error halves when the steps double). The round trip starts from the clip's
latents, not from re-encoded pixels, because a random VAE is not an autoencoder.

`--method NAME` hands over to a method's own demo, `minivid.cli.<name>.demo(args, job)`,
where a method provides one. A method's CLI module may declare `DEMO_MODELS` (the tiny presets its demo
runs on, the first the default; empty: it builds its own model and --model does not apply) and
`DEMO_SIZE` (its default --size); an unset --model or --size takes those, and a --model the method's
demo cannot run on is refused, so the record states what ran.
"""
from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

from minivid.cli.common import (
    DTYPES, FRAMES, STEPS, add_run_arguments, check_job_memory_config, integer, print_hints, run_method,
)

if TYPE_CHECKING:
    import torch

help = "run generation and an inversion round trip on a tiny random model (no weights needed)"
METHOD_NAMES = ("cove", "ei2", "tcve", "i2vedit")     # as minivid.methods.METHODS (not imported for --help)
description = (__doc__.split("\n\n")[1] + " With --method NAME ("
               + ", ".join(METHOD_NAMES) + "), that method's demo on a synthetic clip instead.")
TINY_MODELS = ("tiny", "tiny_sd2")
DEFAULT_MODEL, DEFAULT_SIZE = "tiny", 32
DEMO_HINTS = ["minivid generate --weights PATH --prompt ...",
              "minivid invert --weights PATH --video CLIP --prompt ..."]

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk"]
CLIP_PROMPT = "a boat on a lake"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=list(TINY_MODELS),
                   help="tiny: SD 1-style (ε); tiny_sd2: SD 2-style (v-prediction, linear projections) "
                        "(default: tiny; a method's demo: its base, COVE tiny_sd2; I2VEdit builds a tiny SVD)")
    p.add_argument("--steps", type=STEPS, default=20, help="DDIM steps, 1..1000 (default 20)")
    p.add_argument("--frames", type=FRAMES, default=8, help="frames of the generated clip, ≥ 1 (default 8)")
    p.add_argument("--size", type=integer(16, 1 << 20),
                   help="image size in pixels, a multiple of 16 (default 32; COVE's demo 48, I2VEdit's 32 high x 48 wide)")
    p.add_argument("--method", metavar="NAME",
                   help="run a method's demo instead: " + ", ".join(METHOD_NAMES) + " (see `minivid edit --help`)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="weights and compute dtype (--method i2vedit: the edit's UNet; default fp32); stages the "
                        "methods' authors keep in float32 stay there (docs/numerics.md)")
    add_run_arguments(p, device="cpu")


def run(args: argparse.Namespace) -> int:
    resolve_demo_model(args)
    if not args.method and (args.steps < 1 or args.frames < 1 or args.size < 16 or args.size % 16):
        raise ValueError("--steps and --frames must be at least 1 and --size a multiple of 16")
    # threads: minivid.cli.main runs every demo on one CPU thread unless --threads says otherwise
    return run_method(args, "demo", "; run `minivid demo` without --method") if args.method else run_tiny(args)


def resolve_demo_model(args: argparse.Namespace) -> None:
    """Fill an unset --model / --size with the demo's own (a method's DEMO_MODELS[0] / DEMO_SIZE), and refuse a
    --model the method's demo does not run on: the options, and so record.json, then say what runs."""
    if not args.method:
        args.model, args.size = args.model or DEFAULT_MODEL, args.size or DEFAULT_SIZE
        return
    from minivid.cli.common import method_cli

    mod = method_cli(args.method)
    models = tuple(getattr(mod, "DEMO_MODELS", TINY_MODELS))
    if args.model and args.model not in models:
        runs = f"runs on {' or '.join(models)}" if models else "builds its own tiny model (--model does not apply)"
        raise ValueError(f"--model {args.model}: the {args.method} demo {runs}; leave --model out")
    args.model = args.model or (models[0] if models else None)
    args.size = args.size or getattr(mod, "DEMO_SIZE", DEFAULT_SIZE)


def run_tiny(args: argparse.Namespace) -> int:
    import torch

    from minivid.jobs import Job
    from minivid.models import SDConfig, StableDiffusion
    from minivid.pipelines.sd import invert, psnr, reconstruct, text_to_image

    check_job_memory_config(SDConfig.preset(args.model), max(args.frames, len(PROMPTS)), args.size, args.size,
                            args.device, what=f"a {args.frames}-frame clip at {args.size} px")
    print("minivid demo: a tiny model with RANDOM weights. It makes no real images (expect coloured noise);\n"
          "it runs every stage: text encoding, DDIM sampling with guidance, VAE decoding, DDIM inversion and "
          "reconstruction.")
    job = Job("demo", args.out, vars(args))
    job.ran(model=args.model, frames=args.frames, size=[args.size, args.size], dtype=args.dtype, device=str(args.device))
    with job.timed("build"):
        sd = StableDiffusion.from_config(args.model, device=args.device, seed=args.seed, dtype=DTYPES[args.dtype])
    with job.timed("generate"):
        images = text_to_image(sd, PROMPTS, steps=args.steps, guidance=7.5, height=args.size, width=args.size,
                               seed=args.seed, progress=args.progress).images
    job.write_grid("generated.png", images.cpu(), rows=["generated"], numbers=[f"prompt {i}" for i in range(len(images))])

    with job.timed("generate clip"):
        noise = _interpolated_noise(sd, args.frames, args.size, args.seed)
        generated = text_to_image(sd, CLIP_PROMPT, steps=args.steps, guidance=7.5, num_images=args.frames,
                                  latents=noise, progress=args.progress)
    with job.timed("inversion"):
        inv = invert(sd, latents=generated.latents, prompt=CLIP_PROMPT, steps=args.steps, frames=args.frames,
                     progress=args.progress)
    with job.timed("reconstruction"):
        rec = reconstruct(sd, inv, CLIP_PROMPT, frames=args.frames, progress=args.progress)
    clip, result = generated.images.cpu(), rec.images.cpu()
    job.write_video("clip.mp4", clip)
    job.write_grid("clip_grid.png", torch.cat([clip, result]), rows=["clip", "reconstruction"])
    job.write_video("reconstruction.mp4", result)
    job.write_side_by_side("side_by_side.mp4", clip, result)
    quality = psnr(result, clip)
    latent_err = float((rec.latents - inv.latents).pow(2).mean().sqrt() / inv.latents.std())
    record = job.finish(psnr_db=round(float(quality.mean()), 3), latent_relative_rmse=round(latent_err, 5),
                        note="random weights: the images are not meaningful")
    print(f"DDIM inversion round trip of the {args.frames}-frame clip ({args.steps} steps): reconstruction PSNR "
          f"{float(quality.mean()):.2f} dB, latent RMSE {latent_err:.4f} of the latents' std")
    print(f"wrote {job.dir} ({', '.join(job.record['outputs'])}); record: {record}")
    print_hints(DEMO_HINTS)
    return 0


def _interpolated_noise(sd, frames: int, size: int, seed: int) -> torch.Tensor:
    """[F, C, h, w] unit-variance noise moving along a great circle between two seeds' draws,
    so consecutive frames of the clip are related."""
    import torch

    from minivid.pipelines.sd import initial_noise

    a = initial_noise(sd, 1, size, size, seed=seed)
    b = initial_noise(sd, 1, size, size, seed=seed + 1)
    angles = torch.linspace(0, math.pi / 2, frames, device=a.device).view(-1, 1, 1, 1)
    return torch.cos(angles) * a + torch.sin(angles) * b
