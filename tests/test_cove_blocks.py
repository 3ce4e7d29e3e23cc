"""COVE building blocks: correspondence chaining (Eq. 8-9), temporal token merging (Eq. 12),
correspondence-guided and spatio-temporal attention (Eq. 11-14), each against its definition."""
import pytest
import torch
import torch.nn.functional as F

from minivid.attention import Attention, AttnContext, call_state, name_layers, set_processor
from minivid.kernels.correspondence import window_topk
from minivid.methods.cove.attention import (
    CorrespondenceGuidedAttention,
    correspondence_attention,
    gather_index,
    spatio_temporal,
)
from minivid.methods.cove.correspondence import Correspondence, chain, consecutive_topk, correspondence
from minivid.methods.cove.merge import attend, match, merge, merge_sizes, merge_tokens


# ---------------------------------------------------------------- correspondence

def translated_video(frames, H, W, D, step):
    """Frames cropped from one random map, the content moving by `step` (dy, dx) per frame.
    Token (h, w) of frame i shows the content found at (h + (j-i)·dy, w + (j-i)·dx) in frame j."""
    dy, dx = step
    pad = (frames - 1) * max(abs(dy), abs(dx))
    big = torch.randn(H + 2 * pad, W + 2 * pad, D)
    return torch.stack([big[pad - t * dy:pad - t * dy + H, pad - t * dx:pad - t * dx + W] for t in range(frames)])


@pytest.mark.parametrize("step", [(1, -2), (0, 1), (-2, 2)])
def test_chain_recovers_cumulative_shifts(step):
    Fr, H, W = 6, 10, 12
    video = translated_video(Fr, H, W, 16, step)
    corr = correspondence(video, window=5, k=3)
    assert corr.idx.shape == (Fr, H * W, Fr, 3) and corr.hw == (H, W)
    hs, ws = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    for i in range(Fr):
        for j in range(Fr):
            y, x = hs + (j - i) * step[0], ws + (j - i) * step[1]
            inside = ((y >= 0) & (y < H) & (x >= 0) & (x < W)).flatten()
            top1 = corr.idx[i, :, j, 0]
            assert torch.equal(top1[inside], (y * W + x).flatten()[inside]), (i, j)
            assert torch.allclose(corr.score[i, inside, j, 0], torch.ones(()), atol=1e-5)


def test_chain_neighbours_equal_direct_window_topk_and_own_frame_is_the_token():
    Fr, H, W, D, K = 5, 6, 7, 8, 3
    feats = torch.randn(Fr, H, W, D)
    fi, fs, bi, bs = consecutive_topk(feats, 3, K)
    corr = chain(fi, fs, bi, bs)
    unit = F.normalize(feats, dim=-1)
    for i in range(Fr - 1):
        idx, score = window_topk(unit[i:i + 1], unit[i + 1:i + 2], 3, K)
        assert torch.equal(corr.idx[i, :, i + 1], idx.reshape(H * W, K))
        assert torch.equal(corr.score[i, :, i + 1], score.reshape(H * W, K))
        idx, score = window_topk(unit[i + 1:i + 2], unit[i:i + 1], 3, K)
        assert torch.equal(corr.idx[i + 1, :, i], idx.reshape(H * W, K))
    for i in range(Fr):
        assert torch.equal(corr.idx[i, :, i], torch.arange(H * W)[:, None].expand(H * W, K))
        assert torch.all(corr.score[i, :, i] == 1)


