"""Per-component numerical parity of minivid against diffusers/transformers, for weights a user holds.

    report = run_parity("weights/v2-1_768-ema-pruned.safetensors", components=["unet", "vae", "text"])
    print(render(report)); report.passed          # what `minivid parity WEIGHTS` prints and returns

THIS is the one module of minivid that imports the oracles (diffusers, transformers), and only inside
functions, when a parity run asks for them; importing it (or any other minivid module) loads neither
(tests/test_no_oracle_imports.py enforces both). They come with the `[parity]` extra:
`pip install -e '.[parity]'`.

How the reference is built, offline (HF_HUB_OFFLINE is set before the oracles are imported; nothing
is ever fetched from the hub):
- SD 1.x / 2.x single file: diffusers' own single-file converters (`convert_ldm_unet_checkpoint`,
  `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`) rename
  the file's tensors into diffusers' `UNet2DConditionModel`, `AutoencoderKL` and transformers'
  `CLIPTextModel`. diffusers' single-file loaders would fetch a config from the hub, so the configs
  are made here: the ldm inference-yaml parameters of minivid's config, handed to diffusers'
  `create_unet_diffusers_config_from_ldm` / `create_vae_diffusers_config_from_ldm`; the text config
  from minivid's text config.
- SVD / SVD-XT single file: diffusers has no SVD single-file converter, so the tensors are renamed
  by minivid's `svd_*` tables (whose correctness tests/test_svd.py checks through diffusers' own
  `from_pretrained`) into `UNetSpatioTemporalConditionModel`, `AutoencoderKLTemporalDecoder` and
  transformers' `CLIPVisionModelWithProjection`. diffusers builds some SVD ResBlocks with GroupNorm
  eps 1e-6 where sgm (and minivid) use 1e-5 (docs/svd.md); the reference gets sgm's eps unless
  `diffusers_eps=True`.
- A diffusers folder: each component's `from_pretrained(..., local_files_only=True)`.

Every component runs on the same seeded inputs in the requested dtype. Per output: the largest
absolute difference, the largest relative difference (max |ours − ref| / max |ref|), the index of
the worst element, the time ratio (minivid / reference, best of `repeat` runs after one warm-up) and
the peak-memory ratio (the largest total size of the tensors alive during the call, parameters and
inputs excluded, counted by a dispatch mode, so it means the same on every device). An output passes
when its relative difference is at most TOLERANCES[dtype].
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["TOLERANCES", "COMPONENTS", "Row", "ParityReport", "run_parity", "render", "require_oracles",
           "peak_bytes", "compare"]

# Max relative difference (max |ours - ref| / max |ref|) an output may have, per compute dtype. The
# bound: one rounding of the dtype (fp32 6e-8, fp16 4.9e-4, bf16 3.9e-3) grows through a deep network
# whose two implementations sum in different orders, roughly like sqrt(terms summed per element).
# Measured on the tiny official-layout files (docs/parity.md): fp32 <= 3.2e-6, fp16 <= 2.2e-3,
# bf16 <= 2.0e-2; the full-size networks sum 4-10x more terms per element (sqrt: 2-3x), so the
# values below keep a margin of ~5x over the tiny figures scaled to full size.
TOLERANCES = {"fp32": 5e-5, "fp16": 2e-2, "bf16": 1e-1}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPONENTS = {"sd": ("unet", "vae", "text"), "svd": ("unet", "vae", "image")}
PROMPTS = ["a photo of a cat", "an astronaut riding a horse, highly detailed"]
INSTALL = "pip install 'minivid[parity]'   (or: pip install diffusers transformers)"


class OraclesMissing(ValueError):
    """diffusers/transformers (the `[parity]` extra) are not installed: the user's to fix, not a bug."""


