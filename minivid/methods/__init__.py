"""The four papers, one package each, each reading top to bottom like its method section.

This package is a library: it imports nothing from `minivid.cli`. Each method's command-line glue
lives in `minivid/cli/<method>.py` (`add_arguments(group)`, `edit(args, job) -> dict` and, for
methods that tune, `tune(args, job) -> dict`, `demo(args, job) -> dict`).
"""
from __future__ import annotations

METHODS = {
    "cove": "COVE: correspondence-guided video editing (SD 2.1)",
    "ei2": "EI²: inflated SD 1.4 with STAM and FFAM, one-shot tuning",
    "tcve": "TCVE: temporal UNet beside SD 1.4 with Spatial-Temporal modeling Units",
    "i2vedit": "I2VEdit: first-frame-guided editing on SVD (motion LoRA, EDM inversion, attention matching)",
}
