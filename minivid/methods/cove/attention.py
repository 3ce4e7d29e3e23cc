"""COVE §3.3: correspondence-guided attention (Eq. 11-14) and spatio-temporal attention.

Processors for the self-attention layers (`attn1`) of an SD UNet run on a batch of video
frames: q, k, v are [(B·F), heads, N, d] with the F frames of each video contiguous;
F comes from `ctx.state["frames"]` (set with `minivid.attention.call_state(unet, frames=F)`)
and the token grid from `ctx.hw`.

- Dense spatio-temporal attention (`spatio_temporal`): every token attends to the
  tokens of all F frames of its video, [B, heads, F·N, d] (COVE keeps it, following
  FLATTEN and FRESCO).
- Correspondence-guided attention (CGA, Eq. 11-14): token n of frame i attends only
  to its corresponding tokens (K per frame, from a `Correspondence`), gathered from the
  *current* keys and values, merged along time (Eq. 12, `merge.py`).

`CorrespondenceGuidedAttention(corr, k=3, merge_ratio=0.5, mode=...)` combines them:

| mode | layers where CGA applies | other self-attention layers |
|---|---|---|
| "sequential" (default) | dense ST, then CGA on its output (FLATTEN-style) | dense ST |
| "replace" | CGA on the layer's q, k, v instead of dense ST | dense ST |
| "dense_only" | dense ST (the paper's "w/o CGA" ablation) | dense ST |
| "cga_only" | CGA on the layer's q, k, v | per-frame spatial attention |

Why "sequential" by default: COVE says it retains spatio-temporal attention "following
[FRESCO, FLATTEN]" and COVE follows FLATTEN's setup; FLATTEN's code runs dense
attention over all frames and then its trajectory attention with q = k = v = the dense
output, per head, before the output projection (`sequential_qkv="output"`, FLATTEN's
default). "input" takes q and k from the layer's own projections and v from the dense
output (FLATTEN's `old_qk=1`); "reproject" sends the dense output through the layer's
to_q/to_k/to_v again (ctx.module).

Where CGA applies (`resolutions`): "match" (default) only at layers whose token grid
equals the correspondence grid (COVE computes it at 64×64, the finest latent grid;
FLATTEN likewise applies its trajectory attention only at 64×64); "nearest" at every
layer, with the correspondence resized by nearest neighbour (`Correspondence.resized`).

The query token's own key joins the set (`include_self=True`, as in FLATTEN's
trajectories); Eq. 11 lists only other frames (`include_self=False`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minivid.attention import AttnContext, Processor, frame_count, sdpa

from .correspondence import Correspondence
from .merge import grouped_probs, match, merge_groups

__all__ = ["spatio_temporal", "correspondence_attention", "gather_index", "CorrespondenceGuidedAttention", "MODES"]

MODES = ("sequential", "replace", "dense_only", "cga_only")
_SEQUENTIAL_QKV = ("output", "input", "reproject")
_RESOLUTIONS = ("match", "nearest")


def _frames(q: torch.Tensor, ctx: AttnContext) -> int:
    return frame_count(ctx, q.shape[0], who=f"{ctx.name or 'attention'} (COVE attention)")


def _to_video(x: torch.Tensor, frames: int) -> torch.Tensor:
    """[(B·F), h, N, d] -> [B, h, F·N, d]"""
    BF, h, N, d = x.shape
    return x.view(BF // frames, frames, h, N, d).transpose(1, 2).reshape(BF // frames, h, frames * N, d)


def _from_video(x: torch.Tensor, frames: int) -> torch.Tensor:
    """[B, h, F·N, d] -> [(B·F), h, N, d]"""
    B, h, FN, d = x.shape
    return x.view(B, h, frames, FN // frames, d).transpose(1, 2).reshape(B * frames, h, FN // frames, d)


def spatio_temporal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """Dense spatio-temporal attention: each token attends to all F·N tokens of its video.

    A processor: q, k, v [(B·F), heads, N, d] -> [(B·F), heads, N, d]; F = ctx.state["frames"].
    """
    if ctx.mask is not None:
        raise ValueError(f"{ctx.name or 'attention'}: spatio-temporal attention takes no mask")
    frames = _frames(q, ctx)
    out = sdpa(_to_video(q, frames), _to_video(k, frames), _to_video(v, frames), ctx)
    return _from_video(out, frames)


def gather_index(corr: Correspondence, include_self: bool = True) -> torch.Tensor:
    """For every token n of every frame i, where its key set lies among the F·N tokens of
    its video: [F, N, S] with S = (F-1)·K (+1 for the token itself), ordered: the token
    itself (if included), then frames j ≠ i ascending, each with its K matches in rank order.
    """
    Fr, N, _, K = corr.idx.shape
    dev = corr.idx.device
    frames = torch.arange(Fr, device=dev)
    flat = corr.idx + (frames * N)[None, None, :, None]                     # [F, N, F, K] into F·N
    others = torch.stack([torch.cat([frames[:i], frames[i + 1:]]) for i in range(Fr)])   # [F, F-1]
    index = others[:, None, :, None].expand(Fr, N, Fr - 1, K)
    sets = flat.gather(2, index).reshape(Fr, N, (Fr - 1) * K)
    if include_self:
        own = (frames[:, None] * N + torch.arange(N, device=dev))[..., None]   # [F, N, 1]
        sets = torch.cat([own, sets], dim=-1)
    return sets


def correspondence_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    frames: int,
    scale: float,
    *,
    merge_ratio: float = 0.5,
    proportional: bool = True,
    upcast: bool = False,
    budget: int = 1 << 22,
) -> torch.Tensor:
    """CGA (Eq. 11-14): each token attends to its gathered, merged key set.

    q, k, v: [(B·F), h, N, d]; index: [F, N, S] from `gather_index`. Per query, the keys of
    its set are gathered ([B, h, n, S, d]) for the logits; merging (Eq. 12, ToMe on the
    head-averaged keys, merge_ratio 0 = off) enters as `merge.grouped_probs`, the exact
    equivalent of attending to the merged tokens, so merged keys and values are never
    built; the values are summed with those weights by `embedding_bag`, without gathering
    them. Queries run in chunks whose gathered keys hold about `budget` elements.
    """
    BF, h, N, d = q.shape
    B, S = BF // frames, index.shape[-1]
    if index.shape[:2] != (frames, N):
        raise ValueError(f"correspondence_attention: index {tuple(index.shape)} does not fit {frames} frames of {N} tokens")
    FN, dev = frames * N, q.device
    qv, kv, vv = (_to_video(x, frames) for x in (q, k, v))                  # [B, h, F·N, d]
    if upcast:
        qv, kv = qv.float(), kv.float()
    metric = kv.mean(dim=1) if merge_ratio > 0 else None                     # [B, F·N, d] merging metric
    table = vv.reshape(B * h * FN, d)                                        # one row per (video, head, token)
    row0 = (torch.arange(B * h, device=dev) * FN).view(B, h, 1, 1)
    index = index.reshape(FN, S)
    out = torch.empty(B, h, FN, d, dtype=v.dtype, device=dev)
    chunk = max(1, budget // max(1, B * S * h * d))
    for c0 in range(0, FN, chunk):
        g = index[c0:c0 + chunk]                                              # [n, S]
        n = g.shape[0]
        kg = kv.index_select(2, g.reshape(-1)).view(B, h, n, S, d)
        logits = torch.matmul(kg, qv[:, :, c0:c0 + n, :, None])[..., 0] * scale       # [B, h, n, S]
        if merge_ratio > 0:
            plan = match(metric.index_select(1, g.reshape(-1)).view(B * n, S, d), merge_ratio)
            group = merge_groups(plan).view(B, 1, n, S).expand(B, h, n, S)
            probs = grouped_probs(logits, group, proportional)
        else:
            probs = logits.softmax(dim=-1)
        rows = (row0 + g).reshape(B * h * n, S)
        o = F.embedding_bag(rows, table, per_sample_weights=probs.to(table.dtype).reshape(B * h * n, S), mode="sum")
        out[:, :, c0:c0 + n] = o.view(B, h, n, d)
    return _from_video(out, frames)


class CorrespondenceGuidedAttention:
    """Processor `(q, k, v, ctx) -> out` for the self-attention layers of a video batch.

    correspondence: from `correspondence.correspondence(features, ...)` on the source video.
    k: matches per frame used (<= correspondence.k; None = all). merge_ratio: temporal
    token merging ratio (0 = off). See the module docstring for `mode`, `sequential_qkv`,
    `resolutions` and `include_self`. `dense` is the frame-mixing attention of the modes that keep
    one (the first half of "sequential", and the layers CGA skips): COVE's dense spatio-temporal
    attention by default; any processor, e.g. EI²'s FFAM (`FFAMProcessor(r)`, which with r = 1 is
    dense spatio-temporal attention) to put CGA inside an EI² model.
    """

    def __init__(
        self,
        correspondence: Correspondence,
        k: int | None = 3,
        merge_ratio: float = 0.5,
        mode: str = "sequential",
        *,
        sequential_qkv: str = "output",
        resolutions: str = "match",
        include_self: bool = True,
        proportional: bool = True,
        budget: int = 1 << 22,
        dense: Processor = None,
    ):
        if mode not in MODES:
            raise ValueError(f"CorrespondenceGuidedAttention: mode must be one of {MODES}, got {mode!r}")
        if sequential_qkv not in _SEQUENTIAL_QKV:
            raise ValueError(f"CorrespondenceGuidedAttention: sequential_qkv must be one of {_SEQUENTIAL_QKV}, got {sequential_qkv!r}")
        if resolutions not in _RESOLUTIONS:
            raise ValueError(f"CorrespondenceGuidedAttention: resolutions must be one of {_RESOLUTIONS}, got {resolutions!r}")
        if not 0.0 <= merge_ratio <= 1.0:
            raise ValueError(f"CorrespondenceGuidedAttention: merge_ratio must be in [0, 1], got {merge_ratio}")
        self.correspondence = correspondence if k is None else correspondence.top(k)
        self.merge_ratio, self.mode = merge_ratio, mode
        self.sequential_qkv, self.resolutions = sequential_qkv, resolutions
        self.include_self, self.proportional, self.budget = include_self, proportional, budget
        self.dense: Processor = spatio_temporal if dense is None else dense
        self._index: dict[tuple[tuple[int, int], str], torch.Tensor] = {}   # per (grid, device)

    def index_for(self, hw: tuple[int, int] | None, n_tokens: int, device: torch.device) -> torch.Tensor | None:
        """The [F, N, S] gather index for a layer's grid, or None where CGA does not apply."""
        corr = self.correspondence
        if hw is None:
            if n_tokens != corr.hw[0] * corr.hw[1]:
                return None
            hw = corr.hw
        hw = tuple(hw)
        if hw != corr.hw and self.resolutions == "match":
            return None
        key = (hw, str(device))
        if key not in self._index:
            self._index[key] = gather_index(corr.to(device).resized(hw), self.include_self)
        return self._index[key]

    def cga(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, frames: int, ctx: AttnContext) -> torch.Tensor:
        return correspondence_attention(
            q, k, v, index, frames, ctx.scale, merge_ratio=self.merge_ratio,
            proportional=self.proportional, upcast=ctx.upcast, budget=self.budget,
        )

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        if ctx.is_cross:
            raise ValueError(f"{ctx.name or 'attention'}: COVE attention is for self-attention layers (attn1)")
        frames = _frames(q, ctx)
        if frames != self.correspondence.frames:
            raise ValueError(
                f"{ctx.name or 'attention'}: the correspondence has {self.correspondence.frames} frames, the call {frames}"
            )
        index = None if self.mode == "dense_only" else self.index_for(ctx.hw, q.shape[2], q.device)
        if index is None:
            return sdpa(q, k, v, ctx) if self.mode == "cga_only" else self.dense(q, k, v, ctx)
        if self.mode in ("replace", "cga_only"):
            return self.cga(q, k, v, index, frames, ctx)
        dense = self.dense(q, k, v, ctx)                                     # "sequential"
        if self.sequential_qkv == "output":
            q2 = k2 = v2 = dense
        elif self.sequential_qkv == "input":
            q2, k2, v2 = q, k, dense
        else:
            q2, k2, v2 = self._reproject(dense, ctx)
        return self.cga(q2, k2, v2, index, frames, ctx)

    @staticmethod
    def _reproject(x: torch.Tensor, ctx: AttnContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Send a per-head attention output through the layer's own to_q/to_k/to_v."""
        m = ctx.module
        merged = m.merge_heads(x)                                             # [BF, N, h·d]
        if merged.shape[-1] != m.to_q.in_features:
            raise ValueError(
                f"{ctx.name or 'attention'}: sequential_qkv='reproject' needs heads·dim_head == query_dim "
                f"({merged.shape[-1]} != {m.to_q.in_features})"
            )
        return m.split_heads(m.to_q(merged)), m.split_heads(m.to_k(merged)), m.split_heads(m.to_v(merged))