def require_oracles() -> None:
    """Import check for the `[parity]` extra; an OraclesMissing error saying what to install when it is absent."""
    import importlib.util

    missing = [name for name in ("diffusers", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise OraclesMissing(f"minivid parity compares against {' and '.join(missing)}, which "
                           f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL}")


# ---------------------------------------------------------------- measuring

class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of the storages created by the ops run under it while they are alive, and the peak.
    Storages that existed before (parameters, inputs) are not counted, nor are views of them."""

    def __init__(self, existing: set[int]):
        super().__init__()
        self.existing = existing
        self.live: dict[int, list[int]] = {}          # storage pointer -> [bytes, live tensors]
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self.existing:
                continue
            entry = self.live.get(key)
            if entry is None:
                entry = self.live[key] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out


def _storages(objs) -> set[int]:
    keys = set()
    for t in objs:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            keys.add(t.untyped_storage().data_ptr())
    return keys


def peak_bytes(fn: Callable[[], Any], modules: Sequence[torch.nn.Module] = (), inputs: Sequence[Any] = ()) -> int:
    """Peak bytes of the tensors `fn()` allocates (its result included), parameters/buffers of `modules`
    and the tensors in `inputs` excluded."""
    existing = _storages(t for m in modules for t in (*m.parameters(), *m.buffers()))
    existing |= _storages(torch.utils._pytree.tree_leaves(list(inputs)))
    mode = _LiveBytes(existing)
    with torch.no_grad(), mode:
        result = fn()
    del result
    return mode.peak


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[Any, float]:
    """(result of the first timed run, best time of `repeat` runs after one warm-up)."""
    with torch.no_grad():
        fn()
        best, first = math.inf, None
        for i in range(max(1, repeat)):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
            if i == 0:
                first = out
    return first, best


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """max_abs, max_rel (max |ours - ref| / max |ref|) and the index of the worst element."""
    if ours.shape != ref.shape:
        return {"shape": list(ref.shape), "max_abs": math.inf, "max_rel": math.inf, "worst": None,
                "note": f"shapes differ: minivid {list(ours.shape)}, reference {list(ref.shape)}"}
    diff = (ours.float() - ref.float()).abs()
    if not torch.isfinite(ours).all() or not torch.isfinite(ref).all():
        bad = "minivid" if not torch.isfinite(ours).all() else "reference"
        return {"shape": list(ref.shape), "max_abs": math.inf, "max_rel": math.inf, "worst": None,
                "note": f"non-finite values in the {bad} output"}
    flat = int(diff.argmax()) if diff.numel() else 0
    worst = [int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)] if diff.numel() else []
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(ref.float().abs().max()) if ref.numel() else 0.0
    return {"shape": list(ref.shape), "max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else
            (0.0 if max_abs == 0 else math.inf), "worst": worst}


# ---------------------------------------------------------------- the report

@dataclass
class Row:
    component: str
    output: str
    shape: list[int]
    max_abs: float
    max_rel: float
    worst: list[int] | None
    seconds_minivid: float
    seconds_reference: float
    peak_minivid: int
    peak_reference: int
    tolerance: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.max_rel <= self.tolerance

    @property
    def time_ratio(self) -> float:
        return self.seconds_minivid / self.seconds_reference if self.seconds_reference > 0 else math.nan

    @property
    def memory_ratio(self) -> float:
        return self.peak_minivid / self.peak_reference if self.peak_reference > 0 else math.nan

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(passed=self.passed, time_ratio=_finite(self.time_ratio), memory_ratio=_finite(self.memory_ratio),
                 max_abs=_finite(self.max_abs), max_rel=_finite(self.max_rel))
        return d


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass
class ParityReport:
    weights: str
    reference_weights: str
    model: str
    dtype: str
    device: str
    tolerance: float
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        """Components with an output over the tolerance, in order."""
        return list(dict.fromkeys(r.component for r in self.rows if not r.passed))

    @property
    def passed(self) -> bool:
        return not self.failed

    def to_json(self) -> dict[str, Any]:
        comps = list(dict.fromkeys(r.component for r in self.rows))
        return {"weights": self.weights, "reference_weights": self.reference_weights, "model": self.model,
                "dtype": self.dtype, "device": self.device, "tolerance": self.tolerance,
                "tolerance_rule": "max_rel = max|minivid - reference| / max|reference| <= tolerance",
                "settings": self.settings, "rows": [r.to_json() for r in self.rows],
                "components": {c: c not in self.failed for c in comps}, "passed": self.passed,
                "failed": self.failed, "notes": self.notes}


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def render(report: ParityReport) -> str:
    """The table `minivid parity` prints."""
    head = ["component", "output", "shape", "max abs", "max rel", "worst at", "time ×", "memory ×", "result"]
    body = []
    for r in report.rows:
        body.append([r.component, r.output, "×".join(map(str, r.shape)), f"{r.max_abs:.2e}", f"{r.max_rel:.2e}",
                     "—" if r.worst is None else "[" + ",".join(map(str, r.worst)) + "]",
                     f"{r.time_ratio:.2f}", f"{r.memory_ratio:.2f}", "pass" if r.passed else "FAIL"])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    ref = "" if report.reference_weights == report.weights else f" against {report.reference_weights}"
    out = [f"minivid parity: {report.weights}{ref} ({report.model}, {report.dtype}, {report.device})",
           f"reference: diffusers/transformers; pass when max rel = max|minivid − ref| / max|ref| ≤ "
           f"{report.tolerance:g} ({report.dtype}); time × and memory × are minivid / reference", "",
           line(head), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    for r in report.rows:
        if r.note:
            out.append(f"note: {r.component} {r.output}: {r.note}")
    out += [f"note: {n}" for n in report.notes]
    out.append("")
    out.append("all components pass" if report.passed else f"FAIL: {', '.join(report.failed)} "
               f"over the {report.dtype} tolerance {report.tolerance:g}")
    return "\n".join(out)


def write_json(report: ParityReport, path: str | os.PathLike) -> Path:
    """The report as JSON, written to a temporary file and renamed into place."""
    from minivid.outputs import write_json as write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write(path, report.to_json(), indent=1)


# ---------------------------------------------------------------- the run

@dataclass
class _Check:
    """One call of one component: minivid's and the reference's, returning {output name: tensor}."""
    component: str
    ours: Callable[[], dict[str, torch.Tensor]]
    ref: Callable[[], dict[str, torch.Tensor]]
    modules: tuple[torch.nn.Module, torch.nn.Module]
    inputs: tuple[Any, ...]


def _family(path: Path) -> tuple[str, str]:
    """("sd" | "svd", "single-file" | "folder") of a weights path, or a ValueError."""
    from minivid import weights as W

    layout, comps = W.detect_path(path)
    if layout == "single-file":
        model, reason = W.describe_detection(W.read_shapes(next(iter(comps.values()))), path.name)
        if model in ("sd1", "sd2"):
            return "sd", "single-file"
        if model in ("svd", "svd_xt"):
            return "svd", "single-file"
        raise W.WeightsError(f"{path}: not an SD 1.x/2.x or SVD checkpoint ({reason}); minivid parity compares those")
    if layout == "diffusers-sd":
        return "sd", "folder"
    if layout == "diffusers-svd":
        return "svd", "folder"
    raise W.WeightsError(f"{path}: not a Stable Diffusion or SVD pipeline folder (no model_index.json with "
                         f"unet/, vae/ and text_encoder/ or image_encoder/)")


def run_parity(weights: str | os.PathLike, components: Sequence[str] | None = None,
               size: tuple[int, int] | None = None, frames: int = 4, dtype: str = "fp32",
               device: str = "cpu", timesteps: Sequence[float] | None = None, seed: int = 0, repeat: int = 2,
               reference: str | os.PathLike | None = None, diffusers_eps: bool = False,
               progress: bool = False) -> ParityReport:
    """Run minivid's and the reference's components on the same inputs; see the module docstring.

    components: a subset of ("unet", "vae", "text") for SD, ("unet", "vae", "image") for SVD (default all).
    size: (H, W) pixels of the UNet/VAE inputs (default 256×256 for SD, 128×128 for SVD); frames: SVD's clip.
    timesteps: the UNet batch, one entry per sample (SD: DDPM timesteps, default 999, 500, 1; SVD: EDM
    sigmas, default 700, 1, 0.002). reference: build the oracle from another file or folder of the same
    model (default: `weights` itself), e.g. to check that a converted copy still equals the original.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    weights, reference = Path(weights), Path(reference) if reference is not None else None
    family, fmt = _family(weights)
    ref_path = reference or weights
    if reference is not None:
        ref_family, ref_fmt = _family(reference)
        if ref_family != family:
            raise ValueError(f"--reference {reference} holds an {ref_family.upper()} model, {weights} an {family.upper()} one")
    else:
        ref_fmt = fmt
    allowed = COMPONENTS[family]
    components = list(components or allowed)
    unknown = [c for c in components if c not in allowed]
    if unknown:
        raise ValueError(f"{weights} is an {family.upper()} model: its components are {', '.join(allowed)}; "
                         f"not {', '.join(unknown)}")
    if frames < 1 or repeat < 1:
        raise ValueError("--frames and --repeat must be at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    require_oracles()
    torch_dtype = DTYPES[dtype]
    build = _sd_checks if family == "sd" else _svd_checks
    checks, model_name, notes, settings = build(weights, ref_path, ref_fmt, components, size, frames, torch_dtype,
                                                torch.device(device), timesteps, seed, diffusers_eps)
    report = ParityReport(str(weights), str(ref_path), model_name, dtype, device, TOLERANCES[dtype],
                          {**settings, "seed": seed, "repeat": repeat, "components": components}, notes=notes)
    from tqdm import tqdm

    for check in tqdm(checks, desc="parity", disable=not progress, leave=False):
        ours, t_ours = _timed(check.ours, repeat)
        ref, t_ref = _timed(check.ref, repeat)
        m_ours = peak_bytes(check.ours, [check.modules[0]], check.inputs)
        m_ref = peak_bytes(check.ref, [check.modules[1]], check.inputs)
        for name, value in ours.items():
            c = compare(value, ref[name])
            report.rows.append(Row(check.component, name, c["shape"], c["max_abs"], c["max_rel"], c["worst"],
                                   t_ours, t_ref, m_ours, m_ref, TOLERANCES[dtype], c.get("note", "")))
    return report


def _parse_pair(size, default):
    return tuple(size) if size is not None else default


# ---------------------------------------------------------------- Stable Diffusion

def ldm_original_config(cfg) -> dict:
    """The ldm inference-yaml parameters an SDConfig stands for, as diffusers' config makers read them."""
    u, v = cfg.unet, cfg.vae
    unet = dict(in_channels=u.in_channels, out_channels=u.out_channels, model_channels=u.model_channels,
                channel_mult=list(u.channel_mult), num_res_blocks=u.num_res_blocks,
                attention_resolutions=list(u.attention_resolutions), context_dim=u.context_dim,
                use_linear_in_transformer=u.use_linear_in_transformer, transformer_depth=u.transformer_depth)
    unet.update({"num_heads": u.num_heads} if u.num_heads else {"num_head_channels": u.num_head_channels})
    ddconfig = dict(ch=v.ch, ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks, in_channels=v.in_channels,
                    out_ch=v.out_ch, z_channels=v.z_channels, embed_dim=v.embed_dim)
    return {"model": {"params": {"unet_config": {"params": unet}, "scale_factor": cfg.latent_scale,
                                 "first_stage_config": {"params": {"ddconfig": ddconfig,
                                                                   "embed_dim": v.embed_dim}}}}}


def _sd_reference_from_file(path: Path, cfg, components: Sequence[str]) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel

    from minivid import weights as W

    state = W.read_state_dict(path)
    original = ldm_original_config(cfg)
    out: dict[str, torch.nn.Module] = {}
    if "unet" in components:
        ucfg = sfu.create_unet_diffusers_config_from_ldm(original, state)
        ucfg["upcast_attention"] = cfg.unet.upcast_attention
        unet = UNet2DConditionModel(**ucfg)
        unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(state, ucfg), strict=True)
        out["unet"] = unet
    if "vae" in components:
        vcfg = sfu.create_vae_diffusers_config_from_ldm(original, state)
        vae = AutoencoderKL(**vcfg)
        vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(state, vcfg), strict=True)
        out["vae"] = vae
    if "text" in components:
        t = cfg.text
        # diffusers' SD 2 converter drops the last OpenCLIP block (SD conditions on the penultimate one)
        layers = t.layers - (cfg.kind == "sd2" and t.conditioning_layer == "penultimate")
        text = CLIPTextModel(CLIPTextConfig(hidden_size=t.width, intermediate_size=t.mlp_width, num_hidden_layers=layers,
                                            num_attention_heads=t.heads, hidden_act=t.act, vocab_size=t.vocab_size,
                                            max_position_embeddings=t.context_length, layer_norm_eps=t.eps))
        if cfg.kind == "sd1":
            text_sd = sfu.convert_ldm_clip_checkpoint(state)
        else:
            text_sd = sfu.convert_open_clip_checkpoint(text, state, prefix=W.SD_PREFIXES["sd2"]["text"])
        text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()
                   if k.startswith("text_model.") and not k.endswith("position_ids")}
        text.load_state_dict(text_sd, strict=True)
        out["text"] = text
    return out


