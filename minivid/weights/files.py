"""Reading checkpoint files: safetensors, and pickles only through `torch.load(weights_only=True)`.

Two formats of file, two ways of reading them:

- `.safetensors`: a JSON header (name -> dtype, shape, byte range) and raw bytes. The header is
  parsed and checked here (so a truncated download is named as such); the tensors come from
  `safetensors.torch.load_file`, which memory-maps the file: nothing is read until used.
- `.ckpt` / `.pt` / `.pth` / `.bin`: Python pickles. They are read ONLY by
  `torch.load(weights_only=True)`, whose unpickler accepts tensors and plain containers and
  refuses every other object, so a checkpoint cannot run code while it is read. A top-level
  `{"state_dict": {...}}` (the Lightning layout of the CompVis/Stability `.ckpt`) is unwrapped.

A diffusers folder is read component by component (`read_diffusers_folder`): each component
folder holds one weights file (optionally a `variant` like `fp16`, or shards listed in an
`*.index.json`).
"""
from __future__ import annotations

import json
import pickle
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Mapping

import torch

__all__ = [
    "WeightsError", "TensorInfo", "SAFETENSORS_EXTENSIONS", "PICKLE_EXTENSIONS", "WEIGHT_EXTENSIONS",
    "read_state_dict", "read_shapes", "read_safetensors_header", "find_component_file",
    "read_diffusers_folder", "shapes_of",
]

SAFETENSORS_EXTENSIONS = (".safetensors",)
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_EXTENSIONS = SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS

# (shape, dtype name as in the manifests: "float32", "float16", "bfloat16", "int64", ...)
TensorInfo = tuple[tuple[int, ...], str]

_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_ITEM_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
              "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100_000_000  # the safetensors library's own limit

# Weight files of one diffusers component folder, in order of preference.
_DIFFUSERS_WEIGHT_NAMES = ("diffusion_pytorch_model", "model", "pytorch_model")


class WeightsError(ValueError):
    """A checkpoint that cannot be read, or does not match what was asked of it.

    The message is one paragraph naming the file (or folder) and what was expected instead.
    """


def _expected_formats() -> str:
    return ("a checkpoint file (.safetensors; or .ckpt/.pt/.pth/.bin read with weights_only) "
            "or a diffusers folder (model_index.json + unet/, vae/, text_encoder/ ...)")


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise WeightsError(
            f"{path}: no such file or folder. Expected {_expected_formats()}. Official checkpoints "
            f"go in the repository's weights/ folder; weights/README.md lists them and where they come from."
        )


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32: the spelling used by the manifests."""
    return str(dtype).removeprefix("torch.")


def shapes_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, TensorInfo]:
    """name -> (shape, dtype name) of an in-memory (or meta) state dict."""
    return {k: (tuple(v.shape), dtype_name(v.dtype)) for k, v in state_dict.items()}


# ----------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and check a .safetensors header without reading any tensor data.

    Checks that the header is complete JSON and that the byte ranges tile the rest of the file
    exactly, so a truncated or padded download is reported with both sizes.
    """
    path = Path(path)
    size = path.stat().st_size
    hint = "Download it again and compare its sha256 with the one the hub lists."
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: not a safetensors file: it is only {size} bytes long, shorter than the "
                               f"8-byte header length a safetensors file starts with. {hint}")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise WeightsError(
                f"{path}: not a valid safetensors file: it announces a {n}-byte header but is {size} bytes long "
                f"(truncated, or not a safetensors file at all). {hint}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: corrupt safetensors header (its JSON does not parse: {e}). {hint}") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (a JSON object was expected). {hint}")
    header.pop("__metadata__", None)
    out: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        try:
            dtype, shape, (start, stop) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt safetensors header: entry {name!r} lacks dtype/shape/data_offsets. {hint}") from None
        numel = 1
        for s in shape:
            numel *= s
        if dtype in _ITEM_SIZE and stop - start != numel * _ITEM_SIZE[dtype]:
            raise WeightsError(f"{path}: corrupt safetensors header: tensor {name!r} {list(shape)} {dtype} "
                               f"should span {numel * _ITEM_SIZE[dtype]} bytes, its range spans {stop - start}. {hint}")
        out[name] = (shape, _SAFETENSORS_DTYPES.get(dtype, dtype))
        end = max(end, stop)
    if 8 + n + end != size:
        raise WeightsError(
            f"{path}: truncated or corrupt safetensors file: its header describes {8 + n + end} bytes "
            f"but the file has {size}. {hint}")
    return out


def _read_safetensors(path: Path, device: str) -> dict[str, torch.Tensor]:
    import safetensors.torch

    read_safetensors_header(path)
    try:
        return dict(safetensors.torch.load_file(str(path), device=device))
    except Exception as e:  # the library's SafetensorError, or an OS error while mapping the file
        raise WeightsError(f"{path}: the safetensors library could not read this file ({type(e).__name__}: {e}). "
                           f"It is probably corrupt; download it again.") from None


