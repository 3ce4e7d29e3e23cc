"""The papers' automatic metrics from minivid's own encoders (docs/eval.md).

- `catalog`: the metrics and the encoder files they need, by name (no torch: the command line's help reads it);
- `encoders`: CLIP of any ViT size (transformers' layout), OpenCLIP ViT-H/14, DINO ViT-B/16, LAION's aesthetic
  predictor, each loading its official file strictly; `amt` (AMT-S) and `musiq` (MUSIQ);
- `preprocess`: each metric's reference preprocessing, restated exactly;
- `metrics`: the formulas, and `Evaluator`, which runs the encoders on a video;
- `loading`: the files the metrics need (weights/), checked before any compute, and tiny random stand-ins;
- `benchmark`: datasets to tables (`minivid benchmark`).

The names below are imported from their modules on first use, so that importing `minivid.eval.catalog`
does not import torch.
"""
from __future__ import annotations

import importlib

_HOME = {
    **dict.fromkeys(("AestheticPredictor", "CLIPEncoder", "DINOConfig", "DINOViT", "EncoderError", "OpenAICLIPModel",
                     "build_clip", "load_aesthetic", "load_clip", "load_dino"), "encoders"),
    **dict.fromkeys(("DEFAULT_FILES", "check_files", "load_evaluator", "tiny_evaluator", "write_tiny_encoders"),
                    "loading"),
    **dict.fromkeys(("Evaluator", "aesthetic_quality", "clip_frame_consistency", "clip_text_alignment",
                     "subject_consistency"), "metrics"),
    "METRICS": "catalog",
    **dict.fromkeys(("clip_preprocess_hf", "clip_preprocess_vbench", "dino_preprocess_vbench", "pil_resize",
                     "to_uint8"), "preprocess"),
}

__all__ = list(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
