"""COVE Eq. 12: temporal token merging of the corresponding tokens (ToMe along time).

For each query token, correspondence-guided attention gathers S tokens from the other
frames (Eq. 11); many are near-duplicates (the same point seen in consecutive frames).
COVE merges them "following [ToMe]" (Bolya et al., 2023, bipartite soft matching)
before attending, at a 50% ratio. The paper gives no further detail; minivid's choices:

- Sets: the S tokens, in gathering order, split alternately into A (even positions)
  and B (odd positions).
- Similarity: cosine of the *keys* (ToMe's metric), averaged over heads by the caller.
- Matching: every A token picks its most similar B token; the r A tokens with the
  highest such similarity are merged into their B token; r = ⌊ratio·S⌋, at most |A|.
  Ties in the ranking go to the earlier A token (stable sort).
- What is merged: keys and values (any tensors with the same [M, S, ...] layout), all
  with the same assignment, as size-weighted means; sizes add up (each gathered token
  starts with size 1).
- Output order: the unmerged A tokens (in ranking order), then all B tokens.
- Proportional attention (ToMe): log(size) added to the attention logits, so that a
  merged token of size s weighs like the s tokens it replaced. Default on: with it,
  merging identical tokens leaves attention unchanged (the defining property); off
  gives each merged token the weight of one token. `attend` takes it as an option.

`merge_tokens` + `attend` are the definition. Correspondence-guided attention uses an
exact equivalent that never builds merged tokens (`merge_groups`, `grouped_probs`): with
unit starting sizes a merged key is the mean of its group's keys, so its logit is the
mean of their logits (the dot product is linear), and attending to the merged value
(the group's mean) with weight p_j spreads p_j/s_j over the group's own values. So
attention to the merged set = attention to the S gathered tokens where each token's
logit is replaced by its group's mean logit, and, without proportional attention, also
lowered by log s_j. The values can then be summed straight from the unmerged tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["MergePlan", "match", "merge", "merge_sizes", "merge_tokens", "attend", "merge_groups", "grouped_probs"]


@dataclass(frozen=True)
class MergePlan:
    """The assignment of one bipartite soft matching, for M sets of S tokens."""

    merged: torch.Tensor     # [M, r] positions in A of the merged A tokens
    kept: torch.Tensor       # [M, |A|-r] positions in A of the A tokens that stay
    into: torch.Tensor       # [M, r] positions in B the merged A tokens go into
    size_in: int             # S

    @property
    def size_out(self) -> int:
        return self.size_in - self.merged.shape[1]


def match(metric: torch.Tensor, ratio: float = 0.5) -> MergePlan:
    """Bipartite soft matching on metric [M, S, C] (keys): which A tokens merge into which B."""
    if metric.dim() != 3:
        raise ValueError(f"match: metric must be [M, S, C], got {tuple(metric.shape)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"match: ratio must be in [0, 1], got {ratio}")
    M, S, _ = metric.shape
    n_a = (S + 1) // 2
    r = min(int(ratio * S), n_a, S // 2)                          # S // 2 = |B|: B must exist
    metric = F.normalize(metric.float(), dim=-1)
    a, b = metric[:, 0::2], metric[:, 1::2]                       # [M, |A|, C], [M, |B|, C]
    if r == 0:
        empty = torch.empty(M, 0, dtype=torch.long, device=metric.device)
        keep = torch.arange(n_a, device=metric.device).expand(M, n_a)
        return MergePlan(empty, keep, empty, S)
    best, best_b = (a @ b.transpose(1, 2)).max(dim=-1)           # [M, |A|]
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    merged, kept = order[:, :r], order[:, r:]
    return MergePlan(merged, kept, best_b.gather(1, merged), S)


def _expand(pos: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Positions pos [M, m] as an index for dim 1 of tensors shaped like `like` [M, n, ...]."""
    return pos.view(*pos.shape, *([1] * (like.dim() - 2))).expand(*pos.shape, *like.shape[2:])


