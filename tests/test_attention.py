"""minivid.attention on the tiny UNet: processors, globs, scoped capture/injection, hooks, call state."""
import pytest
import torch

from minivid import attention
from minivid.attention import Attention
from minivid.unet import UNet, UNetConfig

# tiny: levels at 1×, 2× (attention) and 4× (none); 2 res blocks per level, so the
# transformers sit in input_blocks 1, 2, 4, 5, the middle block and output_blocks 3-8.
IN_ATTN = [1, 2, 4, 5]
OUT_ATTN = [3, 4, 5, 6, 7, 8]


@pytest.fixture(scope="module")
def unet():
    from _builders import tiny_unet_all_paths

    return tiny_unet_all_paths(0)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    return x, torch.tensor([10, 600]), torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)


def run(unet, x, t, context):
    with torch.no_grad():
        return unet(x, t, context)


def test_layers_know_their_dotted_names_and_share_one_state(unet):
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}
    assert len(layers) == 2 * (len(IN_ATTN) + 1 + len(OUT_ATTN))
    assert all(m.name == n for n, m in layers.items())
    assert "input_blocks.1.1.transformer_blocks.0.attn1" in layers
    assert "middle_block.1.transformer_blocks.0.attn2" in layers
    assert len({id(m.state) for m in layers.values()}) == 1


def test_explicit_processor_equals_sdpa(unet, inputs):
    x, t, c, _ = inputs
    base = run(unet, x, t, c)
    with attention.processors(unet, "*", attention.explicit) as names:
        out = run(unet, x, t, c)
    assert len(names) == 22
    assert (out - base).abs().max() <= 1e-5


def test_set_processor_glob_hits_exactly_the_intended_layers(unet, inputs):
    x, t, c, _ = inputs
    calls = []

    def spy(q, k, v, ctx):
        calls.append(ctx.name)
        return attention.sdpa(q, k, v, ctx)

    try:
        names = attention.set_processor(unet, "output_blocks.*.attn1", spy)
        assert sorted(names) == sorted(f"output_blocks.{i}.1.transformer_blocks.0.attn1" for i in OUT_ATTN)
        run(unet, x, t, c)
        assert sorted(calls) == sorted(names)
        with pytest.raises(ValueError, match="no attention layer matches"):
            attention.set_processor(unet, "output_blocks.*.attn3", spy)
    finally:
        attention.set_processor(unet, "*", attention.sdpa)
    assert all(m.processor is attention.sdpa for m in attention.attention_layers(unet).values())


def test_processors_scope_restores_even_on_error(unet):
    def other(q, k, v, ctx):
        return attention.explicit(q, k, v, ctx)

    before = {n: m.processor for n, m in attention.attention_layers(unet).items()}
    with pytest.raises(RuntimeError, match="boom"):
        with attention.processors(unet, "*attn2", other) as names:
            assert all(attention.attention_layers(unet)[n].processor is other for n in names)
            raise RuntimeError("boom")
    assert {n: m.processor for n, m in attention.attention_layers(unet).items()} == before
    with pytest.raises(ValueError):
        with attention.processors(unet, "nothing.here", other):
            pass


def test_processor_context_carries_grid_cross_flag_and_upcast(unet, inputs):
    x, t, c, _ = inputs
    seen = {}

    def spy(q, k, v, ctx):
        seen[ctx.name] = (ctx.hw, ctx.is_cross, ctx.upcast, q.shape, k.shape)
        return attention.sdpa(q, k, v, ctx)

    with attention.processors(unet, "*", spy):
        run(unet, x, t, c)
    block = "transformer_blocks.0"
    assert seen[f"input_blocks.1.1.{block}.attn1"] == ((16, 16), False, False, (2, 2, 256, 16), (2, 2, 256, 16))
    assert seen[f"input_blocks.4.1.{block}.attn2"] == ((8, 8), True, False, (2, 2, 64, 32), (2, 2, 77, 32))
    assert seen[f"middle_block.1.{block}.attn1"][0] == (4, 4)
    assert seen[f"output_blocks.8.1.{block}.attn2"][:2] == ((16, 16), True)


def test_injecting_all_qkv_reproduces_the_first_prompt(unet, inputs):
    x, t, c1, c2 = inputs
    with attention.capture(unet, "*", kinds=("q", "k", "v")) as store:
        first = run(unet, x, t, c1)
    second = run(unet, x, t, c2)
    assert store.get_call("input_blocks.1.1.transformer_blocks.0.attn2", "k", 0).shape == (2, 2, 77, 16)
    assert (first - second).abs().max() > 1e-2                       # the prompts matter

    with attention.inject(unet, store, "*", kinds=("q", "k", "v")):
        all_injected = run(unet, x, t, c2)
    assert torch.equal(all_injected, first)

    with attention.inject(unet, store, "*attn1", kinds=("q", "k", "v")):
        self_only = run(unet, x, t, c2)
    assert (self_only - first).abs().max() > 1e-3                    # attn2 still reads prompt 2
    assert (self_only - second).abs().max() > 1e-3                   # attn1 now reads prompt 1's q/k/v
    assert torch.equal(run(unet, x, t, c2), second)                  # restored on exit


