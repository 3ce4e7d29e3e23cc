"""I2VEdit motion LoRA: targets and counts (full size on meta), init, the hooks' defining properties
(zero init = base, hooked = merged, dropout p=1 = base, disabled = base), gradients only on the LoRA,
the authors' list format (order checked against diffusers' modules, round trip), bad LoRAs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from diffusers import UNetSpatioTemporalConditionModel

from minivid.attention import attention_layers
from minivid.methods.i2vedit.lora import (
    DEFAULT_TARGETS, LoRAError, attach_motion_lora, motion_lora_targets, official_order,
)
from minivid.unet_video import VideoUNet, VideoUNetConfig
from minivid.weights import svd_names  # noqa: F401  (registers the svd_* tables)
from minivid.weights.diffusers_names import original_to_diffusers

from _builders import diffusers_kwargs, max_err


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (zero-initialised output layers too), so the temporal blocks reach the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model.eval()


def randomize_lora_(lora, seed: int = 1, std: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(std * torch.randn(p.shape, generator=g))
    return lora


def unet_inputs(cfg: VideoUNetConfig, B: int = 1, F: int = 4, h: int = 8, w: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, cfg.in_channels, h, w, generator=g)
    c_noise = 0.25 * torch.log(torch.tensor([3.0] * B))
    embeds = torch.randn(B, 1, cfg.context_dim, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * B)
    return x, c_noise, embeds, ids


@pytest.fixture()
def unet():
    return randomize_(VideoUNet(VideoUNetConfig.preset("tiny")))


# ---------------------------------------------------------------- targets, counts, init

def test_full_size_targets_and_parameter_count_on_meta():
    with torch.device("meta"):
        unet = VideoUNet(VideoUNetConfig.preset("svd"))
    keys = list(unet.state_dict())
    globs = list(attention_layers(unet, "*time_stack*attn1"))
    lora = attach_motion_lora(unet)
    assert len(lora.names) == 192 and len(lora.names) == 16 * 12
    assert lora.num_parameters() == 17_821_696
    assert list(unet.state_dict()) == keys                       # strict keys of the UNet unchanged
    assert list(attention_layers(unet, "*time_stack*attn1")) == globs
    # only the temporal transformer blocks: never a VideoResBlock's time_stack (emb_layers) nor a spatial block
    assert all(".time_stack.0." in n and ".transformer_blocks." not in n for n in lora.names)
    parts = {n.split(".time_stack.0.")[1] for n in lora.names}
    assert parts == {"ff_in.net.0.proj", "ff_in.net.2", "ff.net.0.proj", "ff.net.2",
                     *(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0"))}
    lora.detach()
    assert list(unet.state_dict()) == keys


def test_init_down_normal_std_one_over_rank_and_up_zero(unet):
    lora = attach_motion_lora(unet, rank=8, seed=3)
    downs = torch.cat([lora.branch(n).lora_down.weight.detach().flatten() for n in lora.names])
    ups = torch.cat([lora.branch(n).lora_up.weight.detach().flatten() for n in lora.names])
    assert torch.count_nonzero(ups) == 0
    # N(0, (1/r)²) over n values: the sample std is within a few 1/√(2n) of 1/r
    n = downs.numel()
    assert abs(float(downs.std()) * 8 - 1) < 5 / (2 * n) ** 0.5
    assert abs(float(downs.mean())) * 8 < 5 / n ** 0.5
    # shapes [r, in] and [out, r] of the Linear each adapts
    for name, linear in lora.layers().items():
        assert lora.branch(name).lora_down.weight.shape == (8, linear.in_features)
        assert lora.branch(name).lora_up.weight.shape == (linear.out_features, 8)
    # the seed fixes the draw
    lora.detach()
    again = attach_motion_lora(unet, rank=8, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(downs, torch.cat([again.branch(n).lora_down.weight.flatten()
                                                                  for n in again.names])))


def test_targets_subset_and_bad_options(unet):
    lora = attach_motion_lora(unet, targets=("attn1", "attn2"))
    assert all(".attn" in n for n in lora.names) and len(lora.names) == 8 * len(motion_lora_targets(unet, ("attn1",))) // 4
    with pytest.raises(ValueError, match="already attached"):
        attach_motion_lora(unet)
    lora.detach()
    with pytest.raises(ValueError, match="subset"):
        attach_motion_lora(unet, targets=("conv",))
    with pytest.raises(ValueError, match="exceeds the width"):
        attach_motion_lora(unet, rank=1000)


# ---------------------------------------------------------------- the hooks

def test_zero_init_output_is_bitwise_the_base(unet):
    inputs = unet_inputs(unet.cfg)
    with torch.no_grad():
        base = unet(*inputs)
        lora = attach_motion_lora(unet)
        lora.train()                                     # dropout on: up = 0 still adds exactly zero
        assert torch.equal(unet(*inputs), base)


U32 = 2.0 ** -24                                         # float32 unit roundoff


def gamma(n: int, u: float = U32) -> float:
    """γ_n = n·u / (1 − n·u): the relative error bound of an n-term float sum or dot product, whatever the
    order or blocking the BLAS uses (Higham, Accuracy and Stability of Numerical Algorithms, §3.1)."""
    return n * u / (1 - n * u)


def hooked_vs_merged_bound(linear: nn.Linear, down: torch.Tensor, up: torch.Tensor, scale: float,
                           x: torch.Tensor) -> torch.Tensor:
    """Elementwise bound of |hooked − merged| for one float32 Linear with K inputs and a rank-r LoRA.
    hooked = fl(Wx + b) + fl(s·fl(U·fl(Dx))) and merged = fl(fl(W + fl(s·fl(UD)))·x + b) are each within
    γ_{K+r+3}·M of the exact (W + sUD)x + b, M = (|W| + |s|·|U|·|D|)·|x| + |b|; so they differ by at most
    2γ_{K+r+3}·M. Computed in float64 from the data: it holds on any CPU's kernels."""
    K, r = linear.in_features, down.shape[0]
    W, x64 = linear.weight.double().abs(), x.double().abs()
    mag = x64 @ (W + abs(scale) * (up.double().abs() @ down.double().abs())).T
    if linear.bias is not None:
        mag = mag + linear.bias.double().abs()
    return 2 * gamma(K + r + 3) * mag


