"""One token's cross-attention maps at every DDIM step, and COVE's diffusion features of the result,
from one text-to-image run.

    python examples/attention_maps.py [--out maps.pt]     # a tiny random model

The recorder keeps, per step and layer, only the conditional half, the one token and the mean over
heads: (1, N) per map, not (2, heads, N, 77). Check (exits non-zero if it fails): recording leaves
the run bitwise unchanged (the latents equal those of the same run without it).
"""
import argparse

import torch

from minivid.attention import SPATIAL_CROSS, record_attention
from minivid.methods.cove.features import diffusion_features
from minivid.models import StableDiffusion
from minivid.pipelines.sd import initial_noise, text_to_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="save {'maps': [steps, h, w], 'features': [h', w', D]} here (torch.save)")
    args = parser.parse_args()
    sd = StableDiffusion.from_config("tiny", seed=0)
    prompt, word = "a red fox in the snow", "fox"
    token = 1 + len(sd.tokenizer.encode(prompt[:prompt.index(word)]))      # after the start token
    noise = initial_noise(sd, 1, 32, 32, seed=0)
    run = lambda: text_to_image(sd, prompt, steps=10, latents=noise, progress=False, decode=False).latents  # noqa: E731
    plain = run()
    with record_attention(sd.unet, SPATIAL_CROSS, tokens=[token], batch=slice(1, None)) as rec:
        latents = run()
    finest = max(m.hw for m in rec)
    maps = torch.stack([torch.stack([m.grid()[0, 0] for m in rec.select(step=s) if m.hw == finest]).mean(0)
                        for s in rec.steps])                              # [steps, h, w], layer mean
    features = diffusion_features(sd, latents)[0]                          # [h', w', D]
    print(f"'{word}' (token {token}): {len(rec)} maps over {len(rec.steps)} steps, {rec.nbytes} bytes kept; "
          f"per-step maps {tuple(maps.shape)} at t = {[m.t for m in rec.select(rec[0].layer)]}")
    print(f"diffusion features {tuple(features.shape)}")
    if args.out:
        torch.save({"maps": maps, "features": features}, args.out)
    assert torch.equal(latents, plain), "recording changed the run"
    print("check passed: the recorded run is bitwise the plain run")


if __name__ == "__main__":
    main()