# component -> (library, class, subfolder) of a diffusers folder's reference model
FOLDER_MODELS = {
    "sd": {"unet": ("diffusers", "UNet2DConditionModel", "unet"), "vae": ("diffusers", "AutoencoderKL", "vae"),
           "text": ("transformers", "CLIPTextModel", "text_encoder")},
    "svd": {"unet": ("diffusers", "UNetSpatioTemporalConditionModel", "unet"),
            "vae": ("diffusers", "AutoencoderKLTemporalDecoder", "vae"),
            "image": ("transformers", "CLIPVisionModelWithProjection", "image_encoder")},
}


def _reference_from_folder(kind: str, path: Path, components: Sequence[str]) -> dict[str, torch.nn.Module]:
    """The reference components of a diffusers folder, from its own files only (`local_files_only`)."""
    import importlib

    out: dict[str, torch.nn.Module] = {}
    for name, (library, cls, sub) in FOLDER_MODELS[kind].items():
        if name in components:
            out[name] = getattr(importlib.import_module(library), cls).from_pretrained(path / sub, local_files_only=True)
    return out


def _references(kind: str, ref_path: Path, ref_fmt: str, components, device, dtype,
                from_file: Callable[[], dict[str, torch.nn.Module]]) -> dict[str, torch.nn.Module]:
    """The reference components, from a single file (`from_file`) or a diffusers folder, in eval mode."""
    refs = from_file() if ref_fmt == "single-file" else _reference_from_folder(kind, ref_path, components)
    return {k: m.to(device=device, dtype=dtype).eval() for k, m in refs.items()}