# ----------------------------------------------------------------------------- pickles


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True; unwrap `state_dict`; refuse anything but tensors."""
    use_mmap = zipfile.is_zipfile(path)  # mmap needs torch's zip format; legacy pickles are read whole
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise WeightsError(
            f"{path}: refused: this pickle holds objects other than tensors and plain containers, which "
            f"could run code when unpickled. minivid reads pickles only with torch.load(weights_only=True) "
            f"and never executes them. If you trust the file's origin, convert it to .safetensors with a "
            f"trusted tool; otherwise use the official .safetensors release. ({first[:300]})") from None
    except Exception as e:  # torch raises RuntimeError/EOFError/KeyError/... on damaged archives
        raise WeightsError(
            f"{path}: could not read this checkpoint ({type(e).__name__}: {str(e)[:200]}). It is truncated, "
            f"corrupt or not a PyTorch checkpoint; expected {_expected_formats()}.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: the pickle holds a {type(obj).__name__}, not a dict of tensors "
                           f"(a state dict, optionally under a top-level 'state_dict' entry).")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise WeightsError(
            f"{path}: {len(bad)} entries of the state dict are not name -> tensor pairs "
            f"(first: {', '.join(repr(k) for k in bad[:10])}); expected a state dict, optionally under "
            f"a top-level 'state_dict' entry.")
    return obj


# ----------------------------------------------------------------------------- files and folders


def _weights_file_in(folder: Path, variant: str | None = None) -> Path | None:
    """The weights file of one diffusers component folder (or None)."""
    suffix = f".{variant}" if variant else ""
    for stem in _DIFFUSERS_WEIGHT_NAMES:
        for ext in (".safetensors", ".bin"):
            for cand in (folder / f"{stem}{suffix}{ext}", folder / f"{stem}{suffix}{ext}.index.json"):
                if cand.is_file():
                    return cand
    return None


def _has_weights(folder: Path) -> bool:
    return any(p.is_file() and p.name.split(".")[0] in _DIFFUSERS_WEIGHT_NAMES
               and (p.name.endswith(WEIGHT_EXTENSIONS) or p.name.endswith(".index.json")) for p in folder.iterdir())


def find_component_file(folder: str | Path, variant: str | None = None) -> Path:
    """The weights file of a diffusers component folder (unet/, vae/, text_encoder/ ...)."""
    folder = Path(folder)
    _check_exists(folder)
    found = _weights_file_in(folder, variant)
    if found is None and variant is None:
        # a folder holding only a variant (e.g. diffusion_pytorch_model.fp16.safetensors)
        variants = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_EXTENSIONS)
                          and p.name.split(".")[0] in _DIFFUSERS_WEIGHT_NAMES)
        found = variants[0] if len(variants) == 1 else None
    if found is None:
        listing = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
        want = " or ".join(f"{s}{'.' + variant if variant else ''}.safetensors" for s in _DIFFUSERS_WEIGHT_NAMES)
        raise WeightsError(
            f"{folder}: no model weights in this folder (it holds: {listing}). Expected a checkpoint file "
            f"(.safetensors/.ckpt/.pt/.pth/.bin), a diffusers pipeline folder with model_index.json, or a "
            f"component folder with {want} (or .bin / sharded .index.json).")
    return found


def _read_sharded(index: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightsError(f"{index}: not a shard index (a JSON file with a 'weight_map'): {e}") from None
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        out.update(read_state_dict(index.parent / shard, device=device))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise WeightsError(f"{index}: {len(missing)} tensors listed in the index are in none of its shards "
                           f"(first: {', '.join(missing[:10])}).")
    return out


def read_state_dict(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read one checkpoint file (or one diffusers component folder) into name -> tensor.

    .safetensors files are memory-mapped (tensors are read when touched); pickles go through
    `torch.load(weights_only=True)` only. Raises WeightsError, naming the file, for a missing
    path, an unsupported extension, a truncated/corrupt file or a pickle holding code.
    """
    path = Path(path)
    _check_exists(path)
    if path.is_dir():
        if (path / "model_index.json").is_file():
            raise WeightsError(
                f"{path}: this is a diffusers pipeline folder (it has model_index.json); read its components "
                f"with read_diffusers_folder(), or pass one component folder such as {path / 'unet'}.")
        path = find_component_file(path)
    name = path.name
    if name.endswith(".index.json"):
        return _read_sharded(path, device)
    if path.suffix in SAFETENSORS_EXTENSIONS:
        return _read_safetensors(path, device)
    if path.suffix in PICKLE_EXTENSIONS:
        sd = _read_pickle(path)
        return sd if device == "cpu" else {k: v.to(device) for k, v in sd.items()}
    raise WeightsError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}. "
                       f"Expected {_expected_formats()}.")


def read_shapes(path: str | Path) -> dict[str, TensorInfo]:
    """name -> (shape, dtype name) of a checkpoint file, reading as little as possible.

    For .safetensors only the header is read (instant even for 10 GB files); pickles are
    memory-mapped when they use torch's zip format.
    """
    path = Path(path)
    _check_exists(path)
    if path.is_file() and path.suffix in SAFETENSORS_EXTENSIONS:
        return read_safetensors_header(path)
    if path.is_dir() and not (path / "model_index.json").is_file():
        found = find_component_file(path)
        if found.suffix in SAFETENSORS_EXTENSIONS:
            return read_safetensors_header(found)
    return shapes_of(read_state_dict(path))


def read_diffusers_folder(path: str | Path, components: tuple[str, ...] | None = None,
                          variant: str | None = None, device: str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """Read the weights of a diffusers pipeline folder: component name -> state dict (diffusers names).

    `components` defaults to every subfolder holding weights (unet, vae, text_encoder, image_encoder ...).
    """
    path = Path(path)
    _check_exists(path)
    if not (path / "model_index.json").is_file():
        raise WeightsError(f"{path}: not a diffusers pipeline folder (no model_index.json). Expected "
                           f"{_expected_formats()}.")
    if components is None:
        components = tuple(sorted(p.name for p in path.iterdir() if p.is_dir() and _has_weights(p)))
    out = {}
    for name in components:
        out[name] = read_state_dict(find_component_file(path / name, variant), device=device)
    return out
