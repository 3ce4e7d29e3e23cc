"""I2VEdit as its authors run it (issue 19): the clip recipe and the time-based frame sampling, the
two-clip main loop with skip-interval attention (editing and motion-LoRA training) against a
restatement of the authors' code, the per-frame threshold ramp and the selector's "down position ≥ 4"
branch on an SVD-shaped tiny UNet, the precision split, and the store's bytes against what the authors'
storage code saves."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minivid.attention import wrap_processors
from minivid.methods.i2vedit import I2VEditConfig, edit_clip, edit_video, store_bytes
from minivid.methods.i2vedit.clips import FIRST, SUBSEQUENT, plan_frames
from minivid.methods.i2vedit.edit import quantize
from minivid.methods.i2vedit.lora import attach_motion_lora
from minivid.methods.i2vedit.matching import (SPATIAL, TEMPORAL, MatchingConfig, MatchingController, install,
                                              layer_shapes, official_coarse_layers, temporal_names)
from minivid.methods.i2vedit.tune import motion_loss, prepare_clip, record_for_sigma, skip_interval_source
from minivid.samplers import karras_sigmas
from minivid.svd import StableVideoDiffusion
from minivid.unet_video import VideoUNetConfig
from minivid.video import time_grid

from _builders import randomize_, svd_shaped_tiny_config
from test_i2vedit_edit import TOL, _official_edit, _official_inversion, _OfficialRecorder, _video, max_rel
from test_i2vedit_tune import official_loss, randomize_lora_


@pytest.fixture(scope="module")
def svd4():
    torch.manual_seed(0)
    return randomize_(StableVideoDiffusion(svd_shaped_tiny_config()), seed=3)


# ---------------------------------------------------------------- recipe and sampling

def test_time_grid_is_the_authors_linspace():
    """data.py read_video_iter: end_t = min(len/fps, end_t) (or len/fps for −1), then
    np.linspace(int(start_t·fps), int(end_t·fps), int((end_t − start_t)·sample_fps), endpoint=False)."""
    for fps, sample_fps, start_t, end_t, total in [(30, 2.5, 0, 8.4, 900), (29.97, 2.5, 0, 8.4, 900), (24, 7, 0, 10, 900),
                                                   (25, 7, 2, 9.5, 900), (8, 4, 0, 3, 900), (30, 2.5, 0, 8.4, 150),
                                                   (23.976, 7, 0, None, 500)]:
        end = total / fps if end_t is None else min(total / fps, end_t)
        ref = np.linspace(int(start_t * fps), int(end * fps), int((end - start_t) * sample_fps),
                          endpoint=False).astype(int).tolist()
        assert time_grid(fps, sample_fps, start_t, end_t, total) == ref, (fps, sample_fps)


def test_plan_follows_the_two_configs():
    # a 30 s video at 30 fps: clip 0 as customize_train.yaml (2.5 fps, 11 frames over 0–4 s)
    plan = plan_frames(900, 30.0, 26)
    assert plan.indices[:11] == list(range(0, 121, 12)) and plan.ranges == [(0, 11), (10, 26)]
    # clip 1 as customize_subsequent_edit.yaml (7 fps, 16 frames) from clip 0's last frame, which it shares
    clip1 = plan.clip_sources()[1]
    assert clip1[0] == 120 and len(clip1) == 16 and all(3 < b - a < 6 for a, b in zip(clip1, clip1[1:]))
    assert plan.sample_fps == [2.5, 7.0] and plan.mode == "time"
    # uniform: the first config's 21 frames of 8.4 s exactly
    uniform = plan_frames(900, 30.0, 21, "uniform")
    assert uniform.indices == np.linspace(0, 252, 21, endpoint=False).astype(int).tolist()
    # no frame rate, or --stride: by index
    assert plan_frames(900, None, 26).indices == list(range(26))
    assert plan_frames(900, 30.0, 26, stride=3).indices == list(range(0, 78, 3))
    with pytest.raises(ValueError, match="fewer than clip 0"):
        plan_frames(60, 30.0, 26)                    # 2 s at 2.5 fps: 5 frames
    assert (FIRST.clip_len, FIRST.sample_fps, SUBSEQUENT.clip_len, SUBSEQUENT.sample_fps) == (11, 2.5, 16, 7)


# ---------------------------------------------------------------- the SVD-shaped tiny UNet

def test_svd_shaped_tiny_preset_has_svd_layout():
    cfg = svd_shaped_tiny_config().unet
    temporal = [s for s in layer_shapes(cfg, (8, 12), 2) if s.kind == "temporal"]
    names = [s.name for s in temporal]
    assert len(names) == 16
    assert sum(n.startswith("input") for n in names) == 6 and sum(n.startswith("output") for n in names) == 9
    fmt = "{}.1.time_stack.0.attn1"
    assert official_coarse_layers(names) == {fmt.format(b) for b in ("input_blocks.7", "input_blocks.8", "middle_block",
                                                                      "output_blocks.3", "output_blocks.4")}
    from minivid.unet_video import VideoUNet

    with torch.device("meta"):
        unet = VideoUNet(cfg)
    assert len(attach_motion_lora(unet, rank=4).names) == 192


@pytest.mark.parametrize("thr", [(0.2, 0.5), (0.5, 0.1)])
def test_edit_loop_with_a_threshold_ramp_on_the_svd_shaped_unet(svd4, thr):
    """Unequal per-frame thresholds (the ramp is compared) and the selector's coarse down layers
    (input_blocks.7/.8, positions ≥ 4 of the down path) against the authors' loops."""
    clip = _video(3)
    edited = quantize(_video(1, seed=5)[0])
    steps = 5
    rec = _OfficialRecorder()
    inv = _official_inversion(svd4, clip, steps, seed=23, recorder=rec)
    ref = _official_edit(svd4, inv[-1], rec.all_steps, edited[None], steps, 23, (0.4, 0.8), thr)
    res = edit_clip(svd4, clip, edited, I2VEditConfig(steps=steps, beta=(0.4, 0.8), mask_thr=thr, recipe="uniform",
                                                      clip_len=3), progress=False)
    assert max_rel(res.latents, ref) <= TOL
    assert "input_blocks.7.1.time_stack.0.attn1" in res.copied[2]           # stage 1 copies the coarse down layers
    assert "input_blocks.5.1.time_stack.0.attn1" not in res.copied[2]
    # the ramp reached the masks: per-frame thresholds differ, so do the masks' hit rates
    name = "input_blocks.1.1.transformer_blocks.0.attn1"
    assert res.masks[name, 0].shape[0] == 3


