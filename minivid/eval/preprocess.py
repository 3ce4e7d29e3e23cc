"""Each metric's image preprocessing, restated exactly from its reference (no PIL, no torchvision).

All three take 8-bit frames, uint8 [F, 3, H, W] (`to_uint8` turns minivid's [-1, 1] frames into
them exactly: a decoded video's frames are 8-bit), and return float32 [F, 3, h, w]:

| function | reference | steps |
|---|---|---|
| `clip_preprocess_hf` | transformers' CLIPImageProcessor (PIL backend), as LOVEU-TGVE's evaluation feeds `openai/clip-vit-large-patch14` | shorter side -> 224 (longer: int(224 · long / short)), PIL bicubic on 8-bit (`pil_resize`), centre crop 224 with offsets (H - 224) // 2, x · (1/255), CLIP mean/std |
| `clip_preprocess_vbench` | VBench's `clip_transform(224)` (aesthetic quality) | shorter side -> 224, bicubic (torch, a = -0.75, align_corners=False, no antialias) in float, clamp [0, 255], round to 8-bit, centre crop 224 with offsets round((H - 224) / 2), x / 255, CLIP mean/std |
| `dino_preprocess_vbench` | VBench's `dino_transform(224)` (subject consistency) | shorter side -> 224, bilinear (align_corners=False, no antialias) in float, round to 8-bit, NO crop, x / 255, ImageNet mean/std |

`pil_resize` is Pillow's `Image.resize(..., BICUBIC)` for 8-bit images: separable, horizontal pass
first, each pass rounding to 8 bits; per output pixel a bicubic kernel (a = -0.5) stretched by the
scale when shrinking (support 2 · max(scale, 1)), its weights normalised to sum 1 and turned into
22-bit fixed point, the sum rounded and clipped to [0, 255].
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from minivid.clip import CLIP_MEAN, CLIP_STD

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "to_uint8", "short_side_size", "pil_resize", "clip_preprocess_hf",
    "clip_preprocess_vbench", "dino_preprocess_vbench", "normalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIL_PRECISION_BITS = 22          # Pillow's fixed-point precision for 8-bit resampling (32 - 8 - 2)


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """[F, 3, H, W] in [-1, 1] -> uint8 [F, 3, H, W], (x + 1) · 127.5 rounded (minivid.video.to_uint8's
    rule; exact for frames read from a file). uint8 input is returned as it is."""
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be [F, 3, H, W], got {getattr(frames, 'shape', type(frames))}")
    if frames.dtype == torch.uint8:
        return frames
    if not frames.dtype.is_floating_point:
        raise TypeError(f"frames must be uint8 or floating point in [-1, 1], got {frames.dtype}")
    return ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _check_u8(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 [F, 3, H, W], got {getattr(images, 'dtype', type(images))} "
                         f"{tuple(getattr(images, 'shape', ()))}")


def short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """The shorter side to `size`, the longer to int(size · long / short) (transformers' and torchvision's rule)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(x - mean) / std per channel, in x's dtype (float32)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


# ---------------------------------------------------------------- Pillow's bicubic resampling

def _pil_bicubic(x: float) -> float:
    """Pillow's bicubic kernel (a = -0.5), in its operation order."""
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@lru_cache(maxsize=32)
def _pil_weights(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] fixed-point (integer-valued float64) weights of one Pillow bicubic pass."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    W = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        ss = 1.0 / filterscale
        xmin = max(int(center - support + 0.5), 0)          # C's (int) truncates toward zero, as int() does
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = [_pil_bicubic((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for v in k:
            ww += v
        if ww != 0.0:
            k = [v / ww for v in k]
        one = 1 << PIL_PRECISION_BITS
        W[xx, xmin:xmin + xmax] = [int(-0.5 + v * one) if v < 0 else int(0.5 + v * one) for v in k]
    return W


def _pil_pass(x: torch.Tensor, out_size: int, dim: int) -> torch.Tensor:
    """One Pillow pass of uint8 [F, 3, H, W] along dim (3: width, 2: height) -> uint8."""
    in_size = x.shape[dim]
    W = torch.from_numpy(_pil_weights(in_size, out_size)).to(x.device)    # integer-valued: every sum is exact in float64
    xd = x.double()
    acc = torch.matmul(xd, W.T) if dim == 3 else torch.matmul(W, xd)
    acc = acc + float(1 << (PIL_PRECISION_BITS - 1))
    out = torch.floor(acc / float(1 << PIL_PRECISION_BITS))               # = arithmetic >> 22 for acc > 0
    return out.clamp(0, 255).to(torch.uint8)


def pil_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pillow's `Image.resize((w, h), Image.BICUBIC)` on uint8 [F, 3, H, W] -> uint8 [F, 3, h, w]."""
    _check_u8(images)
    h, w = size
    x = images
    if w != x.shape[3]:
        x = _pil_pass(x, w, dim=3)
    if h != x.shape[2]:
        x = _pil_pass(x, h, dim=2)
    return x


# ---------------------------------------------------------------- the three references

def clip_preprocess_hf(images: torch.Tensor, size: int = 224, crop: int | None = None) -> torch.Tensor:
    """transformers' CLIPImageProcessor (PIL backend): uint8 [F, 3, H, W] -> float32 [F, 3, crop, crop]."""
    _check_u8(images)
    crop = size if crop is None else crop
    x = pil_resize(images, short_side_size(*images.shape[-2:], size))
    H, W = x.shape[-2:]
    if H < crop or W < crop:
        raise ValueError(f"resized frames {H}x{W} are smaller than the {crop} crop")
    top, left = (H - crop) // 2, (W - crop) // 2
    x = x[..., top:top + crop, left:left + crop]
    x = (x.double() * (1 / 255)).float()
    return normalize(x, CLIP_MEAN, CLIP_STD)


def _torch_resize_u8(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """torchvision's tensor Resize (antialias=False) on uint8: float32, interpolate, (bicubic: clamp), round."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    x = F.interpolate(images.float(), size=size, mode=mode, align_corners=False)
    if mode == "bicubic":
        x = x.clamp(0, 255)
    return x.round().to(torch.uint8)


def clip_preprocess_vbench(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """VBench's clip_transform: uint8 [F, 3, H, W] -> float32 [F, 3, size, size]."""
    _check_u8(images)
    x = _torch_resize_u8(images, short_side_size(*images.shape[-2:], size), "bicubic")
    H, W = x.shape[-2:]
    top, left = int(round((H - size) / 2.0)), int(round((W - size) / 2.0))
    x = x[..., top:top + size, left:left + size]
    return normalize(x.float().div(255.0), CLIP_MEAN, CLIP_STD)


def dino_preprocess_vbench(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """VBench's dino_transform: uint8 [F, 3, H, W] -> float32 [F, 3, h, w] with min(h, w) = size (no crop)."""
    _check_u8(images)
    x = _torch_resize_u8(images, short_side_size(*images.shape[-2:], size), "bilinear")
    return normalize(x.float().div(255.0), IMAGENET_MEAN, IMAGENET_STD)

