"""I2VEdit: the source-attention store (bytes, edit-step time) and one motion-LoRA tuning step (time, peak memory).

`--sections store,lora` (default both; `precision` on request). "store" is benchmarks/i2vedit_store.py (the official fp32 disk
store, the stored mode and the recompute mode in bytes per step and per clip, and one edit step's time
with matching off / recompute / stored; `--store-bytes-only` skips its full-size timing). "lora" is the
tuning step below, in fp32, bf16 autocast, bf16 weights and with gradient checkpointing. "precision"
(`--sections precision`) edits one clip on the tiny SVD (random weights, every layer randomised so the
temporal and output layers act) with each precision split and reports the drift of the final latents and
decoded frames from the all-fp32 edit (issue 19.2): the authors' split (fp32 weights, fp32 inversion and
source attention, the edit's UNet in bf16/fp16 under autocast, fp32 sampler state), inversion in the edit
dtype too, and half-precision weights throughout; once with the matching threshold 0.35 (the mask jumps
from D to 1 there) and once with a continuous mask (threshold above 1: M = D everywhere).

The step is the one `minivid.methods.i2vedit.tune.tune_motion_lora` runs through the shared engine:
the loss of `motion_loss` (EDM denoised-output MSE, σ from the cosine-interpolated log-SNR sampler)
on one clip, backward, AdamW on the 192 LoRA layers (17.8 M parameters at SVD size); the UNet is
frozen. Inputs are random (a clip's latents, conditioning latent, CLIP embedding): the VAE and CLIP,
which the tuning runs once per clip, are not part of the step. The UNet is the full-size SVD UNet
with random weights (~6.1 GB fp32; `--preset tiny` for a quick check) on an h×w latent of F frames.

Reported per mode: the median step time over `--repeats` steps after one warm-up step (which also
creates AdamW's moments), its ratio to fp32, and the peak bytes torch's CPU allocator holds during one
step beyond the weights and optimizer state (profiler, self allocations), with its ratio to fp32.
"""
from __future__ import annotations

import argparse
import contextlib
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import peak_memory, random_weights_, table, write_section  # noqa: E402

MODES = ("fp32", "bf16", "fp32+checkpointing", "bf16+checkpointing", "bf16-weights", "bf16-weights+checkpointing")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sections", default="store,lora", help="store, lora, precision (default store,lora)")
    p.add_argument("--store-bytes-only", action="store_true", help="store section: only the byte arithmetic")
    p.add_argument("--store-latent", default="8x12", help="store section: latent HxW of the edit-step timing (default 8x12)")
    p.add_argument("--store-frames", type=int, default=14, help="store section: frames of the edit-step timing (default 14)")
    p.add_argument("--preset", choices=["svd", "tiny"], default="svd", help="lora section: UNet size (default svd, the full size)")
    p.add_argument("--frames", type=int, default=11, help="frames per clip (default 11, the authors' clip length)")
    p.add_argument("--latent", default="8x8", help="latent h×w (default 8x8, i.e. 64×64 pixels)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per mode after one warm-up (median reported)")
    p.add_argument("--modes", default="fp32,fp32+checkpointing,bf16,bf16-weights",
                   help=f"comma-separated, of {', '.join(MODES)} (default fp32,fp32+checkpointing,bf16,bf16-weights; "
                        f"bf16-weights modes last: they cast the UNet)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="process CPU time (default: steadier on a shared machine; with n threads it sums them) "
                        "or wall-clock time")


