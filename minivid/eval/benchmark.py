"""From a benchmark set to the papers' tables: the (video, prompt) pairs of a dataset, and the table
of a method's metrics over them.

- `read_dataset(path)`: the pairs of a LOVEU-TGVE-2023-style folder (videos plus a CSV of prompts),
  of such a CSV, or of a JSONL plan (one {"video", "prompt", ...} object per line), checked before
  anything runs;
- `summarize(records)`: mean ± sample standard deviation and the number of pairs per metric, with
  each frame-consistency column naming its pair definition;
- `REPORTED`: the numbers the papers print, with their setting, shown beside a method's row.

`minivid benchmark` (minivid/cli/benchmark.py) runs a method on every pair through the batch
machinery and scores the outputs with `minivid eval`'s metrics; docs/eval.md describes both.
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from minivid.jobs import jsonl_objects

__all__ = ["Pair", "DatasetError", "read_dataset", "COLUMNS", "summarize", "REPORTED", "REPORTED_SETTING", "setting_differences", "format_table", "VIDEO_SUFFIXES"]

VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
ID = re.compile(r"[^A-Za-z0-9._-]+")


class DatasetError(ValueError):
    """A dataset that cannot be read as asked; the message names the file and the line."""


@dataclass(frozen=True)
class Pair:
    """One (video, edit prompt) pair of a benchmark set."""

    id: str                            # folder-safe, unique: "<video>-<kind>" for LOVEU-TGVE
    video: str                         # a video file or a folder of frames
    prompt: str                        # the edit prompt
    source_prompt: str | None = None   # a caption of the source video (the tuning prompt of EI²/TCVE)
    kind: str | None = None            # LOVEU-TGVE's edit type: style, object, background, multiple
    first_frame: str | None = None     # I2VEdit's edited first frame (JSONL plans only)
    where: str = ""                    # file:line it was read from


# ---------------------------------------------------------------- reading a dataset

# the CSV headers recognised: LOVEU-TGVE-2023's ("Video name", "Our GT caption", "Style Change Caption",
# ..., "Multiple Changes Caption"; some copies write "Editing Text - Style Change") and a plain one
# ("video", "source_prompt", "prompt")
VIDEO_HEADERS = ("video name", "video", "video_name", "name")
SOURCE_HEADERS = ("our gt caption", "source_prompt", "source prompt", "caption", "gt caption")
COLUMNS = ("Video name", "Our GT caption", "<Kind> Change Caption ... (one column per edit), or video, prompt")


def _edit_kind(header: str) -> str | None:
    """The edit type a prompt column holds ('style' for 'Style Change Caption'), '' for a plain
    'prompt' column, None for any other column."""
    h = header.strip().lower()
    if h in ("prompt", "edit_prompt", "edit prompt", "target_prompt"):
        return ""
    h = re.sub(r"^editing text\s*-\s*", "", h)
    m = re.match(r"^([a-z]+)\s+changes?(\s+caption)?$", h)
    return m.group(1) if m else None


def _find_video(root: Path, section: str | None, name: str) -> Path | None:
    """LOVEU-TGVE's layout first (<section>/480p_videos/<name>.mp4, <section>/480p_frames/<name>/), then
    a video file or a frame folder of that name anywhere below the dataset folder."""
    places = []
    if section:
        places += [root / section / "480p_videos" / f"{name}{s}" for s in VIDEO_SUFFIXES]
        places += [root / section / "480p_frames" / name]
    places += [root / f"{name}{s}" for s in VIDEO_SUFFIXES] + [root / name]
    for p in places:
        if p.is_file() or (p.is_dir() and any(f.suffix.lower() in FRAME_SUFFIXES for f in p.iterdir())):
            return p
    for p in sorted(root.rglob(f"{name}*")):
        if p.is_file() and p.stem == name and p.suffix.lower() in VIDEO_SUFFIXES:
            return p
        if p.is_dir() and p.name == name and any(f.suffix.lower() in FRAME_SUFFIXES for f in p.iterdir()):
            return p
    return None


def _read_csv(path: Path, root: Path) -> list[Pair]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read the prompts CSV ({e})") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise DatasetError(f"{path}: empty CSV")
    header = [h.strip() for h in rows[0]]
    lower = [h.lower() for h in header]
    video_col = next((lower.index(h) for h in VIDEO_HEADERS if h in lower), None)
    if video_col is None:
        raise DatasetError(f"{path}:1: no video column: expected one of {', '.join(repr(h) for h in VIDEO_HEADERS)} "
                           f"(LOVEU-TGVE-2023: 'Video name'); the header is {header}")
    source_col = next((lower.index(h) for h in SOURCE_HEADERS if h in lower), None)
    prompt_cols = [(i, _edit_kind(h)) for i, h in enumerate(header) if i != source_col and _edit_kind(h) is not None]
    if not prompt_cols:
        raise DatasetError(f"{path}:1: no prompt column: expected 'prompt' or LOVEU-TGVE-2023's '<Kind> Change "
                           f"Caption' columns (Style/Object/Background/Multiple); the header is {header}")
    pairs, section = [], None
    for n, row in enumerate(rows[1:], 2):
        cells = [c.strip() for c in row] + [""] * (len(header) - len(row))
        name = cells[video_col]
        prompts = [(kind, cells[i]) for i, kind in prompt_cols if cells[i] and cells[i].lower() != "nan"]
        if not name:
            continue
        if not prompts:                       # a section row of the LOVEU-TGVE sheet ("DAVIS_480p", ...)
            if (root / name).is_dir():
                section = name
            continue
        video = _find_video(root, section, name)
        if video is None:
            raise DatasetError(f"{path}:{n}: video {name!r} not found under {root} (looked for "
                               f"{section + '/' if section else ''}480p_videos/{name}.mp4, 480p_frames/{name}/, "
                               f"{name}.mp4 or a folder of frames named {name})")
        source = cells[source_col] if source_col is not None and cells[source_col] else None
        for kind, prompt in prompts:
            pairs.append(Pair(id=ID.sub("-", f"{name}-{kind}" if kind else name).strip("-")[:128], video=str(video),
                              prompt=prompt, source_prompt=source, kind=kind or None, where=f"{path}:{n}"))
    return pairs


def _read_jsonl(path: Path) -> list[Pair]:
    pairs = []
    allowed = {"id", "video", "prompt", "source_prompt", "kind", "first_frame"}
    for where, obj in jsonl_objects(path, DatasetError):
        extra = set(obj) - allowed
        if extra:
            raise DatasetError(f"{where}: unknown keys {sorted(extra)}; allowed: {sorted(allowed)}")
        for key in ("video", "prompt"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise DatasetError(f"{where}: needs a non-empty {key!r}")
        video = Path(obj["video"])
        if not video.is_absolute():
            video = path.parent / video
        if not video.exists():
            raise DatasetError(f"{where}: video {obj['video']} not found ({video})")
        first = obj.get("first_frame")
        if first is not None:
            first = Path(first) if Path(first).is_absolute() else path.parent / first
            if not first.is_file():
                raise DatasetError(f"{where}: first_frame {obj['first_frame']} not found ({first})")
        raw_id = obj.get("id") or f"{video.stem}-{len(pairs)}"
        pid = ID.sub("-", str(raw_id)).strip("-")[:128]
        if not pid or pid != str(raw_id) and "id" in obj:
            raise DatasetError(f"{where}: id {obj['id']!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
        pairs.append(Pair(id=pid, video=str(video), prompt=obj["prompt"], source_prompt=obj.get("source_prompt"),
                          kind=obj.get("kind"), first_frame=str(first) if first else None, where=where))
    return pairs


def read_dataset(path: str | Path, limit: int | None = None) -> list[Pair]:
    """The (video, prompt) pairs of a dataset: a folder holding one CSV of prompts (LOVEU-TGVE-2023's
    layout: <section>/480p_videos/<name>.mp4 or <section>/480p_frames/<name>/), a CSV (videos looked for
    beside it), or a JSONL plan. Every video is checked to exist and every id to be unique before
    anything runs. `limit`: the first n pairs."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such dataset (a folder with a CSV of prompts, a .csv or a .jsonl file)")
    if path.is_dir():
        csvs = sorted(path.glob("*.csv"))
        if len(csvs) != 1:
            raise DatasetError(f"{path}: expected one CSV of prompts in the folder, found "
                               f"{len(csvs)}{': ' + ', '.join(p.name for p in csvs) if csvs else ''}")
        pairs = _read_csv(csvs[0], path)
    elif path.suffix.lower() == ".csv":
        pairs = _read_csv(path, path.parent)
    elif path.suffix.lower() == ".jsonl":
        pairs = _read_jsonl(path)
    else:
        raise DatasetError(f"{path}: not a dataset: give a folder with a CSV of prompts, a .csv or a .jsonl plan")
    if not pairs:
        raise DatasetError(f"{path}: no (video, prompt) pairs")
    seen: dict[str, str] = {}
    for p in pairs:
        if p.id in seen:
            raise DatasetError(f"{p.where}: duplicate id {p.id!r} (also at {seen[p.id]}); ids name the output folders")
        seen[p.id] = p.where
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"--limit must be >= 1, got {limit}")
        pairs = pairs[:limit]
    return pairs