# ---------------------------------------------------------------- two clips with skip-interval (main.py)

class _Consistency:
    """attention_util.ConsistencyAttentionControl, restated: records temporal attn1 K/V per step, or
    concatenates a store's K/V of step `cur_step` (use_inversion_attention False: the same step) or of
    record `record` before the attention."""

    def __init__(self, source=None):
        self.source, self.store, self.record = source, [], None
        self.first, self.step = None, -1

    def temporal(self, inner):
        def proc(q, k, v, ctx):
            if self.first is None:
                self.first = ctx.name
            if ctx.name == self.first:
                self.step += 1
                self.store.append({})
            if self.source is None:
                self.store[self.step][ctx.name] = (k.clone(), v.clone())
            else:
                k0, v0 = self.source[self.step if self.record is None else self.record][ctx.name]
                k, v = torch.cat([k0, k], dim=2), torch.cat([v0, v], dim=2)
            return inner(q, k, v, ctx)
        return proc


@torch.no_grad()
def _authors_two_clips(svd, video, first, steps, seed=23):
    """main.py's loop for clip 0 (customize_train.yaml settings, consistency stores recorded) and clip 1
    (customize_subsequent_edit.yaml: fps id 6, skip-interval to clip 0's inversion and edit K/V)."""
    out = []
    clip0, clip1 = video[:3], video[2:]
    rec0, cons_inv0 = _OfficialRecorder(), _Consistency()
    inv0 = _official_inversion(svd, clip0, steps, seed, recorder=rec0, consistency=cons_inv0)
    cons_edit0 = _Consistency()
    lat0 = _official_edit(svd, inv0[-1], rec0.all_steps, first[None], steps, seed, (0.5, 0.8), (0.35, 0.35),
                          output_fps=5, consistency=cons_edit0)
    out.append(lat0)
    frames0 = svd.decode_latents(lat0, 8).float()[0].clamp(-1, 1)
    edited1 = quantize(frames0[-1])
    rec1 = _OfficialRecorder()
    inv1 = _official_inversion(svd, clip1, steps, seed, recorder=rec1, consistency=_Consistency(cons_inv0.store))
    lat1 = _official_edit(svd, inv1[-1], rec1.all_steps, edited1[None], steps, seed, (0.5, 0.8), (0.35, 0.35),
                          output_fps=7, previous_latent=lat0[:, -1], consistency=_Consistency(cons_edit0.store))
    out.append(lat1)
    return out, cons_inv0.store


