"""The metrics and the encoder files they need, by name only: no torch, so that `minivid eval --help`,
`minivid edit --help` and `minivid benchmark --help` list them without importing a model (issue 17).

`minivid.eval.metrics` (the formulas) and `minivid.eval.loading` (the files, with their sources) build on
these tables; this module holds nothing else.
"""
from __future__ import annotations

__all__ = ["METRICS", "NEEDS_PROMPT", "RUN_WHEN_PRESENT", "FILES"]

# metric name -> (the encoders it needs: keys of FILES, the papers that report it)
METRICS: dict[str, tuple[tuple[str, ...], str]] = {
    "clip_text_alignment": (("clip",), "EI², TCVE (LOVEU-TGVE's definition)"),
    "clip_frame_consistency": (("clip",), "EI², TCVE, I2VEdit, LOVEU-TGVE"),
    "subject_consistency": (("dino",), "COVE (VBench's definition)"),
    "aesthetic_quality": (("clip", "aesthetic"), "COVE (VBench's definition)"),
    "motion_smoothness": (("amt",), "COVE (VBench's definition)"),
    "imaging_quality": (("musiq",), "COVE (VBench's definition)"),
    "pickscore": (("pickscore",), "TCVE, LOVEU-TGVE (PickScore_v1)"),
}
# metrics that need the edit prompt
NEEDS_PROMPT = ("clip_text_alignment", "pickscore")
# with --tiny, metrics left out of the default set (the tiny AMT needs frames of 64 px and more): name them to run them
RUN_WHEN_PRESENT = ("motion_smoothness", "imaging_quality")

# encoder -> (where it is looked for, relative to the working directory; what it is).
# minivid.eval.loading.DEFAULT_FILES adds where each comes from.
FILES: dict[str, tuple[str, str]] = {
    "clip": ("weights/clip-vit-large-patch14.safetensors", "CLIP ViT-L/14"),
    "dino": ("weights/dino_vitbase16_pretrain.pth", "DINO ViT-B/16"),
    "aesthetic": ("weights/sa_0_4_vit_l_14_linear.pth", "the LAION aesthetic predictor"),
    "amt": ("weights/amt-s.pth", "AMT-S"),
    "musiq": ("weights/musiq_spaq_ckpt-358bb6af.pth", "MUSIQ (SPAQ)"),
    "pickscore": ("weights/PickScore_v1", "PickScore_v1 (a transformers CLIP ViT-H/14 folder)"),
}
