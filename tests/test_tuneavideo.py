"""Tune-A-Video blocks: sparse-causal attention, temporal attention, inflation of an SD UNet."""
import pytest
import torch
import torch.nn as nn

from minivid.attention import Attention, call_state, capture_outputs, name_layers, set_processor
from minivid.layers import FeedForward
from minivid.methods.tuneavideo import (
    TRAINABLE, TemporalAttention, TemporalBlockMixin, inflate_for_tuneavideo, sparse_causal, temporal_attention,
)
from minivid.unet import UNet, UNetConfig


def _attend(q, k, v, scale):
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1) @ v


# ---------------------------------------------------------------- sparse-causal attention

def test_sparse_causal_equals_per_frame_loop():
    B, F, N, D = 2, 5, 6, 16
    attn = name_layers(Attention(D, heads=2, dim_head=8))
    set_processor(attn, "*", sparse_causal)
    x = torch.randn(B * F, N, D)
    with call_state(attn, frames=F):
        out = attn(x)

    # official rule, frame by frame: keys/values from frames [0, max(f-1, 0)]
    xv = x.view(B, F, N, D)
    expect = torch.empty(B, F, N, D)
    for b in range(B):
        for f in range(F):
            src = torch.cat([xv[b, 0], xv[b, max(f - 1, 0)]], dim=0)             # [2N, D]
            q = attn.split_heads(attn.to_q(xv[b, f][None]))
            k = attn.split_heads(attn.to_k(src[None]))
            v = attn.split_heads(attn.to_v(src[None]))
            expect[b, f] = attn.to_out(attn.merge_heads(_attend(q, k, v, attn.scale)))[0]
    torch.testing.assert_close(out, expect.view(B * F, N, D), atol=1e-6, rtol=1e-5)


def test_sparse_causal_first_frame_is_plain_self_attention():
    """Frame 0 attends to itself twice; duplicated keys leave softmax-weighted sums unchanged."""
    B, F, N, D = 1, 4, 5, 16
    attn = name_layers(Attention(D, heads=2, dim_head=8))
    x = torch.randn(B * F, N, D)
    plain = attn(x[:1])
    set_processor(attn, "*", sparse_causal)
    with call_state(attn, frames=F):
        sc = attn(x)
    torch.testing.assert_close(sc[:1], plain, atol=1e-6, rtol=1e-5)
    # later frames do see other frames
    assert not torch.allclose(sc[2], attn.to_out(attn.merge_heads(
        _attend(*(attn.split_heads(p(x[2:3])) for p in (attn.to_q, attn.to_k, attn.to_v)), attn.scale)))[0])


def test_sparse_causal_needs_frames():
    attn = name_layers(Attention(16, heads=2, dim_head=8))
    set_processor(attn, "*", sparse_causal)
    with pytest.raises(KeyError, match="call_state"):
        attn(torch.randn(4, 3, 16))
    with call_state(attn, frames=3), pytest.raises(ValueError, match="whole number"):
        attn(torch.randn(4, 3, 16))


# ---------------------------------------------------------------- temporal attention

def test_temporal_attention_zero_init_is_identity():
    ta = TemporalAttention(32, heads=4)
    x = torch.randn(2 * 6, 10, 32)
    assert torch.equal(ta(x, frames=6), x)
    # the official initialisation zeroes only the weight: a constant offset remains
    official = TemporalAttention(32, heads=4, zero_bias=False)
    torch.testing.assert_close(official(x, frames=6) - x, official.attn_temp.to_out[0].bias.expand_as(x))


def test_temporal_attention_attends_over_frames_per_location():
    B, F, N, C = 2, 5, 7, 32
    ta = TemporalAttention(C, heads=4)
    for p in ta.parameters():
        nn.init.normal_(p, std=0.2)
    x = torch.randn(B * F, N, C)
    with call_state(ta, frames=F):
        out = ta(x)
    xv = x.view(B, F, N, C)
    a = ta.attn_temp
    for b in range(B):
        for n in range(N):
            seq = ta.norm_temp(xv[b, :, n])[None]                               # [1, F, C]
            q, k, v = (a.split_heads(p(seq)) for p in (a.to_q, a.to_k, a.to_v))
            expect = xv[b, :, n] + a.to_out(a.merge_heads(_attend(q, k, v, a.scale)))[0]
            torch.testing.assert_close(out.view(B, F, N, C)[b, :, n], expect, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- inflation of a stand-in block

class StandInBlock(nn.Module):
    """The interface of minivid.unet.BasicTransformerBlock: norm1, attn1, norm2, attn2, norm3, ff."""

    def __init__(self, dim=32, heads=2, context_dim=16):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, None, heads, dim // heads)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, context_dim, heads, dim // heads)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context, hw):
        x = x + self.attn1(self.norm1(x), hw=hw)
        x = x + self.attn2(self.norm2(x), context, hw=hw)
        return x + self.ff(self.norm3(x))


class StandInModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Module(), nn.Module()])
        for b in self.blocks:
            b.transformer_blocks = nn.ModuleList([StandInBlock()])
        name_layers(self)

    def forward(self, x, context):
        for b in self.blocks:
            x = b.transformer_blocks[0](x, context, hw=(2, 3))
        return x


