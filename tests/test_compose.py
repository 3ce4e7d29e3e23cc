"""Blocks that compose (issue 20): hooks that nest in either order, recording that leaves the run
bitwise unchanged, the plain image model under whatever is installed, EI²'s scoped inflation, CGA
with another dense half, `step`/`t` in every pipeline's call state, selectors and one API shape."""
import pytest
import torch

from minivid import attention as A
from minivid.attention import SPATIAL_CROSS, SPATIAL_SELF, TEMPORAL_SELF, call_state, sdpa
from minivid.methods.cove.attention import CorrespondenceGuidedAttention, spatio_temporal
from minivid.methods.cove.correspondence import correspondence
from minivid.methods.cove.features import diffusion_features
from minivid.methods.cove.inject import FeatureBank, injection_layers
from minivid.methods.ei2 import EI2Config, FFAMProcessor, inflate
from minivid.methods.ei2.model import STAMBlockMixin, deflate, inflated
from minivid.models import StableDiffusion
from minivid.pipelines import sd as P
from minivid.samplers import ddim_timesteps, karras_sigmas
from minivid.unet import UNet, UNetConfig

N_SELF = 11          # the tiny UNet's spatial self-attention layers (and as many cross-attention layers)


@pytest.fixture(scope="module")
def unet():
    from _builders import tiny_unet_all_paths

    return tiny_unet_all_paths(0)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    return x, torch.tensor([500, 500]), torch.randn(2, 77, 32, generator=g)


def run(unet, x, t, context):
    with torch.no_grad():
        return unet(x, t, context)


def pristine(unet):
    return all(m.processor is sdpa and not m.wrappers for m in A.attention_layers(unet).values())


# ---------------------------------------------------------------- hooks compose in either order

@pytest.mark.parametrize("capture_outside", [True, False])
def test_capture_and_a_processor_nest_in_both_orders(unet, inputs, capture_outside):
    calls = []

    def mine(q, k, v, ctx):
        calls.append(ctx.name)
        return A.explicit(q, k, v, ctx)

    with A.processors(unet, SPATIAL_SELF, mine):
        ref = run(unet, *inputs)
    capture = A.capture(unet, SPATIAL_SELF, kinds=("out",))
    install = A.processors(unet, SPATIAL_SELF, mine)
    outer, inner = (capture, install) if capture_outside else (install, capture)
    with outer as a, inner as b:
        out = run(unet, *inputs)
    store = a if capture_outside else b
    assert torch.equal(out, ref)                                  # the capture changed nothing
    assert len(store) == N_SELF and len(calls) == 2 * N_SELF      # it saw every layer, running `mine`
    assert pristine(unet)


@pytest.mark.parametrize("bank_outside", [True, False])
def test_feature_bank_keeps_every_site_with_a_processor_installed_inside_or_outside(unet, inputs, bank_outside):
    """COVE's FeatureBank records and injects on FLATTEN's layers while a video processor is
    installed in the same layers, whichever scope is entered first."""
    resnets, attentions = injection_layers(unet)
    bank = FeatureBank(resnets, attentions, {500: 500}, dtype=None)

    def nest(tool):
        install = A.processors(unet, SPATIAL_SELF, spatio_temporal)
        return (tool, install) if bank_outside else (install, tool)

    with call_state(unet, frames=2), bank.at(500):
        first, second = nest(bank.recording(unet))
        with first, second:
            run(unet, *inputs)
        assert sorted(bank.qk[500]) == sorted(attentions) and len(attentions) == 4
        assert sorted(bank.features[500]) == sorted(resnets)
        first, second = nest(bank.injecting(unet))
        with first, second:
            run(unet, *inputs)
    assert bank.injected == 2 * len(attentions) + len(resnets)
    assert pristine(unet)


