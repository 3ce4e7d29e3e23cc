"""Auto-regressive clips (§4.1): a long video is edited clip by clip, each conditioned on the previous one,
and the authors' recipe for them.

    clip_ranges(21)                     # [(0, 11), (10, 21)]   11-frame clips overlapping by 1 (data.py)
    clip_ranges(25, 14, 1)              # [(0, 14), (13, 25)]
    clip_ranges(41, 11, 1, later_len=16)   # [(0, 11), (10, 26), (25, 41)]: the authors' recipe

Boundaries as the authors' `VideoIO.read_video_iter`: a clip starts `overlap` frames before the end of
the previous one and holds `clip_len` frames, the last one whatever is left (it may be shorter). When
the clips are written back, every clip after the first drops its first `overlap` frames, so the shared
frame is written once.

The recipe (`RECIPES`). The authors run two configs: `config/customize_train.yaml` edits clip 0 only
(`begin_clip_id: 0`, `end_clip_id: 1`, lines 45–46) with 11-frame clips sampled at 2.5 fps, output_fps 5 (fps id 4),
300 LoRA steps, skip-interval attention off; their README ("Reuse data for subsequent clips", lines
150–157) sends every later clip to `config/customize_subsequent_edit.yaml`: 16-frame clips sampled at
7 fps, output_fps 7 (fps id 6), 250 LoRA steps (`max_train_steps: 250`) and
`use_consistency_attention_control: true` — skip-interval cross-attention to clip 0 while inverting,
editing AND training the motion LoRA. `FIRST` and `SUBSEQUENT` hold those settings; the "authors"
recipe gives clip 0 the first and clips k ≥ 1 the second, "uniform" gives every clip the first.

`plan_frames` says which source frames each clip reads: clip 0 the authors' time grid
(np.linspace over [start_t, end_t) × fps, data.py `read_video_iter`) at its recipe's sample fps; clip
k ≥ 1 continues from the source frame clip k − 1 ended on (its overlap frame, the frame the edit of
clip k is conditioned on) at its own sample fps.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from minivid.video import time_grid

__all__ = ["clip_ranges", "ClipRecipe", "FIRST", "SUBSEQUENT", "RECIPES", "recipe_for", "plan_frames", "FramePlan"]


@dataclass(frozen=True)
class ClipRecipe:
    """The settings of one clip in the authors' configs."""

    name: str               # "first" | "subsequent"
    clip_len: int           # data_params.chunk_size
    sample_fps: float       # data_params.sample_fps
    output_fps: float       # data_params.output_fps (fps id = output_fps − 1)
    skip_interval: bool     # use_consistency_attention_control (inversion, editing and LoRA training)
    tune_steps: int         # train_motion_lora_params.max_train_steps
    checkpoint_every: int   # train_motion_lora_params.checkpointing_steps

    def to_dict(self) -> dict:
        return asdict(self)


# config/customize_train.yaml: chunk_size 11 (l. 38), sample_fps 2.5 (l. 37), output_fps 5 (l. 41),
# use_consistency_attention_control false (l. 20), max_train_steps 300 (l. 64), checkpointing_steps 50 (l. 66)
FIRST = ClipRecipe("first", 11, 2.5, 5, False, 300, 50)
# config/customize_subsequent_edit.yaml: chunk_size 16 (l. 45), sample_fps 7 (l. 44), output_fps 7 (l. 48),
# use_consistency_attention_control true (l. 20), max_train_steps 250 (l. 71), checkpointing_steps 250 (l. 73)
SUBSEQUENT = ClipRecipe("subsequent", 16, 7.0, 7, True, 250, 250)
RECIPES = ("authors", "uniform")


