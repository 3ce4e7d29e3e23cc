"""`minivid animate --image in.png --weights svd.safetensors`: image-to-video with Stable Video Diffusion.

Writes into --out: result.mp4 (the video), grid.png (its frames), source.png (the conditioning
image as used), source_result.mp4 (still source | result) and record.json. `--tiny` runs a tiny
random model on CPU in seconds (a demo of the machinery; it makes no real video).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from minivid.cli.common import (
    CHUNK, DTYPES, FRAMES, GUIDANCE, PIXELS, STEPS, add_model_arguments, cached_model, check_job_memory, integer,
    number, require_weights,
)

if TYPE_CHECKING:
    import torch

help = "animate an image with Stable Video Diffusion (SVD / SVD-XT)"
log = logging.getLogger(__name__)

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", help="conditioning image (png/jpg/... or a video's first frame); optional with --tiny")
    p.add_argument("--frames", type=FRAMES, help="frames to generate, ≥ 1 (default: the file's metadata, else the model's: "
                                                  "14 for SVD, 25 for SVD-XT)")
    p.add_argument("--steps", type=STEPS, default=25, help="Euler sampling steps, 1..1000 (default 25)")
    p.add_argument("--height", type=PIXELS, help="video height, a multiple of 8 (default: the file's metadata, else 576); "
                                                  "the image is resized and centre-cropped")
    p.add_argument("--width", type=PIXELS, help="video width, a multiple of 8 (default: the file's metadata, else 1024)")
    p.add_argument("--fps", type=integer(1, 1000), default=7, help="frame rate of the video; SVD is conditioned on fps-1 (default 7)")
    p.add_argument("--motion-bucket", type=integer(0, 1023), default=127, help="motion bucket id in [0, 1023]: more = more motion (default 127)")
    p.add_argument("--noise-aug", type=number(0, 10), default=0.02, help="noise added to the conditioning image (default 0.02)")
    p.add_argument("--min-guidance", type=GUIDANCE, default=1.0, help="guidance scale of the first frame (default 1.0)")
    p.add_argument("--max-guidance", type=GUIDANCE, default=3.0, help="guidance scale of the last frame (default 3.0)")
    p.add_argument("--decode-chunk", type=CHUNK, help="decode this many frames at a time, each piece as its own clip "
                                                    "(less memory, less temporal smoothness; default: all)")
    add_model_arguments(p, "official svd.safetensors / svd_xt.safetensors or a diffusers SVD folder")


def _demo_image(height: int, width: int) -> torch.Tensor:
    """A colour gradient with a bright disc: [3, H, W] in [-1, 1]."""
    import torch

    y = torch.linspace(-1, 1, height)[:, None].expand(height, width)
    x = torch.linspace(-1, 1, width)[None, :].expand(height, width)
    disc = ((x * width / height - 0.3) ** 2 + (y + 0.2) ** 2 < 0.15).float()
    return torch.stack([x, y, -x * y]).mul(0.6).add(disc * 0.8).clamp(-1, 1)


def run(args: argparse.Namespace) -> int:
    import torch

    from minivid.jobs import Job
    from minivid.pipelines.svd import check_size, image_to_video
    from minivid.svd import StableVideoDiffusion
    from minivid.video import read_image, resize_center_crop

    require_weights(args)
    if not args.image and not args.tiny:
        raise ValueError("give --image PATH (the image to animate)")
    dtype = DTYPES[args.dtype]
    job = Job("animate", args.out, vars(args))
    with job.timed("load"):
        if args.weights:
            svd = cached_model(("svd", str(Path(args.weights).resolve()), str(dtype), str(args.device),
                                args.allow_nonfinite),
                               lambda: StableVideoDiffusion.load(args.weights, device=args.device, dtype=dtype,
                                                                 allow_nonfinite=args.allow_nonfinite))
            from minivid.svd import SVD_PRESETS

            preset = next((name for name, c in SVD_PRESETS.items() if c == svd.config), None)
            preset = preset or f"{svd.load_info.get('detected', 'svd')} layout, config from the file's metadata"
        else:
            torch.manual_seed(args.seed)
            svd = StableVideoDiffusion.from_config("tiny", device=args.device, dtype=dtype)
            preset = "tiny"
    # size and frames: the options, else the file's metadata (a file minivid wrote records its config),
    # else the official defaults of the detected preset (576x1024; 14 frames SVD, 25 SVD-XT)
    height, width = args.height or svd.config.image_size[0], args.width or svd.config.image_size[1]
    frames = args.frames or svd.num_frames
    check_size(svd, height, width)
    check_job_memory(svd, frames, height, width, args.device, what=f"{frames} frame(s) of {width}x{height}")
    job.ran(model=preset, dtype=args.dtype, device=str(args.device), frames=frames, size=[height, width])
    image = read_image(args.image) if args.image else _demo_image(height, width)
    image = resize_center_crop(image[None], (height, width))[0]
    generator = torch.Generator().manual_seed(args.seed)
    with job.timed("sampling"):
        out = image_to_video(
            svd, image, num_frames=frames, num_steps=args.steps, min_guidance=args.min_guidance,
            max_guidance=args.max_guidance, fps=args.fps, motion_bucket_id=args.motion_bucket,
            noise_aug_strength=args.noise_aug, decode_chunk_size=args.decode_chunk, generator=generator, progress=args.progress,
        )
    result = out.frames[0].clamp(-1, 1).cpu()
    job.write_video("result.mp4", result, fps=args.fps)
    job.write_grid("grid.png", result, rows=["generated"])
    job.write_image("source.png", image)
    job.write_side_by_side("source_result.mp4", image[None].expand_as(result), result, fps=args.fps)
    record = job.finish(
        model=svd.load_info.get("detected", "tiny (random)") if args.weights else "tiny (random)",
        frames=int(result.shape[0]), size=[height, width], fps_id=args.fps - 1,
    )
    print(f"wrote {job.dir} ({', '.join(job.record['outputs'])}); record: {record}")
    return 0