def test_chain_two_hops_is_top_k_of_the_top_1_match():
    """Eq. 9: frame i+2 holds the pair (i+1 -> i+2) top-K of the top-1 match in frame i+1."""
    Fr, H, W, K = 4, 5, 6, 2
    fi, fs, bi, bs = consecutive_topk(torch.randn(Fr, H, W, 4), 3, K)
    corr = chain(fi, fs, bi, bs)
    fi, fs, bi, bs = (t.reshape(Fr - 1, H * W, K) for t in (fi, fs, bi, bs))
    for n in range(H * W):
        m = fi[0, n, 0]
        assert torch.equal(corr.idx[0, n, 2], fi[1, m]) and torch.equal(corr.score[0, n, 2], fs[1, m])
        m2 = fi[1, m, 0]
        assert torch.equal(corr.idx[0, n, 3], fi[2, m2])
        b = bi[2, n, 0]                                    # frame 3 -> 2, then 2 -> 1
        assert torch.equal(corr.idx[3, n, 1], bi[1, b]) and torch.equal(corr.score[3, n, 1], bs[1, b])


def test_resized_correspondence_and_top():
    Fr, H, W = 3, 8, 8
    corr = correspondence(translated_video(Fr, H, W, 16, (2, -2)), window=5, k=3)
    half = corr.resized((4, 4))
    # interior tokens: shifts of (2, -2) per frame on the 8x8 grid are (1, -1) on the 4x4 grid
    assert half.idx[0, 1 * 4 + 1, 1, 0] == 2 * 4 + 0
    assert torch.equal(half.idx[1, :, 1], torch.arange(16)[:, None].expand(16, 3))
    assert corr.resized((8, 8)) is corr
    assert torch.equal(corr.top(1).idx, corr.idx[..., :1])
    with pytest.raises(ValueError, match="k must be"):
        corr.top(4)
    with pytest.raises(ValueError, match="at least 2 frames"):
        consecutive_topk(torch.randn(1, 4, 4, 2))
    with pytest.raises(ValueError, match=r"\[F, H, W, D\]"):
        consecutive_topk(torch.randn(4, 4, 2))


# ---------------------------------------------------------------- temporal token merging

def test_merging_identical_tokens_leaves_attention_unchanged():
    """ToMe's defining property: with proportional attention, merging a token into an
    identical one changes nothing; without it, the merged token is under-weighted."""
    M, S, h, d = 4, 9, 2, 5
    k, v = torch.randn(M, S, h, d), torch.randn(M, S, h, d)
    k[:, 1], v[:, 1] = k[:, 0], v[:, 0]                      # A token 0 == B token 0
    q = torch.randn(M, h, d) * 3
    (km, vm), size = merge_tokens(k.mean(2), (k, v), ratio=1 / S)   # r = 1: the identical pair
    assert km.shape == (M, S - 1, h, d) and torch.all(size.sum(1) == S)
    full = attend(q, k, v, 0.4)
    assert torch.allclose(attend(q, km, vm, 0.4, size), full, atol=1e-6)
    assert not torch.allclose(attend(q, km, vm, 0.4, size, proportional=False), full, atol=1e-3)


def test_merge_is_a_size_weighted_mean_with_expected_counts():
    M, S, C = 3, 10, 6
    x = torch.randn(M, S, C)
    size = torch.randint(1, 5, (M, S)).float()
    plan = match(x, ratio=0.5)
    r = plan.merged.shape[1]
    assert r == 5 and plan.size_out == S - r
    out, out_size = merge(plan, x, size), merge_sizes(plan, size)
    assert out.shape == (M, S - r, C) and out_size.shape == (M, S - r)
    a, b, sa, sb = x[:, 0::2], x[:, 1::2], size[:, 0::2], size[:, 1::2]
    for m in range(M):
        for j in range(b.shape[1]):                          # every B token: weighted mean of itself + its merged A tokens
            src = plan.merged[m][plan.into[m] == j]
            num = b[m, j] * sb[m, j] + (a[m, src] * sa[m, src, None]).sum(0)
            den = sb[m, j] + sa[m, src].sum()
            assert torch.allclose(out[m, len(plan.kept[m]) + j], num / den, atol=1e-6)
            assert out_size[m, len(plan.kept[m]) + j] == den
        assert torch.equal(out[m, :len(plan.kept[m])], a[m, plan.kept[m]])


