"""Frame grids a person can read: labelled rows, frame numbers, an optional colour legend, and small
frames enlarged with nearest neighbour (pixels stay pixels) so that a 32-pixel test clip is visible.

    grid = labelled_grid(torch.cat([source, edited]), rows=["source", "edited"])      # uint8 [H, W, 3]
    save_labelled_grid("grid.png", frames, rows=["source"], legend=[((255, 255, 255), "query point")])

Layout: a title band (optional), a header band with the frame numbers over the columns ("FRAME 0",
"FRAME 1", ... or "0", "1", ... under a "FRAME" heading when the cells are narrow), a band on the left with the row labels,
the cells separated by a 2-pixel gutter (`scale` pixels at most), and a legend band at the bottom:
a coloured swatch and its text per entry. Without `rows`, frames are tiled ⌈√F⌉ per row and every
cell is numbered over its own row. Text is minivid.font's 5×7 glyphs at an integer scale chosen
from the cell size (2 up to 127-pixel cells, then one more per 64 pixels, at most 6).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from minivid.font import draw_text, text_size

__all__ = ["labelled_grid", "save_labelled_grid", "upscale_factor", "text_scale", "BACKGROUND", "INK"]

BACKGROUND = (24, 24, 24)
INK = (235, 235, 235)
MIN_CELL = 128          # small frames are enlarged (by an integer factor) to at least this many pixels a side

Color = tuple[int, int, int]


def upscale_factor(h: int, w: int, min_cell: int = MIN_CELL) -> int:
    """The integer nearest-neighbour factor that brings the smaller side of an h×w frame to ≥ min_cell."""
    return max(1, math.ceil(min_cell / max(1, min(h, w))))


def text_scale(cell_h: int) -> int:
    """Glyph scale for cells `cell_h` pixels high: 2 below 128, +1 per 64 pixels above, at most 6."""
    return int(min(6, max(2, 2 + (cell_h - 64) // 64)))


def _to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """[F, 3, H, W] in [-1, 1] (tensor) or uint8 [F, H, W, 3] -> uint8 [F, H, W, 3]."""
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"labelled_grid: a numpy input must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
        return frames
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"labelled_grid: frames must be [F, 3, H, W], got {tuple(frames.shape)}")
    from minivid.video import to_uint8

    return to_uint8(frames.detach().float().cpu())


def labelled_grid(frames: torch.Tensor | np.ndarray, rows: Sequence[str] | None = None, cols: int | None = None,
                  legend: Sequence[tuple[Color, str]] | None = None, title: str | None = None,
                  numbers: Sequence[str] | None = None, min_cell: int = MIN_CELL) -> np.ndarray:
    """The picture as uint8 [H, W, 3].

    rows: one label per row; the frames are split evenly into the rows (F must divide) and the
    columns numbered once at the top (`numbers` overrides the column labels). Without rows, frames
    are tiled `cols` per row (default ⌈√F⌉) and every cell is labelled with its index (or
    `numbers[i]`). legend: (RGB colour, text) entries drawn under the grid.
    """
    images = _to_uint8(frames)
    F, H, W, _ = images.shape
    if F == 0:
        raise ValueError("labelled_grid: no frames")
    if rows is not None:
        rows = list(rows)
        if not rows or F % len(rows):
            raise ValueError(f"labelled_grid: {F} frames do not split into {len(rows)} rows")
        cols = F // len(rows)
    cols = max(1, min(cols or math.ceil(math.sqrt(F)), F))
    n_rows = math.ceil(F / cols)
    if numbers is not None and len(numbers) != (cols if rows is not None else F):
        raise ValueError(f"labelled_grid: {len(numbers)} numbers for {cols if rows is not None else F} labels")
    up = upscale_factor(H, W, min_cell)
    ch, cw = H * up, W * up
    s = text_scale(ch)
    gap = min(2 * s, 8)
    pad = 2 * s
    line_h = text_size("X", s)[0] + 2 * pad                  # a band holding one line of text

    def cell_label(i: int) -> str:
        if numbers is not None:
            return numbers[i]
        long = f"frame {i}"
        return long if text_size(long, s)[1] + 2 * pad <= cw else str(i)

    n_labels = cols if rows is not None else F
    # a column is as wide as its cell or its widest label ("prompt 0" over a 128-pixel cell), the cell
    # centred in it: labels never overlap the next column nor run off the picture
    col_w = max([cw] + [text_size(cell_label(i), s)[1] + 2 * pad for i in range(n_labels)])
    off = (col_w - cw) // 2
    left = 0
    if rows is not None:
        left = max(text_size(r, s)[1] for r in rows) + 2 * pad
    per_row_header = rows is None                             # tiled: each row numbers its own cells
    header_h = line_h
    title_h = line_h if title else 0
    legend_lines: list[list[tuple[Color, str]]] = []
    grid_w = left + cols * col_w + (cols - 1) * gap
    if title:
        grid_w = max(grid_w, text_size(title, s)[1] + 2 * pad)      # the title is never cut
    if legend:
        sw = text_size("X", s)[0]                             # swatch side = glyph height
        line: list[tuple[Color, str]] = []
        used = pad
        for color, text in legend:
            need = sw + pad + text_size(text, s)[1] + 3 * pad
            if line and used + need > max(grid_w, 1):
                legend_lines.append(line)
                line, used = [], pad
            line.append((color, text))
            used += need
        legend_lines.append(line)
    legend_h = len(legend_lines) * line_h + (pad if legend_lines else 0)
    block_h = (header_h if per_row_header else 0) + ch
    total_h = title_h + (0 if per_row_header else header_h) + n_rows * block_h + (n_rows - 1) * gap + legend_h
    canvas = np.empty((total_h, grid_w, 3), np.uint8)
    canvas[:] = BACKGROUND
    if title:
        draw_text(canvas, title, pad, pad, s, INK)
    y = title_h
    if not per_row_header:
        if numbers is None and left >= text_size("frame", s)[1] + 2 * pad and cell_label(0) == "0":
            draw_text(canvas, "frame", y + pad, pad, s, INK)           # the numbers' meaning, once
        for c in range(cols):
            x = left + c * (col_w + gap)
            draw_text(canvas, cell_label(c), y + pad, x + pad, s, INK)
        y += header_h
    for r in range(n_rows):
        if per_row_header:
            for c in range(cols):
                i = r * cols + c
                if i < F:
                    draw_text(canvas, cell_label(i), y + pad, left + c * (col_w + gap) + pad, s, INK)
            y += header_h
        if rows is not None:
            draw_text(canvas, rows[r], y + (ch - text_size("X", s)[0]) // 2, pad, s, INK)
        for c in range(cols):
            i = r * cols + c
            if i >= F:
                continue
            x = left + c * (col_w + gap) + off
            canvas[y:y + ch, x:x + cw] = images[i].repeat(up, axis=0).repeat(up, axis=1)
        y += ch + gap
    y -= gap
    y += pad if legend_lines else 0
    sw = text_size("X", s)[0]
    for line in legend_lines:
        x = pad
        for color, text in line:
            canvas[y + pad - 1: y + pad + sw + 1, x - 1: x + sw + 1] = INK        # light outline
            canvas[y + pad: y + pad + sw, x: x + sw] = np.asarray(color, np.uint8)
            x += sw + pad
            draw_text(canvas, text, y + pad, x, s, INK)
            x += text_size(text, s)[1] + 3 * pad
        y += line_h
    return canvas


def save_labelled_grid(path: str | Path, frames: torch.Tensor | np.ndarray, rows: Sequence[str] | None = None,
                       cols: int | None = None, legend: Sequence[tuple[Color, str]] | None = None,
                       title: str | None = None, numbers: Sequence[str] | None = None, overwrite: bool = False,
                       min_cell: int = MIN_CELL, inputs: Sequence[str | Path] = ()) -> Path:
    """`labelled_grid` written as a PNG through `minivid.outputs.write_bytes` (a fresh temporary file
    renamed into place; never onto one of `inputs`)."""
    from minivid.outputs import write_bytes
    from minivid.video import encode_png

    data = encode_png(labelled_grid(frames, rows, cols, legend, title, numbers, min_cell))
    return write_bytes(path, data, overwrite=overwrite, inputs=inputs)