def test_two_clips_with_skip_interval_equal_the_authors_main_loop(svd4):
    video = _video(5)
    first = quantize(_video(1, seed=4)[0])
    steps = 4
    ref, _ = _authors_two_clips(svd4, video, first, steps)
    res = edit_video(svd4, video, first, I2VEditConfig(steps=steps, clip_len=3), progress=False, keep_clips=True)
    assert [c.info["recipe"] for c in res.clips] == ["first", "subsequent"]
    assert [c.info["fps_id"] for c in res.clips] == [4, 6] and res.clips[1].info["skip_interval"]
    # the same arithmetic in other summation orders (per frame vs 1024-row chunks, sdpa vs an explicit
    # softmax): fp32 rounding (~1e-7 per op) grown through 2·4 Euler steps of a 4-level UNet; measured here
    # 1.4e-5 (clip 0); clip 1 starts from clip 0's decoded, uint8-rounded last frame, so it inherits clip 0's
    # error once more. An error of the method (a wrong record, step or layer) moves the latents by > 1e-3.
    err0, err1 = max_rel(res.clips[0].latents, ref[0]), max_rel(res.clips[1].latents, ref[1])
    assert err0 <= 5 * TOL and err1 <= 10 * TOL, (err0, err1)
    # skip-interval changes clip 1 (the paper's ablation is not what runs)
    off = edit_video(svd4, video, first, I2VEditConfig(steps=steps, clip_len=3, skip_interval=False), progress=False)
    assert max_rel(off.frames[3:], res.frames[3:]) > 1e-3


def test_record_for_sigma_is_the_authors_timestep():
    """train.py 1049–1057 + ConsistencyAttentionControl: record = N − 1 − clamp(N − searchsorted(...))."""
    N = 25
    s = karras_sigmas(N).float()
    asc = s.flip(0)
    for sigma in [0.001, 0.002, float(s[-2]), float(s[-2]) * 1.01, 1.0, float(s[1]), float(s[0]), 699.9, 800.0]:
        t = (N - torch.searchsorted(asc, torch.tensor([sigma]), right=False)).clamp(0, N - 1)[0]
        assert record_for_sigma(sigma, N) == N - int(t) - 1, sigma
    assert record_for_sigma(800.0, N) == N - 1 and record_for_sigma(0.001, N) == 0


