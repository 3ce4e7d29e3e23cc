"""`minivid generate`: text-to-image with Stable Diffusion 1.x / 2.x (DDIM, classifier-free guidance)."""
from __future__ import annotations

import argparse

from minivid.cli.common import GUIDANCE, PIXELS, STEPS, add_model_arguments, check_job_memory, integer, load_sd

help = "text-to-image with Stable Diffusion 1.x / 2.x"
description = ("Generate images from a prompt (DDIM, classifier-free guidance). Writes image_NN.png, grid.png "
               "and record.json into --out.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (default: empty)")
    p.add_argument("--steps", type=STEPS, default=50, help="DDIM steps, 1..1000 (default 50)")
    p.add_argument("--guidance", type=GUIDANCE, default=7.5, help="classifier-free guidance scale in [0, 100] (default 7.5)")
    p.add_argument("--height", type=PIXELS, help="image height in pixels (default: the model's size, 512 or 768)")
    p.add_argument("--width", type=PIXELS, help="image width in pixels (default: the model's size)")
    p.add_argument("--num-images", type=integer(1, 10_000), default=1, help="images to generate, ≥ 1 (default 1)")
    add_sd_arguments(p)


def add_sd_arguments(p: argparse.ArgumentParser) -> None:
    """Model options shared by generate and invert."""
    add_model_arguments(p)
    p.add_argument("--prediction", choices=["eps", "v"],
                   help="what the UNet predicts, when the checkpoint's name does not say (SD 2.x: 768 -> v)")


def run(args: argparse.Namespace) -> int:
    from minivid.jobs import Job
    from minivid.pipelines.sd import text_to_image

    if args.num_images < 1 or args.steps < 1:
        raise ValueError("--num-images and --steps must be at least 1")
    job = Job("generate", args.out, vars(args))
    with job.timed("load"):
        sd = load_sd(args)
    job.record["model"] = {"kind": sd.kind, "prediction": sd.prediction, "config": sd.config.to_dict()}
    height, width = args.height or sd.config.image_size, args.width or sd.config.image_size
    check_job_memory(sd, args.num_images, height, width, args.device, what=f"{args.num_images} image(s) of {width}x{height}")
    with job.timed("generate"):
        out = text_to_image(sd, args.prompt, args.negative_prompt, steps=args.steps, guidance=args.guidance,
                            height=args.height, width=args.width, num_images=args.num_images, seed=args.seed,
                            progress=args.progress)
    images = out.images.cpu()
    for i, image in enumerate(images):
        job.write_image(f"image_{i:02d}.png", image)
    job.write_grid("grid.png", images)
    job.ran(frames=len(images), size=list(images.shape[-2:]))
    record = job.finish(images=len(images), size=list(images.shape[-2:]))
    print(f"wrote {len(images)} image(s) to {job.dir} ({', '.join(job.record['outputs'])}); record: {record}")
    return 0
