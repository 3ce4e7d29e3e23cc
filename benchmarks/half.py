"""Half precision end to end on the CPU: each method's tiny edit in fp32, fp16 and bf16, and an SD VAE decode.

Methods: the plain SD round trip of `minivid demo` (generate a clip, DDIM-invert it, reconstruct) and
the edits of COVE, EI² and TCVE as their `minivid demo --method NAME` runs them (the tiny random
models, seed 0, the synthetic clips), once with float32 weights and once cast to each half dtype
(same seeded weights, rounded). EI² and TCVE edit without the demo's tuning steps: tuning trains
float32 tensors whatever --dtype says (docs/numerics.md), so the half-precision drift is the
inversion's and the edit's. Reported per method and dtype: whether every output is finite, the drift
of the output frames from the fp32 run (max and RMS over pixels in [-1, 1]), and the time ratio.

The VAE part decodes one latent with the SD VAE (`VAEConfig('sd')`, random weights) in minivid and in
diffusers' AutoencoderKL holding the same tensors, in each dtype (diffusers' fp16 decode is too slow
to run: torch's NCHW half convolutions are `_slow_conv2d_forward`), and times one 3×3 conv both ways.
"""
from __future__ import annotations

import argparse
import copy
import math
import pathlib
import sys
import time

import torch
from diffusers import AutoencoderKL as DiffusersVAE      # before benchmarks/ joins sys.path (its kernels.py)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import interleaved, load_note, random_weights_, section_title, sizes, table, write_section  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
METHODS = ("plain", "cove", "ei2", "tcve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps of every stage (default 4; --full 20)")
    p.add_argument("--frames", type=int, default=None, help="frames of the clips (default 4; --full 8)")
    p.add_argument("--vae-size", type=int, default=None, help="latent side of the VAE decode (default 16; --full 32)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")


# ---------------------------------------------------------------- the methods, as their demos run them

def _plain(dtype, steps, frames):
    from minivid.cli.demo import CLIP_PROMPT, _interpolated_noise
    from minivid.models import StableDiffusion
    from minivid.pipelines.sd import invert, reconstruct, text_to_image

    sd = StableDiffusion.from_config("tiny", seed=0, dtype=dtype)
    noise = _interpolated_noise(sd, frames, 32, 0)
    gen = text_to_image(sd, CLIP_PROMPT, steps=steps, guidance=7.5, num_images=frames, latents=noise, progress=False)
    inv = invert(sd, latents=gen.latents, prompt=CLIP_PROMPT, steps=steps, frames=frames, progress=False)
    rec = reconstruct(sd, inv, CLIP_PROMPT, frames=frames, progress=False)
    return {"generated": gen.images, "reconstruction": rec.images}


def _cove(dtype, steps, frames):
    from minivid.cli.cove import DEMO_PROMPT, DEMO_SIZE, DEMO_SOURCE, moving_shapes
    from minivid.methods.cove.pipeline import COVEConfig, edit_video
    from minivid.models import StableDiffusion

    sd = StableDiffusion.from_config("tiny_sd2", seed=0, dtype=dtype)
    config = COVEConfig(inversion_steps=steps, steps=steps, inject_steps=math.floor(0.8 * steps), guidance=7.5)
    out = edit_video(sd, moving_shapes(frames, DEMO_SIZE), DEMO_PROMPT, DEMO_SOURCE, config, seed=0, progress=False)
    return {"edited": out.images}


def _ei2(dtype, steps, frames):
    from minivid.cli.ei2 import DEMO_PROMPT, DEMO_SOURCE, moving_squares
    from minivid.methods.ei2.edit import edit
    from minivid.methods.ei2.model import EI2Config, EI2Model
    from minivid.models import StableDiffusion

    sd = StableDiffusion.from_config("tiny", seed=0)
    model = EI2Model(sd.unet, EI2Config(r=2))
    sd.to(dtype), model.to(dtype)
    return {"edited": edit(sd, moving_squares(frames, 32), DEMO_PROMPT, DEMO_SOURCE, steps=steps, progress=False).images}


def _tcve(dtype, steps, frames):
    from minivid.cli.tcve import DEMO_PROMPT, DEMO_SOURCE, rolling_ball
    from minivid.methods.tcve.edit import edit_tcve
    from minivid.methods.tcve.model import TCVEModel
    from minivid.models import StableDiffusion

    sd = StableDiffusion.from_config("tiny", seed=0)
    model = TCVEModel.build(sd.unet, seed=0)
    sd.to(dtype), model.to(dtype)
    return {"edited": edit_tcve(sd, model, rolling_ball(frames, 32), DEMO_PROMPT, DEMO_SOURCE, steps=steps,
                                progress=False).images}


RUNNERS = {"plain": _plain, "cove": _cove, "ei2": _ei2, "tcve": _tcve}


