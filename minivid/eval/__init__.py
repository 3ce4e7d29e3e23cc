"""The papers' automatic metrics from minivid's own encoders (docs/eval.md).

- `encoders`: CLIP ViT-L/14 (transformers' layout), OpenCLIP ViT-H/14, DINO ViT-B/16, LAION's aesthetic
  predictor, each loading its official file strictly;
- `preprocess`: each metric's reference preprocessing, restated exactly;
- `metrics`: the formulas, and `Evaluator`, which runs the encoders on a video;
- `loading`: the files the metrics need (weights/), checked before any compute, and tiny random stand-ins.
"""
from minivid.eval.encoders import (
    AestheticPredictor, CLIPEncoder, DINOConfig, DINOViT, EncoderError, OpenAICLIPModel, build_clip, load_aesthetic,
    load_clip, load_dino,
)
from minivid.eval.loading import DEFAULT_FILES, check_files, load_evaluator, tiny_evaluator, write_tiny_encoders
from minivid.eval.metrics import (
    METRICS, Evaluator, aesthetic_quality, clip_frame_consistency, clip_text_alignment, subject_consistency,
)
from minivid.eval.preprocess import clip_preprocess_hf, clip_preprocess_vbench, dino_preprocess_vbench, pil_resize, to_uint8

__all__ = [
    "AestheticPredictor", "CLIPEncoder", "DINOConfig", "DINOViT", "EncoderError", "OpenAICLIPModel", "build_clip",
    "load_aesthetic", "load_clip", "load_dino", "DEFAULT_FILES", "check_files", "load_evaluator", "tiny_evaluator",
    "write_tiny_encoders", "METRICS", "Evaluator", "aesthetic_quality", "clip_frame_consistency",
    "clip_text_alignment", "subject_consistency", "clip_preprocess_hf", "clip_preprocess_vbench",
    "dino_preprocess_vbench", "pil_resize", "to_uint8",
]
