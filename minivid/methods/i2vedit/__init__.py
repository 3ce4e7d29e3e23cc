"""I2VEdit: first-frame-guided video editing on Stable Video Diffusion.

Ouyang et al., "I2VEdit: First-Frame-Guided Video Editing via Image-to-Video Diffusion Models",
SIGGRAPH Asia 2024, arXiv:2405.16537. In the paper's order (section numbers of the arXiv text, §3 being
its preliminaries):

§4.1 coarse motion extraction   the motion LoRA on the temporal layers, tuned per clip
                                (lora.py, tune.py)
§4.2 appearance refinement
     SARP (Eq. 5)               invert.sarp: noise in the smooth areas of the source
     EDM inversion (Eq. 6)      invert.invert_clip, with conditioning.inversion_condition
     attention matching         matching: spatial attn1 masked by the attention difference (Eq. 7–9),
     (Eq. 7–9)                  the temporal attn1 selector (β₁, β₂), the source-attention store
     editing                    edit.edit_clip, with conditioning.edit_condition; its blocks
                                (inversion, SARP, conditioning, attention on the spatial and
                                temporal layers, levels, sampler loop) swappable: edit.I2VEditBlocks
§4.1 long videos                clips.py (the authors' recipe: clip 0 with their first config, clips
                                k ≥ 1 with their subsequent-clip config and skip-interval
                                cross-attention; the time-based frame plan), edit.edit_video
pictures                        visualize.mask_picture: the spatial matching mask M per layer and step

docs/i2vedit.md lists every default and whether it comes from the paper or the authors' code.
"""
from .clips import clip_ranges
from .conditioning import InversionCondition, edit_condition, inversion_condition, uint8_truncate
from .edit import ClipEdit, EditResult, I2VEditBlocks, I2VEditConfig, edit_clip, edit_video, source_attention
from .invert import Inversion, invert_clip, sarp, sarp_mask, sobel_magnitude
from .lora import MotionLoRA, attach_motion_lora
from .tune import MotionTuneConfig, load_motion_lora, tune_clips, tune_motion_lora
from .matching import (LAYER_SETS, PRESETS, MatchingConfig, MatchingController, TemporalSelector, downscale,
                       install, official_coarse_layers, spatial_match, store_bytes)

__all__ = [
    "clip_ranges", "InversionCondition", "edit_condition", "inversion_condition", "uint8_truncate",
    "ClipEdit", "EditResult", "I2VEditBlocks", "I2VEditConfig", "edit_clip", "edit_video", "source_attention",
    "Inversion", "invert_clip", "sarp", "sarp_mask", "sobel_magnitude",
    "LAYER_SETS", "PRESETS", "MatchingConfig", "MatchingController", "TemporalSelector", "downscale", "install",
    "official_coarse_layers", "spatial_match", "store_bytes",
    "MotionLoRA", "attach_motion_lora", "MotionTuneConfig", "load_motion_lora", "tune_clips", "tune_motion_lora",
]
