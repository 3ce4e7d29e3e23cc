"""Frame attention variants of EI² (§4.4): FLOPs, CPU time and peak memory.

Compares, on the Q/K/V of one SD 1.4 self-attention layer over a video of F frames with an
H×W token grid (the projections are the same for all variants and are not timed):

- self-attention per frame (SD's attn1 applied to each frame):  n·l² query-key pairs
- Tune-A-Video sparse-causal attention (keys of frame 0 and f-1): 2·n·l²
- EI² FFAM, r = 2 and r = 4 (own frame fine, other frames pooled r×r): (n-1+r²)/r² · n·l²
- full spatio-temporal attention (every token of the video):     n²·l²

(n = F frames, l = H·W tokens per frame, the paper's notation). FLOPs are analytic
multiply-adds of Q·Kᵀ and P·V (2 · queries · keys · d · heads); the paper's claim is that FFAM
with r = 2 or 4 "achieves comparable speed to SCA". Every variant gets its Q/K/V in the layout
its kernel takes ([F, heads, l, d] per frame, [1, heads, n·l, d] for the video-wide ones), made
outside the measured call. Times are medians of interleaved runs. Two memory figures per call:
torch's CPU allocator peak (profiler, benchmarks/_common.py) and the extra peak RSS, measured in a
fresh process per variant (what the process really holds, allocator overhead included).
"FFAM (r=2), concatenation" is the reference's autograd path (one attention call per frame over
the concatenated fine and coarse keys) — the inference path before it merged by log-sum-exp; its
output is compared with the default path's (max |Δ|).

Default: 8 frames at 32×32 tokens (320 channels, ~1-2 min); `--full`: SD 1.4's 64×64 (320 ch) and
32×32 (640 ch) layers of 8 frames at 512 px (several minutes per configuration).

`--tuning-step` measures instead one EI² tuning step (§5) on the tiny SD model: the ε-MSE forward
of the inflated UNet over the clip, backward, and the AdamW update of the trainable tensors (W_Q of
FFAM and cross-attention, all STAM parameters), in fp32, with gradient checkpointing of the
transformer blocks, and under bf16 autocast.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import section_title, interleaved, peak_memory, peak_rss, table, write_section  # noqa: E402

from minivid.attention import Attention, sdpa  # noqa: E402
from minivid.kernels import fine_coarse_attention as fca  # noqa: E402
from minivid.methods.tuneavideo import sparse_causal  # noqa: E402

# (frames, H, W, channels) of SD 1.4 layers at 512×512: 320 channels at 64×64, 640 at 32×32; 8 heads
FULL = [(8, 64, 64, 320), (8, 32, 32, 640)]
DEFAULT = [(8, 32, 32, 320)]
HEADS = 8
NAMES = ["self-attention", "sparse-causal (Tune-A-Video)", "FFAM (r=2)", "FFAM (r=4)",
         "FFAM (r=2), concatenation", "full spatio-temporal"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (median reported; default 3)")
    p.add_argument("--no-full-attention", action="store_true", help="skip full spatio-temporal attention (the slowest)")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS measurement (one fresh process per variant)")
    p.add_argument("--ffam-backend", default="auto", choices=["auto", "reference", "triton"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1: on a shared, loaded machine OpenMP regions stall, and the "
                        "FFAM reference makes hundreds of fused calls)")
    p.add_argument("--tuning-step", action="store_true",
                   help="measure one EI² tuning step on the tiny model (fp32, gradient checkpointing, bf16 autocast) instead")


def _r(variant: str) -> int:
    return int(variant.split("r=")[1][0])


def keys_per_query(variant: str, frames: int, H: int, W: int) -> int:
    L = H * W
    if variant == "self-attention":
        return L
    if variant == "sparse-causal (Tune-A-Video)":
        return 2 * L
    if variant == "full spatio-temporal":
        return frames * L
    r = _r(variant)
    return L + (frames - 1) * (-(-H // r)) * (-(-W // r))


def paper_ratio(variant: str, frames: int) -> float:
    """The paper's complexity relative to per-frame self-attention O(n·l²)."""
    if variant == "self-attention":
        return 1.0
    if variant == "sparse-causal (Tune-A-Video)":
        return 2.0
    if variant == "full spatio-temporal":
        return float(frames)
    r = _r(variant)
    return (frames - 1 + r * r) / (r * r)


