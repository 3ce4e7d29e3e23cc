"""Which official model a checkpoint holds, from its tensor names (and shapes when known).

Signatures (names of the official single files; shapes checked when available):

    sd1     cond_stage_model.transformer.text_model.*   (HF CLIP ViT-L/14 text, width 768)
            + model.diffusion_model.*  with 1x1-conv proj_in [C, C, 1, 1]
    sd2     cond_stage_model.model.transformer.resblocks.*  (OpenCLIP ViT-H/14 text, width 1024)
            + model.diffusion_model.*  with Linear proj_in [C, C]
    svd     conditioner.embedders.0.open_clip.model.visual.*  (OpenCLIP ViT-H/14 image tower)
            + model.diffusion_model.*  with temporal `time_stack` blocks

Two things the names cannot tell:

- SVD (14 frames) vs SVD-XT (25 frames): their files have IDENTICAL key sets and shapes
  (weights/manifests/README.md). `detect` says "svd" unless the file name carries an "xt"
  token (svd_xt.safetensors, ...-img2vid-xt...), then "svd_xt". A diffusers folder records
  the frame count in unet/config.json (`num_frames` 14 or 25), which `detect_folder` reads.
- SD 2.x epsilon vs v prediction (v2-1_512 vs v2-1_768): same keys and shapes. See
  `guess_prediction`: a diffusers folder says it in scheduler/scheduler_config.json, a file minivid
  wrote in its safetensors metadata (SD_CONFIG_METADATA_KEY); for any other single file the name decides ("768" or a "-v" token -> v; "512" or "base" -> eps; otherwise
  eps, with a warning).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .files import WEIGHT_EXTENSIONS, WeightsError, find_component_file, read_shapes

__all__ = [
    "MODELS", "MANIFEST_OF", "detect", "describe_detection", "detect_path", "detect_folder",
    "guess_prediction", "group_by_component",
]

log = logging.getLogger(__name__)

MODELS = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "svd": "Stable Video Diffusion (img2vid, 14 frames)",
    "svd_xt": "Stable Video Diffusion XT (img2vid-xt, 25 frames)",
    "unknown": "unknown",
}
MANIFEST_OF = {"sd1": "sd-v1-4", "sd2": "sd-v2-1", "svd": "svd", "svd_xt": "svd_xt"}

_UNET = "model.diffusion_model."
_SD1_TEXT = "cond_stage_model.transformer.text_model."
_SD2_TEXT = "cond_stage_model.model.transformer.resblocks."
_SVD_IMAGE = "conditioner.embedders.0.open_clip.model.visual."
_PROJ_IN = _UNET + "input_blocks.1.1.proj_in.weight"
_CONV_IN = _UNET + "input_blocks.0.0.weight"


def _names_and_shapes(x) -> tuple[set[str], dict[str, tuple] | None]:
    if isinstance(x, Mapping):
        shapes = {}
        for k, v in x.items():
            if isinstance(v, torch.Tensor):
                shapes[k] = tuple(v.shape)
            elif isinstance(v, (tuple, list)) and v and isinstance(v[0], (tuple, list)):
                shapes[k] = tuple(v[0])  # (shape, dtype)
            elif isinstance(v, (tuple, list, torch.Size)):
                shapes[k] = tuple(v)
        return set(x), (shapes or None)
    return set(x), None


def _has(keys: set[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _xt_in_name(filename: str | Path | None) -> bool:
    stem = Path(str(filename)).name.lower() if filename else ""
    return re.search(r"(^|[^a-z])xt([^a-z]|$)", stem) is not None


def describe_detection(keys_or_state_dict: Iterable[str] | Mapping, filename: str | Path | None = None) -> tuple[str, str]:
    """(model, reason): model among "sd1", "sd2", "svd", "svd_xt", "unknown"; reason in one sentence."""
    keys, shapes = _names_and_shapes(keys_or_state_dict)
    if not keys:
        return "unknown", "the file holds no tensors"
    if _has(keys, "conditioner.embedders.1.") or (_UNET + "label_emb.0.0.weight" in keys and not _has(keys, _SVD_IMAGE)):
        return "unknown", ("SDXL-style checkpoint (conditioner.embedders.1.* second text encoder and/or "
                           "model.diffusion_model.label_emb): minivid supports SD 1.x/2.x and SVD only")
    if not _has(keys, _UNET):
        if any(_has(keys, p) for p in ("down_blocks.", "text_model.encoder.", "encoder.layers.", "encoder.down_blocks.")):
            return "unknown", ("diffusers-named tensors (one component of a diffusers folder): pass the pipeline "
                               "folder, whose layout detect_path reads")
        tops = sorted({k.split(".")[0] for k in keys})
        return "unknown", f"no model.diffusion_model.* UNet; top-level names: {', '.join(tops[:8])}"
    proj_in = len(shapes[_PROJ_IN]) if shapes and _PROJ_IN in shapes else None
    in_ch = shapes[_CONV_IN][1] if shapes and _CONV_IN in shapes and len(shapes[_CONV_IN]) == 4 else None
    temporal = any(".time_stack." in k for k in keys if k.startswith(_UNET))
    if _has(keys, _SVD_IMAGE) and temporal:
        if in_ch not in (None, 8):
            return "unknown", f"SVD-style names but the UNet takes {in_ch} input channels (SVD: 8)"
        if _xt_in_name(filename):
            return "svd_xt", ("SVD names (open_clip image encoder + temporal time_stack UNet); svd and svd_xt have "
                              "identical keys, the file name's 'xt' says svd_xt")
        return "svd", ("SVD names (open_clip image encoder + temporal time_stack UNet); svd and svd_xt have identical "
                       "keys and the file name has no 'xt': svd (or svd_xt)")
    if temporal:
        return "unknown", "a temporal UNet (time_stack) without SVD's open_clip image encoder"
    if in_ch not in (None, 4):
        return "unknown", f"SD-style names but the UNet takes {in_ch} input channels (inpainting/depth variants are not supported; SD: 4)"
    if _has(keys, _SD1_TEXT):
        if proj_in == 2:
            return "unknown", "SD 1.x text encoder but a Linear proj_in (SD 1.x uses 1x1 convs)"
        return "sd1", "cond_stage_model.transformer.text_model.* (HF CLIP ViT-L/14 text) + ldm UNet with 1x1-conv proj_in"
    if _has(keys, _SD2_TEXT):
        if proj_in == 4:
            return "unknown", "SD 2.x OpenCLIP text encoder but 1x1-conv proj_in (SD 2.x uses Linear)"
        return "sd2", "cond_stage_model.model.* (OpenCLIP ViT-H/14 text) + ldm UNet with Linear proj_in"
    return "unknown", "an ldm UNet (model.diffusion_model.*) without a known text or image encoder"


def detect(keys_or_state_dict: Iterable[str] | Mapping, filename: str | Path | None = None) -> str:
    """"sd1", "sd2", "svd", "svd_xt" or "unknown" from tensor names (and shapes when given).

    svd and svd_xt cannot be told apart by names: "svd_xt" only when `filename` carries an "xt" token.
    """
    return describe_detection(keys_or_state_dict, filename)[0]


# ------------------------------------------------------------------------------------ diffusers folders


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def detect_path(path: str | Path) -> tuple[str, dict[str, Path]]:
    """The layout of a path: ("single-file", {"checkpoint": file}), ("diffusers-sd" | "diffusers-svd" |
    "diffusers-other", {component: weights file}) or ("diffusers-component", {"component": file}).
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder. Expected a checkpoint file "
                           f"({', '.join(WEIGHT_EXTENSIONS)}) or a diffusers folder.")
    if path.is_file():
        return "single-file", {"checkpoint": path}
    if not (path / "model_index.json").is_file():
        return "diffusers-component", {"component": find_component_file(path)}
    index = _read_json(path / "model_index.json")
    comps = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        try:
            comps[sub.name] = find_component_file(sub)
        except WeightsError:
            continue  # tokenizer/, scheduler/, feature_extractor/ hold no weights
    cls = index.get("_class_name", "")
    if cls == "StableVideoDiffusionPipeline" or {"unet", "vae", "image_encoder"} <= set(comps):
        return "diffusers-svd", comps
    if cls.startswith("StableDiffusion") or {"unet", "vae", "text_encoder"} <= set(comps):
        return "diffusers-sd", comps
    return "diffusers-other", comps


