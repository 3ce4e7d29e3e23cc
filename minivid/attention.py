"""Attention: the extension point of minivid.

One `Attention` module owns the projections (`to_q`, `to_k`, `to_v`, `to_out.0`,
the ldm key names) and the head split. A *processor* owns the arithmetic:

    processor(q, k, v, ctx) -> out        # q: (B, heads, N, d), k/v: (B, heads, M, d) -> (B, heads, N, d)

so a new attention variant (sparse-causal, fine-coarse, correspondence-guided,
attention-map injection, ...) is a function of tens of lines, set on the layers
it applies to by a glob over their dotted names:

    set_processor(unet, "output_blocks.*.attn1", my_processor)

Every `Attention` knows its dotted name (`name_layers`). Capturing and injecting
Q/K/V, attention probabilities and block outputs happen inside scoped context
managers (`capture`, `inject`, `record_attention`, `capture_outputs`,
`replace_outputs`) that restore the model when they exit. `call_state(model, **kw)`
puts call-wide facts (frame count, step index, timestep) in front of every processor
for the duration of a block.

Selecting layers. `set_processor`, `processors` and `wrap_processors` take the same
`pattern`: a glob over dotted names (fnmatch: `*` spans dots), a list of globs or
names, or a predicate `(name, module) -> bool`; a pattern that selects nothing is an
error. `*attn1` means "every layer named attn1", which on a video UNet (SVD) includes
the temporal layers `...time_stack.0.attn1`: use `SPATIAL_SELF` / `TEMPORAL_SELF`
(and the `_CROSS` pair) to choose one kind.

Composing. A layer has one *processor* (what `set_processor` / `processors` set) and
a stack of *wrappers* (what `wrap_processors`, hence `capture`, `inject`,
`record_attention` and methods' recorders push). A call runs the wrappers, outermost
first, down to the processor in place at that moment, so the tools nest in any order:
a processor installed inside a capture scope is captured, a capture entered inside a
`processors` scope captures the processor of that scope. `image_model(model)` runs the
plain image model (default processors, no wrappers, no forward hooks inside it, mixed-in
video blocks as their image base class) for the duration of a block.
"""
from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from minivid.layers import HALF, Linear, cpu_has_native

__all__ = [
    "Attention", "AttnContext", "Processor", "sdpa", "explicit", "attention_probs",
    "name_layers", "attention_layers", "select_layers", "set_processor", "processors",
    "SPATIAL_SELF", "SPATIAL_CROSS", "TEMPORAL_SELF", "TEMPORAL_CROSS", "frame_count", "FramesUnknown",
    "call_state", "wrap_processors", "capture", "inject", "capture_outputs", "replace_outputs", "AttentionStore",
    "record_attention", "AttentionRecord", "AttentionMap", "image_model", "step_clock",
]

# Selectors that separate spatial from temporal attention. Spatial transformer blocks are
# `...transformer_blocks.i` in every minivid UNet (SD, SVD, inflated video models); SVD's temporal
# ones are `...time_stack.i` (sgm's names). A bare "*attn1" matches both kinds on SVD.
SPATIAL_SELF = "*transformer_blocks.*.attn1"
SPATIAL_CROSS = "*transformer_blocks.*.attn2"
TEMPORAL_SELF = "*time_stack.*.attn1"
TEMPORAL_CROSS = "*time_stack.*.attn2"

Pattern = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]


@dataclass
class AttnContext:
    """What a processor knows about the call it serves."""

    module: "Attention"
    name: str                       # dotted name of the layer, e.g. "input_blocks.1.1.transformer_blocks.0.attn1"
    is_cross: bool                  # keys come from an external context (text / image embedding)
    scale: float                    # 1/sqrt(d)
    upcast: bool                    # compute Q·Kᵀ and softmax in float32
    hw: tuple[int, int] | None      # spatial size of the token grid, where the caller knows it
    state: dict[str, Any]           # call-wide facts set by `call_state` (frames, step, ...)
    mask: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    observers: list[tuple[frozenset[str], Callable[[str, torch.Tensor], None]]] = field(default_factory=list)

    def report(self, kind: str, tensor: torch.Tensor) -> None:
        """A processor shows an intermediate of its own computation (e.g. `"probs"`, the attention
        probabilities it used, (B, h, N, M)) to the recorders listening on this call; free when
        nobody listens. Recorders (`record_attention`, `capture(kinds=("probs",))`) read these."""
        for kinds, observe in self.observers:
            if kind in kinds:
                observe(kind, tensor)


