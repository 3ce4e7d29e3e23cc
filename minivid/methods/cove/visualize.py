"""The correspondence picture of COVE's Appendix C: one token of one frame and its K matches in every frame.

    pic = correspondence_picture(frames, corr, point=(0.5, 0.5))     # [F, 3, H, W]
    save_labelled_grid("correspondence.png", pic, rows=["source"], legend=correspondence_legend(corr.k))

Markers are drawn into a copy of the frames (no plotting library): the query token as a white square
in its own frame, and in every other frame its K corresponding tokens as squares coloured by rank
(top-1 red, then orange, yellow, green, cyan, ...), each with a black outline; the top-1 is drawn
last, so it stays visible when matches overlap. A square covers the token's cell of the feature grid
(8×8 pixels at 512 px with a 64×64 feature), at least 5 pixels wide. `correspondence_legend(k)` gives
the legend entries for `minivid.pictures.save_labelled_grid`, which also enlarges small frames
(nearest neighbour) to a readable size.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .correspondence import Correspondence

__all__ = ["RANK_COLORS", "point_token", "correspondence_picture", "correspondence_legend"]

RANK_COLORS = ((1.0, -1.0, -1.0), (1.0, 0.3, -1.0), (1.0, 1.0, -1.0), (-1.0, 1.0, -1.0), (-1.0, 1.0, 1.0),
               (-1.0, -1.0, 1.0), (1.0, -1.0, 1.0))          # RGB in [-1, 1]
QUERY_COLOR = (1.0, 1.0, 1.0)


def _uint8(color: tuple[float, float, float]) -> tuple[int, int, int]:
    return tuple(int(round((c + 1) * 127.5)) for c in color)  # type: ignore[return-value]


def correspondence_legend(k: int) -> list[tuple[tuple[int, int, int], str]]:
    """The legend of the picture: (RGB uint8 colour, text) for the query point and match ranks 1..k."""
    return [(_uint8(QUERY_COLOR), "query point")] + [
        (_uint8(RANK_COLORS[r % len(RANK_COLORS)]), f"match {r + 1}" + (" (best)" if r == 0 and k > 1 else ""))
        for r in range(k)]


def point_token(point: tuple[float, float], hw: tuple[int, int]) -> int:
    """Flat token index of the relative point (y, x) in [0, 1]² on an h×w grid."""
    y, x = point
    if not (0.0 <= y <= 1.0 and 0.0 <= x <= 1.0):
        raise ValueError(f"point must be relative coordinates (y, x) in [0, 1], got {point}")
    h, w = hw
    return min(h - 1, int(y * h)) * w + min(w - 1, int(x * w))


def _square(img: Tensor, cy: float, cx: float, half: int, color: tuple[float, float, float]) -> None:
    """Fill a square of side 2·half+1 around pixel (cy, cx) with `color`, outlined in black, in place."""
    _, H, W = img.shape
    y, x = int(cy), int(cx)
    y0, y1, x0, x1 = max(0, y - half - 1), min(H, y + half + 2), max(0, x - half - 1), min(W, x + half + 2)
    img[:, y0:y1, x0:x1] = -1.0
    y0, y1, x0, x1 = max(0, y - half), min(H, y + half + 1), max(0, x - half), min(W, x + half + 1)
    img[:, y0:y1, x0:x1] = torch.tensor(color, dtype=img.dtype).view(3, 1, 1)


def correspondence_picture(frames: Tensor, corr: Correspondence, point: tuple[float, float] = (0.5, 0.5),
                           frame: int = 0) -> Tensor:
    """frames [F, 3, H, W] in [-1, 1] with the query token at relative `point` of `frame` and its
    K matches drawn in every other frame. Returns a new tensor."""
    if frames.ndim != 4 or frames.shape[0] != corr.frames:
        raise ValueError(f"correspondence_picture: {corr.frames} frames in the correspondence, "
                         f"frames tensor {tuple(frames.shape)}")
    if not 0 <= frame < corr.frames:
        raise ValueError(f"correspondence_picture: frame must be in [0, {corr.frames}), got {frame}")
    out = frames.detach().float().cpu().clone()
    (h, w), (H, W) = corr.hw, frames.shape[-2:]
    ch, cw = H / h, W / w
    half = max(2, int(min(ch, cw)) // 2)
    n = point_token(point, corr.hw)
    centre = lambda idx: ((idx // w + 0.5) * ch, (idx % w + 0.5) * cw)  # noqa: E731
    _square(out[frame], *centre(n), half, QUERY_COLOR)
    for j in range(corr.frames):
        if j == frame:
            continue
        for rank in reversed(range(corr.k)):
            _square(out[j], *centre(int(corr.idx[frame, n, j, rank])), half, RANK_COLORS[rank % len(RANK_COLORS)])
    return out
