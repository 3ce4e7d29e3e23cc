"""SD 1.x / 2.x UNet: parity with diffusers' UNet2DConditionModel, official key names, dtypes.

The oracle gets minivid's own weights through diffusers' single-file converter
(`convert_ldm_unet_checkpoint`), so parity also proves the module tree carries the
original ldm key names and semantics.
"""
import json
import pathlib
import time

import pytest
import torch
import torch.nn as nn
import yaml
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
from torch.utils._python_dispatch import TorchDispatchMode

from minivid.layers import reference_convolutions
from minivid.unet import BasicTransformerBlock, UNet, UNetConfig

from _builders import max_err

ROOT = pathlib.Path(__file__).resolve().parents[1]
PREFIX = "model.diffusion_model."


# ---------------------------------------------------------------- helpers

def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights that keep activations O(1), including the zero-initialised output layers
    (so a wrong residual or a missing layer changes the output).

    Values are windows at random offsets of one pool of 2^22+15 Gaussian samples, so that the
    ~900M parameters of a full-size UNet fill at copy speed rather than sampling speed.
    """
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(2 ** 22 + 15, generator=g)

    def sample(shape):
        n = torch.Size(shape).numel()
        start = int(torch.randint(len(pool), (), generator=g))
        reps = (start + n) // len(pool) + 1
        return pool.repeat(reps)[start:start + n].view(shape) if reps > 1 else pool[start:start + n].view(shape)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.copy_(1 + 0.1 * sample(m.weight.shape))
                m.bias.copy_(0.1 * sample(m.bias.shape))
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(sample(m.weight.shape) / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.05 * sample(m.bias.shape))
    return model


def diffusers_config(cfg: UNetConfig) -> dict:
    """diffusers' own translation of the ldm UNetModel parameters that `cfg` stands for."""
    params = dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, model_channels=cfg.model_channels,
        channel_mult=list(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
        attention_resolutions=list(cfg.attention_resolutions), context_dim=cfg.context_dim,
        use_linear_in_transformer=cfg.use_linear_in_transformer, transformer_depth=cfg.transformer_depth,
    )
    if cfg.num_heads is not None:
        params["num_heads"] = cfg.num_heads
    else:
        params["num_head_channels"] = cfg.num_head_channels
    original = {"model": {"params": {
        "unet_config": {"params": params},
        "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
    }}}
    config = create_unet_diffusers_config_from_ldm(original, {}, image_size=512)
    config["upcast_attention"] = cfg.upcast_attention
    return config


