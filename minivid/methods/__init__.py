"""The four papers, one package each, each reading top to bottom like its method section.

A method package exposes, for the command line, a module `<method>.cli` with
`add_arguments(group)` (its own options, prefixed with the method's name where they could
clash), `edit(args, job) -> dict` and, for methods that tune, `tune(args, job) -> dict`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

METHODS = {
    "cove": "COVE: correspondence-guided video editing (SD 2.1)",
    "ei2": "EI²: inflated SD 1.4 with STAM and FFAM, one-shot tuning",
    "tcve": "TCVE: temporal UNet beside SD 1.4 with Spatial-Temporal modeling Units",
    "i2vedit": "I2VEdit: first-frame-guided editing on SVD (motion LoRA, EDM inversion, attention matching)",
}


def method_cli(name: str) -> ModuleType:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return importlib.import_module(f"minivid.methods.{name}.cli")


def available_clis() -> dict[str, ModuleType]:
    """Method CLIs that are present in this checkout."""
    found = {}
    for name in METHODS:
        try:
            found[name] = method_cli(name)
        except ModuleNotFoundError as e:
            if e.name not in (f"minivid.methods.{name}", f"minivid.methods.{name}.cli"):
                raise
    return found