def detect_folder(path: str | Path) -> tuple[str, str]:
    """(model, reason) for a diffusers pipeline folder, from its config files."""
    path = Path(path)
    kind, comps = detect_path(path)
    unet = _read_json(path / "unet" / "config.json")
    if kind == "diffusers-svd":
        frames = unet.get("num_frames")
        if frames == 25:
            return "svd_xt", "diffusers StableVideoDiffusionPipeline; unet/config.json num_frames=25 (img2vid-xt)"
        if frames == 14:
            return "svd", "diffusers StableVideoDiffusionPipeline; unet/config.json num_frames=14 (img2vid)"
        return "svd", f"diffusers StableVideoDiffusionPipeline; unet/config.json num_frames={frames}: svd (or svd_xt)"
    if kind == "diffusers-sd":
        if unet.get("addition_embed_type") or unet.get("class_embed_type"):
            return "unknown", "diffusers UNet with added/class embeddings (SDXL or upscaler style), not SD 1.x/2.x"
        if unet.get("in_channels", 4) != 4:
            return "unknown", f"diffusers UNet with {unet.get('in_channels')} input channels (SD: 4)"
        return _sd_generation(unet, _read_json(path / "text_encoder" / "config.json"))
    return "unknown", f"{kind}: no StableDiffusion/StableVideoDiffusion pipeline in model_index.json"


