"""A 5×7 bitmap font for the labels of minivid's pictures (no font file, no imaging library).

    mask = text_mask("frame 3")                 # bool [7, 41]: 6 columns per character, the last one blank
    draw_text(canvas, "SOURCE", y=4, x=4, scale=2, color=(255, 255, 255))   # into a uint8 [H, W, 3] array

Upper-case letters, digits, the space and `. , : ; - + = / # % ( ) [ ] _ ' ! ? < > *`; lower-case
letters are drawn as upper-case, and any other character as a hollow box. Each glyph is 7 rows of 5
pixels ('#' = ink); `scale` repeats every pixel scale×scale times (nearest neighbour), so a label
is crisp at any size.
"""
from __future__ import annotations

import numpy as np

__all__ = ["GLYPHS", "GLYPH_H", "GLYPH_W", "ADVANCE", "text_mask", "text_size", "draw_text"]

GLYPH_H, GLYPH_W, ADVANCE = 7, 5, 6      # rows, columns, columns per character (one blank between)

_TABLE = """
A .###. #...# #...# ##### #...# #...# #...#
B ####. #...# #...# ####. #...# #...# ####.
C .###. #...# #.... #.... #.... #...# .###.
D ####. #...# #...# #...# #...# #...# ####.
E ##### #.... #.... ####. #.... #.... #####
F ##### #.... #.... ####. #.... #.... #....
G .###. #...# #.... #.### #...# #...# .####
H #...# #...# #...# ##### #...# #...# #...#
I .###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.
J ..### ...#. ...#. ...#. ...#. #..#. .##..
K #...# #..#. #.#.. ##... #.#.. #..#. #...#
L #.... #.... #.... #.... #.... #.... #####
M #...# ##.## #.#.# #.#.# #...# #...# #...#
N #...# #...# ##..# #.#.# #..## #...# #...#
O .###. #...# #...# #...# #...# #...# .###.
P ####. #...# #...# ####. #.... #.... #....
Q .###. #...# #...# #...# #.#.# #..#. .##.#
R ####. #...# #...# ####. #.#.. #..#. #...#
S .#### #.... #.... .###. ....# ....# ####.
T ##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..
U #...# #...# #...# #...# #...# #...# .###.
V #...# #...# #...# #...# #...# .#.#. ..#..
W #...# #...# #...# #.#.# #.#.# #.#.# .#.#.
X #...# #...# .#.#. ..#.. .#.#. #...# #...#
Y #...# #...# .#.#. ..#.. ..#.. ..#.. ..#..
Z ##### ....# ...#. ..#.. .#... #.... #####
0 .###. #...# #..## #.#.# ##..# #...# .###.
1 ..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.
2 .###. #...# ....# ...#. ..#.. .#... #####
3 ####. ....# ....# .###. ....# ....# ####.
4 ...#. ..##. .#.#. #..#. ##### ...#. ...#.
5 ##### #.... ####. ....# ....# #...# .###.
6 ..##. .#... #.... ####. #...# #...# .###.
7 ##### ....# ...#. ..#.. .#... .#... .#...
8 .###. #...# #...# .###. #...# #...# .###.
9 .###. #...# #...# .####. ....# ...#. .##..
. ..... ..... ..... ..... ..... .##.. .##..
, ..... ..... ..... ..... .##.. ..#.. .#...
: ..... .##.. .##.. ..... .##.. .##.. .....
; ..... .##.. .##.. ..... .##.. ..#.. .#...
- ..... ..... ..... ##### ..... ..... .....
+ ..... ..#.. ..#.. ##### ..#.. ..#.. .....
= ..... ..... ##### ..... ##### ..... .....
/ ....# ....# ...#. ..#.. .#... #.... #....
# .#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.
% ##..# ##..# ...#. ..#.. .#... #..## #..##
( ...#. ..#.. .#... .#... .#... ..#.. ...#.
) .#... ..#.. ...#. ...#. ...#. ..#.. .#...
[ .###. .#... .#... .#... .#... .#... .###.
] .###. ...#. ...#. ...#. ...#. ...#. .###.
_ ..... ..... ..... ..... ..... ..... #####
' ..#.. ..#.. .#... ..... ..... ..... .....
! ..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..
? .###. #...# ....# ...#. ..#.. ..... ..#..
< ...#. ..#.. .#... #.... .#... ..#.. ...#.
> .#... ..#.. ...#. ....# ...#. ..#.. .#...
* ..... #.#.# .###. ##### .###. #.#.# .....
"""


def _parse(table: str) -> dict[str, np.ndarray]:
    glyphs = {}
    for line in table.strip().splitlines():
        char, *rows = line.split(" ")
        rows = [r[:GLYPH_W] for r in rows]
        assert len(rows) == GLYPH_H and all(len(r) == GLYPH_W for r in rows), line
        glyphs[char] = np.array([[c == "#" for c in r] for r in rows], dtype=bool)
    glyphs[" "] = np.zeros((GLYPH_H, GLYPH_W), dtype=bool)
    return glyphs


GLYPHS: dict[str, np.ndarray] = _parse(_TABLE)
_UNKNOWN = np.zeros((GLYPH_H, GLYPH_W), dtype=bool)
_UNKNOWN[[0, -1], :] = _UNKNOWN[:, [0, -1]] = True


def text_mask(text: str) -> np.ndarray:
    """bool [7, 6·len(text) − 1]: the ink of `text` at scale 1 (empty text: [7, 0])."""
    if not text:
        return np.zeros((GLYPH_H, 0), dtype=bool)
    out = np.zeros((GLYPH_H, ADVANCE * len(text) - 1), dtype=bool)
    for i, ch in enumerate(text):
        out[:, i * ADVANCE: i * ADVANCE + GLYPH_W] = GLYPHS.get(ch.upper(), _UNKNOWN)
    return out


def text_size(text: str, scale: int = 1) -> tuple[int, int]:
    """(height, width) in pixels of `text` drawn at `scale`."""
    return GLYPH_H * scale, max(0, ADVANCE * len(text) - 1) * scale


def draw_text(canvas: np.ndarray, text: str, y: int, x: int, scale: int = 1,
              color: tuple[int, int, int] = (255, 255, 255)) -> None:
    """Draw `text` with its top-left corner at (y, x) into a uint8 [H, W, 3] array, in place (clipped)."""
    if scale < 1:
        raise ValueError(f"scale must be at least 1, got {scale}")
    mask = text_mask(text).repeat(scale, axis=0).repeat(scale, axis=1)
    H, W = canvas.shape[:2]
    y0, x0 = max(0, y), max(0, x)
    y1, x1 = min(H, y + mask.shape[0]), min(W, x + mask.shape[1])
    if y1 <= y0 or x1 <= x0:
        return
    region = canvas[y0:y1, x0:x1]
    region[mask[y0 - y: y1 - y, x0 - x: x1 - x]] = np.asarray(color, dtype=canvas.dtype)
