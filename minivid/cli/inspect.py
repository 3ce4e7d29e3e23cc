"""`minivid inspect PATH`: which official model a checkpoint file or diffusers folder holds.

Reports the model (SD 1.x / 2.x with its eps-or-v guess / SVD / SVD-XT / unknown, and why),
the dtypes, the parameters per component, and every difference from the matching manifest of
the official file (missing, unexpected, other shape). Reads only what it must: the header of a
.safetensors file, a memory map of a .ckpt. `--write-tiny DIR` writes a small random checkpoint
with the official SD or SVD names (see weights/README.md) and inspects it.
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:            # torch and the weights package load when a path is inspected, not for --help
    import torch

help = "say which official model a checkpoint file or diffusers folder holds, and how it differs from it"

# diffusers folder component -> (rename table, original prefix) per model
_SVD = {"unet": ("svd_unet", "model.diffusion_model."), "vae": ("svd_vae", "first_stage_model."),
        "image_encoder": ("svd_image_encoder", "conditioner.embedders.0.open_clip.model.")}
_DIFFUSERS_COMPONENTS = {
    "sd1": {"unet": ("unet", "model.diffusion_model."), "vae": ("vae", "first_stage_model."),
            "text_encoder": ("text_sd1", "cond_stage_model.transformer.")},
    "sd2": {"unet": ("unet", "model.diffusion_model."), "vae": ("vae", "first_stage_model."),
            "text_encoder": ("text_sd2", "cond_stage_model.model.")},
    "svd": _SVD,
    "svd_xt": _SVD,
}


# minivid.weights.tiny.TINY_LAYOUTS (a test checks they agree), spelled out so `--help` imports no torch
TINY_LAYOUTS = ("sd-v1-4", "sd-v2-1", "svd", "svd_xt")


def _svd_tables() -> None:
    """The SVD tables register themselves in W.TABLES when their module is imported."""
    try:
        importlib.import_module("minivid.weights.svd_names")
    except ModuleNotFoundError as e:
        if e.name != "minivid.weights.svd_names":
            raise


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", help="a checkpoint file (.safetensors/.ckpt/.pt/.pth/.bin) or a diffusers folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--all", action="store_true", help="list every difference (default: the first 10 of each kind)")
    p.add_argument("--manifest", help="compare with this manifest (sd-v1-4, sd-v2-1, svd, svd_xt) instead of the detected one")
    p.add_argument("--write-tiny", metavar="DIR",
                   help="write DIR/tiny-<like>.safetensors, a small random checkpoint with the official names, and inspect it")
    p.add_argument("--like", choices=list(TINY_LAYOUTS), default="sd-v1-4", help="official layout for --write-tiny")


def _params(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _meta(info: dict) -> dict[str, torch.Tensor]:
    import torch

    return {k: torch.empty(s, dtype=getattr(torch, d, torch.float32), device="meta") for k, (s, d) in info.items()}


def inspect_path(path: str | Path, manifest: str | None = None) -> dict:
    """Everything `minivid inspect` reports, as a JSON-ready dict."""
    from minivid import weights as W

    path = Path(path)
    kind, comps = W.detect_path(path)
    out: dict = {"path": str(path), "layout": kind}
    if kind == "diffusers-sd" or kind == "diffusers-svd" or kind == "diffusers-other":
        model, reason = W.detect_folder(path)
        per = {name: W.read_shapes(f) for name, f in comps.items()}
        info = {f"{name}/{k}": v for name, sd in per.items() for k, v in sd.items()}
        groups = {name: {"prefix": f"{name}/", "tensors": len(sd), "params": sum(_params(s) for s, _ in sd.values())}
                  for name, sd in per.items()}
        out["format"] = "diffusers folder (" + ", ".join(f"{n}/{f.name}" for n, f in comps.items()) + ")"
    else:
        file = next(iter(comps.values()))
        info = W.read_shapes(file)
        model, reason = W.describe_detection(info, file.name)
        groups = W.group_by_component(info)
        per = None
        out["format"] = "single file, " + ("safetensors" if file.suffix == ".safetensors"
                                           else f"pickle ({file.suffix}) read with torch.load(weights_only=True)")
    out.update(model=model, model_name=W.MODELS[model], reason=reason)
    if model != "unknown":
        pred, why = W.guess_prediction(path, model, warn=False)      # the loader's rule; the report shows a warning
        out.update(prediction=pred, prediction_reason=why)
    dtypes: dict[str, int] = {}
    for _, d in info.values():
        dtypes[d] = dtypes.get(d, 0) + 1
    out.update(tensors=len(info), params=sum(_params(s) for s, _ in info.values()), dtypes=dtypes, components=groups)

    name = manifest or W.MANIFEST_OF.get(model)
    if name is None:
        out["manifest"] = None
        return out
    if per is None:
        out["manifest"] = W.compare_to_manifest(info, name).to_json()
        return out
    # a diffusers folder: rename to the original names, then compare; tensors the diffusers format
    # cannot hold (SD 2's 24th text resblock, text_projection, logit_scale) are reported apart
    table = _DIFFUSERS_COMPONENTS.get(model)
    if model.startswith("svd"):
        _svd_tables()
    if table is None or any(component not in W.TABLES for component, _ in table.values()):
        out["manifest"] = {"manifest": name, "note": f"no diffusers rename tables for {model} folders"}
        return out
    converted, errors = {}, []
    for comp, (component, prefix) in table.items():
        if comp not in per:
            errors.append(f"component folder {comp}/ is missing")
            continue
        try:
            renamed = W.diffusers_to_original(component, _meta(per[comp]))
        except W.WeightsError as e:
            errors.append(f"{comp}/: {e}")
            continue
        converted.update({prefix + k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in renamed.items()})
    man = W.load_manifest(name)
    rep = W.compare_to_manifest(converted, man)
    # official tensors outside every component (schedule buffers, EMA scalars, SVD's conditioner VAE
    # copy) and those the tables list as original-only cannot be in a diffusers folder
    prefixes = tuple(prefix for _, prefix in table.values())
    absent_in_format = {k for k in man.tensors if not k.startswith(prefixes)}
    for comp, (component, prefix) in table.items():
        rel = [k[len(prefix):] for k in man.tensors if k.startswith(prefix)]
        absent_in_format |= {prefix + k for k in W.original_only(component, rel)}
    only_original = sorted(k for k in rep.missing if k in absent_in_format)
    rep.missing = [k for k in rep.missing if k not in absent_in_format]
    js = rep.to_json()
    js.update(ok=rep.ok and not errors, not_in_diffusers_format=only_original, errors=errors)
    out["manifest"] = js
    return out


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.3f} G" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n}"


def _listing(title: str, items: list[str], show_all: bool, width: int = 12) -> list[str]:
    if not items:
        return []
    shown = items if show_all else items[:10]
    lines = [f"    {title:<{width}}{shown[0]}"] + [f"    {'':<{width}}{x}" for x in shown[1:]]
    if len(items) > len(shown):
        lines.append(f"    {'':<{width}}... {len(items) - len(shown)} more (--all lists every one)")
    return lines


def render(r: dict, show_all: bool = False) -> str:
    """The text report of `inspect_path`."""
    lines = [r["path"], f"  format      {r['format']}", f"  model       {r['model']}: {r['model_name']}",
             f"              ({r['reason']})"]
    if "prediction" in r:
        lines.append(f"  prediction  {r['prediction']}: {r['prediction_reason']}")
    dt = ", ".join(f"{d} {n}" for d, n in sorted(r["dtypes"].items(), key=lambda kv: -kv[1]))
    lines.append(f"  tensors     {r['tensors']} ({_fmt_params(r['params'])} parameters); dtypes: {dt}")
    first = True
    for label, g in r["components"].items():
        head = "  components  " if first else "              "
        lines.append(f"{head}{label:<22}{g['prefix']:<28}{g['tensors']:>6} tensors {_fmt_params(g['params']):>10}")
        first = False
    m = r["manifest"]
    if m is None:
        lines.append("  manifest    none: unknown model (compare with one anyway: --manifest sd-v1-4|sd-v2-1|svd|svd_xt)")
        return "\n".join(lines)
    if "note" in m:
        lines.append(f"  manifest    {m['manifest']}: {m['note']}")
        return "\n".join(lines)
    if m["ok"]:
        lines.append(f"  manifest    {m['manifest']}: no differences in names or shapes")
    else:
        lines.append(f"  manifest    {m['manifest']}: {len(m['missing'])} missing, {len(m['unexpected'])} unexpected, "
                     f"{len(m['shapes'])} with another shape")
    lines += _listing("missing", m["missing"], show_all)
    lines += _listing("unexpected", m["unexpected"], show_all)
    lines += _listing("shape", [f"{s['name']}  {s['file']} vs official {s['manifest']}" for s in m["shapes"]], show_all)
    for err in m.get("errors", []):
        lines += _listing("error", [err], True)
    notes = []
    if m.get("missing_optional"):
        notes.append(f"{len(m['missing_optional'])} listed harmless extras absent (schedule buffers, model_ema, position_ids)")
    if m.get("extra_harmless"):
        notes.append(f"{len(m['extra_harmless'])} listed harmless extras present (e.g. {m['extra_harmless'][0]})")
    if m.get("not_in_diffusers_format"):
        notes.append(f"{len(m['not_in_diffusers_format'])} official tensors the diffusers format does not hold "
                     f"(e.g. {m['not_in_diffusers_format'][0]})")
    lines += _listing("note", notes, True)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from minivid.weights.tiny import write_tiny_checkpoint

    if args.write_tiny:
        path = write_tiny_checkpoint(args.write_tiny, like=args.like)
        if not args.json:
            print(f"wrote {path}: random values, the official {args.like} names, every width shrunk "
                  f"(not a trained model; see weights/README.md)\n")
        args.path = args.path or str(path)
    if not args.path:
        raise ValueError("give a PATH to inspect (a checkpoint file or a diffusers folder), or --write-tiny DIR")
    report = inspect_path(args.path, args.manifest)
    print(json.dumps(report, indent=1) if args.json else render(report, args.all))
    return 0