def _sd_generation(unet: dict, text: dict) -> tuple[str, str]:
    """SD 1.x or 2.x from the structure, at any width: SD 1.x has 1x1-conv proj_in/proj_out and an
    OpenAI CLIP text encoder (quick-GELU); SD 2.x Linear projections and OpenCLIP (GELU). A text
    config that does not state its activation follows the UNet."""
    linear = bool(unet.get("use_linear_projection", False))
    act = text.get("hidden_act")
    dims = (f"cross_attention_dim {unet.get('cross_attention_dim')}, "
            f"{text.get('num_hidden_layers', '?')}-layer text encoder")
    if not linear and act in (None, "quick_gelu"):
        return "sd1", f"diffusers StableDiffusionPipeline; conv proj_in, quick-GELU text encoder (SD 1.x); {dims}"
    if linear and act in (None, "gelu"):
        return "sd2", f"diffusers StableDiffusionPipeline; Linear proj_in, GELU text encoder (SD 2.x); {dims}"
    return "unknown", (f"diffusers StableDiffusionPipeline mixing SD 1.x and 2.x: use_linear_projection {linear} "
                       f"with a {act!r} text encoder")


# ------------------------------------------------------------------------------------ prediction type


SD_CONFIG_METADATA_KEY = "minivid_config"    # safetensors metadata entry of a file minivid wrote: its SDConfig as JSON


def stated_prediction(path: str | Path) -> tuple[str, str] | None:
    """("eps" | "v", where it is written) when the files say it: a diffusers folder's
    scheduler/scheduler_config.json (prediction_type), or the SDConfig minivid writes into a .safetensors
    file's metadata (`StableDiffusion.save`, `minivid inspect --write-tiny`); None otherwise."""
    path = Path(path)
    if path.is_dir():
        sched = _read_json(path / "scheduler" / "scheduler_config.json")
        pred = sched.get("prediction_type")
        if pred in ("epsilon", "v_prediction"):
            return ("eps" if pred == "epsilon" else "v"), f"scheduler/scheduler_config.json prediction_type={pred}"
        return None
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        pred = json.loads(meta[SD_CONFIG_METADATA_KEY]).get("prediction") if SD_CONFIG_METADATA_KEY in meta else None
    except (OSError, ValueError, AttributeError, TypeError):      # unreadable or odd metadata: the name decides
        return None
    if pred in ("eps", "v"):
        return pred, f"the minivid config in the file's metadata ({SD_CONFIG_METADATA_KEY}) says {pred}"
    return None