def to_diffusers(unet: UNet) -> UNet2DConditionModel:
    """The diffusers UNet holding `unet`'s weights, via the official-checkpoint converter (strict)."""
    config = diffusers_config(unet.cfg)
    checkpoint = {PREFIX + k: v for k, v in unet.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    ref.load_state_dict(converted, strict=True, assign=True)   # shares minivid's tensors: no copy
    return ref.eval()


def random_unet(preset: str, seed: int = 0, **changes) -> UNet:
    """A UNet of `preset` with random weights, built without paying for the default init."""
    with torch.device("meta"):
        unet = UNet(UNetConfig.preset(preset, **changes))
    return randomize_(unet.to_empty(device="cpu"), seed).eval()


@pytest.fixture(scope="module")
def pairs():
    cache = {}

    def get(preset):
        if preset not in cache:
            unet = random_unet(preset)
            cache[preset] = unet, to_diffusers(unet)
        return cache[preset]
    return get


# ---------------------------------------------------------------- parity with diffusers (tiny)

CASES = [  # preset, t, (h, w), batch
    ("tiny", 1, (16, 16), 2),
    ("tiny", 999.0, (8, 8), 1),
    ("tiny", torch.tensor(500), (12, 20), 2),               # 0-d tensor, non-square
    ("tiny", torch.tensor([3.5, 720.0]), (9, 13), 2),       # odd sizes: upsample to the skip's size
    ("tiny_sd2", torch.tensor([10, 500]), (16, 24), 2),
    ("tiny_sd2", 0, (8, 8), 1),
    ("tiny_sd2", 250.0, (10, 6), 3),                         # 10 and 6 are not multiples of 4
]


@pytest.mark.parametrize("preset,t,size,batch", CASES, ids=lambda v: str(v) if not torch.is_tensor(v) else "tensor")
@torch.no_grad()
def test_tiny_parity_with_diffusers(pairs, preset, t, size, batch):
    unet, ref = pairs(preset)
    x = torch.randn(batch, 4, *size)
    context = torch.randn(batch, 77, unet.cfg.context_dim)
    out = unet(x, t, context)
    expected = ref(x, t, encoder_hidden_states=context).sample
    assert out.shape == x.shape
    assert expected.abs().mean() > 0.1          # the random output layers make a non-trivial output
    assert max_err(out, expected) <= 1e-5


@torch.no_grad()
def test_frames_run_as_a_plain_batch(pairs):
    """A batch of 4 equals 4 calls of 1. Batched and single calls run GEMMs/convolutions of other shapes,
    summed in other orders by BLAS (and by other kernels on other CPUs): in float32 that differs by
    2.6e-6 here, close enough to a fixed 1e-5 to fail on another vendor's kernels. In float64 two
    summation orders differ by ~K·2⁻⁵³ relative (~1e-13 here), so 1e-10 is a bound with 3 orders of
    margin, and mixing the batch's items changes the output by O(1)."""
    import copy

    unet = copy.deepcopy(pairs("tiny")[0]).double()
    x, context = torch.randn(4, 4, 8, 8, dtype=torch.float64), torch.randn(4, 77, 32, dtype=torch.float64)
    t = torch.tensor([1, 200, 400, 900])
    whole = unet(x, t, context)
    one_by_one = torch.cat([unet(x[i:i + 1], t[i:i + 1], context[i:i + 1]) for i in range(4)])
    assert (whole - one_by_one).abs().max() <= 1e-10
    assert (whole[1:2] - unet(x[1:2], t[2:3], context[1:2])).abs().max() > 1e-3   # another t: visible


# ---------------------------------------------------------------- full-size presets

MANIFESTS = {"sd14": "sd-v1-4.json", "sd21": "sd-v2-1.json", "sd21_base": "sd-v2-1.json"}


@pytest.mark.parametrize("preset", sorted(MANIFESTS))
def test_full_size_keys_and_shapes_equal_the_manifest(preset):
    tensors = json.loads((ROOT / "weights" / "manifests" / MANIFESTS[preset]).read_text())["tensors"]
    expected = {k[len(PREFIX):]: tuple(v[0]) for k, v in tensors.items() if k.startswith(PREFIX)}
    with torch.device("meta"):
        unet = UNet(UNetConfig.preset(preset))
    got = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert {k: s for k, s in got.items() if s != expected[k]} == {}


@pytest.mark.parametrize("preset,yaml_name,kw", [
    ("sd14", "v1-inference.yaml", {}),
    ("sd21", "v2-inference-v.yaml", {"prediction": "v", "upcast_attention": True}),
    ("sd21_base", "v2-inference.yaml", {}),
])
def test_presets_equal_the_original_inference_configs(preset, yaml_name, kw):
    original = yaml.safe_load((ROOT / "minivid" / "configs" / yaml_name).read_text())
    params = original["model"]["params"]["unet_config"]["params"]
    assert original["model"]["params"].get("parameterization", "eps") == UNetConfig.preset(preset).prediction
    assert UNetConfig.from_ldm(params, **kw) == UNetConfig.preset(preset)


@pytest.mark.parametrize("preset", ["sd14", "sd21"])
@torch.no_grad()
def test_full_size_parity_with_diffusers(preset):
    start = time.perf_counter()
    unet = random_unet(preset, seed=1)
    ref = to_diffusers(unet)
    x = torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, unet.cfg.context_dim)
    out = unet(x, 500, context)
    expected = ref(x, 500, encoder_hidden_states=context).sample
    assert expected.abs().mean() > 0.1
    assert max_err(out, expected) <= 1e-4, f"{preset}: max abs error {max_err(out, expected):.3g}"
    if preset == "sd14":
        # SD 1.4's only difference is the im2col path's summation order (minivid.layers): without it, the
        # same kernels on the same tensors in the same order, so bit for bit diffusers' output. (SD 2.1
        # differs by ~2.4e-6 even without it: another kernel's order, not the convolutions.)
        with reference_convolutions():
            exact = unet(x, 500, context)
        assert torch.equal(exact, expected), f"{preset}: {max_err(exact, expected):.3g} under reference_convolutions()"
    print(f"{preset}: max abs err {max_err(out, expected):.3g}, {time.perf_counter() - start:.1f} s")


# ---------------------------------------------------------------- reduced precision