def recipe_for(k: int, recipe: str = "authors") -> ClipRecipe:
    """The settings of clip k: "authors" FIRST for clip 0, SUBSEQUENT after; "uniform" FIRST for all."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    return FIRST if recipe == "uniform" or k == 0 else SUBSEQUENT


def clip_ranges(num_frames: int, clip_len: int = 11, overlap: int = 1,
                later_len: int | None = None) -> list[tuple[int, int]]:
    """[(start, end)] half-open frame ranges covering 0 … num_frames − 1; clip 0 holds `clip_len` frames,
    the later ones `later_len` (default: clip_len)."""
    later = clip_len if later_len is None else later_len
    if clip_len < 2 or later < 2:
        raise ValueError(f"clip_ranges: clip lengths must be at least 2, got {clip_len} and {later}")
    if not 0 <= overlap < min(clip_len, later):
        raise ValueError(f"clip_ranges: overlap must be in [0, clip_len), got {overlap} with clip lengths "
                         f"{clip_len}, {later}")
    if num_frames < clip_len:
        raise ValueError(f"the video has {num_frames} frames, fewer than one clip ({clip_len}); "
                         f"give a longer video or a shorter clip length")
    ranges, begin = [], 0
    while begin < num_frames:
        start = max(begin - overlap, 0)
        end = min(start + (clip_len if not ranges else later), num_frames)
        ranges.append((start, end))
        begin = end
    return ranges


def _continue(start: int, end: int, fps: float, sample_fps: float) -> list[int]:
    """The time grid from source frame `start` to `end` (frames): the authors' linspace with the times in
    frames, so it starts exactly on `start` (clip k ≥ 1 continues from clip k − 1's last frame)."""
    n = int((end - start) / fps * sample_fps + 1e-9)
    return [int(start + i * (end - start) / n) for i in range(n)] if n > 0 else []


@dataclass
class FramePlan:
    """Which source frames are read, in output order, and how they split into clips."""

    indices: list[int]                  # source frame index of every frame of the edit (overlap frames once)
    ranges: list[tuple[int, int]]       # clips over `indices` (as clip_ranges)
    sample_fps: list[float | None]      # per clip; None: frame-based (--stride)
    mode: str                           # "time" | "frames"

    def clip_sources(self) -> list[list[int]]:
        return [self.indices[s:e] for s, e in self.ranges]


def plan_frames(total: int, fps: float | None, num_frames: int, recipe: str = "authors", overlap: int = 1,
                clip_len: int | None = None, sample_fps: float | None = None, stride: int = 1,
                first_end_t: float | None = 8.4) -> FramePlan:
    """The source frames of an edit of at most `num_frames` frames.

    Time-based (the default, when the video's `fps` is known and `stride` is 1): clip 0 reads the grid of
    np.linspace(0, ⌊end_t·fps⌋, ⌊end_t·sample_fps⌋) (end_t = min(`first_end_t`, the duration); the
    authors' first config has end_t 8.4), clip k ≥ 1 the grid at its sample fps from clip k − 1's last
    source frame to the end of the video. `sample_fps` overrides every clip's. Frame-based (`fps` None
    or 0, or `stride` > 1): every `stride`-th frame. `clip_len` overrides every clip's length."""
    len0 = clip_len or recipe_for(0, recipe).clip_len
    len1 = clip_len or recipe_for(1, recipe).clip_len
    if not fps or stride > 1:
        idx = list(range(0, total, stride))[:num_frames]
        ranges = clip_ranges(len(idx), len0, overlap, len1)
        return FramePlan(idx, ranges, [None] * len(ranges), "frames")
    fps0 = sample_fps or recipe_for(0, recipe).sample_fps
    grid0 = time_grid(fps, fps0, 0.0, first_end_t, total)
    end0 = min(total / fps, first_end_t or total / fps) * fps
    idx = grid0[:min(len0, num_frames)]
    if len(idx) < min(len0, num_frames):
        raise ValueError(f"at {fps0:g} fps the first {end0 / fps:.2f} s of the video give {len(grid0)} frames, fewer "
                         f"than clip 0's {min(len0, num_frames)}; give a longer video, a higher --sample-fps or a "
                         f"shorter clip")
    fpss = [fps0]
    k = 1
    while len(idx) < num_frames and idx and idx[-1] < total - 1:
        fk = sample_fps or recipe_for(k, recipe).sample_fps
        start = idx[-overlap] if overlap else idx[-1]
        grid = [i for i in _continue(start, total, fps, fk) if i > idx[-1]]
        if not grid:
            break
        new = grid[:len1 - overlap][:num_frames - len(idx)]
        idx += new
        fpss.append(fk)
        k += 1
    ranges = clip_ranges(len(idx), len0, overlap, len1)
    return FramePlan(idx, ranges, fpss[:len(ranges)], "time")