def test_hooked_equals_merged_per_layer_and_through_the_unet(unet):
    inputs = unet_inputs(unet.cfg)
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    lora = randomize_lora_(attach_motion_lora(unet, scale=0.7))
    probes = {n: torch.randn(2, 6, m.in_features, generator=torch.Generator().manual_seed(i))
              for i, (n, m) in enumerate(lora.layers().items())}

    def plain(state: dict) -> torch.Tensor:
        """The UNet with these weights and no LoRA hooks."""
        model = VideoUNet(unet.cfg).eval()
        model.load_state_dict(state)
        return model(*inputs)

    with torch.no_grad():
        with lora.disabled():
            base = unet(*inputs)
        hooked_layers = {n: lora.layers()[n](x) for n, x in probes.items()}
        hooked = unet(*inputs)
        assert max_err(hooked, base) > 1e-3                 # the LoRA changes the output
        bounds = {n: hooked_vs_merged_bound(lora.layers()[n], lora.branch(n).lora_down.weight,
                                            lora.branch(n).lora_up.weight, lora.scale, x) for n, x in probes.items()}
        lora.merge()
        # each layer: W x + s·up(down(x)) and (W + s·up·down) x agree within the rounding bound of K + r terms
        for n, x in probes.items():
            y = lora.layers()[n](x)
            assert ((y.double() - hooked_layers[n].double()).abs() <= bounds[n]).all(), n
            # the bound is far below what the branch adds: a wrong merge cannot hide in it
            assert float(bounds[n].max()) < 0.01 * float((hooked_layers[n] - nn.functional.linear(
                x, weights[f"{n}.weight"], weights.get(f"{n}.bias"))).abs().max())
        # through the whole UNet: once merged, the hooks add nothing (bitwise the plain UNet with the merged
        # weights: the same computation), so merged = hooked up to the per-layer rounding bounded above
        merged = unet(*inputs)
        assert torch.equal(merged, plain(unet.state_dict()))
        assert max_err(merged, base) > 1e-3
        # the merged weights: W + s·fl(UD) rounded once per add, |ΔW| ≤ γ_{r+2}(|W| + |s||U||D|)
        for n, linear in lora.layers().items():
            b = lora.branch(n)
            exact = weights[f"{n}.weight"].double() + lora.scale * (b.lora_up.weight.double() @ b.lora_down.weight.double())
            mag = weights[f"{n}.weight"].double().abs() + abs(lora.scale) * (b.lora_up.weight.double().abs() @ b.lora_down.weight.double().abs())
            assert ((linear.weight.double() - exact).abs() <= gamma(b.lora_down.weight.shape[0] + 2) * mag).all(), n
        with lora.disabled():                               # a merged LoRA is taken out for the block
            assert torch.equal(unet(*inputs), plain(unet.state_dict()))
        lora.detach()                                       # unmerges (restores the kept base), removes the hooks
        after = unet.state_dict()
        assert all(torch.equal(after[k], v) for k, v in weights.items())   # bitwise: no subtraction
        assert torch.equal(unet(*inputs), plain(after))     # no hook left


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merged_half_precision_base_survives_50_disable_cycles_bitwise(unet, dtype):
    """Issue 19.5: on a half-precision base, W <- W + BA then W <- W - BA rounds twice per cycle; 25 such
    cycles drifted every Linear (up to 1.6 % in bf16). Merging from the kept base never does."""
    unet = unet.to(dtype)
    base = {n: m.weight.detach().clone() for n, m in motion_lora_targets(unet).items()}
    lora = randomize_lora_(attach_motion_lora(unet, scale=1.0), std=0.2)
    lora.merge()
    merged = {n: m.weight.detach().clone() for n, m in lora.layers().items()}
    assert all(not torch.equal(merged[n], base[n]) for n in base)      # the merge changed every layer
    for _ in range(50):                                  # one edit step's `disabled()` per cycle
        with lora.disabled():
            assert all(torch.equal(m.weight, base[n]) for n, m in lora.layers().items())
        assert all(torch.equal(m.weight, merged[n]) for n, m in lora.layers().items())
    lora.detach()
    assert all(torch.equal(m.weight, base[n]) for n, m in motion_lora_targets(unet).items())
    # the old arithmetic (subtract the delta) does drift: the test above can fail
    w = next(iter(base.values())).clone()
    d = lora.branch(next(iter(base))).delta()
    for _ in range(50):
        w = (w.float() + d).to(dtype)
        w = (w.float() - d).to(dtype)
    assert not torch.equal(w, next(iter(base.values())))


