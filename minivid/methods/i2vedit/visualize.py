"""The picture of I2VEdit's spatial matching mask M (Eq. 8): one heat map per spatial attn1 layer (rows,
finest first) and editing step (columns), laid over one frame of the clip.

    tiles, rows, cols = mask_picture(clip_edit.masks, clip_edit.layer_hw, frames, frame=5)
    save_grid("matching_mask.png", tiles, cols=len(cols))

M = 1 (red-yellow-white) marks tokens whose attention follows the edit; M near 0 (black) tokens whose
attention is copied from the source. Each layer's mask lives on its own token grid; it is shown with
nearest-neighbour upsampling to the frame, blended 70/30 with the frame. No plotting library.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["heat_colors", "mask_legend", "mask_picture", "pick_steps", "row_label"]

# black -> red -> yellow -> white, RGB in [0, 1]
_STOPS = torch.tensor([[0.0, 0.0, 0.0], [0.8, 0.0, 0.0], [1.0, 0.8, 0.0], [1.0, 1.0, 1.0]])


def heat_colors(m: Tensor) -> Tensor:
    """[..., H, W] in [0, 1] -> [..., 3, H, W] in [-1, 1]."""
    x = m.float().clamp(0, 1) * (len(_STOPS) - 1)
    lo = x.floor().long().clamp(max=len(_STOPS) - 2)
    t = (x - lo)[..., None]
    rgb = _STOPS[lo] * (1 - t) + _STOPS[lo + 1] * t               # [..., H, W, 3]
    return rgb.movedim(-1, -3) * 2 - 1


def mask_legend() -> list[tuple[tuple[int, int, int], str]]:
    """Legend entries (RGB 0..255, text) of the heat map, for `minivid.pictures.save_labelled_grid`."""
    entries = [(0.0, "M = 0: source attention"), (1 / 3, "M = 1/3"), (2 / 3, "M = 2/3"), (1.0, "M = 1: edited attention")]
    out = []
    for m, text in entries:
        rgb = (heat_colors(torch.tensor([[m]]))[:, 0, 0] + 1) / 2
        out.append((tuple(int(round(float(c) * 255)) for c in rgb), text))
    return out


def row_label(name: str) -> str:
    """A short row label of a spatial attn1 layer: IN 4, MID, OUT 10 (the UNet block it sits in)."""
    parts = name.split(".")
    if parts[0] == "middle_block":
        return "MID"
    return f"{'IN' if parts[0] == 'input_blocks' else 'OUT'} {parts[1]}"


def pick_steps(steps: list[int], count: int = 6) -> list[int]:
    """Up to `count` steps spread over the run, first and last included."""
    steps = sorted(steps)
    if len(steps) <= count:
        return steps
    idx = torch.linspace(0, len(steps) - 1, count).round().long().tolist()
    return [steps[i] for i in dict.fromkeys(idx)]


def _layer_order(name: str) -> tuple[int, int]:
    parts = name.split(".")
    region = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}[parts[0]]
    return region, int(parts[1]) if parts[1].isdigit() else 0


def mask_picture(masks: dict[tuple[str, int], Tensor], layer_hw: dict[str, tuple[int, int]], frames: Tensor,
                 frame: int | None = None, steps: list[int] | None = None,
                 max_steps: int = 6, min_height: int = 96) -> tuple[Tensor, list[str], list[int]]:
    """masks {(layer, step): M [F, N]} (`ClipEdit.masks`), frames [F, 3, H, W] in [-1, 1] -> (tiles
    [rows·cols, 3, H', W'], layer names of the rows, steps of the columns). `frame` defaults to the middle one;
    frames lower than `min_height` are enlarged by a whole factor."""
    if not masks:
        raise ValueError("mask_picture: no matching masks were recorded (matching off, or record_masks=False)")
    layers = sorted({name for name, _ in masks}, key=_layer_order)
    all_steps = sorted({s for _, s in masks})
    cols = steps if steps is not None else pick_steps(all_steps, max_steps)
    Fr, _, H, W = frames.shape
    f = Fr // 2 if frame is None else frame
    if not 0 <= f < Fr:
        raise ValueError(f"mask_picture: frame must be in [0, {Fr}), got {frame}")
    base = frames[f].detach().float().cpu()
    if H < min_height:                                  # small frames: tiles enlarged by a whole factor
        factor = -(-min_height // H)
        H, W = H * factor, W * factor
        base = F.interpolate(base[None], size=(H, W), mode="nearest")[0]
    tiles = []
    for name in layers:
        h, w = layer_hw[name]
        for s in cols:
            m = masks.get((name, s))
            if m is None:
                tiles.append(torch.full_like(base, -1.0))
                continue
            grid = m[f].float().reshape(1, 1, h, w)
            up = F.interpolate(grid, size=(H, W), mode="nearest")[0, 0]
            tiles.append(0.7 * heat_colors(up) + 0.3 * base)
    return torch.stack(tiles), layers, cols