def test_inflate_keeps_names_and_weights_and_adds_temporal_params():
    model = StandInModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = inflate_for_tuneavideo(model, block_type=StandInBlock)
    assert names == ["blocks.0.transformer_blocks.0", "blocks.1.transformer_blocks.0"]
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v)
    new = sorted(set(after) - set(before))
    assert new == sorted(
        f"blocks.{i}.transformer_blocks.0.{m}" for i in range(2)
        for m in ("attn_temp.to_q.weight", "attn_temp.to_k.weight", "attn_temp.to_v.weight",
                  "attn_temp.to_out.0.weight", "attn_temp.to_out.0.bias", "norm_temp.weight", "norm_temp.bias")
    )
    block = model.blocks[0].transformer_blocks[0]
    assert isinstance(block, StandInBlock) and isinstance(block, TemporalBlockMixin)
    assert block.attn1.processor is sparse_causal and block.attn2.processor is not sparse_causal
    assert block.attn_temp.name == "blocks.0.transformer_blocks.0.attn_temp"
    with pytest.raises(ValueError, match="un-inflated"):
        inflate_for_tuneavideo(model, block_type=StandInBlock)


def test_inflated_block_runs_temporal_step_after_feed_forward():
    F, N = 4, 6
    model = StandInModel()
    base = StandInModel()
    base.load_state_dict(model.state_dict())
    set_processor(base, "*attn1", sparse_causal)
    inflate_for_tuneavideo(model, block_type=StandInBlock)
    x, ctx = torch.randn(2 * F, N, 32), torch.randn(2 * F, 3, 16)
    with call_state(model, frames=F), call_state(base, frames=F):
        assert torch.equal(model(x, ctx), base(x, ctx))               # zero-initialised: unchanged
        for b in model.blocks:
            nn.init.normal_(b.transformer_blocks[0].attn_temp.to_out[0].weight, std=0.1)
        out = model(x, ctx)
        h = x
        for bb, bm in zip(base.blocks, model.blocks):
            tb = bm.transformer_blocks[0]
            h = temporal_attention(bb.transformer_blocks[0](h, ctx, hw=(2, 3)), tb.norm_temp, tb.attn_temp, F)
    torch.testing.assert_close(out, h)


# ---------------------------------------------------------------- the SD UNet (tiny preset)

def _unets():
    torch.manual_seed(0)
    base = UNet(UNetConfig.preset("tiny"))
    for p in base.parameters():                        # ldm zero-initialises some output layers: un-zero them
        if not p.any():
            nn.init.normal_(p, std=0.05)
    video = UNet(UNetConfig.preset("tiny"))
    video.load_state_dict(base.state_dict())
    return base, video


def test_unet_inflation_identity_at_init():
    base, video = _unets()
    names = inflate_for_tuneavideo(video)
    assert "input_blocks.1.1.transformer_blocks.0" in names and "output_blocks.8.1.transformer_blocks.0" in names
    assert "input_blocks.1.1.transformer_blocks.0.attn_temp.to_q.weight" in video.state_dict()
    x, t, ctx = torch.randn(3, 4, 8, 8), torch.tensor([10, 500, 900]), torch.randn(3, 5, 32)
    with torch.no_grad(), call_state(video, frames=1):
        torch.testing.assert_close(video(x, t, ctx), base(x, t, ctx), atol=1e-5, rtol=1e-5)

    # frame 0 of each video, plain self-attention, in float64: batched and per-frame calls run kernels of other shapes (other summation orders, and other kernels on other CPUs: float32 margins were 3.5x here); two float64 orders differ by ~1e-13
    F = 4
    base, video = base.double(), video.double()
    xv, cv = torch.randn(2 * F, 4, 8, 8).double(), torch.randn(1, 5, 32).double().expand(2 * F, 5, 32)
    with torch.no_grad(), call_state(video, frames=F):
        out = video(xv, 300, cv)
    with torch.no_grad():
        first = base(xv[::F], 300, cv[::F])
    torch.testing.assert_close(out[::F], first, atol=1e-10, rtol=0)

    # causal: changing the last frame of each video leaves the earlier frames alone
    xp = xv.clone()
    xp[F - 1::F] = torch.randn_like(xp[F - 1::F])
    with torch.no_grad(), call_state(video, frames=F):
        outp = video(xp, 300, cv)
    keep = torch.arange(2 * F) % F != F - 1
    torch.testing.assert_close(outp[keep], out[keep], atol=1e-6, rtol=1e-5)
    assert (outp[~keep] - out[~keep]).abs().max() > 1e-3
    # sparse: in the first self-attention layer, frame 2 sees frame 0 (plain attention would not)
    xp = xv.clone()
    xp[::F] = torch.randn_like(xp[::F])
    first_attn1 = "input_blocks.1.1.transformer_blocks.0.attn1"
    with torch.no_grad(), call_state(video, frames=F), capture_outputs(video, first_attn1) as a:
        video(xv, 300, cv)
        video(xp, 300, cv)
    before, after = a[first_attn1]
    assert (after[2::F] - before[2::F]).abs().max() > 1e-3


def test_unet_inflation_trains_temporal_attention():
    _, video = _unets()
    inflate_for_tuneavideo(video)
    F = 3
    x, ctx = torch.randn(F, 4, 8, 8), torch.randn(F, 5, 32)
    with call_state(video, frames=F):
        video(x, 500, ctx).square().mean().backward()
    import fnmatch
    trainable = {n for n, _ in video.named_parameters() if any(fnmatch.fnmatchcase(n, p) for p in TRAINABLE)}
    assert "output_blocks.5.1.transformer_blocks.0.attn_temp.to_out.0.weight" in trainable
    assert not any("norm_temp" in n for n in trainable)
    grads = dict(video.named_parameters())
    # zero-initialised output projection: it receives a gradient first
    assert grads["output_blocks.5.1.transformer_blocks.0.attn_temp.to_out.0.weight"].grad.abs().sum() > 0
