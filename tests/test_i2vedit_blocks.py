"""I2VEdit's pipeline takes its blocks as arguments (`I2VEditBlocks`, issue 20.1): the default blocks are
the unchanged pipeline, bitwise; a swapped block is the one that runs; blocks from other methods (EI²'s
FFAM, COVE's CGA) run on SVD's spatial layers; bad blocks are refused before any compute."""
from __future__ import annotations

import pytest
import torch

from minivid.attention import SPATIAL_SELF, TEMPORAL_SELF, frame_count, select_layers
from minivid.methods.i2vedit import I2VEditConfig, edit_clip, edit_condition, edit_video, invert_clip, sarp
from minivid.methods.i2vedit.edit import I2VEditBlocks, source_attention
from minivid.methods.i2vedit.matching import (MatchingController, SpatialMatching, TemporalMatching, install,
                                              temporal_names)
from minivid.pipelines.svd import video_denoiser
from minivid.samplers import edm_init_noise, edm_inversion_sigmas, euler_sample, karras_sigmas
from minivid.svd import StableVideoDiffusion
from _builders import randomize_

STEPS = 3


@pytest.fixture(scope="module")
def svd():
    return randomize_(StableVideoDiffusion.from_config("tiny"))


def _video(frames=4, h=32, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = (torch.rand(frames, 3, h, w, generator=g) * 2 - 1) * 0.8
    v[:, :, : h // 4] = 0.5                                          # a flat band: SARP's smooth area
    return v


@pytest.fixture(scope="module")
def data():
    return _video(4), _video(1, seed=4)[0]


@pytest.fixture(scope="module")
def default(svd, data):
    clip, first = data
    return edit_clip(svd, clip, first, I2VEditConfig(steps=STEPS), progress=False)


def _unchanged_edit_clip(svd, clip, first, cfg):
    """The pipeline as it was before the blocks (first clip, recompute store, matching on), restated with
    its hard-coded parts: invert_clip, install (matching on every attn1), edit_condition, video_denoiser,
    euler_sample over karras_sigmas."""
    N, Fr = cfg.steps, clip.shape[0]
    m = svd.config.vae.downsample_factor
    ctl = MatchingController(cfg.matching_config(), (clip.shape[-2] // m, clip.shape[-1] // m), Fr,
                             temporal_names(svd.unet))
    with install(svd.unet, ctl), torch.no_grad(), torch.autocast("cpu", enabled=False):
        inv = invert_clip(svd, clip, N, torch.Generator().manual_seed(cfg.seed), cfg.sarp, cfg.sarp_noise,
                          cfg.sarp_threshold, controller=ctl, progress=False)
        settings = cfg.clip_settings(0)
        cond = edit_condition(svd, first[None], torch.Generator().manual_seed(cfg.seed), fps_id=settings.output_fps - 1)
        base = video_denoiser(svd, cond, Fr, cfg.min_guidance, cfg.max_guidance)
        step = [0]

        def denoise(x, sigma):
            j = step[0]
            step[0] += 1
            ctl.source = source_attention(svd, inv, ctl, j)
            ctl.phase, ctl.step = "match", j
            try:
                return base(x, sigma)
            finally:
                ctl.phase, ctl.source = "off", {}

        sigmas = karras_sigmas(N)
        return euler_sample(denoise, edm_init_noise(inv.noise.float(), sigmas), sigmas, progress=False)


# ---------------------------------------------------------------- (a) the defaults are the unchanged pipeline

def test_default_blocks_are_the_unchanged_pipeline_bitwise(svd, data, default):
    clip, first = data
    old = _unchanged_edit_clip(svd, clip, first, I2VEditConfig(steps=STEPS))
    assert torch.equal(default.latents, old)
    assert default.info["blocks"] == "the paper's"


def test_blocks_called_through_wrappers_give_the_same_two_clip_edit(svd):
    """Every block replaced by a wrapper that calls the default: each is called, and the two-clip edit
    with skip-interval (clip 1 reads clip 0's K/V through the temporal block) is bitwise the default's."""
    video, first = _video(7), _video(1, seed=4)[0]
    cfg = I2VEditConfig(steps=STEPS, clip_len=4, overlap=1)
    calls: dict[str, int] = {}

    def through(name, fn):
        def call(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a, **k)
        return call

    blocks = I2VEditBlocks(**{n: through(n, getattr(I2VEditBlocks(), n)) for n in
                              ("invert", "perturb", "condition", "denoiser", "spatial", "temporal", "sigmas", "sample")})
    ref = edit_video(svd, video, first, cfg, progress=False)
    got = edit_video(svd, video, first, cfg, progress=False, blocks=blocks)
    assert torch.equal(got.frames, ref.frames)
    assert [c.info["skip_interval"] for c in got.clips] == [False, True]
    n_spatial = len(select_layers(svd.unet, SPATIAL_SELF))
    n_temporal = len(select_layers(svd.unet, TEMPORAL_SELF))
    assert calls == {"invert": 2, "perturb": 2, "condition": 2, "denoiser": 2, "sigmas": 2, "sample": 2,
                     "spatial": 2 * n_spatial, "temporal": 2 * n_temporal}
    assert set(got.clips[0].info["blocks"]) == set(blocks.describe())


# ---------------------------------------------------------------- (b) a swapped block is the one that runs

class Spy:
    """A spatial processor that sees every call (layer, call state) and passes through."""

    def __init__(self, inner, seen):
        self.inner, self.seen = inner, seen

    def __call__(self, q, k, v, ctx):
        self.seen.append((ctx.name, frame_count(ctx, q.shape[0]), ctx.state.get("step"), ctx.state.get("t"), q.shape[0]))
        return self.inner(q, k, v, ctx)


def test_a_recording_spatial_block_sees_every_call_and_changes_nothing(svd, data, default):
    clip, first = data
    seen: list = []
    blocks = I2VEditBlocks(spatial=lambda inner, ctl: Spy(SpatialMatching(inner, ctl), seen))
    res = edit_clip(svd, clip, first, I2VEditConfig(steps=STEPS), progress=False, blocks=blocks)
    assert torch.equal(res.latents, default.latents)
    layers = set(select_layers(svd.unet, SPATIAL_SELF))
    assert {s[0] for s in seen} == layers
    assert {s[1] for s in seen} == {4}                                    # frames = F in the call state
    sigmas = karras_sigmas(STEPS)
    edit_calls = [s for s in seen if s[4] == 8]                           # the CFG batch: 2 × F frames
    assert len(edit_calls) == STEPS * len(layers)
    assert sorted({(s[2], round(s[3], 4)) for s in edit_calls}) == [(j, round(float(sigmas[j]), 4)) for j in range(STEPS)]
    # the inversion (STEPS calls) and the recomputed source (one call per edit step) run it too, batch F
    assert len([s for s in seen if s[4] == 4]) >= STEPS * len(layers)


def test_a_recording_sampler_and_other_levels(svd, data, default):
    clip, first = data
    seen = []

    def sample(denoise, x, sigmas, progress=True):
        seen.append(sigmas.clone())
        return euler_sample(denoise, x, sigmas, progress=progress)

    res = edit_clip(svd, clip, first, I2VEditConfig(steps=STEPS), progress=False, blocks=I2VEditBlocks(sample=sample))
    assert torch.equal(res.latents, default.latents) and torch.equal(seen[0], karras_sigmas(STEPS))
    # other levels: the sampler sees them, the inversion climbs the same ones, and the edit changes
    rho5 = lambda n: karras_sigmas(n, rho=5.0)                               # noqa: E731
    res5 = edit_clip(svd, clip, first, I2VEditConfig(steps=STEPS), progress=False,
                     blocks=I2VEditBlocks(sample=sample, sigmas=rho5))
    assert torch.equal(seen[1], rho5(STEPS))
    assert torch.equal(res5.inversion.levels, edm_inversion_sigmas(rho5(STEPS)).float())
    assert not torch.equal(res5.latents, default.latents)


def test_a_sampler_that_calls_too_often_is_a_clear_error(svd, data):
    clip, first = data

    def twice(denoise, x, sigmas, progress=True):
        for s in list(sigmas[:-1]) * 2:
            x = denoise(x, s)
        return x

    with pytest.raises(RuntimeError, match="more than steps = 3 times"):
        edit_clip(svd, clip, first, I2VEditConfig(steps=STEPS), progress=False, blocks=I2VEditBlocks(sample=twice))


def test_perturbation_block(svd, data):
    """An identity perturbation is the inversion without SARP, bitwise; SARP's own block is the default."""
    clip, first = data
    cfg = I2VEditConfig(steps=2)
    plain = edit_clip(svd, clip, first, I2VEditConfig(steps=2, sarp=False), progress=False)
    ident = edit_clip(svd, clip, first, cfg, progress=False, blocks=I2VEditBlocks(perturb=lambda x, s, t, g: x))
    with_sarp = edit_clip(svd, clip, first, cfg, progress=False)
    assert torch.equal(ident.latents, plain.latents)
    assert not torch.equal(with_sarp.latents, plain.latents)
    assert I2VEditBlocks().perturb is sarp


def test_ei2_ffam_on_the_spatial_layers(svd, data, default):
    """EI²'s FFAM (r = 2) replaces the matching on SVD's spatial layers (it needs the frame count and the
    token grid, which the pipeline provides); the temporal matching stays."""
    from minivid.methods.ei2 import FFAMProcessor

    clip, first = data
    ffam, calls = FFAMProcessor(2), []

    def counted(q, k, v, ctx):
        calls.append(ctx.name)
        return ffam(q, k, v, ctx)

    res = edit_clip(svd, clip, first, I2VEditConfig(steps=STEPS), progress=False,
                    blocks=I2VEditBlocks(spatial=lambda inner, ctl: counted))
    assert set(calls) == set(select_layers(svd.unet, SPATIAL_SELF))
    assert torch.isfinite(res.latents).all() and not torch.equal(res.latents, default.latents)
    assert res.masks == {}                                           # no spatial matching ran
    assert res.copied                                                # the temporal selector did
    assert res.info["blocks"]["spatial"] != I2VEditBlocks().describe()["spatial"]     # the record says so


def test_cove_cga_on_the_spatial_layers(svd, data, default):
    """COVE's correspondence-guided attention on SVD's spatial layers, from a correspondence on the
    latent grid (random unit features here: the mechanics, not COVE's feature pass)."""
    from minivid.methods.cove.correspondence import correspondence
    from minivid.methods.cove.pipeline import COVEConfig, cove_attention

    clip, first = data
    m = svd.config.vae.downsample_factor
    g = torch.Generator().manual_seed(5)
    feats = torch.nn.functional.normalize(torch.randn(4, 32 // m, 48 // m, 8, generator=g), dim=-1)
    cga = cove_attention(correspondence(feats, 3, 2, backend="reference"), COVEConfig(window=3, k=2))
    res = edit_clip(svd, clip, first, I2VEditConfig(steps=STEPS), progress=False,
                    blocks=I2VEditBlocks(spatial=lambda inner, ctl: cga))
    assert torch.isfinite(res.latents).all() and not torch.equal(res.latents, default.latents)


# ---------------------------------------------------------------- (c) bad blocks: clear errors up front

@pytest.mark.parametrize("kw, match", [
    (dict(sample=42), "sample must be callable"),
    (dict(invert=lambda svd, clip: None), "invert must be callable as invert"),
    (dict(sigmas=lambda: None), "sigmas must be callable"),
    (dict(spatial_layers=3), "spatial_layers must be a layer pattern"),
    (dict(temporal_layers=[]), "temporal_layers must be a layer pattern"),
])
def test_bad_blocks_are_refused_when_made(kw, match):
    with pytest.raises(TypeError, match=match):
        I2VEditBlocks(**kw)


def test_a_processor_where_a_factory_belongs_is_refused_with_a_hint():
    from minivid.methods.ei2 import FFAMProcessor

    with pytest.raises(TypeError, match=r"spatial must be callable as spatial\(inner, controller\).*lambda inner, ctl"):
        I2VEditBlocks(spatial=FFAMProcessor(2))


@pytest.mark.parametrize("kw, err, match", [
    (dict(spatial_layers="*attn1"), ValueError, "both select"),                         # the temporal ones too
    (dict(spatial_layers="*nothing*"), ValueError, "spatial_layers: no attention layer matches"),
    (dict(temporal_layers=lambda n, m: False), ValueError, "temporal_layers: the selector"),
    (dict(spatial=lambda inner, ctl: None), TypeError, "must return a processor"),
])
def test_bad_blocks_fail_before_any_compute(svd, data, kw, err, match):
    clip, first = data
    ran = []

    def invert(*a, **k):
        ran.append(1)
        return invert_clip(*a, **k)

    blocks = I2VEditBlocks(invert=invert, **kw)
    with pytest.raises(err, match=match):
        edit_clip(svd, clip, first, I2VEditConfig(steps=STEPS), progress=False, blocks=blocks)
    if "layers" in next(iter(kw)):
        with pytest.raises(err, match=match):
            edit_video(svd, clip, first, I2VEditConfig(steps=STEPS, clip_len=4), progress=False, blocks=blocks)
    assert not ran
    with pytest.raises(TypeError, match="blocks must be an I2VEditBlocks"):
        edit_video(svd, clip, first, I2VEditConfig(steps=STEPS, clip_len=4), progress=False, blocks={"sample": None})


def test_the_tuning_inversion_takes_the_blocks(svd, data):
    """Clip 0's training-size inversion (skip-interval tuning) is the edit's inversion block: the default
    gives `invert_clip`'s trajectory bitwise, a swapped block is called with the blocks' levels."""
    from minivid.methods.i2vedit.tune import skip_interval_source

    clip, _ = data
    ref = invert_clip(svd, clip, 2, torch.Generator().manual_seed(23), progress=False)
    got = skip_interval_source(svd, clip, 2)
    assert all(torch.equal(a, b) for a, b in zip(got.trajectory, ref.trajectory))
    seen = []

    def invert(*a, **k):
        seen.append(k["sigmas"])
        return invert_clip(*a, **k)

    rho5 = lambda n: karras_sigmas(n, rho=5.0)                               # noqa: E731
    skip_interval_source(svd, clip, 2, blocks=I2VEditBlocks(invert=invert, sigmas=rho5))
    assert len(seen) == 1 and torch.equal(seen[0], rho5(2))