def test_injecting_probs_and_values_reproduces_cross_attention(unet, inputs):
    x, t, c1, c2 = inputs
    # explicit attention computes out = probs·V, as injecting probs does, so the replay is bitwise
    with attention.processors(unet, "*attn2", attention.explicit), \
            attention.capture(unet, "*attn2", kinds=("probs", "v")) as store:
        first = run(unet, x, t, c1)
    probs = store.get_call("output_blocks.3.1.transformer_blocks.0.attn2", "probs", 0)
    assert probs.shape == (2, 2, 64, 77)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)

    with attention.inject(unet, store, "*attn2", kinds=("probs", "v")):
        assert torch.equal(run(unet, x, t, c2), first)
    with attention.inject(unet, store, "*attn2", kinds=("probs",)):
        maps_only = run(unet, x, t, c2)                              # prompt 1's maps over prompt 2's values
    assert (maps_only - first).abs().max() > 1e-3


def test_inject_select_chooses_the_stored_call(unet, inputs):
    x, t, c1, c2 = inputs
    with attention.capture(unet, "*", kinds=("q", "k", "v")) as store:
        run(unet, x, t, c2)
        first = run(unet, x, t, c1)                                  # second call of every layer
    second = run(unet, x, t, c2)
    with attention.inject(unet, store, "*", select=lambda ctx: 1):
        assert torch.equal(run(unet, x, t, c2), first)
    with attention.inject(unet, store, "*", select=lambda ctx: None):   # None leaves every call alone
        assert torch.equal(run(unet, x, t, c2), second)
    with pytest.raises(ValueError, match="unknown attention tensor kinds"):
        with attention.capture(unet, "*", kinds=("queries",)):
            pass


def test_capture_and_replace_block_outputs_then_remove_the_hooks(unet, inputs):
    x, t, c, _ = inputs
    base = run(unet, x, t, c)
    with attention.capture_outputs(unet, "output_blocks.2") as outs:
        run(unet, x, t, c)
        run(unet, x, t, c)
    assert list(outs) == ["output_blocks.2"] and len(outs["output_blocks.2"]) == 2
    assert outs["output_blocks.2"][0].shape == (2, 64, 8, 8)          # after the level's Upsample

    with attention.replace_outputs(unet, "output_blocks.2", lambda name, out: None):
        assert torch.equal(run(unet, x, t, c), base)
    with attention.replace_outputs(unet, "output_blocks.2", lambda name, out: torch.zeros_like(out)):
        zeroed = run(unet, x, t, c)
    assert (zeroed - base).abs().max() > 1e-2
    with attention.replace_outputs(unet, "output_blocks.2", lambda name, out: outs[name][0]):
        assert torch.equal(run(unet, x, t, c), base)

    assert not unet.output_blocks[2]._forward_hooks
    assert torch.equal(run(unet, x, t, c), base)
    with pytest.raises(ValueError, match="no module matches"):
        with attention.capture_outputs(unet, "output_blocks.99"):
            pass


def test_middle_block_output_is_a_plain_tensor(unet, inputs):
    x, t, c, _ = inputs
    with attention.capture_outputs(unet, "middle_block") as outs:
        run(unet, x, t, c)
    assert type(outs["middle_block"][0]) is torch.Tensor and outs["middle_block"][0].shape == (2, 64, 4, 4)


def test_call_state_reaches_processors_and_is_restored(unet, inputs):
    x, t, c, _ = inputs
    seen = []

    def spy(q, k, v, ctx):
        seen.append(dict(ctx.state))
        return attention.sdpa(q, k, v, ctx)

    with attention.processors(unet, "*", spy):
        with attention.call_state(unet, frames=2, step=5):
            run(unet, x, t, c)
            assert len(seen) == 22 and all(s == {"frames": 2, "step": 5} for s in seen)
            with attention.call_state(unet, step=6):
                seen.clear()
                run(unet, x, t, c)
                assert all(s == {"frames": 2, "step": 6} for s in seen)
            seen.clear()
            run(unet, x, t, c)
            assert all(s == {"frames": 2, "step": 5} for s in seen)
        seen.clear()
        run(unet, x, t, c)
    assert all(s == {} for s in seen) and len(seen) == 22