class Processor(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor: ...


def attention_probs(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale) over keys: (B, h, N, d), (B, h, M, d) -> (B, h, N, M), in q's dtype.

    With `ctx.upcast` the product and the softmax run in float32, as ldm does for SD 2.x
    (`_ATTN_PRECISION = "fp32"`). The softmax of float16/bfloat16 inputs always runs in float32,
    as under autocast and inside the fused kernels (docs/numerics.md, "Half precision").
    """
    dtype = q.dtype
    if ctx.upcast:
        q, k = q.float(), k.float()
    sim = torch.matmul(q, k.transpose(-1, -2)) * ctx.scale
    if ctx.mask is not None:
        sim = sim.masked_fill(~ctx.mask, torch.finfo(sim.dtype).min) if ctx.mask.dtype == torch.bool else sim + ctx.mask
    return sim.float().softmax(dim=-1).to(dtype)


def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """Attention written out: softmax(Q·Kᵀ/√d)·V. Equal to `sdpa` up to rounding. Reports the
    probabilities it multiplies V by (`ctx.report("probs", ...)`)."""
    probs = attention_probs(q, k, ctx)
    ctx.report("probs", probs)
    return torch.matmul(probs, v)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """The default processor: torch's fused scaled_dot_product_attention.

    The fused kernel never materialises the probabilities; when a recorder listens, `Attention`
    reports softmax(Q·Kᵀ·scale) (`attention_probs`) on the q, k this processor receives, computed
    beside it, so the output is the fused one, bit for bit."""
    if q.dtype in HALF and (ctx.upcast or (q.device.type == "cpu" and not cpu_has_native(q.dtype))):
        # float32 as asked (SD 2.1-v), or on a CPU without half kernels (its half path is scalar code)
        return F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=ctx.mask, scale=ctx.scale
        ).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, scale=ctx.scale)


# processors whose probabilities Attention reports for them (the fused kernel never materialises them)
sdpa.reports = ("probs",)          # type: ignore[attr-defined]
explicit.reports = ("probs",)      # type: ignore[attr-defined]


def _reports(processor: Processor, kind: str) -> bool:
    return kind in getattr(processor, "reports", ())


class Attention(nn.Module):
    """Multi-head attention with ldm's key names (`to_q`, `to_k`, `to_v`, `to_out.0`).

    x: (B, N, query_dim); context: (B, M, context_dim) or None (self-attention).
    `processor` computes the attention; `wrappers` (pushed by `wrap_processors`, innermost
    first) run around it, each calling the one beneath it (see the module docstring).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        upcast: bool = False,
        out_dim: int | None = None,
    ):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.scale = dim_head ** -0.5
        self.upcast = upcast
        self.is_cross = context_dim is not None
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(Linear(inner, out_dim or query_dim), nn.Dropout(0.0))
        self.processor: Processor = sdpa
        self.wrappers: list[Processor] = []  # pushed by `wrap_processors`, innermost first
        self.name = ""                      # set by `name_layers` on the model root
        self.state: dict[str, Any] = {}     # shared dict, set by `name_layers`

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, h·d) -> (B, h, N, d)"""
        B, N, _ = x.shape
        return x.view(B, N, self.heads, self.dim_head).transpose(1, 2)

    @staticmethod
    def merge_heads(x: torch.Tensor) -> torch.Tensor:
        """(B, h, N, d) -> (B, N, h·d)"""
        B, h, N, d = x.shape
        return x.transpose(1, 2).reshape(B, N, h * d)

    def context(self, hw: tuple[int, int] | None = None, mask: torch.Tensor | None = None, **extra) -> AttnContext:
        return AttnContext(self, self.name, self.is_cross, self.scale, self.upcast, hw, self.state, mask, extra)

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext, below: int | None = None
            ) -> torch.Tensor:
        """The wrappers beneath position `below` (all of them by default), then the processor."""
        level = len(self.wrappers) if below is None else below
        if level > 0:
            return self.wrappers[level - 1](q, k, v, ctx)
        processor = self.processor
        if ctx.observers and processor is sdpa and any("probs" in kinds for kinds, _ in ctx.observers):
            ctx.report("probs", attention_probs(q, k, ctx))     # what the fused kernel computes, shown beside it
        return processor(q, k, v, ctx)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        hw: tuple[int, int] | None = None,
        mask: torch.Tensor | None = None,
        **extra: Any,
    ) -> torch.Tensor:
        src = x if context is None else context
        q = self.split_heads(self.to_q(x))          # (B, h, N, d)
        k = self.split_heads(self.to_k(src))        # (B, h, M, d)
        v = self.split_heads(self.to_v(src))        # (B, h, M, d)
        out = self.run(q, k, v, self.context(hw, mask, **extra))
        return self.to_out(self.merge_heads(out))


# ---------------------------------------------------------------- naming and selection

def name_layers(model: nn.Module) -> nn.Module:
    """Give every Attention in `model` its dotted name and one shared call-state dict."""
    state: dict[str, Any] = {}
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            m.name = name
            m.state = state
    return model


def attention_layers(model: nn.Module, pattern: str = "*") -> dict[str, Attention]:
    """The Attention layers whose dotted name matches the glob `pattern` (fnmatch: `*` spans dots)."""
    return {
        name: m for name, m in model.named_modules()
        if isinstance(m, Attention) and fnmatch.fnmatchcase(name, pattern)
    }


def select_layers(model: nn.Module, pattern: Pattern, who: str = "select_layers") -> dict[str, Attention]:
    """The Attention layers `pattern` selects: a glob, a list of globs or exact names (each must match
    something), or a predicate `(name, module) -> bool`. Raises if nothing is selected, since a
    silent no-op hides typos; `who` names the caller in the error."""
    if callable(pattern) and not isinstance(pattern, str):
        found = {n: m for n, m in model.named_modules() if isinstance(m, Attention) and pattern(n, m)}
        if not found:
            raise ValueError(f"{who}: the selector {getattr(pattern, '__name__', pattern)!r} picks no attention layer")
        return found
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    if not patterns:
        raise ValueError(f"{who}: an empty list of layer patterns")
    layers: dict[str, Attention] = {}
    for pat in patterns:
        found = attention_layers(model, pat)
        if not found:
            raise ValueError(f"{who}: no attention layer matches {pat!r}")
        layers.update(found)
    return layers


def set_processor(
    model: nn.Module, pattern: Pattern, processor: Processor, *, factory: bool = False
) -> list[str]:
    """Set `processor` on every Attention `pattern` selects (`select_layers`); returns their names.

    With `factory=True`, `processor` is called as `processor(name, module)` once per layer
    and must return that layer's processor (for per-layer state). Wrappers on the layers stay.
    """
    layers = select_layers(model, pattern, "set_processor")
    for name, m in layers.items():
        m.processor = processor(name, m) if factory else processor
    return list(layers)


@contextlib.contextmanager
def processors(
    model: nn.Module, pattern: Pattern, processor: Processor, *, factory: bool = False
) -> Iterator[list[str]]:
    """Scoped `set_processor` (same arguments): the previous processors come back on exit.
    Wrappers on the layers (capture, inject, recorders) stay, and wrap the new processor."""
    layers = select_layers(model, pattern, "processors")
    saved = {n: m.processor for n, m in layers.items()}
    try:
        for n, m in layers.items():
            m.processor = processor(n, m) if factory else processor
        yield list(layers)
    finally:
        for n, m in layers.items():
            m.processor = saved[n]


class FramesUnknown(KeyError, ValueError):
    """No frame count for a video processor: neither passed nor in the call state (a KeyError and a
    ValueError, so callers of either older helper keep catching it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def frame_count(state: "dict[str, Any] | AttnContext", batch: int, frames: int | None = None, who: str = "") -> int:
    """The frame count F of a batch of `batch` = B·F frames (frames contiguous per video): `frames`
    if given, else `state["frames"]` set by `call_state(model, frames=F)`; `state` may be a
    processor's AttnContext. `FramesUnknown` (a KeyError and ValueError) when unknown, ValueError when
    `batch` is not a multiple. The one frame-count helper of every video processor in minivid."""
    if isinstance(state, AttnContext):
        who, state = who or state.name, state.state
    who = who or "video attention"
    if frames is None:
        if "frames" not in state:
            raise FramesUnknown(f"{who}: frame count unknown; pass frames= or run the video model inside "
                           f"minivid.attention.call_state(model, frames=F)")
        frames = state["frames"]
    frames = int(frames)
    if frames < 1 or batch % frames:
        raise ValueError(f"{who}: a batch of {batch} is not a whole number of videos of {frames} frames")
    return frames


@contextlib.contextmanager
def call_state(model: nn.Module, **state: Any) -> Iterator[dict[str, Any]]:
    """Put call-wide facts (e.g. `frames=8`, `step=3`, `t=981`) in front of every processor of `model`.

    minivid's pipelines set `step` (the sampler's step index, from 0 in each loop) and `t` (the
    timestep of the UNet call: the DDPM timestep for DDIM, σ for EDM) around every UNet call, and
    `frames` around video calls."""
    # Normally one dict shared by the whole model (`name_layers`); layers added later may hold their own.
    dicts = {id(m.state): m.state for m in attention_layers(model).values()}
    saved = {key: dict(d) for key, d in dicts.items()}
    for d in dicts.values():
        d.update(state)
    try:
        yield next(iter(dicts.values()), dict(state))
    finally:
        for key, d in dicts.items():
            d.clear()
            d.update(saved[key])


def step_clock(model: nn.Module, denoise: Callable[[torch.Tensor, Any], torch.Tensor]
               ) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """`denoise(x, t)` with `step` (0, 1, … : the index of the call, i.e. the sampler step) and `t`
    (the call's time as a Python number: an int timestep, or σ) in `model`'s call state around each
    call. Every minivid pipeline runs its sampler loops on such a denoiser, so processors and
    recorders read `ctx.state["step"]` and `ctx.state["t"]` instead of keeping a clock of their own."""
    counter = iter(range(1 << 62))

    def clocked(x: torch.Tensor, t: Any) -> torch.Tensor:
        tt = t.item() if isinstance(t, torch.Tensor) else t
        with call_state(model, step=next(counter), t=tt):
            return denoise(x, t)
    return clocked


# ---------------------------------------------------------------- wrappers

class _Beneath:
    """The `inner` a wrapper is given: at call time, whatever lies beneath the wrapper on its layer
    (the wrappers pushed before it, then the processor installed at that moment)."""

    __slots__ = ("module", "owner")

    def __init__(self, module: Attention):
        self.module, self.owner = module, None

    def __call__(self, q, k, v, ctx):
        for i, w in enumerate(self.module.wrappers):
            if w is self.owner:
                return self.module.run(q, k, v, ctx, below=i)
        return self.module.run(q, k, v, ctx, below=0)           # called after its scope closed

    def __repr__(self) -> str:
        return f"<the processor beneath a wrapper on {self.module.name or 'a layer'}>"


@contextlib.contextmanager
def wrap_processors(
    model: nn.Module, pattern: Pattern, wrap: Callable[[Processor], Processor]
) -> Iterator[list[str]]:
    """Push `wrap(inner)` on every layer `pattern` selects (`select_layers`); removed on exit.

    `inner(q, k, v, ctx)` runs what lies beneath the wrapper when it is called — the wrappers
    pushed earlier, then the layer's processor of that moment — so a processor installed inside
    this scope is wrapped too, and wrappers nest in any order. The building block of `capture`,
    `inject`, `record_attention` and methods' own recorders."""
    layers = select_layers(model, pattern, "wrap_processors")
    pushed: list[tuple[Attention, Processor]] = []
    try:
        for m in layers.values():
            beneath = _Beneath(m)
            w = wrap(beneath)
            beneath.owner = w
            m.wrappers.append(w)
            pushed.append((m, w))
        yield list(layers)
    finally:
        for m, w in reversed(pushed):
            for i in range(len(m.wrappers) - 1, -1, -1):
                if m.wrappers[i] is w:
                    del m.wrappers[i]
                    break


def _listen(ctx: AttnContext, kind: str, inner: Processor, q, k, v) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run `inner` with a listener for `kind` on the call; returns (out, what was reported)."""
    got: list[torch.Tensor] = []
    listener = (frozenset((kind,)), lambda _kind, t: got.append(t))
    ctx.observers.append(listener)
    try:
        out = inner(q, k, v, ctx)
    finally:
        ctx.observers.remove(listener)
    return out, got


def _no_report(who: str, layer: str, processor: Any, kind: str) -> str:
    return (f"{who}: the processor on {layer}, {processor!r}, does not report {kind!r} "
            f"(a processor shows its own with ctx.report({kind!r}, tensor) and lists it in its `reports`; "
            f"sdpa and explicit do)")


def _check_reports(layers: dict[str, Attention], kind: str, who: str) -> None:
    for name, m in layers.items():
        if not _reports(m.processor, kind):
            raise ValueError(_no_report(who, name, m.processor, kind))


# ---------------------------------------------------------------- capture and injection

_KINDS = ("q", "k", "v", "probs", "out")


class AttentionStore(dict):
    """{layer name: {kind: [tensor per call, in call order]}} filled by `capture`."""

    def get_call(self, name: str, kind: str, index: int) -> torch.Tensor:
        return self[name][kind][index]


class _Capture:
    def __init__(self, inner: Processor, store: AttentionStore, kinds: tuple[str, ...], detach: bool, to: Any):
        self.inner, self.store, self.kinds, self.detach, self.to = inner, store, kinds, detach, to

    def _keep(self, name: str, kind: str, t: torch.Tensor) -> None:
        if kind in self.kinds:
            t = t.detach() if self.detach else t
            self.store.setdefault(name, {}).setdefault(kind, []).append(t.to(self.to) if self.to is not None else t)

    def __call__(self, q, k, v, ctx):
        for kind, t in (("q", q), ("k", k), ("v", v)):
            self._keep(ctx.name, kind, t)
        if "probs" in self.kinds:
            out, got = _listen(ctx, "probs", self.inner, q, k, v)
            if not got:
                raise RuntimeError(_no_report("capture", ctx.name, ctx.module.processor, "probs"))
            self._keep(ctx.name, "probs", got[-1])
        else:
            out = self.inner(q, k, v, ctx)
        self._keep(ctx.name, "out", out)
        return out


class _Inject:
    def __init__(self, inner: Processor, store: AttentionStore, kinds: tuple[str, ...], select: Callable[[AttnContext], int] | None):
        self.inner, self.store, self.kinds, self.select = inner, store, kinds, select
        self.calls: dict[str, int] = {}

    def __call__(self, q, k, v, ctx):
        i = self.select(ctx) if self.select else self.calls.get(ctx.name, 0)
        self.calls[ctx.name] = self.calls.get(ctx.name, 0) + 1
        if i is None or ctx.name not in self.store:
            return self.inner(q, k, v, ctx)
        saved = self.store[ctx.name]
        take = lambda kind, t: saved[kind][i].to(t) if kind in self.kinds and kind in saved else t  # noqa: E731
        q, k, v = take("q", q), take("k", k), take("v", v)
        if "out" in self.kinds and "out" in saved:
            return saved["out"][i].to(v)
        if "probs" in self.kinds and "probs" in saved:
            return torch.matmul(saved["probs"][i].to(v), v)
        return self.inner(q, k, v, ctx)


def _check_kinds(kinds: tuple[str, ...]) -> tuple[str, ...]:
    bad = [k for k in kinds if k not in _KINDS]
    if bad:
        raise ValueError(f"unknown attention tensor kinds {bad}; choose from {_KINDS}")
    return tuple(kinds)


@contextlib.contextmanager
def capture(
    model: nn.Module,
    pattern: Pattern = "*",
    kinds: tuple[str, ...] = ("q", "k", "v"),
    detach: bool = True,
    to: Any = None,
) -> Iterator[AttentionStore]:
    """Record Q/K/V ((B, h, N, d)), attention probabilities ((B, h, N, M)) and/or the
    processor output of every selected layer, per call, while the block runs.

    The run is unchanged: "probs" are what the layer's processor reports of its own computation
    (`AttnContext.report`; `sdpa` and `explicit` do), and entering with "probs" on a layer whose
    processor does not report them is an error. Q/K/V are what reaches this wrapper (after
    wrappers pushed later, before those pushed earlier). `to` moves or casts what is kept.
    For per-step maps with bounded memory, see `record_attention`.
    """
    kinds = _check_kinds(kinds)
    if "probs" in kinds:
        _check_reports(select_layers(model, pattern, "capture"), "probs", "capture")
    store = AttentionStore()
    with wrap_processors(model, pattern, lambda inner: _Capture(inner, store, kinds, detach, to)):
        yield store


@contextlib.contextmanager
def inject(
    model: nn.Module,
    store: AttentionStore,
    pattern: Pattern = "*",
    kinds: tuple[str, ...] = ("q", "k", "v"),
    select: Callable[[AttnContext], int | None] | None = None,
) -> Iterator[None]:
    """Replace Q/K/V (or the attention probabilities) of selected layers by stored ones.

    By default the n-th call of a layer takes the n-th stored tensor; `select(ctx)` may
    choose another index (e.g. from `ctx.state["step"]`) or None to leave a call alone.
    """
    kinds = _check_kinds(kinds)
    with wrap_processors(model, pattern, lambda inner: _Inject(inner, store, kinds, select)):
        yield


# ---------------------------------------------------------------- recording attention maps

@dataclass
class AttentionMap:
    """One recorded call of one layer: the probabilities its processor used, after the recorder's
    selection and reduction (by default (B, N, m): heads averaged, m = the kept key tokens)."""

    layer: str                       # dotted layer name
    step: int | None                 # ctx.state["step"] (the sampler step; None outside a pipeline)
    t: Any                           # ctx.state["t"] (the timestep of the UNet call)
    hw: tuple[int, int] | None       # the query token grid: N = h·w
    call: int                        # index of this call among the layer's recorded calls
    probs: torch.Tensor

    def grid(self) -> torch.Tensor:
        """`probs` with the query tokens laid on their grid: (..., N, m) -> (..., m, h, w)."""
        if self.hw is None:
            raise ValueError(f"AttentionMap: {self.layer} was called without its token grid (hw)")
        h, w = self.hw
        p = self.probs
        return p.movedim(-2, -1).reshape(*p.shape[:-2], p.shape[-1], h, w)


class AttentionRecord(list):
    """The `AttentionMap`s `record_attention` kept, in call order."""

    def select(self, layer: str | None = None, step: int | None = None) -> list[AttentionMap]:
        """The maps of layers matching the glob `layer` and/or of sampler step `step`."""
        return [m for m in self if (layer is None or fnmatch.fnmatchcase(m.layer, layer))
                and (step is None or m.step == step)]

    @property
    def steps(self) -> list[int]:
        return sorted({m.step for m in self if m.step is not None})

    @property
    def nbytes(self) -> int:
        return sum(m.probs.numel() * m.probs.element_size() for m in self)


@contextlib.contextmanager
def record_attention(
    model: nn.Module,
    pattern: Pattern = SPATIAL_CROSS,
    *,
    steps: Any = None,
    heads: str | Sequence[int] | None = "mean",
    tokens: Sequence[int] | None = None,
    batch: slice | Sequence[int] | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    to: Any = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> Iterator[AttentionRecord]:
    """Record the attention probabilities of the selected layers (default: SD's cross-attention),
    call by call, with the layer's token grid and the call's `step` and `t` (`AttentionMap`).

    The run is bitwise unchanged: the maps are what each layer's processor reports of its own
    computation (`AttnContext.report`; `sdpa` and `explicit` do, and a processor that does not
    is refused at entry, or at the call if installed later). Memory is bounded by keeping only:
    `steps` (None = all; a collection of step indices, or `steps(step, t) -> bool`) — calls outside
    cost nothing; `batch` (indices or a slice of the batch, e.g. the conditional half under
    guidance); `tokens` (key-token indices, e.g. one word of the prompt); `heads` ("mean" averages
    them, None keeps all, a list keeps those); then `reduce(probs)`, and the cast to `to`/`dtype`.
    Each reduction happens on the fly, before the next call.
    """
    layers = select_layers(model, pattern, "record_attention")
    _check_reports(layers, "probs", "record_attention")
    if isinstance(heads, str) and heads != "mean":
        raise ValueError(f"record_attention: heads must be 'mean', None or a list of head indices, got {heads!r}")
    if steps is None or callable(steps):
        want = steps
    else:
        kept_steps = {int(s) for s in steps}
        want = lambda step, t: step in kept_steps  # noqa: E731
    record = AttentionRecord()
    calls: dict[str, int] = {}
    head_index = None if heads is None or isinstance(heads, str) else list(heads)
    token_index = None if tokens is None else list(tokens)

    def keep(name: str, hw, state: dict[str, Any], p: torch.Tensor) -> None:
        p = p.detach()
        if batch is not None:
            p = p[batch] if isinstance(batch, slice) else p[list(batch)]
        if token_index is not None:
            p = p[..., token_index]
        if heads == "mean":
            p = p.float().mean(dim=1)
        elif head_index is not None:
            p = p[:, head_index]
        if reduce is not None:
            p = reduce(p)
        p = p.to(device=to, dtype=dtype) if dtype is not None else p.to(to)
        i = calls.get(name, 0)
        calls[name] = i + 1
        record.append(AttentionMap(name, state.get("step"), state.get("t"), None if hw is None else tuple(hw), i, p))

    def wrap(inner: Processor) -> Processor:
        def recorder(q, k, v, ctx: AttnContext):
            if want is not None and not want(ctx.state.get("step"), ctx.state.get("t")):
                return inner(q, k, v, ctx)
            out, got = _listen(ctx, "probs", inner, q, k, v)
            if not got:
                raise RuntimeError(_no_report("record_attention", ctx.name, ctx.module.processor, "probs"))
            keep(ctx.name, ctx.hw, ctx.state, got[-1])
            return out
        return recorder

    with wrap_processors(model, list(layers), wrap):
        yield record


# ---------------------------------------------------------------- the plain image model

@contextlib.contextmanager
def image_model(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as the plain image model it was built from, for the duration of the block:
    every Attention with the default processor (`sdpa`) and no wrappers, no forward (pre-)hooks
    on its submodules (such hooks change the inner computation, as TCVE's temporal branch does;
    hooks on `model` itself stay: they see the call from outside, as its caller does), and every block made by mixing into an image block's class (a class with a
    `base` attribute naming the class it extends: EI²'s STAM blocks, Tune-A-Video's temporal
    blocks) run as that base class. Weights are the model's own (tuned ones included); nothing is
    copied. Everything comes back on exit."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    saved_attn = [(m, m.processor, m.wrappers) for m in layers]
    saved_class = []
    saved_hooks = []
    for m in model.modules():
        base = getattr(type(m), "base", None)
        if isinstance(base, type) and type(m) is not base and isinstance(m, base):
            saved_class.append((m, type(m)))
        if m is not model:
            saved_hooks.append((m, m._forward_hooks, m._forward_pre_hooks))
    try:
        for m in layers:
            m.processor, m.wrappers = sdpa, []
        for m, cls in saved_class:
            m.__class__ = cls.base
        for m, _, _ in saved_hooks:
            m._forward_hooks, m._forward_pre_hooks = type(m._forward_hooks)(), type(m._forward_pre_hooks)()
        yield model
    finally:
        for m, hooks, pre in saved_hooks:
            m._forward_hooks, m._forward_pre_hooks = hooks, pre
        for m, cls in saved_class:
            m.__class__ = cls
        for m, processor, wrappers in saved_attn:
            m.processor, m.wrappers = processor, wrappers


# ---------------------------------------------------------------- block outputs

def _modules(model: nn.Module, pattern: str) -> dict[str, nn.Module]:
    found = {n: m for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, pattern)}
    if not found:
        raise ValueError(f"no module matches {pattern!r}")
    return found


@contextlib.contextmanager
def capture_outputs(model: nn.Module, pattern: str, detach: bool = True) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the output of every module matching `pattern` ({name: [output per call]})."""
    store: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook_for(name):
        def hook(_m, _inp, out):
            store.setdefault(name, []).append(out.detach() if detach else out)
        return hook

    try:
        for name, m in _modules(model, pattern).items():
            handles.append(m.register_forward_hook(hook_for(name)))
        yield store
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replace_outputs(
    model: nn.Module,
    pattern: str,
    fn: Callable[[str, torch.Tensor], torch.Tensor | None],
) -> Iterator[None]:
    """Replace the output of matching modules by `fn(name, output)` (None keeps it)."""
    handles = []

    def hook_for(name):
        def hook(_m, _inp, out):
            return fn(name, out)
        return hook

    try:
        for name, m in _modules(model, pattern).items():
            handles.append(m.register_forward_hook(hook_for(name)))
        yield
    finally:
        for h in handles:
            h.remove()
