"""COVE Table 3: cost of one denoising step without CGA, with CGA, with CGA + token merging.

Two measurements, CPU fp32, one process, runs interleaved:

1. "UNet step": one classifier-free-guided UNet call of full-size SD 2.1-base (865 M parameters,
   random weights) on 10 frames at a 16×16 latent (128 px), batch [uncond; cond] = 20, every
   self-attention layer running a COVE processor: dense spatio-temporal attention on all of them
   ("without CGA" = mode dense_only), plus CGA at the layers on the correspondence grid, which is the
   latent grid here (16×16: input_blocks.1-2, output_blocks.9-11, 320 channels, 5 heads × 64),
   sequential after the dense attention (the default), without and with 50 % merging. K = 3,
   correspondence from random unit features (l = 9). This is the paper's setting (10 frames, CGA on
   the finest grid) at 1/16 of its tokens.
2. "CGA alone at 64×64": the arithmetic of one CGA processor call (mode "replace", no dense
   attention) at the paper's finest grid: 10 frames of 64×64 tokens, batch 2 (guidance), 5 heads × 64
   (SD's 320-channel level), without and with merging; per-frame attention (plain SD) for scale.

Peak memory: bytes allocated by torch during the call (weights and inputs excluded), from the
profiler. The paper's Table 3 (RTX 3090, whole 10-frame edit): 9 GB / 2.2 min without CGA, 14 GB /
2.7 min with CGA, 11 GB / 2.4 min with CGA + merging.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch
import torch.nn.functional as F

from minivid.attention import AttnContext, call_state, processors, sdpa
from minivid.methods.cove.attention import CorrespondenceGuidedAttention
from minivid.methods.cove.correspondence import correspondence
from minivid.samplers import cfg_denoise
from minivid.unet import UNet, UNetConfig

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import section_title, interleaved, load_note, peak_memory, sizes, table, write_section  # noqa: E402

PAPER = {"without CGA": "9 GB / 2.2 min", "CGA": "14 GB / 2.7 min", "CGA + merging (50 %)": "11 GB / 2.4 min"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=None, help="frames (default 4; --full 10)")
    p.add_argument("--latent", type=int, default=None, help="latent side of the UNet step (default 8: 64 px; --full 16: 128 px)")
    p.add_argument("--grid", type=int, default=None, help="token grid side of the CGA-alone measurement (default 32; --full 64)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (median reported; default 2)")
    p.add_argument("--skip-unet", action="store_true", help="only the CGA-alone measurement")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


CONFIGS = {
    "without CGA": dict(mode="dense_only", merge_ratio=0.0),
    "CGA": dict(mode="sequential", merge_ratio=0.0),
    "CGA + merging (50 %)": dict(mode="sequential", merge_ratio=0.5),
}


def unet_step(args: argparse.Namespace) -> tuple[str, str]:
    Fr, s = args.frames, args.latent
    torch.manual_seed(0)
    unet = UNet(UNetConfig.preset("sd21_base")).eval()          # torch's default initialisation
    corr = correspondence(F.normalize(torch.randn(Fr, s, s, 64), dim=-1), 9, 3)
    x, t = torch.randn(Fr, 4, s, s), torch.tensor(501)
    cond, uncond = torch.randn(Fr, 77, 1024), torch.randn(Fr, 77, 1024)

    def step(proc):
        def run():
            with torch.inference_mode(), processors(unet, "*attn1", proc), call_state(unet, frames=Fr):
                return cfg_denoise(unet, x, t, cond, uncond, 7.5)
        return run

    fns = {name: step(CorrespondenceGuidedAttention(corr, k=3, **kw)) for name, kw in CONFIGS.items()}
    memory = {name: peak_memory(fn) for name, fn in fns.items()}      # also the warm-up
    times = interleaved(fns, repeats=args.repeats, warmup=0)
    base = times["without CGA"]
    rows = [[name, times[name], times[name] / base, memory[name] / 2 ** 20, memory[name] / memory["without CGA"],
             PAPER[name]] for name in fns]
    body = table(["attention", "s / step (median)", "time ratio", "peak MiB", "memory ratio",
                  "paper (whole edit, RTX 3090)"], rows)
    notes = (f"SD 2.1-base UNet (full size, random weights), fp32, {Fr} frames at a {s}×{s} latent, one "
             f"guided step (batch {2 * Fr}), {args.repeats} interleaved runs; CGA (K=3, sequential after dense "
             f"spatio-temporal attention) at the {s}×{s} layers. Peak MiB: allocated during the step, weights excluded.")
    return notes, body


def cga_alone(args: argparse.Namespace) -> tuple[str, str]:
    Fr, s, B, h, d = args.frames, args.grid, 2, 5, 64
    N = s * s
    corr = correspondence(F.normalize(torch.randn(Fr, s, s, 64), dim=-1), 9, 3)
    q, k, v = (torch.randn(B * Fr, h, N, d) for _ in range(3))
    ctx = AttnContext(None, "attn1", False, d ** -0.5, False, (s, s), {"frames": Fr})
    fns = {"per-frame attention (SD)": lambda: sdpa(q, k, v, ctx)}
    for name, ratio in (("CGA", 0.0), ("CGA + merging (50 %)", 0.5)):
        proc = CorrespondenceGuidedAttention(corr, k=3, merge_ratio=ratio, mode="replace")
        proc.index_for((s, s), N, q.device)                           # the gather index is built once per edit
        fns[name] = lambda proc=proc: proc(q, k, v, ctx)
    with torch.inference_mode():
        memory = {name: peak_memory(fn) for name, fn in fns.items()}
        times = interleaved(fns, repeats=args.repeats, warmup=0)
    S = (Fr - 1) * 3 + 1
    rows = [[name, times[name], memory[name] / 2 ** 20] for name in fns]
    body = table(["attention (one layer call)", "s (median)", "peak MiB"], rows)
    notes = (f"One self-attention call's arithmetic on given Q/K/V: {Fr} frames × {s}×{s} tokens, batch {B}, "
             f"{h} heads × {d}, fp32. CGA: each query attends to its S = {S} gathered tokens (itself + K=3 per "
             f"other frame); merging halves them to {S - S // 2} per query, as the same attention over the S "
             "tokens with group-mean logits (merge.grouped_probs), so it adds the matching and saves nothing "
             "here: the per-query attention over S tokens is a small part of the cost (the key gather is most).")
    return notes, body


def run(args: argparse.Namespace) -> int:
    sizes(args, dict(frames=4, latent=8, grid=32, repeats=2), dict(frames=10, latent=16, grid=64, repeats=2))
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = []
    if not args.skip_unet:
        sections.append(unet_step(args))
    sections.append(cga_alone(args))
    cmd = "minivid bench cove" + (" --full" if args.full else "") + (f" --threads {args.threads}" if args.threads else "") + (" --skip-unet" if args.skip_unet else "")
    text = "\n\n".join(f"{notes}\n\n{body}" for notes, body in sections)
    text += f"\n\n{torch.get_num_threads()} thread(s); {load_note()}.\n\nCommand: `{cmd}`."
    print(text)
    if args.write:
        write_section(section_title("COVE attention cost (Table 3: without CGA, CGA, CGA + merging)", args), text)
    return 0
