"""TCVE's temporal branch vs the SD 1.4 UNet: added parameters, forward time and memory; one tiny tuning step.

Part 1, full SD 1.4 size (random weights, fp32, CPU): one denoiser call on a clip of F frames at an
h×w latent (default 8 frames at 16×16, i.e. 128×128 px; a 512 px clip is 64×64 latents), batch of
one video, 77×768 text context. Variants, run interleaved on ONE UNet:

- SD 1.4 UNet per frame (the frames as a batch, plain self-attention);
- + Tune-A-Video (sparse-causal self-attention and temporal attention in every transformer block);
- + the TCVE temporal branch (temporal UNet and 5 STUs fused by hooks) — TCVE;
- the temporal UNet alone (its share of the branch).

For the plain variant the inflated blocks are switched back to their base class for the duration
of the call (and sdpa set on attn1), so all variants share the same weights in memory.

Part 2, the tiny SD model: one tuning step (ε-MSE forward over the clip, backward, gradient clip,
AdamW update) of TCVE (trainable: to_q of attn1/attn2, attn_temp, the whole branch) vs
Tune-A-Video alone (to_q of attn1/attn2, attn_temp).

Times are medians of interleaved runs (benchmarks/_common.py); peak memory is torch's CPU
allocator peak during one call, weights excluded.
"""
from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys
from typing import Iterator

import torch
import torch.nn as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import section_title, interleaved, load_note, peak_memory, random_weights_, sizes, table, write_section  # noqa: E402

from minivid.attention import call_state, processors, sdpa  # noqa: E402
from minivid.methods import tuneavideo  # noqa: E402
from minivid.cli.tcve import rolling_ball  # noqa: E402
from minivid.methods.tcve.model import TCVEModel  # noqa: E402
from minivid.methods.tcve.tune import diffusion_loss, encode_video  # noqa: E402
from minivid.tuning import select_parameters  # noqa: E402
from minivid.unet import UNet, UNetConfig  # noqa: E402


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=None, help="frames of the clip (default 4; --full 8)")
    p.add_argument("--latent", type=int, default=None, help="latent side h = w at SD size (default 8, i.e. 64 px; --full 16)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (median reported; default 2, --full 5)")
    p.add_argument("--tiny-frames", type=int, default=None, help="frames of the tiny tuning step's clip (default 8, 32 px)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's); 1 avoids OpenMP stalls on a shared, loaded machine")


@contextlib.contextmanager
def plain_sd(unet: nn.Module) -> Iterator[None]:
    """Scoped: the inflated UNet runs as the image UNet (base block class, sdpa self-attention)."""
    blocks = [(m, type(m)) for m in unet.modules() if isinstance(m, tuneavideo.TemporalBlockMixin)]
    for b, cls in blocks:
        b.__class__ = cls.base
    try:
        with processors(unet, "*attn1", sdpa):
            yield
    finally:
        for b, cls in blocks:
            b.__class__ = cls


def millions(module_or_params) -> float:
    params = module_or_params.parameters() if isinstance(module_or_params, nn.Module) else module_or_params
    return sum(p.numel() for p in params) / 1e6


def full_size(args: argparse.Namespace) -> tuple[str, str]:
    F, s = args.frames, args.latent
    with torch.device("meta"):
        unet = UNet(UNetConfig.preset("sd14"))
    unet = random_weights_(unet.to_empty(device="cpu")).eval()
    base_params = millions(unet)
    model = TCVEModel.build(unet)
    random_weights_(model.branch, seed=1)                        # trained-like: every part of the branch acts
    for name, m in unet.named_modules():
        if name.endswith("attn_temp"):
            random_weights_(m, seed=2)
    tav = [p for n, p in unet.named_parameters() if "attn_temp" in n or "norm_temp" in n]
    stus = model.branch.stus
    trainable = model.trainable()
    params = [
        ["SD 1.4 UNet", base_params, "frozen"],
        ["Tune-A-Video temporal attention (attn_temp + norm_temp)", millions(tav), "attn_temp"],
        ["TCVE temporal UNet", millions(model.branch.temporal_unet), "all"],
        ["TCVE STUs: temporal attention (norm_temp, attn_temp)",
         millions(p for s in stus for m in (s.norm_temp, s.attn_temp) for p in m.parameters()), "all"],
        ["TCVE STUs: GroupNorm + Conv3d 3×3×3", millions(p for s in stus for m in (s.norm, s.conv_3d) for p in m.parameters()), "all"],
        ["trainable in TCVE (to_q of attn1/attn2, attn_temp, branch)", millions(trainable.values()), ""],
    ]
    x, ctx = torch.randn(F, 4, s, s), torch.randn(F, 77, 768)

    def sd():
        with plain_sd(unet):
            return unet(x, 500, ctx)

    def tav_call():
        with call_state(unet, frames=F):
            return unet(x, 500, ctx)

    def tcve():
        return model(x, 500, ctx, frames=F)

    def temporal_unet():
        return model.branch.temporal_features(x, F)

    fns = {"SD 1.4 UNet per frame": sd, "+ Tune-A-Video blocks": tav_call, "+ temporal branch (TCVE)": tcve,
           "temporal UNet alone": temporal_unet}
    with torch.no_grad():
        times = interleaved(fns, repeats=args.repeats, warmup=1)
        mem = {k: peak_memory(f) / 2 ** 20 for k, f in fns.items()}
    ref_t, ref_m = times["SD 1.4 UNet per frame"], mem["SD 1.4 UNet per frame"]
    rows = [[k, times[k], times[k] / ref_t, mem[k], mem[k] / ref_m] for k in fns]
    rows.append(["TCVE − Tune-A-Video (the branch's cost)", times["+ temporal branch (TCVE)"] - times["+ Tune-A-Video blocks"],
                 (times["+ temporal branch (TCVE)"] - times["+ Tune-A-Video blocks"]) / ref_t, "", ""])
    p_table = table(["parameters", "M", "tuned"], params)
    t_table = table(["denoiser call", "CPU s (median)", "time ratio", "peak MiB", "memory ratio"], rows)
    return p_table, t_table


