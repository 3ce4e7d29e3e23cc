"""Labelled pictures: the 5×7 font (glyph table, deterministic rendering, sizes), the grid layout (label
bands, frame numbers, nearest-neighbour enlargement, legend), and the grids the jobs write."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from minivid.font import ADVANCE, GLYPH_H, GLYPHS, draw_text, text_mask, text_size
from minivid.pictures import BACKGROUND, INK, labelled_grid, save_labelled_grid, text_scale, upscale_factor


def test_glyph_table():
    needed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:-/()#%_'")
    assert needed <= set(GLYPHS)
    shapes = {g.shape for g in GLYPHS.values()}
    assert shapes == {(7, 5)}
    drawn = {c: g.tobytes() for c, g in GLYPHS.items() if c != " "}
    assert len(set(drawn.values())) == len(drawn)                 # no two characters look alike
    assert all(g.any() for c, g in GLYPHS.items() if c != " ") and not GLYPHS[" "].any()
    # "O" and "0" differ (the zero has its slash); "I" and "1" too
    assert not np.array_equal(GLYPHS["O"], GLYPHS["0"]) and not np.array_equal(GLYPHS["I"], GLYPHS["1"])


def test_text_rendering_is_deterministic_and_sized():
    m = text_mask("Frame 12")
    assert m.shape == (GLYPH_H, ADVANCE * 8 - 1) and m.dtype == bool
    assert np.array_equal(m, text_mask("FRAME 12"))              # lower case drawn as upper case
    assert np.array_equal(m[:, :5], GLYPHS["F"]) and not m[:, 5].any()    # one blank column between glyphs
    assert text_size("ab", 3) == (21, 33) and text_size("", 2) == (14, 0)
    a = np.zeros((30, 60, 3), np.uint8)
    b = np.zeros((30, 60, 3), np.uint8)
    draw_text(a, "7x", 2, 3, scale=2, color=(9, 8, 7))
    draw_text(b, "7x", 2, 3, scale=2, color=(9, 8, 7))
    assert np.array_equal(a, b)
    ink = np.argwhere(a.any(-1))
    assert ink.min(0).tolist() == [2, 3] and np.unique(a.reshape(-1, 3), axis=0).tolist() == [[0, 0, 0], [9, 8, 7]]
    assert np.array_equal(a[2:16:2, 3:13:2, 0] > 0, GLYPHS["7"])    # scale 2 = each pixel doubled
    draw_text(a, "clipped at the edge", 25, 50, scale=2)           # clipped, no error
    with pytest.raises(ValueError, match="scale"):
        draw_text(a, "x", 0, 0, scale=0)
    unknown = text_mask("é")
    assert unknown[0].all() and unknown[-1].all() and unknown[:, 0].all()   # a hollow box


def test_scales():
    assert upscale_factor(32, 48) == 4 and upscale_factor(512, 512) == 1 and upscale_factor(100, 300) == 2
    assert text_scale(32) == 2 and text_scale(128) == 3 and text_scale(512) == 6


def frames(n, h=32, w=32, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_grid_with_row_labels_and_frame_numbers():
    f = frames(6)
    grid = labelled_grid(f, rows=["source", "edited"])
    s, up = text_scale(128), 4
    pad, gap = 2 * s, min(2 * s, 8)
    header = GLYPH_H * s + 2 * pad
    left = text_size("edited", s)[1] + 2 * pad
    assert left == text_size("source", s)[1] + 2 * pad
    assert grid.shape == (header + 2 * 128 + gap, left + 3 * 128 + 2 * gap, 3)
    # cells: nearest-neighbour enlargement of the frames, in order
    from minivid.video import to_uint8
    cells = to_uint8(f)
    for i in range(6):
        r, c = divmod(i, 3)
        y, x = header + r * (128 + gap), left + c * (128 + gap)
        assert np.array_equal(grid[y:y + 128, x:x + 128], cells[i].repeat(up, 0).repeat(up, 1))
    # the bands: background with white ink where the labels are
    band = grid[:header]
    assert set(map(tuple, np.unique(band.reshape(-1, 3), axis=0))) == {BACKGROUND, INK}
    row0 = grid[header:header + 128, :left]
    ink_rows = np.argwhere((row0 == INK).all(-1))
    expect = np.zeros((GLYPH_H * s, text_size("source", s)[1]), bool)
    expect[:] = text_mask("source").repeat(s, 0).repeat(s, 1)
    y0, x0 = ink_rows.min(0)
    assert np.array_equal((row0[y0:y0 + GLYPH_H * s, x0:x0 + expect.shape[1]] == INK).all(-1), expect)
    # the column numbers: "0" over the first cell, "1" over the second
    num = (band[pad:pad + GLYPH_H * s, left + pad: left + pad + 5 * s] == INK).all(-1)
    assert np.array_equal(num, GLYPHS["0"].repeat(s, 0).repeat(s, 1))
    assert np.array_equal(labelled_grid(f, rows=["source", "edited"]), grid)            # deterministic
    with pytest.raises(ValueError, match="do not split"):
        labelled_grid(frames(5), rows=["source", "edited"])


def test_tiled_grid_numbers_every_cell_and_large_frames_keep_their_size():
    grid = labelled_grid(frames(5, 256, 320))
    s = text_scale(256)
    header = GLYPH_H * s + 4 * s
    gap = min(2 * s, 8)
    assert grid.shape == (2 * (header + 256) + gap, 3 * 320 + 2 * gap, 3)             # 3 columns, no enlargement
    assert np.array_equal(grid[header + 256 + gap + header:][:256, 2 * (320 + gap):], np.full((256, 320, 3), BACKGROUND, np.uint8))


def test_legend_and_title(tmp_path):
    legend = [((255, 255, 255), "query point"), ((255, 0, 0), "match 1"), ((255, 76, 0), "match 2")]
    plain = labelled_grid(frames(4), rows=["source"])
    grid = labelled_grid(frames(4), rows=["source"], legend=legend, title="query: frame 0")
    s = text_scale(128)
    line = GLYPH_H * s + 4 * s
    assert grid.shape[0] == plain.shape[0] + 2 * line + 2 * s and grid.shape[1] == plain.shape[1]
    bottom = grid[-line:]
    for color, _ in legend:                                       # every swatch is there, at glyph size
        hit = (bottom == np.asarray(color, np.uint8)).all(-1)
        assert hit.sum() >= (GLYPH_H * s) ** 2
    path = save_labelled_grid(tmp_path / "pic.png", frames(4), rows=["source"], legend=legend)
    from minivid.video import read_image, to_uint8
    assert np.array_equal(to_uint8(read_image(path)[None])[0], labelled_grid(frames(4), rows=["source"], legend=legend))
    with pytest.raises(FileExistsError):
        save_labelled_grid(path, frames(4))


def test_edit_grid_written_by_a_job_is_labelled(tmp_path):
    from minivid.cli.common import write_edit
    from minivid.jobs import Job

    job = Job("x", tmp_path / "job", {})
    write_edit(job, frames(3), frames(3, seed=1))
    job.finish()
    from minivid.video import read_image, to_uint8
    got = to_uint8(read_image(job.path("grid.png"))[None])[0]
    assert np.array_equal(got, labelled_grid(torch.cat([frames(3), frames(3, seed=1)]), rows=["source", "edited"]))


def test_column_labels_wider_than_their_cells_neither_overlap_nor_get_cut():
    """`generated.png` of the plain demo: "prompt 0" / "prompt 1" over 32-px images (enlarged to 128): each
    column is as wide as its label, the gutter between columns and the picture's right margin hold no ink."""
    frames = torch.zeros(2, 3, 32, 32)
    grid = labelled_grid(frames, rows=["generated"], numbers=["prompt 0", "prompt 1"])
    s = text_scale(128)
    pad, gap = 2 * s, min(2 * s, 8)
    left = text_size("generated", s)[1] + 2 * pad
    col = text_size("prompt 0", s)[1] + 2 * pad
    assert col > 128 and grid.shape[1] == left + 2 * col + gap
    header = (grid[:GLYPH_H * s + 2 * pad] == INK).all(-1)
    assert header[:, left:left + col].any() and header[:, left + col + gap:].any()
    assert not header[:, left + col - pad:left + col + gap + pad].any()           # between the two labels
    assert not header[:, -pad:].any()                                              # "1" is not cut off