def test_disabled_and_scale(unet):
    inputs = unet_inputs(unet.cfg)
    with torch.no_grad():
        base = unet(*inputs)
        lora = randomize_lora_(attach_motion_lora(unet))
        on = unet(*inputs)
        with lora.disabled():
            assert torch.equal(unet(*inputs), base)
        assert torch.equal(unet(*inputs), on)
        lora.scale = 0.0
        assert torch.equal(unet(*inputs), base)


def test_branch_is_scale_times_up_down_of_the_input(unet):
    lora = randomize_lora_(attach_motion_lora(unet, scale=0.5))
    name = lora.names[2]
    linear = lora.layers()[name]
    x = torch.randn(3, 5, linear.in_features)
    with torch.no_grad():
        b = lora.branch(name)
        expected = nn.functional.linear(x, linear.weight, linear.bias) + 0.5 * (x @ b.lora_down.weight.T @ b.lora_up.weight.T)
        assert max_err(linear(x), expected) <= 1e-6


def test_dropout_one_gives_the_base_in_training_and_acts_on_the_branch_output(unet):
    inputs = unet_inputs(unet.cfg)
    with torch.no_grad():
        base = unet(*inputs)
        lora = randomize_lora_(attach_motion_lora(unet, dropout=1.0))
        lora.train()
        assert torch.equal(unet(*inputs), base)
        lora.eval()                                         # eval: dropout off
        assert max_err(unet(*inputs), base) > 1e-3


def test_gradients_only_on_the_lora(unet):
    for p in unet.parameters():
        p.requires_grad_(False)
    lora = randomize_lora_(attach_motion_lora(unet))
    lora.train()
    unet(*unet_inputs(unet.cfg)).square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    grads = [p.grad for p in lora.parameters()]
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads)


# ---------------------------------------------------------------- files

def official_linears(model: nn.Module) -> list[nn.Linear]:
    """Restated from the authors' utils/lora.py `_find_modules_v2` with ancestor TemporalBasicTransformerBlock:
    every Linear whose path below the block contains 'attn1', 'attn2' or 'ff', in named_modules order."""
    found = []
    for _, ancestor in model.named_modules():
        if type(ancestor).__name__ != "TemporalBasicTransformerBlock":
            continue
        for fullname, module in ancestor.named_modules():
            if isinstance(module, nn.Linear) and ("attn1" in fullname or "attn2" in fullname or "ff" in fullname):
                found.append(module)
    return found


