"""Full-size SVD UNet forward on CPU: minivid's VideoUNet vs diffusers' UNetSpatioTemporalConditionModel.

Both models hold the SAME tensors (diffusers' parameters are assigned minivid's, renamed by
minivid.weights.svd_names, so the 1.5 B random fp32 weights exist once, ~6.1 GB), frozen
(requires_grad False, as for inference or when only LoRA layers train), and get the same
input: one clip (B = 1) of F frames at an h×w latent, c_noise of σ = 1, a random image embedding
and SVD's default added time ids. Reported: the median of forward passes (no grad) run in alternating order,
their ratio, and the peak bytes torch's CPU allocator holds during one forward beyond the weights
(profiler, self allocations). The outputs are compared too (after setting diffusers' ResBlock
GroupNorm eps to sgm's 1e-5, the one architectural difference; docs/svd.md).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch
import torch.nn as nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import section_title, load_note, peak_memory, sizes, table, write_section  # noqa: E402


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default 6; --full 14, SVD's)")
    p.add_argument("--latent", type=int, default=None, help="latent side h = w (default 8, i.e. 64×64 pixels; --full 8)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed forwards per model, in alternating order (median reported; default 3, --full 6)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--trainable", action="store_true",
                   help="leave the weights requiring grad (default: frozen, as for inference or LoRA tuning)")


def alternating(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per function over `repeats` rounds, the order reversed every other round (a, b, b, a, ...),
    so that neither model always runs right after the other."""
    import statistics
    import time

    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(repeats):
        for k in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def random_fill_(model: nn.Module, seed: int = 0) -> None:
    """Materialise a meta-device model with random O(1)-activation weights, at copy speed (windows of one
    Gaussian pool); mix factors and norm scales random too."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(2 ** 22 + 15, generator=g)

    def sample(shape, scale, shift=0.0):
        n = torch.Size(shape).numel()
        start = int(torch.randint(len(pool), (), generator=g))
        reps = (start + n) // len(pool) + 1
        flat = pool.repeat(reps)[start:start + n] if reps > 1 else pool[start:start + n].clone()
        return flat.view(shape).mul_(scale).add_(shift)

    for name, p in list(model.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf == "mix_factor":
            value = sample(p.shape, 1.0)
        elif p.ndim == 1 and leaf == "weight":
            value = sample(p.shape, 0.1, 1.0)
        elif p.ndim == 1:
            value = sample(p.shape, 0.05)
        else:
            value = sample(p.shape, p[0].numel() ** -0.5)
        setattr(module, leaf, nn.Parameter(value, requires_grad=False))


def run(args: argparse.Namespace) -> int:
    from diffusers import UNetSpatioTemporalConditionModel

    from minivid.svd import _unet_config_to_diffusers
    from minivid.unet_video import VideoUNet, VideoUNetConfig
    from minivid.weights.diffusers_names import original_to_diffusers
    from minivid.weights import svd_names  # noqa: F401

    sizes(args, dict(frames=6, latent=8, repeats=3), dict(frames=14, latent=8, repeats=6))
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = VideoUNetConfig.preset("svd")
    with torch.device("meta"):
        ours = VideoUNet(cfg)
    random_fill_(ours)
    ours.eval().requires_grad_(args.trainable)
    kwargs = {k: v for k, v in _unet_config_to_diffusers(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = UNetSpatioTemporalConditionModel(**kwargs)
    ref.load_state_dict(original_to_diffusers("svd_unet", ours.state_dict()), strict=True, assign=True)
    ref.eval().requires_grad_(args.trainable)                              # frozen by default, as for inference or LoRA
    for name, m in ref.named_modules():
        if isinstance(m, nn.GroupNorm) and ".resnets." in name:
            m.eps = 1e-5
    ptrs = {t.data_ptr() for t in ours.state_dict().values()}
    shared = all(t.data_ptr() in ptrs for t in ref.state_dict().values())

    g = torch.Generator().manual_seed(0)
    F, h = args.frames, args.latent
    x = torch.randn(1, F, 8, h, h, generator=g)
    c_noise = torch.tensor([0.0])                                           # 0.25·ln σ at σ = 1
    embeds = torch.randn(1, 1, 1024, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02]])

    def run_ours():
        with torch.no_grad():
            return ours(x, c_noise, embeds, ids)

    def run_ref():
        with torch.no_grad():
            return ref(x, c_noise, embeds, ids).sample

    err = (run_ours() - run_ref()).abs().max().item()
    times = alternating({"minivid": run_ours, "diffusers": run_ref}, repeats=args.repeats)
    mem = {"minivid": peak_memory(run_ours), "diffusers": peak_memory(run_ref)}
    rows = [[name, f"{times[name]:.3f}", f"{times[name] / times['diffusers']:.3f}", f"{mem[name] / 2**20:.1f}",
             f"{mem[name] / mem['diffusers']:.3f}"] for name in ("minivid", "diffusers")]
    body = (
        f"Full-size SVD UNet (1.52 B parameters, fp32, random weights shared by both models: {shared}, "
        f"{'trainable' if args.trainable else 'frozen'}), one forward "
        f"without grad on B=1 clip of {F} frames at a {h}×{h} latent ({8 * h}×{8 * h} pixels); median of "
        f"{args.repeats} runs in alternating order, {torch.get_num_threads()} thread(s). Peak = torch CPU allocator high-water "
        f"mark during one forward, beyond the weights. Max |minivid − diffusers| = {err:.2e} "
        f"(diffusers' ResBlock GroupNorm eps set to sgm's 1e-5). With frozen weights diffusers feeds strided token "
        f"tensors to some Linear layers (proj_in ...), which torch then multiplies as a batched matmul of the "
        f"expanded weight; minivid passes dense tensors. With trainable weights both take the same path. "
        f"{load_note()}.\n\n"
        f"Command: `minivid bench svd-unet{' --full' if args.full else ''} --frames {F} --latent {h} --repeats {args.repeats}"
        f"{f' --threads {args.threads}' if args.threads else ''}{' --trainable' if args.trainable else ''}`.\n\n"
        + table(["model", "CPU s (median)", "time ratio", "peak MiB", "memory ratio"], rows)
    )
    print(body)
    if args.write:
        write_section(section_title("SVD UNet forward (minivid vs diffusers)", args), body)
    return 0