def test_wrappers_nest_and_leave_in_any_order(unet, inputs):
    seen = []

    def tagger(tag):
        def wrap(inner):
            def w(q, k, v, ctx):
                seen.append(tag)
                return inner(q, k, v, ctx)
            return w
        return wrap

    layer = "input_blocks.1.1.transformer_blocks.0.attn1"
    a = A.wrap_processors(unet, layer, tagger("a"))
    b = A.wrap_processors(unet, layer, tagger("b"))
    a.__enter__()
    b.__enter__()
    run(unet, *inputs)
    assert seen == ["b", "a"]                      # the wrapper pushed last runs first
    a.__exit__(None, None, None)                   # leave out of order: b still works, a is gone
    seen.clear()
    run(unet, *inputs)
    assert seen == ["b"]
    b.__exit__(None, None, None)
    assert pristine(unet)


# ---------------------------------------------------------------- recording changes nothing

def test_recorder_leaves_the_run_bitwise_unchanged_and_keeps_grid_step_and_t(tiny_sd):
    sd = tiny_sd("tiny")
    noise = P.initial_noise(sd, 1, 32, 32, seed=0)
    base = P.text_to_image(sd, "a fox", steps=3, latents=noise, progress=False, decode=False).latents
    with A.record_attention(sd.unet, SPATIAL_CROSS, tokens=[1], batch=slice(1, None)) as rec:
        out = P.text_to_image(sd, "a fox", steps=3, latents=noise, progress=False, decode=False).latents
    assert torch.equal(out, base)
    layers = A.attention_layers(sd.unet, SPATIAL_CROSS)
    assert len(rec) == 3 * len(layers) and rec.steps == [0, 1, 2]
    assert {m.step: m.t for m in rec} == dict(enumerate(ddim_timesteps(3).tolist()))
    for m in rec:
        assert m.probs.shape == (1, m.hw[0] * m.hw[1], 1) and m.grid().shape == (1, 1, *m.hw)
    assert rec.nbytes == 4 * sum(m.probs.numel() for m in rec)
    # what it kept is the layer's own probabilities, selected and averaged over heads
    name = "output_blocks.3.1.transformer_blocks.0.attn2"
    with A.capture(sd.unet, name, kinds=("probs",)) as store:
        P.text_to_image(sd, "a fox", steps=3, latents=noise, progress=False, decode=False)
    for step in range(3):
        full = store[name]["probs"][step]                                     # [2, heads, N, 77]
        assert torch.equal(rec.select(name, step)[0].probs, full[1:, :, :, [1]].float().mean(1))
    with A.record_attention(sd.unet, SPATIAL_CROSS, steps=[1], heads=None) as only:
        P.text_to_image(sd, "a fox", steps=3, latents=noise, progress=False, decode=False)
    assert only.steps == [1] and len(only) == len(layers) and only[0].probs.shape[:2] == (2, 2)
    assert pristine(sd.unet)


def test_recorder_refuses_a_processor_that_does_not_report_probabilities(unet, inputs):
    def opaque(q, k, v, ctx):
        return sdpa(q, k, v, ctx)

    with A.processors(unet, SPATIAL_SELF, opaque):                # installed first: refused at entry
        with pytest.raises(ValueError, match=r"record_attention: the processor on .*attn1, .*opaque.* does not report 'probs'"):
            with A.record_attention(unet, SPATIAL_SELF):
                pass
    with A.record_attention(unet, SPATIAL_SELF) as rec:           # installed inside: refused at the call
        with A.processors(unet, SPATIAL_SELF, opaque), pytest.raises(RuntimeError, match="opaque.* does not report"):
            run(unet, *inputs)
        with A.processors(unet, SPATIAL_SELF, A.explicit):        # a processor that reports is recorded
            run(unet, *inputs)
    assert len(rec) == N_SELF
    assert pristine(unet)


# ---------------------------------------------------------------- the plain image model