def test_match_pairs_each_a_token_with_its_most_similar_b_token():
    # A = positions 0, 2, 4; B = 1, 3, 5: A0 ~ B2 (pos 5), A1 ~ B0 (pos 1) strongly, A2 weakly
    e = torch.eye(4)
    metric = torch.stack([e[0], e[1], e[1], e[2], e[3] + 0.3 * e[2], e[0]])[None]
    plan = match(metric, ratio=2 / 6)
    assert plan.merged.tolist() == [[0, 1]] and plan.into.tolist() == [[2, 0]] and plan.kept.tolist() == [[2]]
    assert match(metric, 0.0).merged.shape == (1, 0)
    with pytest.raises(ValueError, match="ratio"):
        match(metric, 1.5)


# ---------------------------------------------------------------- attention

def ctx_for(frames, hw, heads_dim=4, module=None, name="attn1", upcast=False):
    return AttnContext(module, name, False, heads_dim ** -0.5, upcast, hw, {"frames": frames})


def test_spatio_temporal_equals_attention_over_all_frames():
    B, Fr, h, N, d = 2, 3, 2, 6, 4
    q, k, v = (torch.randn(B * Fr, h, N, d) for _ in range(3))
    out = spatio_temporal(q, k, v, ctx_for(Fr, (2, 3), d))
    for b in range(B):
        keys = torch.cat([k[b * Fr + f] for f in range(Fr)], dim=1)       # [h, F·N, d]
        vals = torch.cat([v[b * Fr + f] for f in range(Fr)], dim=1)
        for f in range(Fr):
            probs = (q[b * Fr + f] @ keys.transpose(1, 2) * d ** -0.5).softmax(-1)
            assert torch.allclose(out[b * Fr + f], probs @ vals, atol=1e-5)


