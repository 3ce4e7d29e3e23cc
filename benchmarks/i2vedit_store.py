"""I2VEdit's source-attention store: bytes (official disk store / stored / recompute) and edit-step time.

1. Bytes per step and per clip at the official setting (576×1024, 14 frames, 25 steps; the arithmetic of
   `minivid.methods.i2vedit.store_bytes` from the full SVD UNet config's layer list), as ratios to the
   authors' fp32 disk store.
2. Time of one edit step at full SVD size (random weights, fp32, filled in place: peak ≈ 6.5 GB) on a small latent: the CFG UNet call
   (batch 2) without matching; with matching and the source attention recomputed (one more batch-1
   UNet call, LoRA off); with matching reading the stored records. Median of alternating runs.
The goal (issue 10): recompute ≤ 1/100 of the official bytes at ≤ 1.6× the step time without matching.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import table, write_section  # noqa: E402


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=14, help="frames per clip of the timing (default 14)")
    p.add_argument("--latent", default="8x12", help="latent HxW of the timing (default 8x12, 64×96 pixels)")
    p.add_argument("--step", default="0",
                   help="edit steps timed, comma-separated, each a table of the section (default 0: every temporal "
                        "layer copies; e.g. 0,24)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--bytes-only", action="store_true", help="only the store arithmetic (no full-size timing)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="cpu: process CPU time (default; steadier on a machine shared with other jobs, use with "
                        "--threads 1), wall: elapsed time")


def timed_alternating(fns: dict, repeats: int, clock: str) -> dict[str, float]:
    """Median seconds per function over `repeats` rounds in alternating order (a, b, c, c, b, a, ...)."""
    import statistics
    import time

    now = time.process_time if clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats):
        for k in (names if i % 2 == 0 else names[::-1]):
            t0 = now()
            fns[k]()
            times[k].append(now() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bytes_table() -> tuple[str, dict]:
    from minivid.methods.i2vedit import store_bytes
    from minivid.unet_video import VideoUNetConfig

    rows, out = [], {}
    for frames in (14, 11):
        est = store_bytes(VideoUNetConfig.preset("svd"), (72, 128), frames, 25)
        off = est["official"]
        for mode in ("official", "stored", "recompute"):
            e = est[mode]
            rows.append([f"{frames}", mode, f"{e['per_step'] / 1e9:.4g}", f"{e['per_clip'] / 1e9:.4g}",
                         f"{e['per_clip'] / off['per_clip']:.4g}", f"1/{off['per_clip'] / e['per_clip']:.0f}"])
        out[frames] = est
    return table(["frames", "store", "GB per step", "GB per clip", "ratio to official", "as a fraction"], rows), out


def run(args: argparse.Namespace) -> int:
    from minivid.methods.i2vedit.edit import source_attention
    from minivid.methods.i2vedit.conditioning import InversionCondition
    from minivid.methods.i2vedit.invert import Inversion
    from minivid.methods.i2vedit.matching import MatchingConfig, MatchingController, install, keep_for, temporal_names
    from minivid.pipelines.svd import SVDConditioning, video_denoiser
    from minivid.samplers import edm_inversion_sigmas, karras_sigmas
    from minivid.unet_video import VideoUNet, VideoUNetConfig

    body_bytes, _ = bytes_table()
    body = ("Source-attention store at 576×1024 (72×128 latent), 25 steps, fp32, official clip lengths; "
            "per-step figures of stored/recompute are the per-clip ones / 25.\n\n" + body_bytes)
    if not args.bytes_only:
        steps = [int(v) for v in str(args.step).split(",")]
        if any(not 0 <= j < 25 for j in steps):
            raise ValueError(f"--step: edit steps are 0..24, got {args.step}")
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = VideoUNetConfig.preset("svd")
        with torch.device("meta"):
            unet = VideoUNet(cfg)
        unet.to_empty(device="cpu")            # weights filled in place: one copy (6.1 GB), no pool
        fill = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, prm in unet.named_parameters():
                if name.endswith("mix_factor") or prm.ndim == 1:
                    prm.normal_(1.0 if name.endswith("weight") and prm.ndim == 1 else 0.0, 0.05, generator=fill)
                else:
                    prm.normal_(0.0, prm[0].numel() ** -0.5, generator=fill)
        unet.eval().requires_grad_(False)
        svd = SimpleNamespace(unet=unet, dtype=torch.float32, device=torch.device("cpu"))
        h, w = (int(v) for v in args.latent.lower().split("x"))
        Fr, N = args.frames, 25
        g = torch.Generator().manual_seed(0)
        sigmas = karras_sigmas(N)
        levels = edm_inversion_sigmas(sigmas)
        cond_inv = InversionCondition(torch.randn(1, 1, 1024, generator=g), torch.randn(1, 4, h, w, generator=g),
                                      torch.randn(1, 4, h, w, generator=g), torch.tensor([[8.0, 127.0, 0.02]]))
        traj = [torch.randn(1, Fr, 4, h, w, generator=g) * float(levels[i]) for i in range(N + 1)]
        inv = Inversion(traj, levels, cond_inv, traj[-1])
        cond = SVDConditioning(torch.randn(1, 1, 1024, generator=g), torch.randn(1, 4, h, w, generator=g),
                               torch.tensor([[4.0, 127.0, 0.02]]))
        denoise = video_denoiser(svd, cond, Fr, 1.0, 2.0)
        noise = torch.randn(1, Fr, 4, h, w, generator=g)
        ctl = MatchingController(MatchingConfig(steps=N, record_masks=False), (h, w), Fr, temporal_names(unet))

        def time_step(j: int) -> dict[str, float]:
            x = noise * float(sigmas[j])

            def off():
                with torch.no_grad():
                    denoise(x, sigmas[j])

            def match(source):
                ctl.source, ctl.phase, ctl.step = source, "match", j
                try:
                    with torch.no_grad():
                        denoise(x, sigmas[j])
                finally:
                    ctl.phase = "off"

            with torch.no_grad():
                stored = source_attention(svd, inv, ctl, j)                 # what the stored mode holds for step j

            def recompute():
                with torch.no_grad():
                    match(source_attention(svd, inv, ctl, j))

            return timed_alternating({"matching off": off, "recompute": recompute, "stored": lambda: match(stored)},
                                     args.repeats, args.clock)

        with install(unet, ctl):
            for j in steps:
                times = time_step(j)
                rows = [[k, f"{v:.3f}", f"{v / times['matching off']:.3f}"] for k, v in times.items()]
                body += (f"\n\nOne edit step (edit step {j}) at full SVD size (1.52 B parameters, random fp32 weights) on a "
                         f"{h}×{w} latent, {Fr} frames, CFG batch 2, no LoRA; median of {args.repeats} alternating runs, "
                         f"{torch.get_num_threads()} thread(s), {'process CPU' if args.clock == 'cpu' else 'wall-clock'} time. recompute = the matched CFG call plus one batch-1 UNet call "
                         f"recording the source attention; stored = the matched CFG call reading records held in memory.\n\n"
                         + table(["edit step", f"{args.clock} s (median)", "time ratio to matching off"], rows))
    body += (f"\n\nCommand: `minivid bench i2vedit-store --frames {args.frames} --latent {args.latent} --step {args.step} "
             f"--repeats {args.repeats} --clock {args.clock}{' --bytes-only' if args.bytes_only else ''}"
             f"{f' --threads {args.threads}' if args.threads else ''}`.")
    print(body)
    if args.write:
        write_section("I2VEdit source-attention store (bytes and edit-step time)", body)
    return 0
