"""COVE §3.2: one-to-many token correspondence across frames (Eq. 5-10).

For every token p of frame i, COVE records the K most similar tokens of every other
frame j, by cosine similarity of diffusion features (Eq. 6). Instead of the all-pairs
similarity S = F·Fᵀ of Eq. 5, it searches only an l×l window of the *next* frame
around the token's position (Eq. 7, 8, 10) and reaches farther frames by chaining
(Eq. 9): frame i+2 is searched around the top-1 match in frame i+1, with that match's
feature, and so on; "similarly" for previous frames.

Consequence used here: per consecutive pair we compute, once, the windowed top-K of
every token forward (i -> i+1) and backward (i+1 -> i), both from one pass over the
pair's similarities (`consecutive_topk`); every
longer chain is then only an index gather (`chain`).

    fwd_idx, fwd_score, bwd_idx, bwd_score = consecutive_topk(features, window=9, k=3)
    corr = chain(fwd_idx, fwd_score, bwd_idx, bwd_score)
    corr.idx    # [F, H*W, F, K]  flat index into frame j of the K tokens matching token n of frame i
    corr.score  # [F, H*W, F, K]  similarity of the last hop of the chain (Eq. 9)

`correspondence(features, ...)` does both. Computing the diffusion features themselves
(Eq. 4: one UNet pass per noised frame) belongs to the pipeline.

The windowed top-K itself (Eq. 7, 8, 10) is defined, readably, by `window_topk_definition` below:
one query token at a time, in float64. The search that runs is `minivid.kernels.correspondence`
(`window_topk_pair` and friends: banded, tiled and Triton paths for speed and memory), tested to
return exactly what this definition returns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minivid.kernels.correspondence import window_topk_pair

__all__ = ["Correspondence", "window_topk_definition", "consecutive_topk", "chain", "correspondence"]


def window_topk_definition(src: torch.Tensor, dst: torch.Tensor, window: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sliding-window top-K of COVE (Eq. 7, 8, 10), written to be read, not run at size.

    src, dst [B, H, W, D]: (normalised) features of frame i and frame j. For every token (h, w) of src: the
    l×l window of dst around the same position (l = `window`; shifted, not cut, at the borders so it
    always holds min(l, H)×min(l, W) tokens), the similarity of the token to each candidate (Eq. 7: a
    dot product, the cosine for unit features), and the K best (Eq. 8, 10), ties to the lower flat index.
    Returns (idx [B, H, W, K] flat indices h*W + w into dst, score [B, H, W, K] float64).
    """
    B, H, W, D = src.shape
    Lh, Lw = min(window, H), min(window, W)
    idx = torch.empty(B, H, W, k, dtype=torch.long)
    score = torch.empty(B, H, W, k, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for w in range(W):
                top, left = min(max(h - window // 2, 0), H - Lh), min(max(w - window // 2, 0), W - Lw)
                candidates = dst[b, top:top + Lh, left:left + Lw].double().reshape(-1, D)     # the window
                sims = (candidates @ src[b, h, w].double()).tolist()                            # Eq. 7
                flat = [(top + p // Lw) * W + left + p % Lw for p in range(Lh * Lw)]
                best = sorted(zip(sims, flat), key=lambda t: (-t[0], t[1]))[:k]                 # Eq. 8, 10
                idx[b, h, w] = torch.tensor([f for _, f in best])
                score[b, h, w] = torch.tensor([v for v, _ in best])
    return idx, score


@dataclass(frozen=True)
class Correspondence:
    """Top-K corresponding tokens of every token of every frame in every frame.

    idx[i, n, j, k]: flat index (h*W + w) in frame j of the k-th match of token n of frame i.
    score[i, n, j, k]: its similarity. For j = i±1 it is the cosine to token n itself
    (Eq. 8); for |j - i| >= 2 it is the cosine to the chain's previous top-1 match in frame
    j∓1, the token the search was made with (Eq. 9). For j = i the K entries are the token
    itself with score 1 (a token is its own correspondence; consumers choose whether to use it).
    """

    idx: torch.Tensor        # [F, N, F, K] int64
    score: torch.Tensor      # [F, N, F, K] float
    hw: tuple[int, int]      # (H, W) token grid the indices refer to

    @property
    def frames(self) -> int:
        return self.idx.shape[0]

    @property
    def k(self) -> int:
        return self.idx.shape[-1]

    def to(self, device: torch.device | str) -> "Correspondence":
        return Correspondence(self.idx.to(device), self.score.to(device), self.hw)

    def top(self, k: int) -> "Correspondence":
        """The first k of the K matches (the top-k, since matches are sorted and chains use top-1 only)."""
        if not 1 <= k <= self.k:
            raise ValueError(f"Correspondence.top: k must be in [1, {self.k}], got {k}")
        return Correspondence(self.idx[..., :k], self.score[..., :k], self.hw)

    def resized(self, hw: tuple[int, int]) -> "Correspondence":
        """The same correspondence on another token grid (nearest neighbour).

        Token (y, x) of the new grid takes the matches of the feature token
        (⌊y·H/H'⌋, ⌊x·W/W'⌋) (torch's "nearest"), and a matched feature token (u, v) maps
        to the new token (⌊u·H'/H⌋, ⌊v·W'/W⌋) that contains it. Own-frame entries stay
        the token itself. Meant for coarser grids (UNet layers below the feature size).
        """
        (H, W), (H2, W2) = self.hw, tuple(hw)
        if (H2, W2) == (H, W):
            return self
        dev = self.idx.device
        ys = torch.arange(H2, device=dev) * H // H2
        xs = torch.arange(W2, device=dev) * W // W2
        source = (ys[:, None] * W + xs[None, :]).flatten()                  # [N'] feature token of each new token
        idx = self.idx[:, source]                                           # [F, N', F, K]
        idx = (idx // W) * H2 // H * W2 + (idx % W) * W2 // W
        Fr, N2 = self.frames, H2 * W2
        own = torch.arange(N2, device=dev)[:, None].expand(N2, self.k)
        idx[torch.arange(Fr, device=dev), :, torch.arange(Fr, device=dev)] = own
        return Correspondence(idx, self.score[:, source], (H2, W2))


def consecutive_topk(
    features: torch.Tensor,
    window: int = 9,
    k: int = 3,
    *,
    normalize: bool = True,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windowed top-K between every pair of consecutive frames, both ways (Eq. 7, 8, 10).

    features: [F, H, W, D] (L2-normalised along D here unless normalize=False).
    Returns fwd_idx, fwd_score: [F-1, H, W, K], pair p = frame p -> frame p+1;
    bwd_idx, bwd_score: [F-1, H, W, K], pair p = frame p+1 -> frame p.
    Both directions come from one pass over each pair's similarities (`window_topk_pair`:
    a[p]·b[q] serves p -> q and q -> p); equal bitwise to two separate `window_topk` calls.
    """
    if features.dim() != 4:
        raise ValueError(f"consecutive_topk: features must be [F, H, W, D], got {tuple(features.shape)}")
    if features.shape[0] < 2:
        raise ValueError(f"consecutive_topk: need at least 2 frames, got {features.shape[0]}")
    if normalize:
        features = F.normalize(features, dim=-1)
    return window_topk_pair(features[:-1], features[1:], window, k, backend=backend)


def chain(
    fwd_idx: torch.Tensor,
    fwd_score: torch.Tensor,
    bwd_idx: torch.Tensor,
    bwd_score: torch.Tensor,
) -> Correspondence:
    """Chain consecutive-pair matches to every frame (Eq. 8-9), as gathers.

    Frame i+1 gets the top-K of token n itself; frame i+d gets the top-K, in the pair
    (i+d-1 -> i+d), of the top-1 match a_{i+d-1} of the chain in frame i+d-1; backwards
    alike. One gather per distance d; no loop over tokens.
    """
    if not (fwd_idx.shape == fwd_score.shape == bwd_idx.shape == bwd_score.shape) or fwd_idx.dim() != 4:
        raise ValueError("chain: expects four [F-1, H, W, K] tensors of one shape from consecutive_topk")
    P, H, W, K = fwd_idx.shape
    Fr, N, dev = P + 1, H * W, fwd_idx.device
    fi, fs = fwd_idx.reshape(P, N, K), fwd_score.reshape(P, N, K)
    bi, bs = bwd_idx.reshape(P, N, K), bwd_score.reshape(P, N, K)

    idx = torch.empty(Fr, N, Fr, K, dtype=torch.long, device=dev)
    score = torch.empty(Fr, N, Fr, K, dtype=fwd_score.dtype, device=dev)
    frames = torch.arange(Fr, device=dev)
    tokens = torch.arange(N, device=dev)
    idx[frames, :, frames] = tokens[:, None].expand(N, K)          # j = i: the token itself
    score[frames, :, frames] = 1.0

    # Forward: at distance d the sources i = 0..F-1-d reach frame i+d through pair
    # p = i+d-1; `anchor` holds, per source, the chain's top-1 position in frame i+d-1.
    anchor = tokens.expand(P, N)
    for d in range(1, Fr):
        src = frames[: Fr - d]
        pair = src + d - 1
        idx[src[:, None], tokens, (src + d)[:, None]] = fi[pair[:, None], anchor]      # [F-d, N, K]
        score[src[:, None], tokens, (src + d)[:, None]] = fs[pair[:, None], anchor]
        anchor = fi[pair[:, None], anchor, 0][:-1]                 # top-1 in frame i+d, for sources 0..F-2-d

    # Backward: sources i = d..F-1 reach frame i-d through pair p = i-d (frame p+1 -> p).
    anchor = tokens.expand(P, N)
    for d in range(1, Fr):
        src = frames[d:]
        pair = src - d
        idx[src[:, None], tokens, (src - d)[:, None]] = bi[pair[:, None], anchor]
        score[src[:, None], tokens, (src - d)[:, None]] = bs[pair[:, None], anchor]
        anchor = bi[pair[:, None], anchor, 0][1:]                  # top-1 in frame i-d, for sources d+1..F-1

    return Correspondence(idx, score, (H, W))


def correspondence(
    features: torch.Tensor,
    window: int = 9,
    k: int = 3,
    *,
    normalize: bool = True,
    backend: str = "auto",
) -> Correspondence:
    """Correspondence of every token to K tokens of every frame: `chain(consecutive_topk(...))`.

    features: [F, H, W, D] diffusion features of the F frames (Eq. 4).
    """
    return chain(*consecutive_topk(features, window, k, normalize=normalize, backend=backend))