def tiny_step(args: argparse.Namespace) -> str:
    from minivid.models import StableDiffusion

    F = args.tiny_frames
    clip = rolling_ball(F, 32)
    variants = {}
    for name in ("Tune-A-Video", "TCVE"):
        sd = StableDiffusion.from_config("tiny", seed=0)
        if name == "TCVE":
            model = TCVEModel.build(sd.unet)
            trainable = model.trainable()
        else:
            tuneavideo.inflate_for_tuneavideo(sd.unet)
            model = sd.unet
            trainable = select_parameters(model, list(tuneavideo.TRAINABLE))
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable.values():
            p.requires_grad_(True)
        mean, std = encode_video(sd, clip)
        with torch.no_grad():
            context = sd.encode_prompt(["a white ball rolling over a sunset"])
        if name == "TCVE":
            loss_fn = diffusion_loss(model, mean, context, F, sd.schedule, sd.prediction, std)
        else:
            loss_fn = _tav_loss(model, mean, std, context, F, sd)
        opt = torch.optim.AdamW(list(trainable.values()), lr=3e-5, weight_decay=1e-2)
        gen = torch.Generator()

        def step(loss_fn=loss_fn, opt=opt, trainable=trainable):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(0, gen.manual_seed(0))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(trainable.values()), 1.0)
            opt.step()

        variants[name] = (step, millions(trainable.values()))
    times = interleaved({k: v[0] for k, v in variants.items()}, repeats=max(args.repeats, 5), warmup=1)
    mem = {k: peak_memory(v[0]) / 2 ** 20 for k, v in variants.items()}
    ref = "Tune-A-Video"
    rows = [[k, variants[k][1], times[k], times[k] / times[ref], mem[k], mem[k] / mem[ref]] for k in variants]
    return table(["tiny SD, one tuning step", "trainable M", "CPU s (median)", "time ratio", "peak MiB", "memory ratio"], rows)


def _tav_loss(unet, mean, std, context, frames, sd):
    """The same ε-MSE step on the Tune-A-Video UNet without the branch."""
    from minivid.samplers import add_noise, training_target

    ctx = context.repeat_interleave(frames, 0)

    def loss_fn(step, gen):
        z0 = mean + std * torch.randn(mean.shape, generator=gen)
        noise = torch.randn(mean.shape, generator=gen)
        t = torch.randint(0, 1000, (1,), generator=gen).repeat_interleave(frames)
        with call_state(unet, frames=frames):
            pred = unet(add_noise(z0, noise, t, sd.schedule), t, ctx)
        return torch.nn.functional.mse_loss(pred, training_target(z0, noise, t, sd.prediction, sd.schedule))
    return loss_fn


def run(args: argparse.Namespace) -> int:
    sizes(args, dict(frames=4, latent=8, repeats=2, tiny_frames=8), dict(frames=8, latent=16, repeats=5, tiny_frames=8))
    if args.threads:
        torch.set_num_threads(args.threads)
    p_table, t_table = full_size(args)
    print(p_table, "\n\n", t_table, sep="", flush=True)
    s_table = tiny_step(args)
    print("\n" + s_table)
    body = (
        f"Parameters at SD 1.4 size:\n\n{p_table}\n\n"
        f"One denoiser call at SD 1.4 size on {args.frames} frames at {args.latent}×{args.latent} latents "
        f"({args.latent * 8}×{args.latent * 8} px), batch of one video, 77×768 context, random weights, fp32; "
        f"{args.repeats} interleaved runs after one warm-up, {torch.get_num_threads()} thread(s); peak memory: "
        f"bytes allocated by torch during the call (weights excluded). Every variant runs on the same UNet "
        f"(plain SD: the inflated blocks temporarily switched back to the image block).\n\n{t_table}\n\n"
        f"One tuning step (forward, backward, clip, AdamW) on the tiny SD model, {args.tiny_frames} frames at "
        f"32×32 px (8×8 latents):\n\n{s_table}\n\n"
        f"{load_note()}.\n\n"
        f"Command: `minivid bench tcve{' --full' if args.full else ''} --frames {args.frames} --latent {args.latent} --repeats {args.repeats}"
        + (f" --threads {args.threads}" if args.threads else "") + " --write`."
    )
    if getattr(args, "write", False):
        write_section(section_title("TCVE: temporal branch vs the SD 1.4 UNet", args), body)
    return 0