def guess_prediction(path: str | Path, model: str | None = None, warn: bool = True) -> tuple[str, str]:
    """("eps" | "v", reason) for a checkpoint file or diffusers folder: what `StableDiffusion.load` uses
    when no prediction= argument is given (the one rule; `minivid inspect` reports it).

    What the files state comes first (`stated_prediction`: a diffusers scheduler config, minivid's
    metadata). Else SD 1.x is eps and SVD v (EDM v-scaling). For SD 2.x the tensors cannot tell: the
    file name decides: "768" or a "-v"/"_v" token (e.g. v2-1_768-ema-pruned, 768-v-ema) -> v; "512" or
    "base" (v2-1_512-ema-pruned, 512-base-ema) -> eps; anything else -> eps with a warning (logged unless
    warn=False: the reason then starts with "WARNING: ", for a caller that shows it itself).
    """
    path = Path(path)
    stated = stated_prediction(path)
    if stated is not None:
        return stated
    if path.is_dir() and (path / "model_index.json").is_file():
        model = model or detect_folder(path)[0]
    if model is None:
        model = detect(read_shapes(path), path.name)
    if model == "sd1":
        return "eps", "SD 1.x is trained with epsilon-prediction"
    if model in ("svd", "svd_xt"):
        return "v", "SVD is trained with EDM v-prediction scaling (sgm VScalingWithEDMcNoise)"
    name = path.name.lower()
    if "768" in name or re.search(r"[-_]v([-_.]|$)", name):
        return "v", f"file name {path.name!r} says 768 / -v: v-prediction (v2-1_768-ema-pruned style)"
    if "512" in name or "base" in name:
        return "eps", f"file name {path.name!r} says 512 / base: epsilon-prediction (v2-1_512-ema-pruned style)"
    reason = (f"file name {path.name!r} says neither 768/-v nor 512/base and the tensors cannot tell: assuming "
              f"epsilon-prediction; if samples come out as flat grey or noise, pass prediction='v'")
    if warn:
        log.warning("%s: %s", path, reason)
    return "eps", "WARNING: " + reason


# ------------------------------------------------------------------------------------ component groups

# display label -> prefix, longest prefixes first when grouping
COMPONENT_GROUPS = [
    ("unet", "model.diffusion_model."),
    ("vae", "first_stage_model."),
    ("text encoder", "cond_stage_model."),
    ("image encoder", "conditioner.embedders.0."),
    ("conditioner VAE copy", "conditioner.embedders.3."),
    ("EMA", "model_ema."),
]


def group_by_component(info: Mapping[str, tuple]) -> dict[str, dict]:
    """label -> {"prefix", "tensors", "params"} for name -> (shape, dtype); unknown names grouped by first word."""
    from .strict import SCHEDULE_BUFFERS

    groups: dict[str, dict] = {}
    for name, (shape, _) in info.items():
        label, prefix = next(((lab, p) for lab, p in COMPONENT_GROUPS if name.startswith(p)), (None, None))
        if label is None:
            if name in SCHEDULE_BUFFERS:
                label, prefix = "schedule buffers", ""
            else:
                prefix = name.split(".")[0] + "." if "." in name else name
                label = prefix.rstrip(".")
        g = groups.setdefault(label, {"prefix": prefix, "tensors": 0, "params": 0})
        n = 1
        for s in shape:
            n *= int(s)
        g["tensors"] += 1
        g["params"] += n
    order = [label for label, _ in COMPONENT_GROUPS]
    return dict(sorted(groups.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
