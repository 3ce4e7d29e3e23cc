"""The methods' defaults and choices that `minivid edit --help` and `minivid tune --help` show, as plain
values: no torch, no method package (those import torch), so that building the parsers stays fast (issue 17.10).

Each value repeats a setting of the method's own code, named beside it; the method code stays the one
that runs (the CLI modules build their configs from the method's classes when a job runs).
tests/test_cli_help.py compares every value here with the method's and fails when one of them changes alone.
"""
from __future__ import annotations

METHOD_TITLES = {"cove": "COVE", "ei2": "EI²", "tcve": "TCVE", "i2vedit": "I2VEdit"}

# ---------------------------------------------------------------- COVE (minivid.methods.cove)
# COVEConfig's defaults (pipeline.py): the paper's
COVE = {
    "window": 9, "k": 3, "merge_ratio": 0.5, "mode": "sequential", "resolutions": "match", "feature_layer": "auto",
    "feature_t": 261, "feature_prompt": "empty", "inversion_steps": 100, "inject_steps": 40, "steps": 50,
    "guidance": 7.5, "store_device": "cpu", "store_dtype": "fp16", "backend": "auto",
}
COVE_MODES = ("sequential", "replace", "dense_only", "cga_only")      # attention.MODES
COVE_STORE_DTYPES = ("fp16", "bf16", "fp32")                          # pipeline.STORE_DTYPES
COVE_FEATURE_PROMPTS = ("empty", "source")
COVE_RESOLUTIONS = ("match", "nearest")
BACKENDS = ("auto", "reference", "triton")

# ---------------------------------------------------------------- EI² (minivid.methods.ei2)
EI2 = {"r": 2, "order": "ffam-stam-ca", "ffam_backend": "auto"}       # EI2Config's defaults (model.py)
EI2_ORDERS = ("ffam-stam-ca", "ffam-ca-stam")                         # model.ORDERS
EI2_TUNE = {"steps": 500, "lr": 3e-5, "checkpoint_every": 100}        # minivid.tuning.TuneConfig's defaults (§5)
EI2_EDIT = {"steps": 50, "guidance": 7.5}                             # edit.DEFAULT_STEPS, DEFAULT_GUIDANCE

# ---------------------------------------------------------------- TCVE (minivid.methods.tcve)
TCVE_ABLATIONS = ("none", "no_temporal_unet", "no_stu", "no_temporal_attention", "no_conv3d")   # stu.ABLATIONS
TCVE_TUNE = {"steps": 100, "lr": 3e-5, "checkpoint_every": 100}       # tune.TCVE_TUNING over TuneConfig
TCVE_EDIT = {"steps": 50, "guidance": 12.5}                           # edit.EDIT_STEPS, EDIT_GUIDANCE

# ---------------------------------------------------------------- I2VEdit (minivid.methods.i2vedit)
# I2VEditConfig's defaults (edit.py): the authors' code's
I2VEDIT = {
    "steps": 25, "preset": "local", "layer_set": "official", "mask_thr": (0.35, 0.35), "compare": ">=",
    "store": "recompute", "recipe": "authors", "overlap": 1, "max_guidance": 2.0, "decode_chunk": 8, "seed": 23,
    "invert_dtype": "fp32",
}
I2VEDIT_PRESETS = {"local": (0.5, 0.8), "global": (0.8, 0.9), "shape": (0.4, 0.5)}   # matching.PRESETS (β₁, β₂)
I2VEDIT_LAYER_SETS = ("official", "paper")                            # matching.LAYER_SETS
I2VEDIT_STORES = ("recompute", "stored")                              # edit.STORES
I2VEDIT_RECIPES = ("authors", "uniform")                              # clips.RECIPES
I2VEDIT_INVERT_DTYPES = ("fp32", "edit")                              # edit.INVERT_DTYPES
I2VEDIT_TIME_IDS_ORDERS = ("official", "svd")                         # tune.TIME_IDS_ORDERS
# tune.DEFAULT_STEPS / DEFAULT_LR / DEFAULT_CHECKPOINT_EVERY / DEFAULT_USE_STEP; lora.DEFAULT_RANK / DEFAULT_DROPOUT
I2VEDIT_TUNE = {"steps": 300, "lr": 5e-4, "checkpoint_every": 50, "use_step": 250, "rank": 32, "dropout": 0.1}
# clips.FIRST / clips.SUBSEQUENT: frames per clip, sampling fps, output fps, tuning steps
I2VEDIT_CLIPS = {"first": {"length": 11, "sample_fps": 2.5, "output_fps": 5, "tune_steps": 300},
                 "subsequent": {"length": 16, "sample_fps": 7.0, "output_fps": 7, "tune_steps": 250}}

# what `minivid tune --help` states per method
TUNE = {"ei2": EI2_TUNE, "tcve": TCVE_TUNE, "i2vedit": I2VEDIT_TUNE}


def per_method(key: str, methods: dict[str, dict] = TUNE, fmt: str = "{}") -> str:
    """'EI² 500, TCVE 100, I2VEdit 300': `key` of each method's table, for a help text."""
    return ", ".join(f"{METHOD_TITLES[name]} {fmt.format(table[key])}" for name, table in methods.items())
