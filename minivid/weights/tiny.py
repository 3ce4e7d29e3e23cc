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
`inspect` shows them as optional and absent).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .strict import is_harmless, load_manifest

__all__ = ["TINY_WIDTHS", "tiny_state_dict", "write_tiny_checkpoint"]

_UNET = {320: 32, 640: 64, 960: 96, 1280: 128, 1920: 192, 2560: 256, 5120: 512, 10240: 1024}
_VAE = {128: 32, 256: 64, 512: 128}
TINY_WIDTHS = {
    "sd-v1-4": {"model.": {**_UNET, 768: 96}, "first_stage_model.": _VAE,
                "cond_stage_model.": {768: 96, 3072: 384}},
    "sd-v2-1": {"model.": {**_UNET, 1024: 128}, "first_stage_model.": _VAE,
                "cond_stage_model.": {1024: 128, 4096: 512, 3072: 384}},
}


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


def write_tiny_checkpoint(folder: str | Path, like: str = "sd-v1-4", seed: int = 0,
                          dtype: torch.dtype = torch.float16) -> Path:
    """Write `folder/tiny-<like>.safetensors` and return its path."""
    import safetensors.torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"tiny-{like}.safetensors"
    safetensors.torch.save_file(tiny_state_dict(like, seed, dtype), str(path),
                                metadata={"minivid": f"tiny random checkpoint with the names of {like} (not trained)"})
    return path