def method_rows(methods, steps: int, frames: int) -> list[list[object]]:
    rows = []
    for name in methods:
        results, seconds = {}, {}
        for key, dtype in DTYPES.items():
            torch.manual_seed(0)
            t0 = time.perf_counter()
            results[key] = {k: v.float() for k, v in RUNNERS[name](dtype, steps, frames).items()}
            seconds[key] = time.perf_counter() - t0
        for key in ("fp16", "bf16"):
            for out, ref in results["fp32"].items():
                got = results[key][out]
                d = (got - ref).abs()
                rows.append([name, out, key, bool(torch.isfinite(got).all()), float(d.max()),
                             float(d.pow(2).mean().sqrt()), seconds[key] / seconds["fp32"]])
        print(f"{name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()), flush=True)
    return rows


# ---------------------------------------------------------------- the VAE decode against diffusers

def build_vaes():
    from minivid.vae import AutoencoderKL
    from minivid.weights import original_to_diffusers

    with torch.device("meta"):
        vae = AutoencoderKL("sd")
    vae = random_weights_(vae.to_empty(device="cpu")).eval()
    ref = DiffusersVAE(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    ref.load_state_dict(original_to_diffusers("vae", vae.state_dict()), strict=True)
    return vae, ref.eval()


def vae_rows(side: int, repeats: int) -> list[list[object]]:
    vae32, ref32 = build_vaes()
    z = torch.randn(1, 4, side, side)
    rows, base = [], None
    for key, dtype in DTYPES.items():
        vae, ref = copy.deepcopy(vae32).to(dtype), copy.deepcopy(ref32).to(dtype)
        zz = z.to(dtype)
        fns = {"minivid": lambda: vae.decode(zz)}
        if dtype != torch.float16:       # diffusers' fp16 decode runs _slow_conv2d_forward: minutes (the conv rows)
            fns["diffusers"] = lambda: ref.decode(zz).sample
        with torch.no_grad():
            out = {k: f().float() for k, f in fns.items()}
            times = interleaved(fns, repeats=repeats, warmup=0)
        base = out["diffusers"] if base is None else base
        d = times.get("diffusers")
        rows.append([f"VAE decode {side * 8}×{side * 8} px", key, times["minivid"], "not run" if d is None else d,
                     "" if d is None else times["minivid"] / d, float((out["minivid"] - base).abs().max())])
        print(f"VAE decode {key}: " + ", ".join(f"{k} {v:.3f} s" for k, v in times.items()), flush=True)
    return rows


def conv_rows(channels: int = 64, side: int = 128) -> list[list[object]]:
    """One 3x3 conv: torch's F.conv2d (NCHW, what diffusers runs) against minivid.layers.conv2d, per dtype."""
    from minivid.layers import conv2d

    g = torch.Generator().manual_seed(0)
    x32, w32 = torch.randn(1, channels, side, side, generator=g), torch.randn(channels, channels, 3, 3, generator=g) / 24
    exact = torch.nn.functional.conv2d(x32.double(), w32.double(), padding=1)
    rows = []
    for key, dtype in DTYPES.items():
        x, w = x32.to(dtype), w32.to(dtype)
        fns = {"minivid": lambda: conv2d(x, w, None, 1, 1),
               "torch": lambda: torch.nn.functional.conv2d(x, w, None, 1, 1)}
        times = interleaved(fns, repeats=1, warmup=0)
        err = float((conv2d(x, w, None, 1, 1).double() - exact).abs().max())
        rows.append([f"conv 3×3, {channels} ch, {side}×{side}", key, times["minivid"], times["torch"],
                     times["minivid"] / times["torch"], err])
        print(f"conv {key}: minivid {times['minivid']:.3f} s, torch NCHW {times['torch']:.3f} s", flush=True)
    return rows


def run(args: argparse.Namespace) -> int:
    sizes(args, dict(steps=4, frames=4, vae_size=16), dict(steps=20, frames=8, vae_size=32))
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in RUNNERS]
    if bad:
        raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    with torch.no_grad():
        rows = method_rows(methods, args.steps, args.frames)
    body = table(["method", "output", "dtype", "finite", "max abs drift", "RMS drift", "time / fp32"], rows)
    body += (f"\n\nTiny random models (seed 0), {args.frames} frames, {args.steps} DDIM steps per stage, the demos' "
             f"synthetic clips and prompts; drift: output frames (pixels in [-1, 1]) against the fp32 run's. "
             f"EI² and TCVE without tuning (tuning is float32 at every --dtype).\n\n")
    vrows = vae_rows(args.vae_size, 1) + conv_rows()
    body += table(["computation", "dtype", "minivid s", "diffusers / torch s", "time ratio", "max abs error"], vrows)
    body += (f"\n\nVAE: SD decoder (`VAEConfig('sd')`, random weights shared with diffusers' AutoencoderKL), one "
             f"{args.vae_size}×{args.vae_size} latent, each model cast to the dtype, one timed decode each after an "
             f"untimed one, interleaved; error: against diffusers' fp32 decode. diffusers' fp16 decode is not run: "
             f"its NCHW half convolutions are torch's `_slow_conv2d_forward` (the conv rows: one such conv, "
             f"minivid.layers.conv2d against F.conv2d in NCHW; error against a float64 conv). {load_note()}.\n\n"
             f"Command: `minivid bench half{' --full' if args.full else ''} --steps {args.steps} --frames {args.frames} "
             f"--vae-size {args.vae_size}{f' --threads {args.threads}' if args.threads else ''} --write`")
    print(body)
    if getattr(args, "write", False):
        write_section(section_title("Half precision on the CPU (fp16 / bf16 against fp32)", args), body)
    return 0
