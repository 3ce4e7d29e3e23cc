"""COVE's correspondence-guided attention (CGA) inside an EI²-inflated model: COVE's pipeline on a UNet
with EI²'s STAM blocks, CGA's dense half being EI²'s fine-coarse frame attention (FFAM) instead of
COVE's dense spatio-temporal attention. A few lines of configuration, no copied loop.

    python examples/cga_in_ei2.py         # a tiny random model: it shows the wiring, not a good edit

Check (exits non-zero if it fails): FFAM with r = 1 is dense spatio-temporal attention, so CGA in EI²
with r = 1 must equal COVE's own sequential mode on the same inflated model, while r = 2 must not.
The UNet runs in float64, so the two dense halves differ by rounding (~1e-16) that float32 latents turn
into at most about one ulp per step: the runs must agree to 1e-5 of the latents' scale.
"""
import torch

from minivid.cli.cove import moving_shapes
from minivid.methods.cove.pipeline import COVEBlocks, COVEConfig, cove_attention, edit_video
from minivid.methods.ei2 import EI2Config, FFAMProcessor
from minivid.methods.ei2.model import inflated
from minivid.models import StableDiffusion


def cga_in_ei2(r: int) -> COVEBlocks:
    """COVE's blocks with FFAM(r) as the dense half of CGA."""
    return COVEBlocks(attention=lambda corr, cfg: cove_attention(corr, cfg, dense=FFAMProcessor(r)))


def main() -> None:
    sd = StableDiffusion.from_config("tiny_sd2", seed=0)
    sd.unet.to(torch.float64).eval()
    frames = moving_shapes(3, 32)
    cfg = COVEConfig(inversion_steps=6, steps=3, inject_steps=2, store_dtype="fp32")
    with inflated(sd.unet, EI2Config(r=2)):                    # STAM in every block, for this scope only
        edit = lambda blocks: edit_video(sd, frames, "a bear", "a man", cfg, blocks=blocks,  # noqa: E731
                                         progress=False, decode=False).latents
        cove, ei2_r1, ei2_r2 = edit(COVEBlocks()), edit(cga_in_ei2(1)), edit(cga_in_ei2(2))
    scale = cove.abs().max().item()
    err1, err2 = (ei2_r1 - cove).abs().max().item(), (ei2_r2 - cove).abs().max().item()
    print(f"CGA in EI², r = 1 vs COVE's sequential mode: max |Δ latents| {err1:.2e} (scale {scale:.2f})")
    print(f"CGA in EI², r = 2 vs COVE's sequential mode: max |Δ latents| {err2:.2e}")
    assert err1 <= 1e-5 * scale, "r = 1 should equal COVE's sequential mode"
    assert err2 > 1e-3 * scale, "r = 2 should differ from dense attention"
    print("check passed")


if __name__ == "__main__":
    main()