def test_cove_features_run_the_plain_image_model_on_an_inflated_tuned_unet():
    sd = StableDiffusion.from_config("tiny", seed=0)
    z = torch.randn(3, 4, 8, 8)
    plain = diffusion_features(sd, z, generator=torch.Generator().manual_seed(5))
    x, t, c = torch.randn(3, 4, 8, 8), torch.tensor([261] * 3), torch.randn(3, 77, 32)
    image_out = run(sd.unet, x, t, c)
    with inflated(sd.unet, EI2Config(r=2)):
        with torch.no_grad():                                     # "tuned": STAM's bias and weights move
            for name, p in sd.unet.named_parameters():
                if ".stam." in name:
                    p.add_(torch.randn_like(p) * 0.1)
        with call_state(sd.unet, frames=1):
            assert (run(sd.unet, x, t, c) - image_out).abs().max() > 1e-3    # the video model differs ...
        with A.capture(sd.unet, SPATIAL_SELF, kinds=("q",)) as store, \
                A.replace_outputs(sd.unet, "middle_block", lambda name, out: out + 1):   # as TCVE's branch hooks
            feats = diffusion_features(sd, z, generator=torch.Generator().manual_seed(5))
        with A.image_model(sd.unet):
            assert torch.equal(run(sd.unet, x, t, c), image_out)             # ... its image model does not
        assert any(isinstance(m, STAMBlockMixin) for m in sd.unet.modules())
    assert torch.equal(feats, plain)
    assert not store                                              # no wrapper ran in the feature pass
    assert pristine(sd.unet)


def test_inflated_is_a_scope_and_deflate_undoes_inflate():
    sd = StableDiffusion.from_config("tiny", seed=0)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 77, 32)
    keys, before = set(sd.unet.state_dict()), run(sd.unet, x, t, c)
    with inflated(sd.unet, EI2Config(r=1)) as model:
        assert len(model.stam_blocks) == N_SELF
        assert len([m for m in A.attention_layers(sd.unet).values() if isinstance(m.processor, FFAMProcessor)]) == N_SELF
        assert any(".stam." in k for k in sd.unet.state_dict())
    assert set(sd.unet.state_dict()) == keys and pristine(sd.unet)
    assert torch.equal(run(sd.unet, x, t, c), before)
    inflate(sd.unet, EI2Config(r=2))
    assert len(deflate(sd.unet)) == N_SELF
    assert set(sd.unet.state_dict()) == keys and pristine(sd.unet)
    assert torch.equal(run(sd.unet, x, t, c), before)
    with inflated(sd.unet), pytest.raises(ValueError, match="already inflated"):
        with inflated(sd.unet):
            pass


# ---------------------------------------------------------------- CGA with another dense half

def test_cga_with_ffam_r1_as_its_dense_half_equals_coves_sequential_mode():
    """FFAM with r = 1 is dense spatio-temporal attention, so CGA on top of it is COVE's sequential mode.
    float64: the two dense halves sum the same terms in another order, so they differ by rounding only
    (≤ ~F·N·2⁻⁵² relative), far below 1e-10."""
    Fr, hw, h, d = 3, (4, 4), 2, 8
    feats = torch.nn.functional.normalize(torch.randn(Fr, *hw, 16), dim=-1)
    corr = correspondence(feats, 3, 2, normalize=False)
    q, k, v = (torch.randn(2 * Fr, h, 16, d, dtype=torch.float64) for _ in range(3))
    ctx = A.AttnContext(None, "attn1", False, d ** -0.5, False, hw, {"frames": Fr})
    cove = CorrespondenceGuidedAttention(corr, k=2)(q, k, v, ctx)
    ei2 = CorrespondenceGuidedAttention(corr, k=2, dense=FFAMProcessor(1, "reference"))(q, k, v, ctx)
    assert (cove - ei2).abs().max() <= 1e-10
    coarse = CorrespondenceGuidedAttention(corr, k=2, dense=FFAMProcessor(2, "reference"))(q, k, v, ctx)
    assert (cove - coarse).abs().max() > 1e-3                    # the dense half matters