def pair_dict(pair: Pair) -> dict[str, Any]:
    return asdict(pair)


# ---------------------------------------------------------------- the table

# (column key, the metric of results.eval, the field of its result, the pair definition or note)
COLUMNS_OF_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("clip_text_alignment", "clip_text_alignment", "value", "mean cos(frame, prompt)"),
    ("clip_score", "clip_text_alignment", "clip_score", "100 x cos: LOVEU-TGVE's CLIP score"),
    ("frame_consistency_consecutive", "clip_frame_consistency", "value", "consecutive pairs (i, i+1)"),
    ("frame_consistency_all_pairs", "clip_frame_consistency", "all_pairs", "all pairs i != j (LOVEU-TGVE, TCVE)"),
    ("pickscore", "pickscore", "value", "mean over frames"),
    ("subject_consistency", "subject_consistency", "value", "VBench"),
    ("motion_smoothness", "motion_smoothness", "value", "VBench"),
    ("aesthetic_quality", "aesthetic_quality", "value", "VBench"),
    ("imaging_quality", "imaging_quality", "value", "VBench"),
)

# What the papers print, and in which setting: method -> column -> (value, where, setting).
REPORTED: dict[str, dict[str, tuple[float, str, str]]] = {
    "cove": {
        "subject_consistency": (0.9731, "COVE Table 1", "115 text-video pairs (23 videos x 5 prompts), SD 2.1"),
        "motion_smoothness": (0.9892, "COVE Table 1", "115 text-video pairs (23 videos x 5 prompts), SD 2.1"),
        "aesthetic_quality": (0.7122, "COVE Table 1", "115 text-video pairs (23 videos x 5 prompts), SD 2.1"),
        "imaging_quality": (0.7441, "COVE Table 1", "115 text-video pairs (23 videos x 5 prompts), SD 2.1"),
    },
    "ei2": {
        # EI² Table 1 prints CLIP scores x 100; "pairs of video frames" is not said to be consecutive or all
        "frame_consistency_all_pairs": (0.9594, "EI² Table 1 (95.94 / 100)",
                                        "75 edits of 15 videos (object, style), 8 frames at 512x512, SD 1.4"),
        "clip_score": (29.84, "EI² Table 1", "75 edits of 15 videos (object, style), 8 frames at 512x512, SD 1.4"),
    },
}


