"""SD 1.4 UNet forward: minivid vs diffusers, same weights and inputs, CPU fp32.

Both models hold the same tensors (diffusers' through its own single-file converter,
`convert_ldm_unet_checkpoint`, from minivid's ldm-named state dict), get the same latents,
timestep and a 77×768 text context, and run interleaved in one process. Reported: median
seconds per forward, peak bytes allocated by torch during one forward, and the max abs
difference of the outputs (the two must agree to float rounding).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

from minivid.layers import reference_convolutions
from minivid.unet import UNet, UNetConfig

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    interleaved_clocks, load_average, load_note, peak_memory, random_weights_, section_title, sizes, table, write_section,
)

# the ldm UNetModel parameters of v1-inference.yaml, as diffusers' config builder reads them
SD14_LDM = dict(
    in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2,
    attention_resolutions=[4, 2, 1], num_heads=8, context_dim=768, transformer_depth=1,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sizes", default=None, help="latent sides to time, comma-separated (default 16; --full 32,64)")
    p.add_argument("--repeats", type=int, default=None, help="timed forwards per model and size (default 3; --full 5)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--thread-list", default=None,
                   help="thread counts, one pass each, e.g. 2,1 (default: --threads; --full 2,1)")


def build() -> tuple[UNet, UNet2DConditionModel]:
    with torch.device("meta"):
        unet = UNet(UNetConfig.preset("sd14"))
    unet = random_weights_(unet.to_empty(device="cpu")).eval()
    original = {"model": {"params": {
        "unet_config": {"params": SD14_LDM},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
    }}}
    config = create_unet_diffusers_config_from_ldm(original, {}, image_size=512)
    converted = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}, config)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    ref.load_state_dict(converted, strict=True, assign=True)      # the same tensors, no copy
    return unet, ref.eval()


def run(args: argparse.Namespace) -> int:
    sizes(args, dict(sizes="16", repeats=3), dict(sizes="32,64", repeats=5, thread_list="2,1"))
    threads = [int(t) for t in args.thread_list.split(",")] if args.thread_list else [args.threads or torch.get_num_threads()]
    unet, ref = build()
    rows = []
    inputs: dict[int, tuple] = {}
    outputs: dict[tuple[str, int, int], torch.Tensor] = {}      # (model, side, threads) -> output
    for n in threads:
        torch.set_num_threads(n)
        for side in (int(s) for s in args.sizes.split(",")):
            if side not in inputs:                                    # the same inputs at every thread count
                inputs[side] = torch.randn(1, 4, side, side), torch.randn(1, 77, 768)
            x, context = inputs[side]
            fns = {
                "minivid": lambda: unet(x, 500, context),
                "diffusers": lambda: ref(x, 500, encoder_hidden_states=context).sample,
            }
            with torch.no_grad():
                a, b = fns["minivid"](), fns["diffusers"]()
                err, scale = (a - b).abs().max().item(), b.abs().max().item()
                outputs["minivid", side, n], outputs["diffusers", side, n] = a, b
                with reference_convolutions():
                    exact = bool(torch.equal(fns["minivid"](), b))
                load = load_average()
                times = interleaved_clocks(fns, repeats=args.repeats, warmup=0)
                mem = {k: peak_memory(f) / 2 ** 20 for k, f in fns.items()} if n == threads[0] else None
            (mw, mc), (dw, dc) = times["minivid"], times["diffusers"]
            rows.append([
                f"{side}×{side}", n, mw, dw, mw / dw, mc, dc, mc / dc,
                *((mem["minivid"], mem["diffusers"], mem["minivid"] / mem["diffusers"]) if mem else ("", "", "")),
                f"{err:.1e} ({err / scale:.1e})", "yes" if exact else "no", f"{load:.1f} → {load_average():.1f}",
            ])
            print(f"{side}×{side}, {n} thread(s): minivid {mw:.3f} s ({mc:.3f} s CPU), diffusers {dw:.3f} s ({dc:.3f} s CPU)",
                  flush=True)
    body = table(
        ["latent", "threads", "minivid s", "diffusers s", "time ratio", "minivid CPU s", "diffusers CPU s",
         "CPU-time ratio", "minivid peak MiB", "diffusers peak MiB", "memory ratio", "max abs diff (relative)",
         "bitwise equal (reference convs)", "load average"],
        rows,
    )
    # the yardstick for that difference: diffusers' own output at two thread counts (another BLAS split)
    own = []
    for side in inputs:
        if len(threads) > 1:
            b0, b1 = outputs["diffusers", side, threads[0]], outputs["diffusers", side, threads[1]]
            e = (b0 - b1).abs().max().item()
            own.append(f"{side}×{side}: {e:.1e} ({e / b0.abs().max().item():.1e})")
    own_note = (f" For scale, diffusers' own output at {threads[0]} vs {threads[1]} threads differs by "
                f"{', '.join(own)} (max abs, relative)." if own else "")
    body += (
        f"\n\nSD 1.4 UNet (`UNetConfig.preset('sd14')`), random weights shared with diffusers' "
        f"UNet2DConditionModel through `convert_ldm_unet_checkpoint`; batch 1, fp32, 77×768 context, "
        f"median of {args.repeats} interleaved forwards after one untimed forward each; wall time and process CPU "
        f"time (all threads of this process; on a loaded machine the steadier ratio). Peak memory: bytes allocated "
        f"by torch during one forward (weights excluded). max abs diff: minivid − diffusers over the output "
        f"(relative: over the output's max abs); minivid's wide convolutions on ≤ 16×16 grids sum in another order "
        f"(docs/numerics.md, \"CPU convolutions\"); bitwise equal: minivid inside `minivid.layers.reference_convolutions()` "
        f"(oneDNN for every convolution) against diffusers, `torch.equal`.{own_note} Load average: 1-minute, before → after each row. "
        f"{load_note()}.\n\n"
        f"Command: `minivid bench unet{' --full' if args.full else ''} --sizes {args.sizes} --repeats {args.repeats}"
        f"{f' --thread-list {args.thread_list}' if args.thread_list else ''}"
        f"{f' --threads {args.threads}' if args.threads and not args.thread_list else ''} --write`"
    )
    print(body)
    if getattr(args, "write", False):
        write_section(section_title("UNet: minivid vs diffusers (SD 1.4, CPU fp32)", args), body,
                      threads="/".join(map(str, threads)))
    return 0