# ---------------------------------------------------------------- step and t in the call state

def clock(model, pattern=SPATIAL_CROSS):
    """A wrapper on the first selected layer that notes (step, t) at each call."""
    seen = []
    name = sorted(A.attention_layers(model, pattern))[0]

    def wrap(inner):
        def note(q, k, v, ctx):
            seen.append((ctx.state.get("step"), ctx.state.get("t")))
            return inner(q, k, v, ctx)
        return note
    return A.wrap_processors(model, name, wrap), seen


def test_sd_pipelines_put_step_and_t_in_the_call_state(tiny_sd):
    sd = tiny_sd("tiny")
    scope, seen = clock(sd.unet)
    with scope:
        inv = P.invert(sd, latents=torch.randn(1, 4, 4, 4), steps=3, progress=False)
        P.reconstruct(sd, inv, progress=False, decode=False, chunk=1)
    ts = ddim_timesteps(3).tolist()
    assert seen == [(i, t) for i, t in enumerate(ts[::-1])] + [(i, t) for i, t in enumerate(ts)]
    assert "step" not in next(iter(A.attention_layers(sd.unet).values())).state      # restored


def test_cove_puts_step_and_t_in_the_call_state():
    from minivid.cli.cove import moving_shapes
    from minivid.methods.cove.pipeline import COVEConfig, edit_video, inversion_unet_timesteps

    sd = StableDiffusion.from_config("tiny_sd2", seed=0)
    scope, seen = clock(sd.unet, SPATIAL_SELF)
    with scope:
        edit_video(sd, moving_shapes(3, 32), "a bear", "a man", COVEConfig(inversion_steps=4, steps=2, inject_steps=1),
                   progress=False, decode=False)
    inversion, sampling = inversion_unet_timesteps(4), ddim_timesteps(2).tolist()
    assert seen == list(enumerate(inversion)) + list(enumerate(sampling))     # (the feature pass runs no wrapper)


def test_svd_pipeline_puts_step_and_sigma_in_the_call_state():
    from minivid.pipelines.svd import image_to_video
    from minivid.svd import StableVideoDiffusion

    svd = StableVideoDiffusion.from_config("tiny")
    scope, seen = clock(svd.unet, TEMPORAL_SELF)
    with scope:
        image_to_video(svd, torch.zeros(1, 3, 32, 32), num_frames=2, num_steps=2, progress=False, decode=False,
                       generator=torch.Generator().manual_seed(0))
    assert seen == [(i, float(s)) for i, s in enumerate(karras_sigmas(2)[:-1])]


# ---------------------------------------------------------------- selectors and one API shape

def test_selectors_separate_spatial_from_temporal_layers_on_svd():
    from minivid.svd import StableVideoDiffusion

    unet = StableVideoDiffusion.from_config("tiny").unet
    every, spatial, temporal = (set(A.attention_layers(unet, p)) for p in ("*attn1", SPATIAL_SELF, TEMPORAL_SELF))
    assert spatial and temporal and not spatial & temporal
    assert every == spatial | temporal                            # the bare glob takes both kinds
    assert all(".time_stack." in n for n in temporal) and not any(".time_stack." in n for n in spatial)


def test_set_processor_processors_and_wrappers_take_the_same_selectors(unet):
    names = ["input_blocks.1.1.transformer_blocks.0.attn1", "output_blocks.3.1.transformer_blocks.0.attn2"]
    for pattern, count in ((names, 2), (lambda n, m: m.is_cross, N_SELF), (SPATIAL_SELF, N_SELF)):
        made = []

        def factory(name, module):
            made.append(name)
            return A.explicit
        with A.processors(unet, pattern, factory, factory=True) as got:
            assert len(got) == count == len(made)
            assert all(A.attention_layers(unet)[n].processor is A.explicit for n in got)
        with A.wrap_processors(unet, pattern, lambda inner: inner) as wrapped:
            assert wrapped == got
        assert A.set_processor(unet, pattern, sdpa) == got
    for call in (lambda: A.set_processor(unet, ["*attn1", "*nope"], sdpa),
                 lambda: A.processors(unet, "*nope", sdpa).__enter__(),
                 lambda: A.wrap_processors(unet, lambda n, m: False, lambda i: i).__enter__()):
        with pytest.raises(ValueError, match=r"^(set_processor|processors|wrap_processors): .*(nope|picks no)"):
            call()
    assert pristine(unet)


