"""I2VEdit inversion, SARP, editing pipeline and auto-regressive clips, against restatements of the
authors' code (Vicky0522/I2VEdit: euler_utils.py, attention_util.py, attention_store.py, model_utils.py
P2P pipeline, data.py) on a tiny random SVD."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minivid.attention import wrap_processors
from minivid.methods.i2vedit import (I2VEditConfig, clip_ranges, edit_clip, edit_condition, edit_video,
                                     invert_clip, sarp, sarp_mask, source_attention, uint8_truncate)
from minivid.methods.i2vedit import edit as edit_mod
from minivid.methods.i2vedit.matching import SPATIAL, TEMPORAL, MatchingController, install, keep_for, temporal_names
from minivid.methods.i2vedit.matching import MatchingConfig
from minivid.samplers import karras_sigmas
from minivid.svd import StableVideoDiffusion
from _builders import randomize_

TOL = 1e-5


@pytest.fixture(scope="module")
def svd():
    return randomize_(StableVideoDiffusion.from_config("tiny"))


def _video(frames=4, h=32, w=48, seed=0):
    """A smooth moving pattern with a flat (SARP) band, [F, 3, H, W] in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(-1, 1, h)[:, None]
    x = torch.linspace(-1, 1, w)[None]
    out = []
    for f in range(frames):
        base = torch.stack([torch.sin(3 * x + 0.4 * f) * torch.cos(2 * y), torch.cos(2 * x - y + 0.3 * f), x * y])
        out.append(0.8 * base + 0.05 * torch.randn(3, h, w, generator=g))
    v = torch.stack(out).clamp(-1, 1)
    v[:, :, : h // 4] = 0.5            # a flat band: SARP's smooth area
    return v


def max_rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------- SARP

def _official_sobel_mask(x, thr):
    """svd_util.SmoothAreaRandomDetection.detection, restated."""
    kx = torch.zeros(3, 3, 3, 3)
    ky = torch.zeros(3, 3, 3, 3)
    for i in range(3):
        kx[i, i] = torch.tensor([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]])
        ky[i, i] = torch.tensor([[-1., -2., -1.], [0., 0., 0.], [1., 2., 1.]])
    g = F.conv2d(x, kx, padding=1).abs() + F.conv2d(x, ky, padding=1).abs()
    return (g.mean(1, keepdim=True) <= thr).expand_as(x)


def test_sarp_mask_on_a_ramp_and_the_border():
    h, w = 12, 16
    img = torch.zeros(1, 3, h, w)
    img[..., :, 8:] = torch.linspace(-1, 1, 8)                 # left half flat (0), right half a ramp
    mask = sarp_mask(img)
    assert torch.equal(mask, _official_sobel_mask(img, 0.001))
    # flat interior columns 1..6 are smooth; the ramp (gradient 8·2/7 per pixel) is not
    assert mask[0, :, 1:-1, 1:7].all()
    assert not mask[0, :, :, 8:].any()
    # zero padding: at the border a flat but non-zero image has a gradient, so it is not smooth
    flat = torch.full((1, 3, h, w), 0.5)
    m = sarp_mask(flat)
    assert m[0, :, 1:-1, 1:-1].all() and not m[0, :, 0].any() and not m[0, :, :, -1].any()
    # a constant 0 image is smooth everywhere, the border too
    assert sarp_mask(torch.zeros(1, 3, h, w)).all()


def test_sarp_changes_values_only_inside_the_mask_and_clamps():
    v = _video(2)
    v[0, :, -4:, -4:] = 1.0                                     # a saturated flat corner: clamped
    g = torch.Generator().manual_seed(3)
    out = sarp(v, 0.005, 0.001, g)
    mask = sarp_mask(v)
    assert mask.any() and (~mask).any()
    assert torch.equal(out[~mask], v[~mask])
    changed = (out != v)
    assert changed[mask].float().mean() > 0.5
    assert out.max() <= 1.0 and out.min() >= -1.0
    eps = torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
    ref = torch.where(mask, v + 0.005 * eps, v).clamp(-1, 1)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------- the authors' loops, restated