def build_unet(preset: str):
    """The UNet with random O(1)-activation weights, frozen; the full size is built on the meta device and
    each tensor then filled in place of its own storage (no copies: the weights exist once, ~6.1 GB fp32)."""
    from minivid.unet_video import VideoUNet, VideoUNetConfig

    cfg = VideoUNetConfig.preset(preset)
    if preset == "tiny":
        return random_weights_(VideoUNet(cfg)).eval().requires_grad_(False)
    with torch.device("meta"):
        unet = VideoUNet(cfg)
    g = torch.Generator().manual_seed(0)
    for name, p in list(unet.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        t = torch.empty(p.shape)
        if leaf == "mix_factor":
            t.normal_(0.0, 1.0, generator=g)
        elif p.ndim == 1 and leaf == "weight":
            t.normal_(1.0, 0.1, generator=g)
        elif p.ndim == 1:
            t.normal_(0.0, 0.05, generator=g)
        else:
            t.normal_(0.0, p[0].numel() ** -0.5, generator=g)
        setattr(unet.get_submodule(module_name), leaf, torch.nn.Parameter(t, requires_grad=False))
    return unet.eval()


class _SVD:
    """What motion_loss needs of an SVD: its UNet."""

    def __init__(self, unet):
        self.unet = unet


def lora_step_section(args: argparse.Namespace) -> str:
    from minivid.methods.i2vedit.lora import attach_motion_lora
    from minivid.methods.i2vedit.tune import CHECKPOINTED_BLOCKS, ClipData, motion_loss, training_time_ids
    from minivid.tuning import gradient_checkpointing

    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"unknown modes {bad}; choose from {MODES}")
    h, w = (int(v) for v in args.latent.lower().split("x"))
    F = args.frames
    unet = build_unet(args.preset)
    lora = attach_motion_lora(unet)
    n_params = lora.num_parameters()
    g = torch.Generator().manual_seed(0)
    data = ClipData(torch.randn(1, F, 4, h, w, generator=g) * 0.8, torch.randn(1, 4, h, w, generator=g) * 5,
                    torch.randn(1, 1, unet.cfg.context_dim, generator=g), training_time_ids(_default_config()))
    loss_fn = motion_loss(_SVD(unet), lora, data)
    params = list(lora.parameters())
    for p in params:
        p.requires_grad_(True)
    lora.train()
    opt = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.999), weight_decay=1e-2)
    step_gen = torch.Generator()
    counter = iter(range(10**9))

    def step(amp_dtype):
        i = next(counter)
        step_gen.manual_seed(i)
        amp = torch.autocast("cpu", dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with amp:
            loss = loss_fn(i, step_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    results = {}
    for mode in modes:
        amp_dtype = torch.bfloat16 if mode.split("+")[0] == "bf16" else None
        unet.to(torch.bfloat16 if mode.startswith("bf16-weights") else torch.float32)
        with contextlib.ExitStack() as stack:
            if mode.endswith("checkpointing"):
                for pattern in CHECKPOINTED_BLOCKS:
                    stack.enter_context(gradient_checkpointing(unet, pattern))
            step(amp_dtype)                                            # warm-up (AdamW state)
            now = time.process_time if args.clock == "cpu" else time.perf_counter
            times = []
            for _ in range(args.repeats):
                t0 = now()
                step(amp_dtype)
                times.append(now() - t0)
            mem = peak_memory(lambda: step(amp_dtype))
        weights = sum(p.numel() * p.element_size() for p in unet.parameters())
        results[mode] = (statistics.median(times), mem, weights)
        print(f"{mode}: {results[mode][0]:.3f} s, peak {mem / 2**20:.1f} MiB", file=sys.stderr)
    ref_t, ref_m, _ = results.get("fp32", next(iter(results.values())))
    rows = [[mode, f"{t:.3f}", f"{t / ref_t:.3f}", f"{m / 2**20:.1f}", f"{m / ref_m:.3f}", f"{wb / 2**30:.2f}"]
            for mode, (t, m, wb) in results.items()]
    size = "full-size SVD UNet (1.52 B parameters, random fp32 weights, frozen)" if args.preset == "svd" else "tiny UNet"
    return (
        f"One motion-LoRA tuning step (loss, backward, AdamW on {len(lora.names)} LoRA layers, {n_params:,} "
        f"parameters) of the {size} on B=1 clip of {F} frames at a {h}×{w} latent ({8 * h}×{8 * w} pixels), "
        f"{torch.get_num_threads()} thread(s), {'process CPU' if args.clock == 'cpu' else 'wall-clock'} time; median of {args.repeats} steps after one warm-up. Peak = torch CPU "
        f"allocator high-water mark during one step beyond the weights and AdamW state. bf16 = torch.autocast "
        f"on the CPU (weights stay fp32; autocast keeps a bf16 copy of each weight it casts for the step); bf16-weights = the frozen UNet stored in bf16, the LoRA in fp32, no autocast; checkpointing recomputes every spatial and temporal transformer block "
        f"in the backward pass.\n\n"
        f"Command: `minivid bench i2vedit --sections lora --preset {args.preset} --frames {F} --latent {h}x{w} --repeats {args.repeats} "
        f"--modes {','.join(modes)} --clock {args.clock}{f' --threads {args.threads}' if args.threads else ''}`.\n\n"
        + table(["mode", f"{args.clock} s per step (median)", "time ratio", "peak MiB", "memory ratio", "UNet weights GiB"], rows)
    )


def _default_config():
    from minivid.methods.i2vedit.tune import MotionTuneConfig

    return MotionTuneConfig()


def store_section(args: argparse.Namespace) -> int:
    """benchmarks/i2vedit_store.py with this run's shared options (it prints and writes its own section)."""
    import i2vedit_store

    parser = argparse.ArgumentParser()
    i2vedit_store.add_arguments(parser)
    store_args = parser.parse_args([])
    store_args.repeats, store_args.threads, store_args.clock, store_args.write = \
        args.repeats, args.threads, args.clock, args.write
    store_args.bytes_only, store_args.latent, store_args.frames = args.store_bytes_only, args.store_latent, args.store_frames
    return i2vedit_store.run(store_args)


def precision_section(args: argparse.Namespace) -> str:
    """The edit's drift from all-fp32 per precision split, on the tiny SVD (one clip of 6 frames, 10 steps)."""
    from minivid.methods.i2vedit import I2VEditConfig, edit_clip
    from minivid.svd import StableVideoDiffusion

    torch.manual_seed(0)
    ref_model = random_weights_(StableVideoDiffusion.from_config("tiny"), seed=0).eval()
    F_, steps = 6, 10
    g = torch.Generator().manual_seed(1)
    y = torch.linspace(-1, 1, 32)[:, None]
    x = torch.linspace(-1, 1, 48)[None]
    clip = torch.stack([torch.stack([torch.sin(3 * x + 0.4 * f) * torch.cos(2 * y), torch.cos(2 * x - y + 0.3 * f), x * y])
                        for f in range(F_)]) * 0.8 + 0.05 * torch.randn(F_, 3, 32, 48, generator=g)
    clip = clip.clamp(-1, 1)
    first = (clip[0] + 0.3 * torch.randn(3, 32, 48, generator=g)).clamp(-1, 1)
    splits = [("all fp32 (reference)", torch.float32, None, "fp32"),
              ("authors' split, edit bf16", torch.float32, torch.bfloat16, "fp32"),
              ("authors' split, edit fp16", torch.float32, torch.float16, "fp32"),
              ("inversion in the edit dtype, bf16", torch.float32, torch.bfloat16, "edit"),
              ("inversion in the edit dtype, fp16", torch.float32, torch.float16, "edit"),
              ("bf16 weights throughout", torch.bfloat16, None, "edit"),
              ("fp16 weights throughout", torch.float16, None, "edit")]
    rows = []
    for thr_name, thr in (("0.35", (0.35, 0.35)), ("continuous", (1.5, 1.5))):
        ref = None
        for name, weights, edit_dtype, inv in splits:
            model = ref_model if weights == torch.float32 else \
                random_weights_(StableVideoDiffusion.from_config("tiny"), seed=0).eval().to(weights)
            cfg = I2VEditConfig(steps=steps, clip_len=F_, recipe="uniform", mask_thr=thr, edit_dtype=edit_dtype,
                                invert_dtype=inv, record_masks=False)
            t0 = time.perf_counter()
            res = edit_clip(model, clip, first, cfg, progress=False)
            sec = time.perf_counter() - t0
            if ref is None:
                ref = res
            dl = float((res.latents - ref.latents).abs().max() / ref.latents.abs().max())
            df = float((res.frames - ref.frames).abs().max())
            inv_d = float((res.inversion.noise - ref.inversion.noise).abs().max() / ref.inversion.noise.abs().max())
            rows.append([thr_name, name, f"{inv_d:.2e}", f"{dl:.2e}", f"{df:.2e}", round(sec, 1)])
    body = table(["threshold", "split", "inverted noise, max rel. diff", "edited latents, max rel. diff",
                  "decoded frames, max abs. diff ([-1, 1])", "s"], rows)
    return (body + f"\n\nTiny SVD (random weights), one clip of {F_} frames at 32×48, {steps} steps, preset local, "
            f"recompute store, CPU autocast for the half-precision edit. Command: `minivid bench i2vedit --sections precision`.")


def run(args: argparse.Namespace) -> int:
    sections = [s for s in args.sections.split(",") if s]
    if not sections or any(s not in ("store", "lora", "precision") for s in sections):
        raise ValueError(f"--sections must list store, lora and/or precision, got {args.sections!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if "store" in sections:
        store_section(args)
    if "lora" in sections:
        body = lora_step_section(args)
        print(body)
        if args.write:
            write_section("I2VEdit motion-LoRA tuning step", body)
    if "precision" in sections:
        body = precision_section(args)
        print(body)
        if args.write:
            write_section("I2VEdit precision splits", body)
    return 0
