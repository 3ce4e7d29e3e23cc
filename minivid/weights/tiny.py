"""A small random checkpoint in the official SD layout, for trying `minivid inspect` and loaders offline.

`write_tiny_checkpoint` takes the tensor names of an official file from its manifest and every
shape with each width divided down consistently (below), so the file has EXACTLY the official
names and a self-consistent architecture at ~1/100 of the size; the values are random. It is
not a model anyone trained: `minivid inspect` reports it as SD 1.x/2.x by its names and lists
every shape that differs from the official manifest.

Widths (official -> tiny); kernel sizes, channel counts 1/3/4/8, the 77 positions and the
49408-token vocabulary are kept, so the real tokenizer works with it:

    UNet   320 -> 32 (model_channels; 640, 960, 1280, 1920, 2560, 5120, 10240 scale alike)
    VAE    128 -> 32 (ch; 256 -> 64, 512 -> 128)
    text   SD 1.x: width 768 -> 96, MLP 3072 -> 384 (12 heads of 8)
           SD 2.x: width 1024 -> 128, MLP 4096 -> 512, fused qkv 3072 -> 384 (16 heads of 8)
    UNet cross-attention context = the text width (96 / 128).

The 12 schedule buffers and the two model_ema scalars are left out (listed harmless extras;
`inspect` shows them as optional and absent). Head counts leave no trace in the tensors, so the
file carries minivid's config in its metadata (`StableDiffusion.load` reads it): SD 1.x's rules
hold at these widths (8 UNet heads, 12 text heads), SD 2.x's 64-wide UNet heads do not fit 32
channels, so its tiny UNet has 8-wide heads; the SD 2.x file is a v-model like 768-v.

`like="svd"` (or "svd_xt") writes the Stable Video Diffusion layout at the same reduction, built
from minivid's SVD modules (whose full-size names and shapes equal the official manifest, tests/
test_svd.py): the video UNet and temporal VAE at the widths above, the OpenCLIP ViT-H/14 image
tower at width 1280 -> 128 (16 heads of 8, MLP 512, all 32 blocks, 224-pixel input, 14-pixel
patches), its text-tower leftovers at 1024 -> 128, and sgm's conditioning-frame VAE copy
(`conditioner.embedders.3.encoder.*`) holding the first-stage encoder with an identity quant_conv.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .strict import is_harmless, load_manifest

__all__ = ["TINY_WIDTHS", "TINY_LAYOUTS", "tiny_state_dict", "tiny_sd_config", "tiny_svd_config",
           "write_tiny_checkpoint"]

_UNET = {320: 32, 640: 64, 960: 96, 1280: 128, 1920: 192, 2560: 256, 5120: 512, 10240: 1024}
_VAE = {128: 32, 256: 64, 512: 128}
TINY_WIDTHS = {
    "sd-v1-4": {"model.": {**_UNET, 768: 96}, "first_stage_model.": _VAE,
                "cond_stage_model.": {768: 96, 3072: 384}},
    "sd-v2-1": {"model.": {**_UNET, 1024: 128}, "first_stage_model.": _VAE,
                "cond_stage_model.": {1024: 128, 4096: 512, 3072: 384}},
}
TINY_LAYOUTS = (*TINY_WIDTHS, "svd", "svd_xt")


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Norm scales 1, biases 0, position ids arange, weights N(0, 1/fan_in)."""
    if name.endswith("position_ids"):
        return torch.arange(shape[-1]).expand(shape).clone()
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1 and name.endswith("weight"):
        return torch.ones(shape)
    if len(shape) == 0:
        return torch.ones(())
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return torch.randn(shape, generator=gen) / max(fan_in, 1) ** 0.5


