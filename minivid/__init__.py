"""minivid: diffusion video editing (COVE, EI², TCVE, I2VEdit) and the models under it, from scratch.

    import minivid
    sd = minivid.StableDiffusion.load("weights/sd-v1-4.safetensors")
    svd = minivid.StableVideoDiffusion.load("weights/svd.safetensors")
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "StableDiffusion": "minivid.models",
    "StableVideoDiffusion": "minivid.svd",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minivid' has no attribute {name!r}")