@pytest.mark.parametrize("seed", [0, 5])
def test_skip_interval_training_loss_equals_the_authors(svd4, seed):
    """A clip k ≥ 1's LoRA loss with skip-interval: temporal attn1 attends to clip 0's training-size
    inversion K/V of record N − 1 − timestep(σ) (main.py 267–345, train.py 994–1057)."""
    video = _video(5)
    steps = 5
    cons = _Consistency()
    _official_inversion(svd4, video[:3], steps, 23, consistency=cons)           # clip 0, motion LoRA off
    inv0 = skip_interval_source(svd4, video[:3], steps, 23)
    lora = randomize_lora_(attach_motion_lora(svd4.unet, rank=4), std=0.2)        # eval: no dropout
    try:
        data = prepare_clip(svd4, video[2:], seed=1)
        ctl = MatchingController(MatchingConfig(steps=steps, spatial=False, temporal=False), (8, 12), 3,
                                 temporal_names(svd4.unet))
        with install(svd4.unet, ctl):
            ours = motion_loss(svd4, lora, data, skip_interval=inv0, controller=ctl)(0, torch.Generator().manual_seed(seed))
        plain = motion_loss(svd4, lora, data)(0, torch.Generator().manual_seed(seed))
        ours, plain = ours.detach(), plain.detach()
        train_cons = _Consistency(cons.store)

        def unet(inp, t, emb, ids):                      # set_cur_step(timestep) from the σ of this step
            sigma = float(torch.exp(4 * torch.as_tensor(t).float()).reshape(-1)[0])
            train_cons.record = record_for_sigma(sigma, steps)
            return svd4.unet(inp, t, emb, ids)

        torch.manual_seed(seed)
        with torch.no_grad(), wrap_processors(svd4.unet, TEMPORAL, train_cons.temporal):
            theirs = official_loss(unet, data.latents, (data.cond_latent * 0.18215)[:, None], data.image_embeds)
    finally:
        lora.detach()
    assert abs(float(ours) - float(theirs)) <= 1e-5 * abs(float(theirs))
    assert abs(float(ours) - float(plain)) > 1e-4 * abs(float(plain))     # the clip-0 K/V change the loss


# ---------------------------------------------------------------- precision split

def test_precision_split_inverts_in_fp32_and_edits_in_bf16(svd4):
    clip = _video(3)
    first = quantize(_video(1, seed=4)[0])
    base = dict(steps=3, clip_len=3, recipe="uniform")
    ref = edit_clip(svd4, clip, first, I2VEditConfig(**base), progress=False)
    split = edit_clip(svd4, clip, first, I2VEditConfig(**base, edit_dtype=torch.bfloat16), progress=False)
    both = edit_clip(svd4, clip, first, I2VEditConfig(**base, edit_dtype=torch.bfloat16, invert_dtype="edit"),
                     progress=False)
    # the default split: the inversion is the fp32 one, bitwise; the edit is not
    assert all(torch.equal(a, b) for a, b in zip(split.inversion.trajectory, ref.inversion.trajectory))
    assert not torch.equal(split.latents, ref.latents) and split.latents.dtype == torch.float32
    assert not torch.equal(both.inversion.trajectory[-1], ref.inversion.trajectory[-1])
    assert (split.info["inversion_dtype"], split.info["edit_dtype"], both.info["inversion_dtype"]) == ("fp32", "bf16", "bf16")
    # half-precision weights cannot invert in fp32: a clear error, not a silent bf16 inversion
    half = StableVideoDiffusion(svd_shaped_tiny_config()).to(torch.bfloat16)
    with pytest.raises(ValueError, match="cannot run in fp32"):
        edit_clip(half, clip, first, I2VEditConfig(**base), progress=False)


def test_stored_mode_refuses_a_clip_over_the_host_budget(svd4):
    video = _video(3)
    with pytest.raises(MemoryError, match="over the budget"):
        edit_video(svd4, video, video[0], I2VEditConfig(steps=2, clip_len=3, store="stored", store_budget=1000),
                   progress=False)


# ---------------------------------------------------------------- the store against the authors' storage code

