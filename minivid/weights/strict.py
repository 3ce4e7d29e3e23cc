"""Strict loading: split a checkpoint into components, check names and shapes, then copy.

Loading never guesses. Before a single tensor is copied, the file's names and shapes are
compared with the module's; any missing, unexpected or misshapen tensor raises a WeightsError
naming the file, the component, the first offending names and their count. The only names
allowed to be left over are LISTED in `HARMLESS_EXTRAS`, each with the reason it is harmless.
"""
from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn as nn

from .files import TensorInfo, WeightsError, shapes_of

__all__ = [
    "HARMLESS_EXTRAS", "SCHEDULE_BUFFERS", "SD_PREFIXES", "REST", "is_harmless", "split_by_prefix", "load_strict",
    "Manifest", "MANIFESTS_DIR", "load_manifest", "Report", "compare_to_manifest", "format_mismatch",
]

log = logging.getLogger(__name__)

# The 12 DDPM schedule buffers ldm's LatentDiffusion registers (all [1000] float32); minivid's
# samplers recompute the schedule from its definition.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)

# Names a checkpoint may carry that no minivid module needs: fnmatch patterns -> why harmless.
# Matched against full checkpoint names and, for the last ones, component-relative names.
HARMLESS_EXTRAS: dict[str, str] = {
    **{name: "DDPM schedule buffer (recomputed by minivid.samplers)" for name in SCHEDULE_BUFFERS},
    "model_ema.decay": "EMA bookkeeping scalar of the training run",
    "model_ema.num_updates": "EMA bookkeeping scalar of the training run",
    "model_ema.*": "EMA copy of the UNet kept by training checkpoints (e.g. sd-v1-4-full-ema.ckpt, "
                   "flattened names like model_ema.diffusion_modelinput_blocks00weight); "
                   "the released -ema-pruned/sd-v1-4 files already hold the EMA weights under model.*",
    "cond_stage_model.transformer.text_model.embeddings.position_ids": "HF CLIP position-id buffer = arange(77)",
    "text_model.embeddings.position_ids": "the same, relative to the text model (also in older diffusers text encoders)",
}

