"""COVE §3.2, Eq. 4: diffusion features of the source frames.

Each frame's latent z_i is noised to one timestep (t = 261, following DIFT [68]) and sent
once through the UNet; the output of one decoder layer is the frame's feature map
F_i = f_θ(z_i^t), [h, w, D] tokens, L2-normalised per token so that dot products are the
cosine similarities of Eq. 6.

    feats = diffusion_features(sd, latents)          # latents [F, 4, h, w] (scaled) -> [F, h, w, D]

Which decoder layer (`layer`, default "auto" = `default_feature_layer(unet)`):
the paper's main text and Appendix A say "the intermediate layer of the 2D UNet decoder" with a
64×64 feature at 512 px; Appendix C says "the final layer of the U-Net decoder". Table 4 settles
it: its multiply-add counts 0.448e9 / 4.03e9 / 11.2e9 = (N−1)·H·W·l²·d for N = 20, H = W = 64,
l = 3 / 9 / 15 need d = 640. The only decoder output with 640 channels on the 64×64 grid is the
last block of the second-finest level, whose Upsample brings it to the latent grid:
ldm `output_blocks.8` (diffusers `up_blocks[2]`, its output after the upsampler). The final
decoder block (`output_blocks.11`, 320 channels) is the Appendix C reading; pass it by name.
For other UNets "auto" takes the same position: the last block of the second-finest level.

Other choices: the prompt of the pass is empty by default (DIFT's default, and the feature
should describe the source frames, not a caption); each frame gets its own noise draw
("we add noise ... to each frame"); `ensemble` > 1 averages several draws (DIFT's ensemble;
COVE uses one pass, the default). The UNet runs frame by frame as the image model it is, whatever
is installed on it (`minivid.attention.image_model`: default attention processors, no wrappers or
hooks, EI²'s or Tune-A-Video's video blocks run as their image block), and stops at the feature
layer: the blocks after it are not evaluated. So the features of an EI²-inflated or tuned UNet are
those of its image model (with its own weights: tuned W_Q are part of it, STAM is not).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minivid.attention import image_model, replace_outputs
from minivid.samplers import add_noise

__all__ = ["FEATURE_T", "default_feature_layer", "diffusion_features"]

FEATURE_T = 261      # DIFT's timestep for semantic correspondence, used by COVE (§4, Appendix A)


def default_feature_layer(unet: nn.Module) -> str:
    """The last output block of the second-finest decoder level (`output_blocks.8` for SD):
    its Upsample ends on the latent grid, and its width is the 640 Table 4 implies for SD 2.1."""
    cfg = unet.cfg
    levels = len(cfg.channel_mult)
    if levels < 2:
        raise ValueError("default_feature_layer: the UNet has a single level; name the feature layer")
    return f"output_blocks.{(levels - 1) * (cfg.num_res_blocks + 1) - 1}"


class _Reached(Exception):
    """Raised by the feature hook to stop the UNet once the feature layer has run."""


@torch.no_grad()
def diffusion_features(
    sd,
    latents: torch.Tensor,
    *,
    t: int = FEATURE_T,
    layer: str = "auto",
    prompt: str = "",
    generator: torch.Generator | None = None,
    ensemble: int = 1,
    chunk: int | None = None,
) -> torch.Tensor:
    """Eq. 4: F_i = f_θ(z_i^t) for every frame, L2-normalised per token.

    latents: scaled source latents [F, C, h, w]. Returns float32 [F, h', w', D] on the model's
    device ((h', w') is the layer's grid, the latent grid for the default layer). Noise is drawn
    in float32 on the CPU from `generator` (one draw per frame and per ensemble member), so a
    seed gives the same features on every device. `chunk` frames per UNet call bound memory.
    """
    if latents.dim() != 4:
        raise ValueError(f"diffusion_features: latents must be [F, C, h, w], got {tuple(latents.shape)}")
    if ensemble < 1:
        raise ValueError(f"diffusion_features: ensemble must be at least 1, got {ensemble}")
    if not 0 <= t < sd.schedule.num_train_timesteps:
        raise ValueError(f"diffusion_features: t must be in [0, {sd.schedule.num_train_timesteps}), got {t}")
    unet = sd.unet
    name = default_feature_layer(unet) if layer == "auto" else layer
    Fr = latents.shape[0]
    step = chunk or Fr
    context = sd.encode_prompt([prompt])                                     # [1, 77, D_text]
    kept: list[torch.Tensor] = []

    def keep(_name: str, out: torch.Tensor) -> None:
        kept.append(out.float())
        raise _Reached

    total = None
    with image_model(unet), replace_outputs(unet, name, keep):
        for _ in range(ensemble):
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
            parts = []
            for s in range(0, Fr, step):
                z = latents[s:s + step].float()
                tt = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
                x_t = add_noise(z, noise[s:s + step], tt, sd.schedule)
                kept.clear()
                try:
                    unet(x_t.to(sd.device), tt.to(sd.device), context.expand(z.shape[0], -1, -1))
                except _Reached:
                    pass
                if not kept:
                    raise ValueError(f"diffusion_features: layer {name!r} did not run in the UNet's forward pass")
                parts.append(kept[0])                                         # [f, D, h', w']
            feats = torch.cat(parts)
            total = feats if total is None else total + feats
    feats = (total / ensemble).permute(0, 2, 3, 1)                           # [F, h', w', D]
    return F.normalize(feats, dim=-1)
