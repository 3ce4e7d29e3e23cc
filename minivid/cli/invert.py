"""`minivid invert`: DDIM inversion of an image or a video, then reconstruction, with its PSNR."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from minivid.cli.common import CHUNK, GUIDANCE, STEPS, add_video_arguments, load_sd, read_source
from minivid.cli.generate import add_sd_arguments

if TYPE_CHECKING:
    import torch

    from minivid.jobs import Job

help = "DDIM-invert an image or video and reconstruct it (reports the reconstruction PSNR)"
description = ("Invert an image or video to DDIM noise and sample it back with the same prompt. Reports the "
               "reconstruction PSNR (and the VAE's own round trip, for comparison) in the terminal and "
               "record.json; writes the reconstruction, frame grids and a source|reconstruction side-by-side. "
               "--video (or --image) also takes a single image. With --tiny, --size defaults to the tiny model's 32 px.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default="", help="a prompt describing the input (default: empty)")
    p.add_argument("--steps", type=STEPS, default=50, help="DDIM steps of inversion and of reconstruction (default 50)")
    p.add_argument("--guidance", type=GUIDANCE, default=1.0,
                   help="guidance scale of inversion and reconstruction (default 1: the conditional model alone)")
    p.add_argument("--chunk", type=CHUNK, help="frames per UNet call (default: all frames in one batch)")
    p.add_argument("--save-latents", action="store_true", help="also write latents.safetensors (x_0 and x_T)")
    add_sd_arguments(p)
    add_video_arguments(p, images=True)


def run(args: argparse.Namespace) -> int:
    import safetensors.torch
    import torch

    from minivid.jobs import Job
    from minivid.pipelines.sd import invert_video, reconstruct_video

    if args.steps < 1:
        raise ValueError("--steps must be at least 1")
    job = Job("invert", args.out, vars(args))
    with job.timed("load"):
        sd = load_sd(args)
        source = read_source(args, sd, images=True)
    job.record["model"] = {"kind": sd.kind, "prediction": sd.prediction}
    with job.timed("inversion"):
        inv = invert_video(sd, source, args.prompt, args.steps, args.guidance, chunk=args.chunk, progress=args.progress)
    with job.timed("reconstruction"):
        rec = reconstruct_video(sd, inv, args.prompt, guidance=args.guidance, chunk=args.chunk,
                                progress=args.progress)
        with torch.no_grad():
            vae_only = sd.decode_latents(inv.latents)
    source, result = source.cpu(), rec.images.cpu()
    quality = write_outputs(job, source, result, vae_only.cpu(), args.fps)
    latent_err = (rec.latents - inv.latents).pow(2).mean().sqrt() / inv.latents.std()
    quality["latent_relative_rmse"] = round(float(latent_err), 5)
    if args.save_latents:
        from minivid.outputs import write_file

        latents = {"x0": inv.latents.cpu().contiguous(), "xT": inv.noise.cpu().contiguous()}
        job.add_output(write_file(job.output_path("latents.safetensors"),
                                  lambda tmp: safetensors.torch.save_file(latents, tmp), inputs=job.inputs))
    record = job.finish(**quality)
    print(f"reconstruction PSNR {quality['psnr_db']:.2f} dB over {len(source)} frame(s) "
          f"(the VAE's own round trip: {quality['vae_psnr_db']:.2f} dB; latent relative RMSE {float(latent_err):.4f})")
    print(f"wrote {job.dir} ({', '.join(job.record['outputs'])}); record: {record}")
    return 0


def write_outputs(job: Job, source: torch.Tensor, result: torch.Tensor, vae_only: torch.Tensor, fps: float) -> dict:
    """Grids (and videos for more than one frame); returns the PSNR figures for the record."""
    import torch

    from minivid.pipelines.sd import psnr

    job.write_grid("source_grid.png", source, rows=["source"])
    job.write_grid("reconstruction_grid.png", result, rows=["reconstruction"])
    if len(source) > 1:
        job.write_video("reconstruction.mp4", result, fps=fps)
        job.write_side_by_side("side_by_side.mp4", source, result, fps=fps)
    else:
        job.write_grid("side_by_side.png", torch.cat([source, result]), rows=["source", "reconstruction"])
    per_frame = psnr(result, source)
    return {
        "psnr_db": round(float(per_frame.mean()), 3),
        "psnr_db_per_frame": [round(float(v), 3) for v in per_frame],
        "vae_psnr_db": round(float(psnr(vae_only, source).mean()), 3),
    }
