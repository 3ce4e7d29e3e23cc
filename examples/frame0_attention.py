"""Text2Video-Zero's cross-frame attention as a minivid processor: every frame's spatial self-attention
takes the keys and values of its video's first frame.

    python examples/frame0_attention.py   # a tiny random model

Check (exits non-zero if it fails): the UNet with this processor equals diffusers' UNet with
`CrossFrameAttnProcessor2_0` on the same weights, to 1e-5 (one float32 UNet call). This check is the
one place an example imports diffusers, as the oracle, inside `diffusers_reference` only.
"""
import tempfile

import torch

from minivid.attention import SPATIAL_SELF, call_state, frame_count, processors, sdpa
from minivid.models import StableDiffusion


def frame0(q, k, v, ctx):
    """q, k, v [(B·F), heads, N, d]: each frame attends to the tokens of its video's frame 0."""
    F = frame_count(ctx, k.shape[0])
    first = lambda t: t[::F].repeat_interleave(F, dim=0)      # noqa: E731  frame 0 of each video, F times
    return sdpa(q, first(k), first(v), ctx)


def diffusers_reference(sd, x, t, context):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.pipelines.deprecated.text_to_video_synthesis.pipeline_text_to_video_zero import (
        CrossFrameAttnProcessor2_0)

    with tempfile.TemporaryDirectory() as tmp:
        sd.save(f"{tmp}/sd", format="diffusers")
        unet = UNet2DConditionModel.from_pretrained(f"{tmp}/sd", subfolder="unet").eval()
    unet.set_attn_processor({name: CrossFrameAttnProcessor2_0(batch_size=2) if name.endswith("attn1.processor")
                             else AttnProcessor2_0() for name in unet.attn_processors})
    with torch.no_grad():
        return unet(x, t, context).sample


def main() -> None:
    sd = StableDiffusion.from_config("tiny", seed=0)
    F, g = 4, torch.Generator().manual_seed(0)
    x = torch.randn(2 * F, 4, 8, 8, generator=g)                 # [uncond; cond] halves of one 4-frame video
    t, context = torch.tensor(500), sd.encode_prompt(["", "a dancer"]).repeat_interleave(F, dim=0)
    with torch.no_grad(), processors(sd.unet, SPATIAL_SELF, frame0), call_state(sd.unet, frames=F):
        ours = sd.unet(x, t, context)
    with torch.no_grad():
        per_frame = sd.unet(x, t, context)
    err, effect = (ours - diffusers_reference(sd, x, t, context)).abs().max().item(), (ours - per_frame).abs().max().item()
    print(f"frame-0 attention vs diffusers' CrossFrameAttnProcessor2_0: max |Δ| {err:.2e} "
          f"(vs plain per-frame attention: {effect:.2e})")
    assert err <= 1e-5, "should equal diffusers' CrossFrameAttnProcessor2_0"
    assert effect > 1e-3, "frame-0 attention should change the output"
    print("check passed")


if __name__ == "__main__":
    main()