class _AuthorsStore:
    """attention_store.AttentionStore.forward + attention_control, restated: spatial attn1 saves q and k
    ([F, heads, N, d]), temporal attn1 the softmax probabilities ([N, heads, F, F]), each only when
    `attn.shape[-2] <= 8*9*8*16` (9216); one record per step, fp32 (the inversion runs in fp32)."""

    def __init__(self):
        self.saved = []

    def _keep(self, t):
        if t.shape[-2] <= 8 * 9 * 8 * 16:
            self.saved.append(t)

    def spatial(self, inner):
        def proc(q, k, v, ctx):
            self._keep(q)
            self._keep(k)
            return inner(q, k, v, ctx)
        return proc

    def temporal(self, inner):
        def proc(q, k, v, ctx):
            probs = (torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1)
            self._keep(probs)
            return inner(q, k, v, ctx)
        return proc


def _authors_bytes(cfg: VideoUNetConfig, latent_hw, frames):
    from minivid.unet_video import VideoUNet

    with torch.device("meta"):
        unet = VideoUNet(cfg)
    store = _AuthorsStore()
    with torch.no_grad(), wrap_processors(unet, SPATIAL, store.spatial), wrap_processors(unet, TEMPORAL, store.temporal):
        x = torch.empty(1, frames, cfg.in_channels, *latent_hw, device="meta")
        unet(x, torch.ones((), device="meta"), torch.empty(1, 1, cfg.context_dim, device="meta"),
             torch.empty(1, 3, device="meta"))
    return sum(t.numel() * 4 for t in store.saved), store.saved


@pytest.mark.parametrize("frames, expected", [(14, 3_229_148_160), (11, 2_483_585_280)])
def test_store_bytes_equal_what_the_authors_store_saves(frames, expected):
    svd = VideoUNetConfig.preset("svd")
    got, saved = _authors_bytes(svd, (72, 128), frames)
    assert got == expected                                                      # the audit figures
    assert store_bytes(svd, (72, 128), frames, 25)["official"]["per_step"] == got
    shapes = {tuple(t.shape) for t in saved}
    assert (frames, 5, 9216, 64) in shapes and (9216, 5, frames, frames) in shapes
    # above 9216 tokens the authors keep no spatial q/k of that layer (the cap binds): 80×128 latents
    got, _ = _authors_bytes(svd, (80, 128), frames)
    assert store_bytes(svd, (80, 128), frames, 25)["official"]["per_step"] == got


def test_clip0_kv_kept_where_kv_home_says_and_read_back_exactly(svd4, monkeypatch):
    """Skip-interval's K/V of clip 0 live on the host for a model on an accelerator (`kv_home`); every later
    clip moves them back. Here the "home" is float64 on the CPU (fp32 -> fp64 -> fp32 is exact): the K/V
    must really be kept there, and the edit must be bitwise the edit that keeps them where computed."""
    from minivid.methods.i2vedit import edit as edit_mod

    assert edit_mod.kv_home(torch.device("cuda", 0)) == torch.device("cpu")
    assert edit_mod.kv_home(torch.device("cpu")) is None
    video, first, steps = _video(5), quantize(_video(1, seed=4)[0]), 3
    cfg = I2VEditConfig(steps=steps, clip_len=3)
    plain = edit_video(svd4, video, first, cfg, progress=False, keep_clips=True)
    monkeypatch.setattr(edit_mod, "kv_home", lambda device: torch.float64)
    moved = edit_video(svd4, video, first, cfg, progress=False, keep_clips=True)
    kept = [t for step in moved.clips[0].edit_kv.values() for kv in step.values() for t in kv]
    kept += [t for step in moved.clips[0].inversion.kv.values() for kv in step.values() for t in kv]
    assert kept and all(t.dtype == torch.float64 for t in kept)
    assert all(t.dtype == torch.float32 for step in plain.clips[0].edit_kv.values() for kv in step.values() for t in kv)
    assert moved.clips[1].info["skip_interval"]
    assert torch.equal(moved.frames, plain.frames) and torch.equal(moved.clips[1].latents, plain.clips[1].latents)