def test_one_frame_count_helper():
    from minivid.methods.ei2.blocks import video_frames
    from minivid.methods.tuneavideo import frames_of

    assert A.frame_count({"frames": 4}, 8) == 4 == A.frame_count({}, 8, frames=4) == video_frames({"frames": 4}, 8)
    assert frames_of({"frames": 2}, 6) == 3 * 0 + 2
    for helper in (lambda: A.frame_count({}, 8), lambda: video_frames({}, 8), lambda: frames_of({}, 8)):
        with pytest.raises(KeyError, match="frame count unknown"):
            helper()
        with pytest.raises(ValueError, match="call_state"):
            helper()
    with pytest.raises(ValueError, match="a batch of 7 is not a whole number of videos of 2 frames"):
        A.frame_count({"frames": 2}, 7)


# ---------------------------------------------------------------- EI² and TCVE take their blocks as arguments

def _counting_loop(calls):
    def loop(*args, **kwargs):
        calls.append(kwargs.get("progress"))
        return P.edit_video(*args, **kwargs)
    return loop


def _counting(processor, seen):
    def proc(q, k, v, ctx):
        seen.add(ctx.name)
        return processor(q, k, v, ctx)
    return proc


def test_ei2_edit_takes_its_attention_and_loop():
    from minivid.cli.ei2 import moving_squares
    from minivid.methods.ei2.edit import edit

    sd = StableDiffusion.from_config("tiny", seed=0)
    inflate(sd.unet, EI2Config(r=2))
    clip = moving_squares(2, 32)
    run = dict(steps=2, progress=False)
    default = edit(sd, clip, "a red square", **run)
    calls, seen = [], set()
    same = edit(sd, clip, "a red square", **run, loop=_counting_loop(calls),
                attention=_counting(FFAMProcessor(2), seen))               # the paper's block, passed explicitly
    assert calls == [False] and torch.equal(same.latents, default.latents)
    assert seen == set(A.select_layers(sd.unet, SPATIAL_SELF, "test"))    # installed on the layers asked for ...
    assert all(isinstance(m.processor, FFAMProcessor) for m in A.select_layers(sd.unet, SPATIAL_SELF, "test").values())
    per_frame = edit(sd, clip, "a red square", **run, attention=sdpa)     # ... and restored; another block differs
    assert (per_frame.latents - default.latents).abs().max() > 1e-3


def test_tcve_edit_takes_its_attention_and_loop():
    from minivid.cli.tcve import rolling_ball
    from minivid.methods.tcve.model import TCVEModel
    from minivid.methods.tcve.edit import edit_tcve
    from minivid.methods.tuneavideo import sparse_causal

    sd = StableDiffusion.from_config("tiny", seed=0)
    model = TCVEModel.build(sd.unet)
    clip = rolling_ball(3, 32)
    run = dict(steps=2, progress=False)
    default = edit_tcve(sd, model, clip, "a red ball", **run)
    calls, seen = [], set()
    same = edit_tcve(sd, model, clip, "a red ball", **run, loop=_counting_loop(calls),
                     attention=_counting(sparse_causal, seen))
    assert calls == [False] and torch.equal(same.latents, default.latents)
    assert seen == set(A.select_layers(sd.unet, SPATIAL_SELF, "test"))
    per_frame = edit_tcve(sd, model, clip, "a red ball", **run, attention=sdpa)
    assert (per_frame.latents - default.latents).abs().max() > 1e-3