@pytest.mark.parametrize("preset", ["tiny", "tiny_sd2"])
@torch.no_grad()
def test_bf16_forward_is_close_to_fp32(preset):
    low = random_unet(preset).to(torch.bfloat16)
    full = UNet(low.cfg).eval()
    full.load_state_dict(low.state_dict())          # same (bf16-representable) weights in fp32
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 77, low.cfg.context_dim)
    expected = full(x, 300, context)
    out = low(x, 300, context)
    assert out.dtype == torch.float32                # cast back to the input's dtype
    # bf16 rounds each activation to a relative step of 2^-8 ≈ 0.4%; the output accumulates the
    # roundings of ~25 residual sublayers, √25·0.4% ≈ 2% (measured 1.4% tiny, 2.3% tiny_sd2).
    # 5% leaves headroom yet stays >5× below what a different prompt changes (35-60%).
    rel = ((out - expected).norm() / expected.norm()).item()
    changed = ((full(x, 300, torch.randn_like(context)) - expected).norm() / expected.norm()).item()
    assert rel < 0.05 and changed > 5 * rel, (rel, changed)


class _OpDtypes(TorchDispatchMode):
    """Record the dtype of the inputs of every softmax / scaled-dot-product kernel that runs."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if "softmax" in name or "scaled_dot_product" in name or name.startswith("bmm"):
            self.seen.append((name, args[0].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("processor", ["sdpa", "explicit"])
@pytest.mark.parametrize("upcast", [True, False])
@torch.no_grad()
def test_upcast_attention_computes_attention_in_fp32(processor, upcast):
    from minivid import attention
    from minivid.layers import cpu_has_native

    unet = random_unet("tiny_sd2", upcast_attention=upcast).to(torch.bfloat16)
    attention.set_processor(unet, "*", getattr(attention, processor))
    with _OpDtypes() as rec:
        out = unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, 48))
    assert torch.isfinite(out).all()
    n_attn = len(attention.attention_layers(unet))
    kernels = [(n, dt) for n, dt in rec.seen if not n.startswith("bmm")]
    assert len(kernels) >= n_attn
    if upcast:
        assert {dt for _, dt in kernels} == {torch.float32}, rec.seen
    elif processor == "sdpa":
        # the fused kernel in bf16 where the CPU has bf16 kernels; else float32 (a CPU's scalar half path)
        assert {dt for _, dt in kernels} == {torch.bfloat16 if cpu_has_native(torch.bfloat16) else torch.float32}
    else:
        # the softmax of half inputs is always float32 (as under autocast); Q·Kᵀ stays bf16 without upcast
        assert {dt for _, dt in kernels} == {torch.float32}, rec.seen
        assert torch.bfloat16 in {dt for n, dt in rec.seen if n.startswith("bmm")}, rec.seen


# ---------------------------------------------------------------- extension and errors

@torch.no_grad()
def test_swapping_in_a_subclassed_transformer_block_keeps_keys(pairs):
    unet, _ = pairs("tiny")
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    before, keys = unet(x, 7, context), list(unet.state_dict())

    class Recording(BasicTransformerBlock):
        def forward(self, x, context, hw):
            self.hw = hw
            return super().forward(x, context, hw)

    import copy
    model = copy.deepcopy(unet)
    parent = model.get_submodule("output_blocks.3.1.transformer_blocks")
    new = Recording(64, 2, 32, 32)
    new.load_state_dict(parent[0].state_dict())
    parent[0] = new
    assert list(model.state_dict()) == keys
    assert max_err(model(x, 7, context), before) == 0.0
    assert new.hw == (4, 4)                      # the token grid of output level 1 at 8×8 latents


def test_bad_inputs_raise_clear_errors(pairs):
    unet, _ = pairs("tiny")
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with pytest.raises(ValueError, match="x must be"):
        unet(torch.randn(2, 3, 8, 8), 1, context)
    with pytest.raises(ValueError, match="x must be"):
        unet(torch.randn(4, 8, 8), 1, context)
    with pytest.raises(ValueError, match="context must be"):
        unet(x, 1, torch.randn(2, 77, 48))
    with pytest.raises(ValueError, match="context must be"):
        unet(x, 1, torch.randn(1, 77, 32))
    with pytest.raises(ValueError, match="t must be"):
        unet(x, torch.tensor([1, 2, 3]), context)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="exactly one"):
        UNetConfig(num_heads=8, num_head_channels=64)
    with pytest.raises(ValueError, match="exactly one"):
        UNetConfig(num_heads=None)
    with pytest.raises(ValueError, match="prediction"):
        UNetConfig(prediction="x0")
    with pytest.raises(ValueError, match="GroupNorm"):
        UNetConfig(model_channels=40)
    with pytest.raises(ValueError, match="heads"):
        UNetConfig(model_channels=32, channel_mult=(1,), num_heads=None, num_head_channels=24)
    with pytest.raises(ValueError, match="unknown UNet preset"):
        UNetConfig.preset("sd3")