@pytest.mark.parametrize("preset", ["tiny", "tiny_depth2"])
def test_official_list_order_is_diffusers_module_order(preset):
    cfg = VideoUNetConfig.preset("tiny", **({"transformer_depth": 2} if preset == "tiny_depth2" else {}))
    unet = randomize_(VideoUNet(cfg))
    oracle = UNetSpatioTemporalConditionModel(**diffusers_kwargs(cfg)).eval()
    oracle.load_state_dict(original_to_diffusers("svd_unet", unet.state_dict()), strict=True)
    theirs = official_linears(oracle)
    lora = attach_motion_lora(unet)
    ours = [lora.layers()[n] for n in lora.official_names()]
    assert len(theirs) == len(ours) == len(lora.names)
    # random weights identify each Linear: the i-th of our order is the i-th the authors' code finds
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(ours, theirs))


def test_official_order_groups():
    names = ["middle_block.1.x", "output_blocks.3.1.x", "input_blocks.1.1.x", "output_blocks.4.1.x", "input_blocks.2.1.x"]
    assert official_order(names) == ["input_blocks.1.1.x", "input_blocks.2.1.x", "output_blocks.3.1.x",
                                     "output_blocks.4.1.x", "middle_block.1.x"]


def test_official_list_round_trip_is_the_identity(unet, tmp_path):
    lora = randomize_lora_(attach_motion_lora(unet))
    exported = lora.export_official(tmp_path / "100_unet.pt")
    assert len(exported) == 2 * len(lora.names)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in exported)
    first = lora.names[0]
    assert torch.equal(exported[0], lora.branch(first).lora_up.weight)      # up first, then down
    assert torch.equal(exported[1], lora.branch(first).lora_down.weight)
    before = {k: v.clone() for k, v in lora.tensors().items()}
    lora.detach()
    other = attach_motion_lora(unet, seed=5)
    other.import_official(tmp_path / "100_unet.pt")                        # torch.load(weights_only=True)
    assert all(torch.equal(other.tensors()[k], v) for k, v in before.items())
    again = other.export_official()
    assert all(torch.equal(a, b) for a, b in zip(exported, again))
    # a list of (up, down) pairs is read too
    other.import_official([(exported[i], exported[i + 1]) for i in range(0, len(exported), 2)])
    assert all(torch.equal(other.tensors()[k], v) for k, v in before.items())


def test_safetensors_round_trip_with_documented_names(unet, tmp_path):
    from safetensors import safe_open

    lora = randomize_lora_(attach_motion_lora(unet))
    path = lora.save(tmp_path / "motion_lora.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert keys == {f"{n}.{w}.weight" for n in lora.names for w in ("lora_down", "lora_up")}
    before = {k: v.clone() for k, v in lora.tensors().items()}
    lora.detach()
    other = attach_motion_lora(unet, seed=9).load(path)
    assert all(torch.equal(other.tensors()[k], v) for k, v in before.items())


def test_bad_loras_give_clear_errors(unet, tmp_path):
    lora = randomize_lora_(attach_motion_lora(unet, rank=4))
    path = lora.save(tmp_path / "r4.safetensors")
    official = lora.export_official(tmp_path / "r4.pt")
    lora.detach()
    wide = attach_motion_lora(unet, rank=8)
    with pytest.raises(LoRAError, match="rank 4; this one has rank 8"):
        wide.load(path)
    with pytest.raises(LoRAError, match="rank 4; this one has rank 8"):
        wide.import_official(official)
    wide.detach()
    # another model: the tiny UNet with two transformer layers per block has twice the layers
    deep = VideoUNet(VideoUNetConfig.preset("tiny", transformer_depth=2))
    other = attach_motion_lora(deep, rank=4)
    with pytest.raises(LoRAError, match="not a motion LoRA of this model"):
        other.load(path)
    with pytest.raises(LoRAError, match="another model"):
        other.import_official(official)
    # another width: same names, other shapes
    narrow = VideoUNet(VideoUNetConfig.preset("tiny", model_channels=64))
    with pytest.raises(LoRAError, match="another model"):
        attach_motion_lora(narrow, rank=4).load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(LoRAError, match="not a readable"):
        attach_motion_lora(unet, rank=4).load(tmp_path / "junk.safetensors")


def test_default_targets_are_the_authors():
    assert set(DEFAULT_TARGETS) == {"attn1", "attn2", "ff", "ff_in"}