def _sd_checks(weights: Path, ref_path: Path, ref_fmt: str, components, size, frames, dtype, device, timesteps,
               seed, diffusers_eps):
    from minivid.models import StableDiffusion

    sd = StableDiffusion.load(weights, device=device, dtype=dtype)
    cfg = sd.config
    refs = _references("sd", ref_path, ref_fmt, components, device, dtype,
                       lambda: _sd_reference_from_file(ref_path, cfg, components))
    H, W = _parse_pair(size, (256, 256))
    f = cfg.downsample_factor
    if H % (f * cfg.unet.downsample_factor) or W % (f * cfg.unet.downsample_factor):
        raise ValueError(f"--size {H},{W}: both sides must be multiples of {f * cfg.unet.downsample_factor} for this model")
    ts = list(timesteps) if timesteps is not None else [999, 500, 1]
    g = torch.Generator().manual_seed(seed)
    B = len(ts)
    x = torch.randn(B, cfg.unet.in_channels, H // f, W // f, generator=g).to(device, dtype)
    t = torch.tensor(ts, dtype=torch.float32).to(device)
    ctx = torch.randn(B, cfg.text.context_length, cfg.text.width, generator=g).to(device, dtype)
    images = (torch.rand(2, cfg.vae.in_channels, H, W, generator=g) * 2 - 1).to(device, dtype)
    z = torch.randn(2, cfg.vae.embed_dim, H // f, W // f, generator=g).to(device, dtype)
    ids = sd.tokenizer(PROMPTS).to(device)
    checks = []
    if "unet" in components:
        unet = refs["unet"]
        checks.append(_Check("unet", lambda: {"sample": sd.unet(x, t, ctx)},
                             lambda: {"sample": unet(x, t, encoder_hidden_states=ctx).sample},
                             (sd.unet, unet), (x, t, ctx)))
    if "vae" in components:
        vae = refs["vae"]

        def ours_enc():
            d = sd.vae.encode(images)
            return {"encode.mean": d.mean, "encode.std": d.std}

        def ref_enc():
            d = vae.encode(images).latent_dist
            return {"encode.mean": d.mean, "encode.std": d.std}
        checks.append(_Check("vae", ours_enc, ref_enc, (sd.vae, vae), (images,)))
        checks.append(_Check("vae", lambda: {"decode": sd.vae.decode(z)}, lambda: {"decode": vae.decode(z).sample},
                             (sd.vae, vae), (z,)))
    if "text" in components:
        text = refs["text"]
        # a single SD 2.x file: diffusers keeps 23 of the 24 blocks, so its pooled output (the last block's
        # EOT token) is another quantity than the file's; only the UNet's conditioning is compared
        pooled = not (cfg.text.conditioning_layer == "penultimate" and text.config.num_hidden_layers < cfg.text.layers)

        checks.append(_Check("text", lambda: {"hidden": sd.text_encoder(ids)},
                             lambda: {"hidden": text(input_ids=ids).last_hidden_state},
                             (sd.text_encoder, text), (ids,)))
        if pooled:                              # its own call on each side, so the times compare
            checks.append(_Check("text", lambda: {"pooled": sd.text_encoder(ids, output="pooled")},
                                 lambda: {"pooled": text(input_ids=ids).pooler_output},
                                 (sd.text_encoder, text), (ids,)))
    notes = []
    if "text" in components and cfg.text.conditioning_layer == "penultimate":
        notes.append("text hidden: SD 2.x conditions on the penultimate OpenCLIP block + final LayerNorm, which is "
                     "what diffusers' converter keeps (the last block dropped); the pooled output is not compared "
                     "for a single SD 2.x file (the reference lacks the last block)")
    name = f"{'SD 1.x' if cfg.kind == 'sd1' else 'SD 2.x'} ({cfg.prediction}-prediction)"
    settings = {"size": [H, W], "timesteps": ts, "prompts": PROMPTS}
    return checks, name, notes, settings


# ---------------------------------------------------------------- Stable Video Diffusion

def _sgm_eps_(unet: torch.nn.Module) -> int:
    """Set the GroupNorm eps of diffusers' SVD ResBlocks to sgm's 1e-5; returns how many were changed."""
    n = 0
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.GroupNorm) and ".resnets." in name and m.eps != 1e-5:
            m.eps, n = 1e-5, n + 1
    return n


def _svd_reference_from_file(path: Path, svd, components) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKLTemporalDecoder, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from minivid import weights as W
    from minivid.svd import (COND_VAE_PREFIX, _unet_config_to_diffusers, _vae_config_to_diffusers,
                             _vision_config_to_transformers)
    from minivid.weights.diffusers_names import original_to_diffusers

    cfg = svd.config
    parts = W.split_by_prefix(W.read_state_dict(path), {**W.SVD_PREFIXES, "cond_vae": COND_VAE_PREFIX}, source=str(path))
    plain = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    out: dict[str, torch.nn.Module] = {}
    if "unet" in components:
        unet = UNetSpatioTemporalConditionModel(**plain(_unet_config_to_diffusers(cfg.unet)))
        unet.load_state_dict(original_to_diffusers("svd_unet", parts["unet"]), strict=True)
        out["unet"] = unet
    if "vae" in components:
        vae = AutoencoderKLTemporalDecoder(**plain(_vae_config_to_diffusers(cfg.vae, cfg.latent_scale)))
        vae.load_state_dict({**original_to_diffusers("svd_vae", parts["vae"]),
                             **W.identity_quant_conv(cfg.vae.embed_dim)}, strict=True)
        out["vae"] = vae
    if "image" in components:
        vision = {k: v for k, v in _vision_config_to_transformers(cfg.vision).items()
                  if k not in ("architectures", "model_type", "torch_dtype")}
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
        encoder.load_state_dict(original_to_diffusers("svd_image_encoder", parts["image_encoder"]), strict=True)
        out["image"] = encoder
    return out


def _svd_checks(weights: Path, ref_path: Path, ref_fmt: str, components, size, frames, dtype, device, timesteps,
                seed, diffusers_eps):
    from minivid.svd import StableVideoDiffusion

    svd = StableVideoDiffusion.load(weights, device=device, dtype=dtype)
    cfg = svd.config
    refs = _references("svd", ref_path, ref_fmt, components, device, dtype,
                       lambda: _svd_reference_from_file(ref_path, svd, components))
    notes = []
    if "unet" in refs:
        if diffusers_eps:
            notes.append("unet: diffusers' own GroupNorm eps (1e-6 in some ResBlocks; sgm and minivid use 1e-5)")
        else:
            changed = _sgm_eps_(refs["unet"])
            notes.append(f"unet: {changed} GroupNorm eps of the reference's ResBlocks set from diffusers' 1e-6 to "
                         f"sgm's 1e-5 (docs/svd.md; --diffusers-eps keeps them)")
    H, W = _parse_pair(size, (128, 128))
    f = cfg.downsample_factor
    m = f * cfg.unet.downsample_factor
    if H % m or W % m:
        raise ValueError(f"--size {H},{W}: both sides must be multiples of {m} for this model")
    sigmas = list(timesteps) if timesteps is not None else [700.0, 1.0, 0.002]
    g = torch.Generator().manual_seed(seed)
    B, F = len(sigmas), frames
    x = torch.randn(B, F, cfg.unet.in_channels, H // f, W // f, generator=g).to(device, dtype)
    c_noise = (0.25 * torch.log(torch.tensor(sigmas, dtype=torch.float64))).float().to(device)
    embeds = torch.randn(B, 1, cfg.unet.context_dim, generator=g).to(device, dtype)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]] * B).to(device, dtype)
    images = (torch.rand(F, 3, H, W, generator=g) * 2 - 1).to(device, dtype)
    z = torch.randn(F, cfg.vae.embed_dim, H // f, W // f, generator=g).to(device, dtype)
    size_in = cfg.vision.image_size
    pixels = torch.randn(2, 3, size_in, size_in, generator=g).to(device, dtype)
    checks = []
    if "unet" in components:
        unet = refs["unet"]
        checks.append(_Check("unet", lambda: {"sample": svd.unet(x, c_noise, embeds, time_ids)},
                             lambda: {"sample": unet(x, c_noise, embeds, time_ids).sample},
                             (svd.unet, unet), (x, c_noise, embeds, time_ids)))
    if "vae" in components:
        vae = refs["vae"]

        def ours_enc():
            d = svd.vae.encode(images)
            return {"encode.mean": d.mean, "encode.std": d.std}

        def ref_enc():
            d = vae.encode(images).latent_dist
            return {"encode.mean": d.mean, "encode.std": d.std}
        checks.append(_Check("vae", ours_enc, ref_enc, (svd.vae, vae), (images,)))
        checks.append(_Check("vae", lambda: {"decode": svd.vae.decode(z, num_frames=F)},
                             lambda: {"decode": vae.decode(z, num_frames=F).sample}, (svd.vae, vae), (z,)))
    if "image" in components:
        enc = refs["image"]
        checks.append(_Check("image", lambda: {"embeds": svd.image_encoder(pixels)},
                             lambda: {"embeds": enc(pixels).image_embeds}, (svd.image_encoder, enc), (pixels,)))
    name = f"Stable Video Diffusion ({svd.load_info.get('detected', 'svd')})"
    settings = {"size": [H, W], "frames": F, "sigmas": sigmas}
    return checks, name, notes, settings