def _column_values(records: Iterable[dict[str, Any]]) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {c: [] for c, *_ in COLUMNS_OF_METRICS}
    for rec in records:
        metrics = rec.get("metrics") or {}
        for column, metric, field, _ in COLUMNS_OF_METRICS:
            v = (metrics.get(metric) or {}).get(field)
            if isinstance(v, (int, float)) and math.isfinite(v):
                values[column].append(float(v))
    return values


# The part of each paper's setting a run can be checked against: pairs = the number of scored pairs of the
# column, tiny = whether random tiny models ran (the papers ran the official weights), frames / size = what
# --frames / --size asked (None, the method's default, is not checked: EI²'s defaults are its paper's 8 frames
# at 512 px; COVE does not state its frame count).
REPORTED_SETTING: dict[str, dict[str, Any]] = {
    "cove": {"pairs": 115, "tiny": False},
    "ei2": {"pairs": 75, "tiny": False, "frames": 8, "size": 512},
}


def setting_differences(method: str | None, ran: dict[str, Any], n: int) -> list[str]:
    """How a run differs from the setting its paper's numbers were measured in ([] when it matches)."""
    needs = REPORTED_SETTING.get(method or "", {})
    got = {**ran, "pairs": n}
    out = []
    for key, want in needs.items():
        have = got.get(key)
        if have is None or have == want:
            continue
        if key == "tiny":
            out.append("tiny random models, not the official weights")
        else:
            out.append(f"{key} {have}, the paper {want}")
    return out


def summarize(records: list[dict[str, Any]], method: str | None = None,
              ran: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """column -> {"mean", "std" (sample, n - 1; 0 for one pair), "n", "pairs" (the definition), "reported"
    (the paper's number and setting, for the method's own paper) } over the scored items' results.eval.

    `ran`: what the run was ({"tiny", "frames", "size"}, see REPORTED_SETTING); when it, or the number of
    pairs, differs from the paper's setting, "reported" also holds "differs" (a list of the differences) and
    the table shows the paper's number only as not comparable."""
    out = {}
    for column, metric, _, note in COLUMNS_OF_METRICS:
        vals = _column_values(records)[column]
        if not vals:
            continue
        n = len(vals)
        mean = sum(vals) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
        entry: dict[str, Any] = {"mean": mean, "std": std, "n": n, "metric": metric, "definition": note}
        rep = REPORTED.get(method or "", {}).get(column)
        if rep is not None:
            entry["reported"] = {"value": rep[0], "where": rep[1], "setting": rep[2]}
            differs = setting_differences(method, ran or {}, n)
            if differs:
                entry["reported"]["differs"] = differs
        out[column] = entry
    return out


def format_table(tables: dict[str, dict[str, dict[str, Any]]], counts: dict[str, dict[str, int]]) -> str:
    """A Markdown table: one row per (method, column): mean ± std, n, the definition, the paper's number."""
    lines = ["| method | metric | mean ± std | n | definition | reported (setting) |", "|---|---|---|---|---|---|"]
    for method, table in tables.items():
        for column, e in table.items():
            rep = e.get("reported")
            rep_text = "" if not rep else (f"{rep['value']} ({rep['where']}: {rep['setting']})" if not rep.get("differs")
                                           else f"not comparable ({'; '.join(rep['differs'])}): {rep['where']}")
            lines.append(f"| {method} | {column} | {e['mean']:.4f} ± {e['std']:.4f} | {e['n']} | {e['definition']} "
                         f"| {rep_text} |")
        c = counts.get(method, {})
        lines.append(f"| {method} | (pairs) | {c.get('scored', 0)} scored | {c.get('failed', 0)} failed | | |")
    return "\n".join(lines)
