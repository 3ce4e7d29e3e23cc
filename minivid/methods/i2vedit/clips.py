"""Auto-regressive clips (§4.1): a long video is edited clip by clip, each conditioned on the previous one.

    clip_ranges(21)          # [(0, 11), (10, 21)]   11-frame clips overlapping by 1 (the authors' data.py)
    clip_ranges(25, 14, 1)   # [(0, 14), (13, 25)]

Boundaries as the authors' `VideoIO.read_video_iter`: a clip starts `overlap` frames before the end of
the previous one and holds `clip_len` frames, the last one whatever is left (it may be shorter). When
the clips are written back, every clip after the first drops its first `overlap` frames, so the shared
frame is written once.
"""
from __future__ import annotations

__all__ = ["clip_ranges"]


def clip_ranges(num_frames: int, clip_len: int = 11, overlap: int = 1) -> list[tuple[int, int]]:
    """[(start, end)] half-open frame ranges covering 0 … num_frames − 1."""
    if clip_len < 2:
        raise ValueError(f"clip_ranges: clip_len must be at least 2, got {clip_len}")
    if not 0 <= overlap < clip_len:
        raise ValueError(f"clip_ranges: overlap must be in [0, clip_len), got {overlap} with clip_len {clip_len}")
    if num_frames < clip_len:
        raise ValueError(f"the video has {num_frames} frames, fewer than one clip ({clip_len}); "
                         f"give a longer video or a shorter clip length")
    ranges, begin = [], 0
    while begin < num_frames:
        start = max(begin - overlap, 0)
        end = min(start + clip_len, num_frames)
        ranges.append((start, end))
        begin = end
    return ranges
