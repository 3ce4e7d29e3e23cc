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


def input_path(path, option: str = "", file_ok: bool = True, folder_ok: bool = True):
    """`path` (a pathlib.Path) if it can be read as an input; else an error naming `option` and saying
    what is wrong: missing (FileNotFoundError), a symlink loop, a FIFO, socket or device (minivid reads
    regular files and folders), a folder where a file is needed or a file where a folder is (exit 1)."""
    import errno
    import os
    import pathlib
    import stat

    from minivid.outputs import PathError

    path = pathlib.Path(path)
    name = f"{option} {path}" if option else str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileNotFoundError(f"{name}: a symlink to a missing file ({os.readlink(path)})") from None
        raise FileNotFoundError(f"{name}: no such file or folder") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PathError(e.errno, f"{name}: a symlink loop (a link that leads back to itself)") from None
        raise PathError(e.errno, f"{name}: cannot be read ({e.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        if not folder_ok:
            raise PathError(errno.EISDIR, f"{name}: is a folder; expected a file")
    elif stat.S_ISREG(st.st_mode):
        if not file_ok:
            raise PathError(errno.ENOTDIR, f"{name}: is a file; expected a folder")
    else:
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device")
        raise PathError(errno.EINVAL, f"{name}: is {kind}, not a regular file; minivid reads files and folders "
                                      f"(save the stream to a file first)")
    if not os.access(path, os.R_OK | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)):
        raise PermissionError(f"{name}: no permission to read it")
    return path


def json_object(text: str | bytes, source: str, error: type[Exception] = ValueError) -> dict:
    """`text` parsed as a JSON object; otherwise `error` naming `source` (the file, and the part of it)
    and what is wrong: not JSON (the parser's message with line and column) or JSON but not an object."""
    import json

    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{source}: not valid JSON ({getattr(e, 'msg', e)}"
                    + (f" at line {e.lineno} column {e.colno})" if hasattr(e, "lineno") else ")")) from None
    if not isinstance(data, dict):
        raise error(f"{source}: expected a JSON object ({{\"key\": value, ...}}), got a JSON {type(data).__name__}")
    return data