class _OfficialRecorder:
    """attention_store.AttentionStore during inversion: spatial q, k; temporal probs (explicit)."""

    def __init__(self):
        self.step_store = {}
        self.all_steps = []

    def between_steps(self):
        self.all_steps.append(self.step_store)
        self.step_store = {}

    def spatial(self, inner):
        def proc(q, k, v, ctx):
            self.step_store[ctx.name] = {"q": q.clone(), "k": k.clone()}
            return F.scaled_dot_product_attention(q, k, v)
        return proc

    def temporal(self, inner):
        def proc(q, k, v, ctx):
            probs = (torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1)
            self.step_store[ctx.name] = {"probs": probs.clone()}
            return torch.matmul(probs, v)
        return proc


@torch.no_grad()
def _official_inversion(svd, clip, steps, seed, recorder=None, consistency=None):
    """euler_utils.inverse_video / init_image / euler_loop, restated (SARP first, then the VAE sample,
    then init_image's ε, from one generator)."""
    g = torch.Generator().manual_seed(seed)
    stack = torch.cat([clip[:1], clip[:1], clip])
    mask = _official_sobel_mask(stack, 0.001)
    noise = torch.randn(stack.shape, generator=g)
    stack = stack.clone()
    stack[mask] = stack[mask] + noise[mask] * 0.005
    stack = stack.clamp(-1, 1)
    firstframe, keyframe, video = stack[:1], stack[1:2], stack[2:]
    latents = (svd.vae.encode(video).sample(g) * 0.18215)[None]
    to_pil = lambda t: ((t + 1) / 2.0 * 255.0).type(torch.uint8).float() / 255.0 * 2 - 1   # noqa: E731
    image, first = to_pil(keyframe), to_pil(firstframe)
    emb = svd.encode_image(first)
    eps = torch.randn(image.shape, generator=g)
    image_latents = svd.vae.encode(image + 0.02 * eps).mode()
    first_latents = svd.vae.encode(first + 0.02 * eps).mode()
    Fr = clip.shape[0]
    image_latents = torch.cat([image_latents[:, None], first_latents[:, None].repeat(1, Fr - 1, 1, 1, 1)], 1)
    ids = torch.tensor([[8.0, 127.0, 0.02]])
    s = karras_sigmas(steps)
    sigmas_0 = s[-2] * s[-2] / s[-3]
    timesteps = torch.cat([(0.25 * s[:-1].log())[1:], (0.25 * sigmas_0.log()).reshape(1)])
    sigmas = s.clone()
    sigmas[-1] = sigmas_0
    all_latent = [latents]
    scope = contextlib.ExitStack()
    if recorder is not None:
        scope.enter_context(wrap_processors(svd.unet, SPATIAL, recorder.spatial))
        scope.enter_context(wrap_processors(svd.unet, TEMPORAL, recorder.temporal))
    if consistency is not None:        # ConsistencyAttentionControl: K/V concatenated before the controller
        scope.enter_context(wrap_processors(svd.unet, TEMPORAL, consistency.temporal))
    with scope, torch.no_grad():
        for i in range(steps):
            t = timesteps[len(timesteps) - i - 1]
            sigma = sigmas[len(sigmas) - i - 1]
            sigma_next = sigmas[len(sigmas) - i - 2]
            inp = torch.cat([latents / ((sigma**2 + 1) ** 0.5), image_latents], dim=2)
            pred = svd.unet(inp, t, emb, ids)
            pred_original = pred * (-sigma / (sigma**2 + 1) ** 0.5) + (latents / (sigma**2 + 1))
            latents = latents + (sigma_next - sigma) * (latents - pred_original) / sigma
            all_latent.append(latents)
            if recorder is not None:
                recorder.between_steps()
    all_latent[-1] = all_latent[-1] / ((sigmas[0] ** 2 + 1) ** 0.5)
    return all_latent


def test_inversion_equals_the_official_loop(svd):
    clip = _video(4)
    steps = 6
    ref = _official_inversion(svd, clip, steps, seed=7)
    inv = invert_clip(svd, clip, steps, torch.Generator().manual_seed(7), progress=False)
    assert len(inv.trajectory) == steps + 1
    assert max_rel(inv.trajectory[0], ref[0]) == 0.0                  # the same clean latents
    for mine, theirs in zip(inv.trajectory[1:-1], ref[1:-1]):
        assert max_rel(mine, theirs) <= TOL
    assert (inv.noise - ref[-1]).abs().max() <= TOL * max(1.0, float(ref[-1].abs().max()))
    s = karras_sigmas(steps)
    assert torch.allclose(inv.levels[0], s[-2] ** 2 / s[-3]) and inv.levels[-1] == s[0]


