"""I2VEdit attention matching (§3.3, Eq. 7–9): the spatial mask, the temporal selector, the store and
its footprint."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minivid.attention import Attention
from minivid.methods.i2vedit import I2VEditConfig, edit_clip, invert_clip
from minivid.methods.i2vedit.matching import (PRESETS, MatchingConfig, MatchingController, TemporalSelector, SpatialMatching,
                                              TemporalMatching, captured_bytes, downscale, install, keep_for, layer_shapes,
                                              official_coarse_layers, spatial_match, store_bytes, temporal_names)
from minivid.svd import StableVideoDiffusion
from minivid.unet_video import VideoUNetConfig

SVD = VideoUNetConfig.preset("svd")
TINY = VideoUNetConfig.preset("tiny")


def _qkv(b=2, h=2, n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for _ in range(3)]


def _plain(q, k, v):
    return ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1) @ v


# ---------------------------------------------------------------- spatial matching

def test_identical_source_leaves_the_output_unchanged():
    q, k, v = [t[0] for t in _qkv()]
    out, m = spatial_match(q, k, v, q, k, q.shape[-1] ** -0.5, 0.35)
    assert torch.equal(m, torch.zeros_like(m))
    assert (out - _plain(q, k, v)).abs().max() <= 1e-6


def test_threshold_zero_with_ge_gives_the_edited_attention():
    q, k, v = [t[0] for t in _qkv()]
    qs, ks, _ = [t[0] for t in _qkv(seed=1)]
    out, m = spatial_match(q, k, v, qs, ks, q.shape[-1] ** -0.5, 0.0, ">=")
    assert torch.equal(m, torch.ones_like(m))
    assert (out - _plain(q, k, v)).abs().max() <= 1e-6
    # and a threshold above 1 leaves M = D, a blend that is neither
    out2, m2 = spatial_match(q, k, v, qs, ks, q.shape[-1] ** -0.5, 1.5)
    assert (m2 < 1).all() and (out2 - _plain(q, k, v)).abs().max() > 1e-3


def test_difference_is_in_0_1_and_follows_eq7():
    q, k, v = [t[0] for t in _qkv(n=20)]
    qs, ks, _ = [t[0] for t in _qkv(n=20, seed=3)]
    scale = q.shape[-1] ** -0.5
    _, d = spatial_match(q, k, v, qs, ks, scale, 2.0)        # thr above every D: M = D
    a = ((q @ k.transpose(-1, -2)) * scale).softmax(-1)
    a0 = ((qs @ ks.transpose(-1, -2)) * scale).softmax(-1)
    ref = (a0 - a).abs().mean(0).sum(-1) / 2
    assert (d - ref).abs().max() <= 1e-6
    assert float(d.min()) >= 0 and float(d.max()) <= 1
    # a fully disjoint pair of maps reaches D = 1
    one = torch.zeros(1, 2, 4)
    assert float((torch.tensor([[1.0, 0, 0, 0]]) - torch.tensor([[0, 1.0, 0, 0]])).abs().sum() / 2) == 1.0
    del one


def test_query_chunks_give_the_same_result():
    q, k, v = [t[0] for t in _qkv(n=23)]
    qs, ks, _ = [t[0] for t in _qkv(n=23, seed=4)]
    whole = spatial_match(q, k, v, qs, ks, 0.3, 0.35, chunk=10_000)
    parts = spatial_match(q, k, v, qs, ks, 0.3, 0.35, chunk=5)
    assert (whole[0] - parts[0]).abs().max() <= 1e-6 and (whole[1] - parts[1]).abs().max() <= 1e-6


def test_ge_versus_the_papers_gt():
    q, k, v = [t[0] for t in _qkv()]
    qs, ks, _ = [t[0] for t in _qkv(seed=2)]
    scale = q.shape[-1] ** -0.5
    _, d = spatial_match(q, k, v, qs, ks, scale, 2.0)
    thr = float(d[3])
    _, m_ge = spatial_match(q, k, v, qs, ks, scale, thr, ">=")
    _, m_gt = spatial_match(q, k, v, qs, ks, scale, thr, ">")
    assert m_ge[3] == 1.0 and m_gt[3] == d[3] < 1.0


def _ctx(name, hw, n_frames=None):
    attn = Attention(16, heads=2, dim_head=8)
    attn.name = name
    return attn.context(hw=hw)


def test_unconditional_half_is_plain_attention_and_threshold_ramps():
    Fr, h, n, d = 3, 2, 12, 8
    q, k, v = _qkv(2 * Fr, h, n, d)
    ctl = MatchingController(MatchingConfig(mask_thr=(0.1, 0.7)), (3, 4), Fr, [])
    assert ctl.thresholds() == pytest.approx([0.1, 0.3, 0.5])
    proc = SpatialMatching(None, ctl)
    ctx = _ctx("input_blocks.1.1.transformer_blocks.0.attn1", (3, 4))
    outs = []
    for seed in (5, 6):
        qs, ks, _ = _qkv(Fr, h, n, d, seed=seed)
        ctl.phase, ctl.step, ctl.source = "match", 0, {ctx.name: {"q": qs, "k": ks}}
        outs.append(proc(q, k, v, ctx))
    plain = F.scaled_dot_product_attention(q[:Fr], k[:Fr], v[:Fr], scale=ctx.scale)
    assert (outs[0][:Fr] - plain).abs().max() <= 1e-6
    assert torch.equal(outs[0][:Fr], outs[1][:Fr])           # the source never reaches the unconditional half
    assert not torch.allclose(outs[0][Fr:], outs[1][Fr:])
    assert ctl.masks[ctx.name, 0].shape == (Fr, n)


# ---------------------------------------------------------------- temporal selector

def test_selector_bounds_are_floors():
    names = [f"input_blocks.{i}.1.time_stack.0.attn1" for i in (1, 2, 4, 5, 7, 8)]
    for preset, bounds in (("local", (12, 20)), ("global", (20, 22)), ("shape", (10, 12))):
        sel = TemporalSelector(25, PRESETS[preset], "official", names)
        assert sel.bounds == bounds
        assert [sel.stage(j) for j in (bounds[0] - 1, bounds[0], bounds[1] - 1, bounds[1])] == [0, 1, 1, 2]
    assert TemporalSelector(7, (0.5, 0.8), "official", names).bounds == (3, 5)


def test_layer_sets_at_svd_size():
    shapes = layer_shapes(SVD, (72, 128), 14)
    temporal = [s for s in shapes if s.kind == "temporal"]
    assert len(temporal) == 16 and len([s for s in shapes if s.kind == "spatial"]) == 16
    official = official_coarse_layers([s.name for s in temporal])
    fmt = "{}.1.time_stack.0.attn1"
    assert official == {fmt.format(b) for b in ("input_blocks.7", "input_blocks.8", "middle_block",
                                                "output_blocks.3", "output_blocks.4")}
    sel = TemporalSelector(25, PRESETS["local"], "paper", [s.name for s in temporal])
    paper = {s.name for s in temporal if sel.coarse(s.name, s.hw, (72, 128))}
    assert paper == official | {fmt.format("output_blocks.5")}


@pytest.mark.parametrize("latent_hw", [(8, 12), (12, 8), (7, 13)])
def test_downscale_is_read_from_the_token_grid(latent_hw):
    level = {1: 1, 2: 1, 4: 2, 5: 2, 7: 4, 8: 4}          # input block -> downscale (SVD)
    up = {3: 4, 4: 4, 5: 4, 6: 2, 7: 2, 8: 2, 9: 1, 10: 1, 11: 1}
    for s in layer_shapes(SVD, latent_hw, 2):
        block, idx = s.name.split(".")[0], s.name.split(".")[1]
        want = 8 if block == "middle_block" else (level if block == "input_blocks" else up)[int(idx)]
        assert downscale(s.hw, latent_hw) == want, (s.name, s.hw)
    # the same on the tiny model (levels 1, 2; the middle block at 4)
    for s in layer_shapes(TINY, latent_hw, 2):
        want = 4 if s.name.startswith("middle") else 1 if s.name.split(".")[1] in ("1", "2", "6", "7", "8") else 2
        assert downscale(s.hw, latent_hw) == want, (s.name, s.hw)


@pytest.fixture(scope="module")
def svd():
    torch.manual_seed(0)
    return StableVideoDiffusion.from_config("tiny")


def test_any_aspect_ratio_edits_with_the_paper_layer_set(svd):
    """7×13 latents (28×52 pixels on the tiny model): the middle stage copies exactly the downscale-4 layer."""
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(3, 3, 28, 52, generator=g) * 2 - 1
    res = edit_clip(svd, clip, clip[0], I2VEditConfig(steps=5, clip_len=3, layer_set="paper"), progress=False)
    # steps 5, local: stage 0 = steps 0, 1; stage 1 = 2, 3; stage 2 = 4
    assert res.copied[2] == res.copied[3] == ["middle_block.1.time_stack.0.attn1"]
    assert len(res.copied[0]) == 11 and 4 not in res.copied
    assert res.layer_hw["middle_block.1.transformer_blocks.0.attn1"] == (2, 4)


def test_temporal_selector_copies_the_conditional_half_only():
    n, h, Fr, d = 6, 2, 4, 8
    q, k, v = _qkv(2 * n, h, Fr, d)
    names = ["middle_block.1.time_stack.0.attn1"]
    ctl = MatchingController(MatchingConfig(steps=10), (2, 3), Fr, names)
    ctx = _ctx(names[0], (2, 3))
    src = torch.rand(n, h, Fr, Fr).softmax(-1)
    ctl.phase, ctl.step, ctl.source = "match", 0, {names[0]: {"probs": src}}
    out = TemporalMatching(None, ctl)(q, k, v, ctx)
    assert (out[:n] - _plain(q[:n], k[:n], v[:n])).abs().max() <= 1e-6
    assert (out[n:] - src @ v[n:]).abs().max() <= 1e-6
    ctl.step = 9                                             # stage 2: the edited maps
    out = TemporalMatching(None, ctl)(q, k, v, ctx)
    assert (out - _plain(q, k, v)).abs().max() <= 1e-6


def test_skip_interval_with_duplicated_kv_leaves_the_output_unchanged():
    q, k, v = _qkv(4, 2, 5, 8)
    name = "input_blocks.1.1.time_stack.0.attn1"
    ctl = MatchingController(MatchingConfig(), (2, 2), 5, [name])
    ctx = _ctx(name, (2, 2))
    ctl.kv_source = {name: (k.clone(), v.clone())}
    ctl.phase = "record"
    out = TemporalMatching(None, ctl)(q, k, v, ctx)
    assert ctl.captured[name]["probs"].shape == (4, 2, 5, 10)   # keys [K_clip0; K]
    assert (out - _plain(q, k, v)).abs().max() <= 1e-6
    other = torch.randn_like(k)
    ctl.kv_source = {name: (other, v.clone())}
    assert (TemporalMatching(None, ctl)(q, k, v, ctx) - _plain(q, k, v)).abs().max() > 1e-3


# ---------------------------------------------------------------- the store's footprint

def test_store_bytes_against_captured_bytes_on_tiny(svd):
    Fr, steps, hw = 3, 5, (8, 12)
    clip = torch.rand(Fr, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cfg = MatchingConfig(steps=steps)
    ctl = MatchingController(cfg, hw, Fr, temporal_names(svd.unet))
    with install(svd.unet, ctl):
        everything = invert_clip(svd, clip, steps, torch.Generator().manual_seed(0), controller=ctl,
                                 keep=lambda i: (lambda n, k, hw_: True), progress=False)
        stored = invert_clip(svd, clip, steps, torch.Generator().manual_seed(0), controller=ctl,
                             keep=lambda i: keep_for(steps - 1 - i, ctl), progress=False)
    est = store_bytes(TINY, hw, Fr, steps, cfg)
    assert captured_bytes(everything.records) == est["official"]["per_clip"]
    assert captured_bytes(everything.records[0]) == est["official"]["per_step"]
    assert captured_bytes(stored.records) == est["stored"]["per_clip"] < est["official"]["per_clip"]
    assert everything.nbytes() == est["recompute"]["per_clip"]
    # the stored mode skips the records of stage 2 and the fine layers of stage 1
    assert all("q" in kinds for kinds in stored.records[0].values() if len(kinds))


def test_store_bytes_at_full_size_on_meta():
    est = store_bytes(SVD, (72, 128), 14, 25)
    assert est["official"]["per_step"] == 3_229_148_160            # the authors' fp32 disk store, 3.23 GB/step
    assert est["official"]["per_clip"] == 25 * 3_229_148_160       # 80.7 GB/clip
    latent = 14 * 4 * 72 * 128 * 4
    assert est["recompute"]["per_clip"] == 26 * latent + 1024 * 4 + 2 * 4 * 72 * 128 * 4 + 12
    assert est["recompute"]["per_clip"] <= est["official"]["per_clip"] / 100
    spatial_step = 2 * 14 * 4 * (5 * 9216 * 320 + 5 * 2304 * 640 + 5 * 576 * 1280 + 144 * 1280)
    t = 14 * 14 * 4
    temporal_all = t * (5 * 9216 * 5 + 5 * 2304 * 10 + 5 * 576 * 20 + 144 * 20)
    temporal_coarse = t * (4 * 576 * 20 + 144 * 20)               # input 7, 8, output 3, 4 and the middle block
    assert est["stored"]["per_clip"] == 25 * spatial_step + 12 * temporal_all + 8 * temporal_coarse


def test_mask_picture_layout_and_colours():
    from minivid.methods.i2vedit.visualize import heat_colors, mask_picture, pick_steps

    assert torch.equal(heat_colors(torch.zeros(2, 2)), -torch.ones(3, 2, 2))        # M = 0: black
    assert torch.equal(heat_colors(torch.ones(2, 2)), torch.ones(3, 2, 2))          # M = 1: white
    assert pick_steps(list(range(25)), 6) == [0, 5, 10, 14, 19, 24]
    layers = {"input_blocks.1.1.transformer_blocks.0.attn1": (2, 3), "middle_block.1.transformer_blocks.0.attn1": (1, 2)}
    masks = {(n, s): torch.rand(4, hw[0] * hw[1]) for n, hw in layers.items() for s in range(3)}
    masks["input_blocks.1.1.transformer_blocks.0.attn1", 1][2] = 1.0               # frame 2, step 1: all ones
    frames = torch.zeros(4, 3, 8, 12)
    tiles, rows, cols = mask_picture(masks, layers, frames, frame=2, min_height=8)
    assert rows == list(layers) and cols == [0, 1, 2] and tiles.shape == (6, 3, 8, 12)
    assert torch.allclose(tiles[1], torch.full((3, 8, 12), 0.7))                    # 0.7·white + 0.3·frame
    with pytest.raises(ValueError, match="no matching masks"):
        mask_picture({}, layers, frames)
