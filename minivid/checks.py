"""Stops at the first non-finite value, and where a long loop is.

Every sampling and inversion loop calls `step_done(loop, i, n, x)` after step i: it records the
step (so an interrupted run can say where it stopped) and raises `NonFiniteError` naming the loop,
the step and a hint as soon as the latent holds a NaN or an infinity — a run never goes on to
write an all-black video. `last_step()` is what the command line reports on Ctrl-C.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

HINT = ("the weights or an option may hold NaN/Inf (check the checkpoint with `minivid inspect`); "
        "in fp16 the values may have overflowed: try --dtype fp32 (or bf16)")


class NonFiniteError(ValueError):
    """A latent, loss or tensor holds NaN or ±Inf where a finite value is required."""


@dataclass
class Progress:
    loop: str = ""
    step: int = 0          # steps completed
    total: int = 0


_state = threading.local()


def last_step() -> Progress | None:
    """The loop that last reported a step in this thread (None before any)."""
    return getattr(_state, "progress", None)


def reset() -> None:
    _state.progress = None


def step_done(loop: str, i: int, n: int, x: torch.Tensor | None = None, hint: str = HINT) -> None:
    """Step i (0-based) of n of `loop` finished with latent `x`: record it; NonFiniteError if x is not finite."""
    _state.progress = Progress(loop, i + 1, n)
    if x is not None and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise NonFiniteError(f"{loop}: the latent became non-finite at step {i + 1}/{n} ({bad} of {x.numel()} "
                             f"values NaN/Inf); stopped. Hint: {hint}")


def finite_number(value: float, what: str) -> float:
    """`value` as a float; NonFiniteError naming `what` if it is NaN or infinite."""
    value = float(value)
    if not math.isfinite(value):
        raise NonFiniteError(f"{what} must be a finite number, got {value}")
    return value


DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
               "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: torch.dtype | str, what: str = "dtype") -> torch.dtype:
    """A floating torch dtype from a dtype or its name ("fp32", "float16", "bf16", "torch.bfloat16", ...)."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"{what} must be a floating dtype (float32, float16, bfloat16), got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"{what} must be a torch dtype or one of fp32, fp16, bf16 (float32, float16, bfloat16), "
                     f"got {dtype!r}")