def tiny_state_dict(like: str = "sd-v1-4", seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The official names of `like` ("sd-v1-4" or "sd-v2-1") at the tiny widths, random values."""
    if like not in TINY_WIDTHS:
        raise ValueError(f"no tiny layout for {like!r}; choose one of {', '.join(TINY_WIDTHS)}")
    man = load_manifest(like)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, (shape, file_dtype) in man.tensors.items():
        if is_harmless(name) and not name.endswith("position_ids"):
            continue  # schedule buffers, model_ema scalars
        widths = next((w for p, w in TINY_WIDTHS[like].items() if name.startswith(p)), {})
        tiny = tuple(widths.get(s, s) for s in shape)
        t = _init(name, tiny, gen)
        out[name] = t if file_dtype.startswith("int") else t.to(dtype)
    return out


def tiny_sd_config(like: str, state: dict[str, torch.Tensor]):
    """The SDConfig of a tiny SD file: read from its shapes by SD's rules, the UNet heads of SD 2.x made
    8 wide (see the module docstring)."""
    import dataclasses

    from minivid import sd_formats
    from minivid.models import SDConfig

    from .strict import SD_PREFIXES, split_by_prefix

    kind = "sd1" if like == "sd-v1-4" else "sd2"
    parts = split_by_prefix(state, SD_PREFIXES[kind], source=f"tiny-{like}")
    prediction = "eps" if kind == "sd1" else "v"
    unet = sd_formats.unet_config_from_original(parts["unet"], "sd1", prediction)     # 8 heads: fits 32 channels
    if kind == "sd2":
        unet = dataclasses.replace(unet, num_heads=None, num_head_channels=8, upcast_attention=True)
    return SDConfig(unet, sd_formats.vae_config_from_original(parts["vae"]),
                    sd_formats.text_config_from_original(parts["text"], kind), pad="end" if kind == "sd1" else "zero",
                    prediction=prediction, image_size=768 if kind == "sd2" else 512)


def tiny_svd_config(like: str = "svd"):
    """The SVDConfig of the tiny SVD / SVD-XT file: the official architecture at the reduced widths."""
    import dataclasses

    from minivid.svd import SVDConfig

    official = SVDConfig.preset(like)
    unet = dataclasses.replace(official.unet, model_channels=32, num_head_channels=8, context_dim=128)
    vae = dataclasses.replace(official.vae, ch=32)
    vision = dataclasses.replace(official.vision, width=128, mlp_width=512, projection_dim=128)
    text = dataclasses.replace(official.text, width=128, mlp_width=512, projection_dim=128)
    return SVDConfig(unet, vae, vision, text, official.latent_scale)


def _tiny_svd_state_dict(like: str, seed: int, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], str]:
    from minivid.models import _randomize_
    from minivid.svd import COND_VAE_PREFIX, StableVideoDiffusion
    from minivid.vae import AutoencoderKL, VAEConfig

    from .svd_names import identity_quant_conv

    cfg = tiny_svd_config(like)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = StableVideoDiffusion(cfg)
        v = cfg.vae
        copy = AutoencoderKL(VAEConfig(ch=v.ch, ch_mult=v.ch_mult, num_res_blocks=v.num_res_blocks,
                                       z_channels=v.z_channels, embed_dim=v.z_channels))
    gen = torch.Generator().manual_seed(seed)
    _randomize_(model, gen)
    _randomize_(copy, gen)
    cond = copy.state_dict()
    cond.update({k: v.clone() for k, v in model.vae.state_dict().items() if k.startswith("encoder.")})
    cond.update(identity_quant_conv(v.z_channels))
    out = {k: t.detach() for k, t in model.original_state_dict().items()}
    out.update({COND_VAE_PREFIX + k: t.detach() for k, t in cond.items()})
    out = {k: (t.to(dtype) if t.is_floating_point() else t).contiguous() for k, t in out.items()}
    return out, cfg.to_json()


def write_tiny_checkpoint(folder: str | Path, like: str = "sd-v1-4", seed: int = 0,
                          dtype: torch.dtype = torch.float16) -> Path:
    """Write `folder/tiny-<like>.safetensors` (like: sd-v1-4, sd-v2-1, svd, svd_xt) and return its path."""
    import json

    import safetensors.torch

    if like not in TINY_LAYOUTS:
        raise ValueError(f"no tiny layout for {like!r}; choose one of {', '.join(TINY_LAYOUTS)}")
    meta = {"minivid": f"tiny random checkpoint with the names of {like} (not trained)"}
    if like in TINY_WIDTHS:
        from minivid.models import METADATA_KEY

        state = tiny_state_dict(like, seed, dtype)
        meta[METADATA_KEY] = json.dumps(tiny_sd_config(like, state).to_dict())
    else:
        from minivid.svd import CONFIG_METADATA_KEY

        state, meta[CONFIG_METADATA_KEY] = _tiny_svd_state_dict(like, seed, dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from minivid.outputs import write_file

    return write_file(folder / f"tiny-{like}.safetensors", lambda tmp: safetensors.torch.save_file(state, tmp, metadata=meta))
