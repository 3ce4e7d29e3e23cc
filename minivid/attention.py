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
managers (`capture`, `inject`, `capture_outputs`, `replace_outputs`) that restore
the model when they exit. `call_state(model, **kw)` puts call-wide facts (frame
count, step index, ...) in front of every processor for the duration of a block.
"""
from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Attention", "AttnContext", "Processor", "sdpa", "explicit", "attention_probs",
    "name_layers", "attention_layers", "set_processor", "processors",
    "call_state", "wrap_processors", "capture", "inject", "capture_outputs", "replace_outputs", "AttentionStore",
]


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


class Processor(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor: ...


def attention_probs(q: torch.Tensor, k: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """softmax(Q·Kᵀ·scale) over keys: (B, h, N, d), (B, h, M, d) -> (B, h, N, M), in q's dtype.

    With `ctx.upcast` (or a float16/bfloat16 input and upcast requested) the product and
    the softmax run in float32, as ldm does for SD 2.1-v.
    """
    dtype = q.dtype
    if ctx.upcast:
        q, k = q.float(), k.float()
    sim = torch.matmul(q, k.transpose(-1, -2)) * ctx.scale
    if ctx.mask is not None:
        sim = sim.masked_fill(~ctx.mask, torch.finfo(sim.dtype).min) if ctx.mask.dtype == torch.bool else sim + ctx.mask
    return sim.softmax(dim=-1).to(dtype)


def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """Attention written out: softmax(Q·Kᵀ/√d)·V. Equal to `sdpa` up to rounding."""
    return torch.matmul(attention_probs(q, k, ctx), v)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """The default processor: torch's fused scaled_dot_product_attention."""
    if ctx.upcast and q.dtype in (torch.float16, torch.bfloat16):
        return F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=ctx.mask, scale=ctx.scale
        ).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, scale=ctx.scale)


class Attention(nn.Module):
    """Multi-head attention with ldm's key names (`to_q`, `to_k`, `to_v`, `to_out.0`).

    x: (B, N, query_dim); context: (B, M, context_dim) or None (self-attention).
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
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, out_dim or query_dim), nn.Dropout(0.0))
        self.processor: Processor = sdpa
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
        out = self.processor(q, k, v, self.context(hw, mask, **extra))
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


def set_processor(
    model: nn.Module, pattern: str, processor: Processor, *, factory: bool = False
) -> list[str]:
    """Set `processor` on every Attention matching `pattern`; returns the names it was set on.

    With `factory=True`, `processor` is called as `processor(name, module)` once per layer
    and must return that layer's processor (for per-layer state). Raises if nothing
    matches, since a silent no-op hides typos in globs.
    """
    layers = attention_layers(model, pattern)
    if not layers:
        raise ValueError(f"set_processor: no attention layer matches {pattern!r}")
    for name, m in layers.items():
        m.processor = processor(name, m) if factory else processor
    return list(layers)


@contextlib.contextmanager
def processors(model: nn.Module, pattern: str, processor: Processor) -> Iterator[list[str]]:
    """Scoped `set_processor`: the previous processors come back on exit."""
    layers = attention_layers(model, pattern)
    if not layers:
        raise ValueError(f"processors: no attention layer matches {pattern!r}")
    saved = {n: m.processor for n, m in layers.items()}
    try:
        for m in layers.values():
            m.processor = processor
        yield list(layers)
    finally:
        for n, m in layers.items():
            m.processor = saved[n]


@contextlib.contextmanager
def call_state(model: nn.Module, **state: Any) -> Iterator[dict[str, Any]]:
    """Put call-wide facts (e.g. `frames=8`, `step=3`) in front of every processor of `model`."""
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
            probs = attention_probs(q, k, ctx)
            self._keep(ctx.name, "probs", probs)
            out = torch.matmul(probs, v)
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
def wrap_processors(
    model: nn.Module, pattern: str | list[str], wrap: Callable[[Processor], Processor]
) -> Iterator[list[str]]:
    """Wrap the current processor of every layer matching `pattern` (a glob, or a list of globs or
    exact names) as `wrap(processor)`; the previous processors come back on exit. The building
    block of `capture` and `inject`, and of methods' own recorders."""
    layers: dict[str, Attention] = {}
    for pat in [pattern] if isinstance(pattern, str) else pattern:
        found = attention_layers(model, pat)
        if not found:
            raise ValueError(f"no attention layer matches {pat!r}")
        layers.update(found)
    saved = {n: m.processor for n, m in layers.items()}
    try:
        for n, m in layers.items():
            m.processor = wrap(saved[n])
        yield list(layers)
    finally:
        for n, m in layers.items():
            m.processor = saved[n]


@contextlib.contextmanager
def capture(
    model: nn.Module,
    pattern: str = "*",
    kinds: tuple[str, ...] = ("q", "k", "v"),
    detach: bool = True,
    to: Any = None,
) -> Iterator[AttentionStore]:
    """Record Q/K/V ((B, h, N, d)), attention probabilities ((B, h, N, M)) and/or the
    processor output of every matching layer, per call, while the block runs.

    Capturing "probs" computes attention explicitly (`explicit`) on those layers, so
    it applies to layers running standard attention. `to` moves or casts what is kept.
    """
    kinds = _check_kinds(kinds)
    store = AttentionStore()
    with wrap_processors(model, pattern, lambda inner: _Capture(inner, store, kinds, detach, to)):
        yield store


@contextlib.contextmanager
def inject(
    model: nn.Module,
    store: AttentionStore,
    pattern: str = "*",
    kinds: tuple[str, ...] = ("q", "k", "v"),
    select: Callable[[AttnContext], int | None] | None = None,
) -> Iterator[None]:
    """Replace Q/K/V (or the attention probabilities) of matching layers by stored ones.

    By default the n-th call of a layer takes the n-th stored tensor; `select(ctx)` may
    choose another index (e.g. from `ctx.state["step"]`) or None to leave a call alone.
    """
    kinds = _check_kinds(kinds)
    with wrap_processors(model, pattern, lambda inner: _Inject(inner, store, kinds, select)):
        yield


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
