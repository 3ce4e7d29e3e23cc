"""Which files the metrics need, checking them before any compute, and tiny random stand-ins.

`DEFAULT_FILES`: where each encoder is looked for (weights/ of the working directory) and where it
comes from. `available`/`default_metrics`: the metrics run when none is named, every metric whose
weights are there (the others named with the missing file). `check_files` lists every missing file at once; `load_evaluator` loads what the asked
metrics need. `write_tiny_encoders(dir)` writes tiny RANDOM encoders in the official layouts (for
tests and for trying the command without downloads: the numbers they give mean nothing);
`tiny_evaluator()` builds the same in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from minivid.eval.encoders import (
    AESTHETIC_SOURCE, CLIP_PRESETS, CLIP_SOURCE, DINO_SOURCE, PICKSCORE_SOURCE, AestheticPredictor, DINOViT, build_clip,
    clip_config_to_transformers, load_aesthetic, load_clip, load_dino, missing_message,
)
from minivid.eval.amt import AMT, AMT_SOURCE, load_amt
from minivid.eval.catalog import FILES
from minivid.eval.metrics import METRICS, RUN_WHEN_PRESENT, Evaluator
from minivid.eval.musiq import MUSIQ, MUSIQ_SOURCE, load_musiq

__all__ = ["WeightsFile", "DEFAULT_FILES", "needed", "check_files", "available", "default_metrics", "load_evaluator",
           "write_tiny_encoders", "tiny_evaluator", "TINY_FILES"]


@dataclass(frozen=True)
class WeightsFile:
    path: Path
    what: str
    source: str


_SOURCES = {"clip": CLIP_SOURCE, "dino": DINO_SOURCE, "aesthetic": AESTHETIC_SOURCE, "amt": AMT_SOURCE,
            "musiq": MUSIQ_SOURCE, "pickscore": PICKSCORE_SOURCE}
DEFAULT_FILES: dict[str, WeightsFile] = {key: WeightsFile(Path(path), what, _SOURCES[key])
                                         for key, (path, what) in FILES.items()}
TINY_FILES = {"clip": "tiny-clip.safetensors", "openclip": "tiny-openclip.safetensors", "dino": "tiny-dino.pth",
              "aesthetic": "tiny-aesthetic.pth", "amt": "tiny-amt.pth", "musiq": "tiny-musiq.pth",
              "pickscore": "tiny-pickscore"}


def needed(metrics: Iterable[str]) -> list[str]:
    """The encoders (keys of DEFAULT_FILES) the metrics need, in order; aesthetic quality also needs CLIP ViT-L/14."""
    keys = []
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
        for k in METRICS[m][0]:
            if k not in keys:
                keys.append(k)
    return keys


def available(paths: dict[str, str | Path | None], metrics: Iterable[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """Which of `metrics` can run with the files present: (metrics, {skipped metric: why}). The default of
    `minivid eval` and `edit --eval`: a metric runs when its encoders are there, and the others are named."""
    run, skipped = [], {}
    for m in metrics:
        missing = []
        for key in needed([m]):
            path = Path(paths.get(key) or DEFAULT_FILES[key].path)
            if not path.exists():
                missing.append(f"{path} ({DEFAULT_FILES[key].what}) not found")
        if missing:
            skipped[m] = "; ".join(missing)
        else:
            run.append(m)
    return tuple(run), skipped


def default_metrics(paths: dict[str, str | Path | None] | None = None) -> tuple[str, ...]:
    """The metrics run when none are named: every metric whose weights are present (given in `paths`,
    or the default in weights/)."""
    return available(paths or {}, METRICS)[0]


def check_files(paths: dict[str, str | Path | None], metrics: Iterable[str], option: str = "--metrics") -> dict[str, Path]:
    """The file of every encoder the metrics need (given, or the default in weights/).
    FileNotFoundError listing every missing one, with where it comes from, before anything is loaded."""
    chosen, missing = {}, []
    for key in needed(metrics):
        default = DEFAULT_FILES[key]
        path = Path(paths.get(key) or default.path)
        if not path.exists():
            missing.append(missing_message(path, default.what, default.source))
        chosen[key] = path
    if missing:
        raise FileNotFoundError(f"missing weights for the asked metrics (choose fewer with {option}):\n  "
                                + "\n  ".join(missing))
    return chosen


def load_evaluator(paths: dict[str, str | Path | None], metrics: Iterable[str], device: str | torch.device = "cpu",
                   progress: bool = False) -> Evaluator:
    """check_files, then load each encoder once; the aesthetic metric embeds with the --clip model,
    which must then be CLIP ViT-L/14 (the predictor's input)."""
    metrics = tuple(metrics)
    files = check_files(paths, metrics)
    clip = load_clip(files["clip"], device) if "clip" in files else None
    dino = load_dino(files["dino"], device) if "dino" in files else None
    aesthetic = load_aesthetic(files["aesthetic"], device) if "aesthetic" in files else None
    amt = load_amt(files["amt"], device) if "amt" in files else None
    musiq = load_musiq(files["musiq"], device) if "musiq" in files else None
    pick = load_clip(files["pickscore"], device) if "pickscore" in files else None
    if aesthetic is not None and (clip.kind != "openai" or clip.embed_dim != aesthetic.in_features):
        raise ValueError(f"aesthetic quality embeds the frames with CLIP ViT-L/14 (the LAION predictor's input, "
                         f"{aesthetic.in_features} dims); {files['clip']} is {clip.preset} ({clip.embed_dim} dims). "
                         f"Give a CLIP ViT-L/14 file, or leave aesthetic_quality out of --metrics")
    return Evaluator(clip=clip, dino=dino, aesthetic=aesthetic, aesthetic_clip=clip if aesthetic is not None else None,
                     amt=amt, musiq=musiq, pickscore=pick, progress=progress, metrics=metrics)


def _seeded(seed: int, build):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(state)


def _tiny_models(seed: int = 0):
    clip = _seeded(seed, lambda: build_clip("tiny_openai"))
    openclip = _seeded(seed + 1, lambda: build_clip("tiny_openclip"))
    dino = _seeded(seed + 2, lambda: DINOViT("tiny_dino").eval())
    aesthetic = _seeded(seed + 3, lambda: AestheticPredictor(clip.embed_dim).eval())
    amt = _seeded(seed + 4, lambda: AMT("tiny_amt").eval())
    musiq = _seeded(seed + 5, lambda: MUSIQ("tiny_musiq").eval())
    pick = _seeded(seed + 6, lambda: build_clip("tiny_pickscore"))
    return clip, openclip, dino, aesthetic, amt, musiq, pick


def tiny_evaluator(metrics: Iterable[str] | None = None, seed: int = 0, device: str | torch.device = "cpu",
                   progress: bool = False) -> Evaluator:
    """Tiny RANDOM encoders (CLIP width 32 on 32 px, DINO width 32 on 32 px, AMT for frames of 64 px
    and more, MUSIQ with 16 px patches): the machinery, no meaning. Default metrics: those that need
    no RUN_WHEN_PRESENT weights (name motion_smoothness / imaging_quality to have them)."""
    metrics = tuple(m for m in METRICS if m not in RUN_WHEN_PRESENT) if metrics is None else tuple(metrics)
    keys = needed(metrics)
    clip, _, dino, aesthetic, amt, musiq, pick = _tiny_models(seed)
    clip.model.to(device)
    pick.model.to(device)
    return Evaluator(clip=clip if "clip" in keys else None, dino=dino.to(device) if "dino" in keys else None,
                     aesthetic=aesthetic.to(device) if "aesthetic" in keys else None,
                     aesthetic_clip=clip if "aesthetic" in keys else None,
                     amt=amt.to(device) if "amt" in keys else None, musiq=musiq.to(device) if "musiq" in keys else None,
                     pickscore=pick if "pickscore" in keys else None, progress=progress, metrics=metrics)


def write_tiny_encoders(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write tiny RANDOM encoders in the official layouts: tiny-clip.safetensors (transformers'
    CLIPModel keys), tiny-openclip.safetensors (OpenCLIP's), tiny-dino.pth (DINO's), tiny-aesthetic.pth
    (LAION's Linear), tiny-amt.pth (amt-s.pth's layout: the tensors under "state_dict"), tiny-musiq.pth
    (pyiqa's MUSIQ keys). Returns name -> path."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clip, openclip, dino, aesthetic, amt, musiq, pick = _tiny_models(seed)
    out = {k: folder / v for k, v in TINY_FILES.items()}
    from minivid.outputs import write_file, write_json

    # PickScore: a transformers folder (config.json + model.safetensors), as yuvalkirstain/PickScore_v1 is laid out
    out["pickscore"].mkdir(exist_ok=True)
    write_json(out["pickscore"] / "config.json", clip_config_to_transformers(*CLIP_PRESETS["tiny_pickscore"]))
    pick_state = {k: v.contiguous() for k, v in pick.model.state_dict().items()}
    write_file(out["pickscore"] / "model.safetensors", lambda tmp: save_file(pick_state, tmp))
    for key, model in (("clip", clip.model), ("openclip", openclip.model)):
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        write_file(out[key], lambda tmp, state=state: save_file(state, tmp))
    for key, model in (("dino", dino), ("aesthetic", aesthetic), ("amt", amt), ("musiq", musiq)):
        state = {"state_dict": model.state_dict()} if key == "amt" else model.state_dict()
        write_file(out[key], lambda tmp, state=state: torch.save(state, tmp))
    return out