def variant_fn(name: str, frames: int, H: int, W: int, channels: int, backend: str = "auto", seed: int = 0):
    """One variant's call on random Q/K/V in its kernel's layout (made here, outside the call)."""
    d, L = channels // HEADS, H * W
    g = torch.Generator().manual_seed(seed)
    if name in ("self-attention", "sparse-causal (Tune-A-Video)"):
        layer = Attention(channels, None, HEADS, d)
        layer.state = {"frames": frames}
        ctx = layer.context(hw=(H, W))
        q, k, v = (torch.randn(frames, HEADS, L, d, generator=g) for _ in range(3))      # [(B·F), heads, l, d]
        op = sdpa if name == "self-attention" else sparse_causal
        return lambda: op(q, k, v, ctx)
    q, k, v = (torch.randn(1, HEADS, frames * L, d, generator=g) for _ in range(3))      # [1, heads, n·l, d]
    if name == "full spatio-temporal":
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    r = _r(name)
    if name.endswith("concatenation"):
        return lambda: fca._concat_reference(q, k, v, frames, (H, W), r, None)
    return lambda: fca.fine_coarse_attention(q, k, v, frames, (H, W), r, backend=backend)


def rss_job(name: str, frames: int, H: int, W: int, channels: int, backend: str = "auto"):
    """(warm-up, measured call) for `_common.peak_rss`; the warm-up runs the variant at half the grid."""
    return (variant_fn(name, frames, max(H // 2, 4), max(W // 2, 4), channels, backend),
            variant_fn(name, frames, H, W, channels, backend))


def run(args: argparse.Namespace) -> int:
    configs = FULL if args.full else DEFAULT
    repeats = args.repeats or 3
    args.threads = args.threads or 1
    torch.set_num_threads(args.threads)
    if args.tuning_step:
        return run_tuning_step(args, repeats)
    names = [n for n in NAMES if not (args.no_full_attention and n == "full spatio-temporal")]
    rows, diffs = [], []
    for frames, H, W, channels in configs:
        d = channels // HEADS
        with torch.inference_mode():
            fns = {name: variant_fn(name, frames, H, W, channels, args.ffam_backend) for name in names}
            memory = {name: peak_memory(fn) for name, fn in fns.items()}           # also the warm-up run
            times = interleaved(fns, repeats=repeats, warmup=0)
            diff = (fns["FFAM (r=2)"]() - fns["FFAM (r=2), concatenation"]()).abs().max().item()
            diffs.append(f"{frames}×{H}×{W} {diff:.1e}")
            del fns
        rss = {name: None if args.no_rss else peak_rss("frame_attention", "rss_job", name, frames, H, W, channels,
                                                       args.ffam_backend, threads=torch.get_num_threads())
               for name in names}
        base = "self-attention"
        for name in names:
            macs = 2 * frames * H * W * keys_per_query(name, frames, H, W) * d * HEADS
            rows.append([
                f"{frames}×{H}×{W}, {channels} ch, d={d}", name, keys_per_query(name, frames, H, W),
                macs / 1e9, keys_per_query(name, frames, H, W) / (H * W), paper_ratio(name, frames),
                times[name], times[name] / times[base], memory[name] / 2 ** 20,
                "n/a" if rss[name] is None else f"{rss[name]:.1f}",
                "n/a" if rss[name] is None or rss["full spatio-temporal" if "full spatio-temporal" in rss else base] is None
                else f"{rss[name] / rss['full spatio-temporal' if 'full spatio-temporal' in rss else base]:.3f}",
            ])
        print(f"done {frames}×{H}×{W}", flush=True)
    ref = "full" if "full spatio-temporal" in names else "SA"
    headers = ["frames×H×W", "attention", "keys/query", "GMAC", "MAC ratio", "paper ratio",
               "CPU s (median)", "time ratio", "allocator peak MiB", "extra peak RSS MiB", f"RSS / {ref}"]
    body = table(headers, rows)
    out_mib = ", ".join(f"{frames}×{H}×{W}×{c} ch: {frames * H * W * c * 4 / 2 ** 20:.0f} MiB"
                        for frames, H, W, c in configs)
    notes = (
        "One attention layer's arithmetic on given Q/K/V (batch 1, 8 heads, fp32), "
        f"{repeats} interleaved runs, {torch.get_num_threads()} thread(s); ratios relative to per-frame self-attention. "
        "'paper ratio' is the paper's complexity over O(n·l²): SCA 2, FFAM (n-1+r²)/r², full n. FFAM runs the "
        f"reference on CPU (backend '{args.ffam_backend}'): fine and coarse keys attended separately and merged by "
        "log-sum-exp, in groups of heads and query rows under a 512 KiB working set; 'concatenation' is the one-call-per-frame path it "
        "replaced for inference (kept for autograd). Allocator peak: torch's CPU allocations during one call "
        "(profiler). Extra peak RSS: VmHWM − VmRSS around one call in a fresh process after a half-size warm-up; "
        f"the output tensor alone is {out_mib}. Max |FFAM r=2 − concatenation path|: {', '.join(diffs)}.\n\n"
        "Command: `minivid bench frame-attention" + (" --full" if args.full else "")
        + (f" --threads {args.threads}" if args.threads != 1 else "") + "`."
    )
    print(notes)
    print(body)
    if args.write:
        write_section(section_title("Frame attention (EI² FFAM vs SA / SCA / full)", args), notes + "\n\n" + body)
    return 0


# ---------------------------------------------------------------- one tuning step on the tiny model

# (frames, pixels) of the clip; the tiny SD has a 4× VAE, so 32 px are 8×8 latents and 64 px 16×16
TUNING_FULL = [(8, 32), (8, 64)]
TUNING_DEFAULT = [(4, 32)]


def tuning_step(frames: int, size: int, variant: str):
    """(step function, number of trainable values) of one EI² tuning step on a fresh tiny model."""
    import contextlib

    from minivid.attention import call_state
    from minivid.methods.ei2 import EI2Config, EI2Model
    from minivid.cli.ei2 import moving_squares
    from minivid.methods.ei2.tune import CHECKPOINTED_BLOCKS, diffusion_loss, encode_video, tuned_tensors
    from minivid.models import StableDiffusion
    from minivid.tuning import freeze_all_but, gradient_checkpointing

    sd = StableDiffusion.from_config("tiny", seed=0)
    model = EI2Model(sd.unet, EI2Config(r=2))
    params, _ = tuned_tensors(sd.unet)
    freeze_all_but(sd.unet, params)
    sd.unet.train()
    with torch.no_grad():
        mean, std = encode_video(sd, moving_squares(frames, size))
        context = sd.encode_prompt(["squares"])
    loss_fn = diffusion_loss(model, mean, context, sd.schedule, sd.prediction, std)
    opt = torch.optim.AdamW(list(params.values()), lr=3e-5, weight_decay=1e-2)
    gen = torch.Generator()

    def step():
        gen.manual_seed(0)
        with contextlib.ExitStack() as stack:
            stack.enter_context(call_state(sd.unet, frames=frames))
            if variant == "gradient checkpointing":
                stack.enter_context(gradient_checkpointing(sd.unet, CHECKPOINTED_BLOCKS))
            if variant == "bf16 autocast":
                stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
            loss = loss_fn(0, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()

    return step, sum(p.numel() for p in params.values())


def run_tuning_step(args: argparse.Namespace, repeats: int) -> int:
    configs = TUNING_FULL if args.full else TUNING_DEFAULT
    variants = ["fp32", "gradient checkpointing", "bf16 autocast"]
    rows = []
    for frames, size in configs:
        steps = {v: tuning_step(frames, size, v) for v in variants}
        memory = {v: peak_memory(fn) for v, (fn, _) in steps.items()}                # also the warm-up run
        times = interleaved({v: fn for v, (fn, _) in steps.items()}, repeats=repeats, warmup=0)
        for v in variants:
            rows.append([f"{frames}×{size}×{size} px ({frames}×{size // 4}×{size // 4} latents)", v,
                         steps[v][1] / 1e6, times[v], times[v] / times["fp32"], memory[v] / 2 ** 20,
                         memory[v] / memory["fp32"]])
        print(f"done {frames}×{size}", flush=True)
    headers = ["clip", "variant", "trainable M", "s / step (median)", "time ratio", "peak MiB", "memory ratio"]
    body = table(headers, rows)
    notes = (
        "One EI² tuning step (§5) on the tiny SD model (`StableDiffusion.from_config(\"tiny\")`, SD 1-style, "
        "random weights): STAM power iteration, ε-MSE forward of the inflated UNet (FFAM r = 2, STAM) over "
        "the clip at one random t, backward, AdamW update of the trainable tensors. Gradient checkpointing "
        "recomputes each transformer block in the backward pass; bf16 autocast runs the forward in bfloat16 "
        f"(weights float32). {repeats} interleaved runs, {torch.get_num_threads()} thread(s); peak memory is "
        "the CPU allocator's peak during one step (self allocations of profiler events).\n\n"
        "Command: `minivid bench frame-attention --tuning-step" + (" --full" if args.full else "")
        + (f" --threads {args.threads}" if args.threads else "") + "`."
    )
    print(body)
    if args.write:
        write_section(section_title("EI² tuning step (tiny model)", args), notes + "\n\n" + body)
    return 0