def brute_force_cga(q, k, v, corr, frames, include_self, scale):
    """Eq. 11-14 one query token at a time, no merging."""
    BF, h, N, d = q.shape
    out = torch.empty_like(q)
    for b in range(BF // frames):
        for i in range(frames):
            for n in range(N):
                keys, vals = ([k[b * frames + i, :, n]], [v[b * frames + i, :, n]]) if include_self else ([], [])
                for j in range(frames):
                    if j != i:
                        for m in corr.idx[i, n, j].tolist():
                            keys.append(k[b * frames + j, :, m])
                            vals.append(v[b * frames + j, :, m])
                K_, V_ = torch.stack(keys, 1), torch.stack(vals, 1)             # [h, S, d]
                probs = (q[b * frames + i, :, n, None] @ K_.transpose(1, 2) * scale).softmax(-1)
                out[b * frames + i, :, n] = (probs @ V_)[:, 0]
    return out


def random_correspondence(frames, H, W, K):
    idx = torch.randint(0, H * W, (frames, H * W, frames, K))
    own = torch.arange(H * W)[:, None].expand(H * W, K)
    for i in range(frames):
        idx[i, :, i] = own
    return Correspondence(idx, torch.rand(frames, H * W, frames, K), (H, W))


def test_cga_with_identity_correspondence_is_temporal_attention():
    """K=1, each token matched to its own position in every frame: CGA degenerates to
    attention along time at each spatial location."""
    B, Fr, h, H, W, d = 2, 4, 2, 2, 3, 4
    N = H * W
    idx = torch.arange(N)[None, :, None, None].expand(Fr, N, Fr, 1)
    corr = Correspondence(idx.contiguous(), torch.ones(Fr, N, Fr, 1), (H, W))
    q, k, v = (torch.randn(B * Fr, h, N, d) for _ in range(3))
    proc = CorrespondenceGuidedAttention(corr, k=1, merge_ratio=0.0, mode="replace")
    out = proc(q, k, v, ctx_for(Fr, (H, W), d))
    for b in range(B):
        for n in range(N):
            qt, kt, vt = (x[b * Fr:(b + 1) * Fr, :, n].transpose(0, 1) for x in (q, k, v))   # [h, F, d]
            ref = (qt @ kt.transpose(1, 2) * d ** -0.5).softmax(-1) @ vt
            assert torch.allclose(out[b * Fr:(b + 1) * Fr, :, n], ref.transpose(0, 1), atol=1e-5)


@pytest.mark.parametrize("include_self", [True, False])
def test_cga_equals_brute_force_on_random_correspondence(include_self):
    B, Fr, h, H, W, d, K = 2, 3, 2, 2, 3, 4, 2
    corr = random_correspondence(Fr, H, W, K)
    q, k, v = (torch.randn(B * Fr, h, H * W, d) for _ in range(3))
    ref = brute_force_cga(q, k, v, corr, Fr, include_self, d ** -0.5)
    index = gather_index(corr, include_self)
    assert index.shape == (Fr, H * W, (Fr - 1) * K + include_self)
    for budget in (1, 1 << 20):                              # one query per chunk, and all at once
        out = correspondence_attention(q, k, v, index, Fr, d ** -0.5, merge_ratio=0.0, budget=budget)
        assert torch.allclose(out, ref, atol=1e-5)


def test_cga_with_merging_equals_per_token_merge_then_attend():
    B, Fr, h, H, W, d, K = 1, 3, 2, 2, 2, 4, 3
    corr = random_correspondence(Fr, H, W, K)
    q, k, v = (torch.randn(B * Fr, h, H * W, d) for _ in range(3))
    index = gather_index(corr)
    out = correspondence_attention(q, k, v, index, Fr, d ** -0.5, merge_ratio=0.5, budget=50)
    kf = k.permute(0, 2, 1, 3).reshape(Fr * H * W, h, d)       # token t = frame·N + n
    vf = v.permute(0, 2, 1, 3).reshape(Fr * H * W, h, d)
    for i in range(Fr):
        for n in range(H * W):
            g = index[i, n]
            (km, vm), size = merge_tokens(kf[g].mean(1)[None], (kf[g][None], vf[g][None]), 0.5)
            assert km.shape[1] == index.shape[-1] - index.shape[-1] // 2
            ref = attend(q[i, :, n][None], km, vm, d ** -0.5, size)[0]
            assert torch.allclose(out[i, :, n], ref, atol=1e-5)


def test_modes_and_resolutions():
    B, Fr, h, H, W, d = 1, 3, 2, 4, 4, 4
    corr = random_correspondence(Fr, H, W, 2)
    q, k, v = (torch.randn(B * Fr, h, H * W, d) for _ in range(3))
    c = ctx_for(Fr, (H, W), d)
    dense = spatio_temporal(q, k, v, c)
    index = gather_index(corr)
    cga = lambda q_, k_, v_: correspondence_attention(q_, k_, v_, index, Fr, d ** -0.5, merge_ratio=0.5)  # noqa: E731
    run = lambda mode, **kw: CorrespondenceGuidedAttention(corr, k=2, mode=mode, **kw)(q, k, v, c)  # noqa: E731
    assert torch.allclose(run("dense_only"), dense, atol=1e-6)
    assert torch.allclose(run("replace"), cga(q, k, v), atol=1e-6)
    assert torch.allclose(run("cga_only"), cga(q, k, v), atol=1e-6)
    assert torch.allclose(run("sequential"), cga(dense, dense, dense), atol=1e-6)
    assert torch.allclose(run("sequential", sequential_qkv="input"), cga(q, k, dense), atol=1e-6)
    # a 2x2 layer: "match" leaves CGA out (dense, or per-frame attention for cga_only) ...
    q2, k2, v2 = (x[:, :, :4].contiguous() for x in (q, k, v))
    c2 = ctx_for(Fr, (2, 2), d)
    for mode in ("sequential", "replace"):
        out = CorrespondenceGuidedAttention(corr, mode=mode, k=2)(q2, k2, v2, c2)
        assert torch.allclose(out, spatio_temporal(q2, k2, v2, c2), atol=1e-6)
    spatial = ((q2 @ k2.transpose(-1, -2)) * d ** -0.5).softmax(-1) @ v2
    assert torch.allclose(CorrespondenceGuidedAttention(corr, mode="cga_only", k=2)(q2, k2, v2, c2), spatial, atol=1e-5)
    # ... "nearest" resizes the correspondence to the layer
    near = CorrespondenceGuidedAttention(corr, mode="replace", k=2, resolutions="nearest")
    index2 = gather_index(corr.resized((2, 2)))
    ref = correspondence_attention(q2, k2, v2, index2, Fr, d ** -0.5, merge_ratio=0.5)
    assert torch.allclose(near(q2, k2, v2, c2), ref, atol=1e-6)


def test_processor_runs_inside_attention_module_and_reprojects():
    torch.manual_seed(1)
    Fr, H, W, C, heads = 3, 2, 3, 8, 2
    layer = name_layers(torch.nn.ModuleDict({"attn1": Attention(C, heads=heads, dim_head=C // heads)}))
    corr = random_correspondence(Fr, H, W, 2)
    proc = CorrespondenceGuidedAttention(corr, k=2, sequential_qkv="reproject")
    set_processor(layer, "attn1", proc)
    x = torch.randn(Fr, H * W, C)
    with call_state(layer, frames=Fr):
        out = layer["attn1"](x, hw=(H, W))
    m = layer["attn1"]
    q, k, v = (m.split_heads(p(x)) for p in (m.to_q, m.to_k, m.to_v))
    c = m.context((H, W))
    c.state["frames"] = Fr
    dense = spatio_temporal(q, k, v, c)
    d2 = m.merge_heads(dense)
    q2, k2, v2 = (m.split_heads(p(d2)) for p in (m.to_q, m.to_k, m.to_v))
    ref = correspondence_attention(q2, k2, v2, gather_index(corr), Fr, m.scale, merge_ratio=0.5)
    assert torch.allclose(out, m.to_out(m.merge_heads(ref)), atol=1e-5)


def test_processor_errors():
    Fr, H, W, d = 3, 2, 2, 4
    corr = random_correspondence(Fr, H, W, 2)
    q = torch.randn(Fr, 2, H * W, d)
    proc = CorrespondenceGuidedAttention(corr, k=2)
    with pytest.raises(ValueError, match="frame count"):
        proc(q, q, q, AttnContext(None, "x", False, 0.5, False, (H, W), {}))
    with pytest.raises(ValueError, match="not a whole number of videos of 3 frames"):
        proc(q[:2], q[:2], q[:2], ctx_for(Fr, (H, W), d))
    with pytest.raises(ValueError, match="correspondence has 3 frames"):
        proc(q[:2], q[:2], q[:2], ctx_for(2, (H, W), d))
    with pytest.raises(ValueError, match="self-attention"):
        proc(q, q, q, AttnContext(None, "attn2", True, 0.5, False, (H, W), {"frames": Fr}))
    with pytest.raises(ValueError, match="mode"):
        CorrespondenceGuidedAttention(corr, mode="parallel")
    with pytest.raises(ValueError, match="merge_ratio"):
        CorrespondenceGuidedAttention(corr, merge_ratio=2.0)
    with pytest.raises(ValueError, match="k must be"):
        CorrespondenceGuidedAttention(corr, k=5)
    with pytest.raises(ValueError, match="no mask"):
        spatio_temporal(q, q, q, AttnContext(None, "x", False, 0.5, False, (H, W), {"frames": Fr}, torch.ones(1, dtype=torch.bool)))
    layer = name_layers(torch.nn.ModuleDict({"attn1": Attention(8, heads=2, dim_head=3)}))   # heads·dim_head != query_dim
    set_processor(layer, "attn1", CorrespondenceGuidedAttention(corr, k=2, sequential_qkv="reproject"))
    with call_state(layer, frames=Fr), pytest.raises(ValueError, match="reproject"):
        layer["attn1"](torch.randn(Fr, H * W, 8), hw=(H, W))