def _take(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [M, n, ...] at positions pos [M, m] along dim 1 -> [M, m, ...]."""
    return x.gather(1, _expand(pos, x))


def merge(plan: MergePlan, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Size-weighted merge of x [M, S, ...] (sizes [M, S]) by `plan` -> [M, S - r, ...]."""
    if x.shape[1] != plan.size_in or size.shape != x.shape[:2]:
        raise ValueError(f"merge: expected x [M, {plan.size_in}, ...] and size [M, {plan.size_in}], "
                         f"got {tuple(x.shape)} and {tuple(size.shape)}")
    w = size.to(x.dtype).view(*size.shape, *([1] * (x.dim() - 2)))   # [M, S, 1, ...]
    xs = x * w
    a, b = xs[:, 0::2], xs[:, 1::2]
    wa, wb = w[:, 0::2], w[:, 1::2]
    b = b.scatter_add(1, _expand(plan.into, b), _take(a, plan.merged))
    wb = wb.scatter_add(1, _expand(plan.into, wb), _take(wa, plan.merged))
    return torch.cat([_take(a, plan.kept) / _take(wa, plan.kept), b / wb], dim=1)


def merge_sizes(plan: MergePlan, size: torch.Tensor) -> torch.Tensor:
    """Sizes [M, S] after merging -> [M, S - r] (merged sizes add up)."""
    a, b = size[:, 0::2], size[:, 1::2]
    b = b.scatter_add(1, plan.into, a.gather(1, plan.merged))
    return torch.cat([a.gather(1, plan.kept), b], dim=1)


def merge_tokens(
    metric: torch.Tensor,
    tokens: tuple[torch.Tensor, ...],
    ratio: float = 0.5,
    size: torch.Tensor | None = None,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Match on `metric` [M, S, C] and merge every tensor of `tokens` ([M, S, ...] each)
    with the same assignment. Returns the merged tensors ([M, S-r, ...]) and their sizes."""
    M, S = metric.shape[:2]
    if size is None:
        size = torch.ones(M, S, dtype=torch.float32, device=metric.device)
    plan = match(metric, ratio)
    return tuple(merge(plan, t, size) for t in tokens), merge_sizes(plan, size)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    size: torch.Tensor | None = None,
    *,
    proportional: bool = True,
    upcast: bool = False,
) -> torch.Tensor:
    """Each query attends to its own key set: q [M, h, d], k/v [M, S, h, d] -> [M, h, d].

    With `size` [M, S] and proportional=True, log(size) joins the logits (ToMe's
    proportional attention). upcast computes logits and softmax in float32.
    """
    dtype = q.dtype
    if upcast:
        q, k = q.float(), k.float()
    logits = torch.einsum("mhd,mshd->mhs", q, k) * scale
    if size is not None and proportional:
        logits = logits + size.log().to(logits.dtype)[:, None, :]
    probs = logits.softmax(dim=-1).to(v.dtype)
    return torch.einsum("mhs,mshd->mhd", probs, v).to(dtype)


def merge_groups(plan: MergePlan) -> torch.Tensor:
    """[M, S]: for every token of each set, the position of the token it ends up in (a merged
    A token: its B token; every other token: itself). Tokens sharing a value form one merged token."""
    M, S = plan.merged.shape[0], plan.size_in
    group = torch.arange(S, device=plan.merged.device).expand(M, S).clone()
    return group.scatter_(1, 2 * plan.merged, 2 * plan.into + 1)             # A_a sits at 2a, B_b at 2b+1


def grouped_probs(logits: torch.Tensor, group: torch.Tensor, proportional: bool = True) -> torch.Tensor:
    """Attention weights over the unmerged tokens equal to attending to the merged ones.

    logits [..., S]: q·k·scale of every token of the set (unit sizes); group [..., S] from
    `merge_groups`. Each token gets its group's mean logit (minus log of the group size
    without proportional attention); softmax over the S tokens. Summing the unmerged values
    with these weights equals `attend` on `merge_tokens`' output.
    """
    total = torch.zeros_like(logits).scatter_add_(-1, group, logits)
    size = torch.zeros_like(logits).scatter_add_(-1, group, torch.ones_like(logits))
    mean = total.gather(-1, group) / size.gather(-1, group)
    if not proportional:
        mean = mean - size.gather(-1, group).log()
    return mean.softmax(dim=-1)