def test_inversion_conditioning_is_the_official_one(svd):
    clip = _video(3)
    inv = invert_clip(svd, clip, 2, torch.Generator().manual_seed(1), use_sarp=False, progress=False)
    g = torch.Generator().manual_seed(1)
    svd.vae.encode(clip).sample(g)                                     # the VAE sample's draw comes first
    eps = torch.randn(clip[:1].shape, generator=g)
    first = uint8_truncate(clip[:1])
    assert torch.equal(first, ((((clip[:1] + 1) / 2 * 255).floor()) / 255 * 2 - 1))   # truncation, not rounding
    assert torch.equal(inv.cond.image_embeds, svd.encode_image(first))
    assert torch.equal(inv.cond.first_latent, svd.vae.encode(first + 0.02 * eps).mode())
    assert torch.equal(inv.cond.key_latent, inv.cond.first_latent)    # no SARP: both copies alike, one ε
    assert inv.cond.added_time_ids.tolist() == [[8.0, 127.0, 0.02]] or \
        torch.allclose(inv.cond.added_time_ids, torch.tensor([[8.0, 127.0, 0.02]]))
    assert inv.cond.latent(3).shape == (1, 3, 4, 8, 12)


class _OfficialEditProcessors:
    """attention_util.AttentionControlEdit (spatial "masked_copy", temporal "copy_v2"), restated with its
    position counters per region."""

    def __init__(self, store, steps, beta, thr, frames):
        self.store, self.steps, self.beta, self.thr, self.frames = store, steps, beta, thr, frames
        self.cur_step = 0
        self.counter = {}

    def between_steps(self):
        self.cur_step += 1
        self.counter = {}

    @staticmethod
    def region(name):
        return "down" if name.startswith("input") else "mid" if name.startswith("middle") else "up"

    def base(self, name):
        return self.store[len(self.store) - self.cur_step - 1][name]

    def spatial(self, inner):
        def proc(q, k, v, ctx):
            base = self.base(ctx.name)
            q0s, k0s = base["q"], base["k"]
            n = q.shape[0]
            outs = []
            for i in range(n):
                qi, ki, vi = q[i].float(), k[i].float(), v[i].float()
                probs = (torch.matmul(qi, ki.transpose(-1, -2)) / math.sqrt(qi.shape[-1])).softmax(-1)
                if i >= n // 2:
                    q0, k0 = q0s[i - n // 2].float(), k0s[i - n // 2].float()
                    probs0 = (torch.matmul(q0, k0.transpose(-1, -2)) / math.sqrt(q0.shape[-1])).softmax(-1)
                    mask = torch.sum(torch.mean(torch.abs(probs0 - probs), dim=0), dim=1).reshape(1, -1, 1)
                    mask = mask.clamp(0, 2) / 2.0
                    mask_thr = (self.thr[1] - self.thr[0]) / (n // 2) * (i - n // 2) + self.thr[0]
                    mask[mask >= mask_thr] = 1.0
                    probs = (1 - mask) * probs0 + mask * probs
                outs.append(torch.matmul(probs, vi))
            return torch.stack(outs).to(q.dtype)
        return proc

    def temporal(self, inner):
        def proc(q, k, v, ctx):
            probs = (torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1)
            region = self.region(ctx.name)
            pos = self.counter.get(region, 0)
            self.counter[region] = pos + 1
            attn_base = self.base(ctx.name)["probs"]
            h = probs.shape[0]
            if self.cur_step < int(self.beta[0] * self.steps):
                repl = attn_base
            elif self.cur_step >= int(self.beta[1] * self.steps):
                repl = probs[h // 2:]
            elif (region == "down" and pos < 4) or (region == "up" and pos > 1):
                repl = probs[h // 2:]
            else:
                repl = attn_base
            probs = torch.cat([probs[: h // 2], repl])
            return torch.matmul(probs, v)
        return proc


def _official_edit(svd, inv_noise, store, edited, steps, seed, beta, thr, output_fps=5, max_guidance=2.0,
                   previous_latent=None, consistency=None):
    """model_utils.P2PStableVideoDiffusionPipeline.__call__ with the edit controller, restated."""
    Fr = inv_noise.shape[1]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = svd.encode_image(edited)
        emb = torch.cat([torch.zeros_like(emb), emb])
        lat = svd.vae.encode(edited).mode() if previous_latent is None else previous_latent / 0.18215
        image_latents = torch.cat([torch.zeros_like(lat), lat])
        noise = torch.randn(image_latents.shape, generator=g)[1:]
        image_latents[1:] = image_latents[1:] + 0.02 * noise
        image_latents = image_latents[:, None].repeat(1, Fr, 1, 1, 1)
        ids = torch.tensor([[output_fps - 1, 127.0, 0.02]]).repeat(2, 1)
        sigmas = karras_sigmas(steps)
        timesteps = 0.25 * sigmas[:-1].log()
        latents = inv_noise * ((sigmas[0] ** 2 + 1) ** 0.5)
        gs = torch.linspace(1.0, max_guidance, Fr)[None].reshape(1, Fr, 1, 1, 1)
        ctl = _OfficialEditProcessors(store, steps, beta, thr, Fr)
        with contextlib.ExitStack() as scope:
            scope.enter_context(wrap_processors(svd.unet, SPATIAL, ctl.spatial))
            scope.enter_context(wrap_processors(svd.unet, TEMPORAL, ctl.temporal))
            if consistency is not None:    # pushed last: outermost, K/V concatenated before the controller
                scope.enter_context(wrap_processors(svd.unet, TEMPORAL, consistency.temporal))
            for i, t in enumerate(timesteps):
                sigma, sigma_next = sigmas[i], sigmas[i + 1]
                inp = torch.cat([latents] * 2) / ((sigma**2 + 1) ** 0.5)
                inp = torch.cat([inp, image_latents], dim=2)
                pred = svd.unet(inp, t, emb, ids)
                u, c = pred.chunk(2)
                pred = u + gs * (c - u)
                original = pred * (-sigma / (sigma**2 + 1) ** 0.5) + (latents / (sigma**2 + 1))
                ctl.between_steps()
                latents = latents + (latents - original) / sigma * (sigma_next - sigma)
    return latents


@pytest.mark.parametrize("preset, beta", [("local", (0.5, 0.8)), ("shape", (0.4, 0.5))])
def test_edit_loop_equals_the_official_loop(svd, preset, beta):
    clip = _video(4)
    edited = _video(1, seed=5)[0].clamp(-1, 1)
    edited = torch.round((edited + 1) / 2 * 255) / 255 * 2 - 1          # an image file's values
    steps = 6
    rec = _OfficialRecorder()
    inv = _official_inversion(svd, clip, steps, seed=23, recorder=rec)
    ref = _official_edit(svd, inv[-1], rec.all_steps, edited[None], steps, 23, beta, (0.35, 0.35))
    cfg = I2VEditConfig(steps=steps, preset=preset, clip_len=4)
    res = edit_clip(svd, clip, edited, cfg, progress=False)
    assert max_rel(res.latents, ref) <= TOL
    # a mask was recorded for every spatial layer and step, values in [0, 1]
    n_spatial = len([n for n in res.layer_hw if "transformer_blocks" in n])
    assert len(res.masks) == steps * n_spatial
    assert all(0 <= float(m.min()) and float(m.max()) <= 1 for m in res.masks.values())


def test_stored_and_recompute_edits_are_bitwise_equal(svd):
    clip = _video(4)
    edited = _video(1, seed=5)[0]
    a = edit_clip(svd, clip, edited, I2VEditConfig(steps=4, clip_len=4, store="recompute"), progress=False)
    b = edit_clip(svd, clip, edited, I2VEditConfig(steps=4, clip_len=4, store="stored"), progress=False)
    assert torch.equal(a.latents, b.latents)
    assert b.inversion.records and not a.inversion.records
    off = edit_clip(svd, clip, edited, I2VEditConfig(steps=4, clip_len=4, matching=False), progress=False)
    assert not torch.equal(off.latents, a.latents)                     # the matching does something


class _FakeLoRA:
    """The motion-LoRA interface (`.disabled()`, `.scale`, `.detach()`): a perturbation of every temporal
    attn1 to_out, so a forgotten `disabled()` changes the recomputed attention."""

    def __init__(self, unet):
        self.scale = 1.0
        self.handles = []
        self.on = True
        for name, m in unet.named_modules():
            if name.endswith("time_stack.0.attn1.to_q"):
                self.handles.append(m.register_forward_hook(lambda _m, _i, out: out * 1.5 if self.on else None))

    @contextlib.contextmanager
    def disabled(self):
        self.on = False
        try:
            yield
        finally:
            self.on = True

    def detach(self):
        for h in self.handles:
            h.remove()


def test_recompute_equals_captured_bitwise(svd):
    clip = _video(4)
    steps = 5
    ctl = MatchingController(MatchingConfig(steps=steps), (8, 12), 4, temporal_names(svd.unet))
    lora = _FakeLoRA(svd.unet)
    try:
        with install(svd.unet, ctl):
            inv = invert_clip(svd, clip, steps, torch.Generator().manual_seed(0), controller=ctl,
                              keep=lambda i: (lambda n, k, hw: True), lora=lora, progress=False)
            assert sorted(inv.records) == list(range(steps))
            for j in range(steps):
                src = source_attention(svd, inv, ctl, j, lora)
                rec = inv.records[steps - 1 - j]
                assert src, "nothing recomputed"
                for name, kinds in src.items():
                    for kind, t in kinds.items():
                        assert torch.equal(t, rec[name][kind]), (j, name, kind)
                # exactly what edit step j reads: all spatial Q/K, the selector's temporal maps
                wanted = {(n, k) for n, kinds in rec.items() for k in kinds
                          if keep_for(j, ctl)(n, k, ctl.hw[n])}
                assert {(n, k) for n, kinds in src.items() for k in kinds} == wanted
            # the recomputation ends after the last layer read: at the last step (stage 2, no temporal maps)
            # the finest spatial attn1, before its own temporal block
            assert ctl.last_needed(keep_for(steps - 1, ctl)) == "output_blocks.8.1.transformer_blocks.0.attn1"
            assert ctl.last_needed(keep_for(0, ctl)) == "output_blocks.8.1.time_stack.0.attn1"
            # with the LoRA on, the temporal attention differs: the recomputation did turn it off
            ctl.phase, ctl.captured, ctl.keep = "record", {}, (lambda n, k, hw: True)
            from minivid.methods.i2vedit.invert import inversion_denoiser
            inversion_denoiser(svd, inv.cond, 4)(inv.trajectory[0], inv.levels[0])
            on = ctl.captured
            ctl.phase = "off"
            name = next(n for n in on if "time_stack" in n)
            assert not torch.equal(on[name]["probs"], inv.records[0][name]["probs"])
    finally:
        lora.detach()


# ---------------------------------------------------------------- clips

def test_clip_splits():
    assert clip_ranges(21, 11, 1) == [(0, 11), (10, 21)]
    assert clip_ranges(25, 14, 1) == [(0, 14), (13, 25)]
    assert clip_ranges(11) == [(0, 11)]
    assert clip_ranges(22) == [(0, 11), (10, 21), (20, 22)]           # the last clip may be shorter
    assert clip_ranges(8, 4, 0) == [(0, 4), (4, 8)]
    with pytest.raises(ValueError, match="fewer than one clip"):
        clip_ranges(10, 11, 1)
    with pytest.raises(ValueError, match="overlap"):
        clip_ranges(20, 5, 5)


def test_clip_k_conditioning(svd, monkeypatch):
    """Clip 1 is conditioned on clip 0's last latent (not re-encoded) and its decoded last frame; the
    overlap frame is written once; the result comes back at the source size."""
    video = _video(7, 32, 48)
    first = _video(1, seed=4)[0]
    calls = []
    real = edit_mod.edit_clip

    def spy(svd_, clip, first_frame, cfg, lora, previous_latent, clip0, is_first, progress, **kw):
        out = real(svd_, clip, first_frame, cfg, lora, previous_latent, clip0, is_first=is_first, progress=progress, **kw)
        calls.append((clip, first_frame, previous_latent, out))
        return out

    monkeypatch.setattr(edit_mod, "edit_clip", spy)
    cfg = I2VEditConfig(steps=2, clip_len=4, overlap=1, recipe="uniform")     # every clip: fps id 4, no skip-interval
    res = edit_video(svd, video, first, cfg, work_size=(16, 32), progress=False)
    assert res.ranges == [(0, 4), (3, 7)]
    assert res.frames.shape == (7, 3, 32, 48)
    (c0, f0, p0, o0), (c1, f1, p1, o1) = calls
    assert p0 is None and c0.shape == (4, 3, 16, 32)
    assert torch.equal(p1, o0.latents[:, -1])
    assert torch.equal(f1, edit_mod.quantize(o0.frames.clamp(-1, 1)[-1]))
    # the conditioning latent of clip 1: previous latent / 0.18215 + 0.02·ε, no VAE encoding
    g = torch.Generator().manual_seed(cfg.seed)
    cond = edit_condition(svd, f1[None], g, fps_id=4, previous_latent=p1)
    eps = torch.randn((2, *p1.shape[1:]), generator=torch.Generator().manual_seed(cfg.seed))[1:]
    assert torch.allclose(cond.latent, p1 / 0.18215 + 0.02 * eps, atol=1e-6)
    assert torch.equal(cond.image_embeds, svd.encode_image(f1[None]))
    # frames: clip 0 whole, clip 1 without its first (the overlap) frame
    expect = torch.cat([edit_mod.resize_frames(o0.frames.clamp(-1, 1), (32, 48)),
                        edit_mod.resize_frames(o1.frames.clamp(-1, 1)[1:], (32, 48))])
    assert torch.equal(res.frames, expect)


def test_the_authors_recipe_is_the_default():
    """Issue 19.1: clip 0 with customize_train.yaml, clips k >= 1 with customize_subsequent_edit.yaml."""
    cfg = I2VEditConfig()
    first, later = cfg.clip_settings(0), cfg.clip_settings(1)
    assert (first.clip_len, first.output_fps, first.skip_interval, first.tune_steps, first.sample_fps) == (11, 5, False, 300, 2.5)
    assert (later.clip_len, later.output_fps, later.skip_interval, later.tune_steps, later.sample_fps) == (16, 7, True, 250, 7)
    assert cfg.ranges(41) == [(0, 11), (10, 26), (25, 41)]
    uniform = I2VEditConfig(recipe="uniform")
    assert uniform.clip_settings(3) == first and uniform.ranges(21) == [(0, 11), (10, 21)]
    assert I2VEditConfig(skip_interval=False).clip_settings(1).skip_interval is False
    with pytest.raises(ValueError, match="recipe"):
        I2VEditConfig(recipe="mine")


def test_skip_interval_is_on_for_later_clips_by_default(svd):
    video = _video(6)
    first = _video(1, seed=4)[0]
    res = edit_video(svd, video, first, I2VEditConfig(steps=2, clip_len=4, overlap=1), progress=False, keep_clips=True)
    assert res.clips[0].inversion.kv and res.clips[0].edit_kv
    assert [c.info["skip_interval"] for c in res.clips] == [False, True]
    plain = edit_video(svd, video, first, I2VEditConfig(steps=2, clip_len=4, overlap=1, skip_interval=False), progress=False)
    assert not plain.clips[0].inversion.kv                          # nothing recorded when no clip reads it
    assert torch.equal(res.frames[:4], plain.frames[:4])            # clip 0 is unaffected
    assert not torch.equal(res.frames[4:], plain.frames[4:])       # clips k ≥ 1 attend to clip 0's K/V


def test_bad_inputs(svd):
    with pytest.raises(ValueError, match="fewer than one clip"):
        edit_video(svd, _video(3), _video(1)[0], I2VEditConfig(steps=2, clip_len=4), progress=False)
    with pytest.raises(ValueError, match="multiple"):
        edit_video(svd, _video(4, 30, 48), _video(1, 30, 48)[0], I2VEditConfig(steps=2, clip_len=4), progress=False)
    with pytest.raises(ValueError, match="preset"):
        I2VEditConfig(preset="huge")
    with pytest.raises(ValueError, match="beta"):
        I2VEditConfig(beta=(0.9, 0.2))
    with pytest.raises(ValueError, match="layer_set"):
        I2VEditConfig(layer_set="all")


def test_stored_equals_recompute_with_skip_interval_and_a_motion_lora(svd):
    """Recomputation runs with the motion LoRA off and with clip 0's inversion K/V, as the inversion did."""
    from minivid.methods.i2vedit.lora import attach_motion_lora

    video = _video(6)
    first = _video(1, seed=4)[0]

    def lora_for_clip(k):
        lora = attach_motion_lora(svd.unet, rank=4, seed=k)
        g = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if name.endswith("lora_up.weight"):
                    p.normal_(0, 0.5, generator=g)
        return lora

    out = {}
    for store in ("recompute", "stored"):
        cfg = I2VEditConfig(steps=3, clip_len=4, overlap=1, store=store)
        out[store] = edit_video(svd, video, first, cfg, lora_for_clip=lora_for_clip, progress=False)
    assert torch.equal(out["recompute"].frames, out["stored"].frames)
    plain = edit_video(svd, video, first, I2VEditConfig(steps=3, clip_len=4, overlap=1), progress=False)
    assert not torch.equal(plain.frames, out["recompute"].frames)        # the LoRA was on while editing
    assert getattr(svd.unet, "_motion_lora", None) is None                # and detached after each clip