# Component prefixes of the original SD single files: ldm LatentDiffusion attribute names, down to the
# module whose names minivid's models copy (SD 1.x: FrozenCLIPEmbedder.transformer = HF CLIPTextModel;
# SD 2.x: FrozenOpenCLIPEmbedder.model = the OpenCLIP model).
SD_PREFIXES = {
    "sd1": {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text": "cond_stage_model.transformer."},
    "sd2": {"unet": "model.diffusion_model.", "vae": "first_stage_model.", "text": "cond_stage_model.model."},
}

REST = "(other)"  # split_by_prefix's name for names outside every prefix (strict=False)


def is_harmless(name: str, patterns: Iterable[str] = HARMLESS_EXTRAS) -> bool:
    """Whether `name` matches one of the listed harmless-extra patterns."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _first(names: list, n: int = 10) -> str:
    shown = ", ".join(str(x) for x in names[:n])
    return shown + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def split_by_prefix(state_dict: Mapping[str, torch.Tensor], prefixes: Mapping[str, str], source: str = "checkpoint",
                    ignore: Iterable[str] = HARMLESS_EXTRAS, strict: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Split a single-file checkpoint into components, stripping their prefixes.

    prefixes: component -> prefix, e.g. SD_PREFIXES["sd1"] {"unet": "model.diffusion_model.", ...}; the
    longest matching prefix wins. Every component is in the result (empty if the file has none of
    its names). Names outside every prefix are dropped if listed harmless; any other raises
    WeightsError (strict) or is returned under REST.
    """
    order = sorted(prefixes.items(), key=lambda kv: -len(kv[1]))
    out: dict[str, dict[str, torch.Tensor]] = {c: {} for c in prefixes}
    rest: dict[str, torch.Tensor] = {}
    ignore = list(ignore)
    for name, t in state_dict.items():
        for comp, prefix in order:
            if name.startswith(prefix):
                out[comp][name[len(prefix):]] = t
                break
        else:
            if not is_harmless(name, ignore):
                rest[name] = t
    if rest and strict:
        names = sorted(rest)
        raise WeightsError(
            f"{source}: {len(names)} tensors belong to no component of this model (first: {_first(names)}). "
            f"Expected names under {', '.join(repr(p) for _, p in order)}, plus the listed harmless extras "
            f"(schedule buffers, model_ema.*, position_ids). This is probably a checkpoint of another model.")
    if rest:
        out[REST] = rest
    return out


def format_mismatch(source: str, component: str, missing: list[str], unexpected: list[str],
                    shapes: list[tuple[str, tuple, tuple]], what: str = "the model") -> str:
    """One paragraph listing the first 10 of each kind of difference, with counts."""
    lines = [f"{source}: the {component} weights do not match {what}: "
             f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} with another shape."]
    if missing:
        lines.append(f"  missing from the file ({len(missing)}): {_first(missing)}")
    if unexpected:
        lines.append(f"  unexpected in the file ({len(unexpected)}): {_first(unexpected)}")
    if shapes:
        shown = [f"{k} file {list(a)} vs {list(b)}" for k, a, b in shapes]
        lines.append(f"  shape differs ({len(shapes)}): {_first(shown)}")
    if missing and unexpected and not shapes and len(unexpected) >= len(missing) // 2:
        lines.append("  Nearly nothing matches: a checkpoint of another model, the wrong component, or a prefix "
                     "left unstripped (see minivid.weights.detect and SD_PREFIXES).")
    return "\n".join(lines)


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, component: str,
                ignore: Iterable[str] = HARMLESS_EXTRAS) -> nn.Module:
    """Load `state_dict` into `module` after checking names and shapes; convert dtypes.

    1. names/shapes: every tensor of `module.state_dict()` must be present with its shape, and the
       file may carry nothing else except names matching `ignore` -> else WeightsError listing the
       first 10 missing / unexpected / misshapen names and their counts, naming file and component;
    2. each tensor is converted to the dtype of the module's tensor (fp16/bf16 files into fp32
       models and back);
    3. `module.load_state_dict(strict=True)` (with assign=True when the module sits on the meta
       device, so a model built on meta is materialised from the file without a second copy).
    """
    expected = module.state_dict()
    ignore = list(ignore)
    given = {k: v for k, v in state_dict.items() if k in expected or not is_harmless(k, ignore)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted((k, tuple(given[k].shape), tuple(expected[k].shape)) for k in set(given) & set(expected)
                    if tuple(given[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        raise WeightsError(format_mismatch(source, component, missing, unexpected, shapes,
                                           f"minivid's {type(module).__name__}"))
    not_float = sorted(k for k, v in given.items() if expected[k].is_floating_point() and not v.is_floating_point())
    if not_float:
        raise WeightsError(f"{source}: {len(not_float)} tensor(s) of {component} are stored as integers where the model "
                           f"holds floats (first: {', '.join(f'{k} ({given[k].dtype})' for k in not_float[:5])}); a "
                           f"quantized or damaged file: minivid loads float checkpoints (fp32, fp16, bf16)")
    converted = {k: v.to(dtype=expected[k].dtype) for k, v in given.items()}
    on_meta = any(t.is_meta for t in expected.values())
    module.load_state_dict(converted, strict=True, assign=on_meta)
    log.debug("%s: loaded %d tensors into %s (%s)", source, len(converted), component, type(module).__name__)
    return module


# ------------------------------------------------------------------------------------ manifests


def _manifests_dir() -> Path:
    import minivid

    return Path(minivid.__file__).resolve().parents[1] / "weights" / "manifests"


MANIFESTS_DIR = _manifests_dir()


@dataclass(frozen=True)
class Manifest:
    """The tensors of one official checkpoint: name -> (shape, dtype), and how they were obtained."""

    name: str
    tensors: dict[str, TensorInfo]
    info: dict
    prefix_groups: dict


def load_manifest(name: str) -> Manifest:
    """Read weights/manifests/<name>.json ("sd-v1-4", "sd-v2-1", "svd", "svd_xt")."""
    name = name.removesuffix(".json")
    path = MANIFESTS_DIR / f"{name}.json"
    if not path.is_file():
        have = sorted(p.stem for p in MANIFESTS_DIR.glob("*.json")) if MANIFESTS_DIR.is_dir() else []
        raise WeightsError(
            f"{path}: no such manifest. Available: {', '.join(have) or 'none'}. The manifests live in the "
            f"repository's weights/manifests/ folder, beside the package; a wheel install without the "
            f"source checkout does not ship them.")
    data = json.loads(path.read_text())
    tensors = {k: (tuple(shape), dtype) for k, (shape, dtype) in data["tensors"].items()}
    return Manifest(name, tensors, data.get("info", {}), data.get("prefix_groups", {}))


@dataclass
class Report:
    """How a state dict differs from a manifest."""

    manifest: str
    missing: list[str] = field(default_factory=list)         # in the manifest, not in the file
    unexpected: list[str] = field(default_factory=list)      # in the file, not in the manifest
    shapes: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (name, file shape, manifest shape)
    missing_optional: list[str] = field(default_factory=list)  # listed harmless extras the file does not carry
    extra_harmless: list[str] = field(default_factory=list)    # listed harmless extras the manifest does not list
    dtypes: dict[str, int] = field(default_factory=dict)       # file dtype -> tensor count

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shapes)

    def summary(self) -> str:
        if self.ok:
            return f"matches manifest {self.manifest}"
        return format_mismatch(f"vs manifest {self.manifest}", "file", self.missing, self.unexpected, self.shapes,
                               "the official checkpoint")

    def to_json(self) -> dict:
        return {"manifest": self.manifest, "ok": self.ok, "missing": self.missing, "unexpected": self.unexpected,
                "shapes": [{"name": k, "file": list(a), "manifest": list(b)} for k, a, b in self.shapes],
                "missing_optional": self.missing_optional, "extra_harmless": self.extra_harmless,
                "dtypes": self.dtypes}


def compare_to_manifest(state_dict_or_shapes: Mapping[str, torch.Tensor | TensorInfo] | Mapping[str, tuple],
                        manifest_name: str | Manifest, optional: Iterable[str] = HARMLESS_EXTRAS) -> Report:
    """Compare names and shapes of a state dict (tensors, or name -> (shape, dtype)) with a manifest.

    Listed harmless extras are reported apart: absent ones in `missing_optional` (e.g. the
    model_ema scalars some SD 2.1 copies drop), present-but-unlisted ones in `extra_harmless`.
    """
    man = manifest_name if isinstance(manifest_name, Manifest) else load_manifest(manifest_name)
    info = _as_info(state_dict_or_shapes)
    optional = list(optional)
    rep = Report(man.name)
    for k in man.tensors:
        if k not in info:
            (rep.missing_optional if is_harmless(k, optional) else rep.missing).append(k)
        elif tuple(info[k][0]) != tuple(man.tensors[k][0]):
            rep.shapes.append((k, tuple(info[k][0]), tuple(man.tensors[k][0])))
    for k in info:
        if k not in man.tensors:
            (rep.extra_harmless if is_harmless(k, optional) else rep.unexpected).append(k)
    for _, dtype in info.values():
        rep.dtypes[dtype] = rep.dtypes.get(dtype, 0) + 1
    rep.unexpected.sort()  # missing and shapes stay in the manifest's (architecture) order
    return rep


def _as_info(x: Mapping) -> dict[str, TensorInfo]:
    if not x:
        return {}
    first = next(iter(x.values()))
    if isinstance(first, torch.Tensor):
        return shapes_of(x)
    return {k: (tuple(v[0]), str(v[1])) for k, v in x.items()}


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, int]]:
    """(name, count of NaN/Inf values) of every floating tensor that is not all finite, in order."""
    for name, t in named:
        if t.is_floating_point() and t.device.type != "meta":
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                yield name, bad


def check_finite(named: Iterable[tuple[str, torch.Tensor]], source: str, allow: bool = False, n: int = 3) -> list[str]:
    """Refuse weights holding NaN/Inf: WeightsError naming `source` and the first `n` such tensors (and how
    many values each has). allow=True (for inspection) logs a warning instead. Returns the names found."""
    found = list(nonfinite_tensors(named))
    if found:
        first = ", ".join(f"{k} ({c} values)" for k, c in found[:n]) + (f" and {len(found) - n} more" if len(found) > n else "")
        message = f"{source}: {len(found)} tensor(s) hold NaN/Inf: {first}"
        if not allow:
            raise WeightsError(message + "; the file is damaged or was saved from a diverged run "
                               "(load it anyway, for inspection, with allow_nonfinite=True / --allow-nonfinite)")
        logging.getLogger(__name__).warning("%s; loaded anyway (allow_nonfinite)", message)
    return [k for k, _ in found]
