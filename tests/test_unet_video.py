"""SVD spatio-temporal UNet: parity with diffusers' UNetSpatioTemporalConditionModel on tiny configs,
official key names and shapes at full size, the blending and frame-mixing properties, and the
attention extension points on temporal layers.

The oracle gets minivid's weights through minivid.weights.svd_names (whose mapping the round trip
in test_svd.py checks once more through a saved diffusers folder). One known difference: diffusers
builds the ResBlocks of its cross-attention down blocks and of all up blocks with GroupNorm eps 1e-6,
where sgm (and minivid) use 1e-5 everywhere; the oracle's eps is set back to sgm's before comparing,
and `test_diffusers_groupnorm_eps_is_the_only_difference` measures what it changes.
"""
from __future__ import annotations

import pathlib

import pytest
import torch
import torch.nn as nn
import yaml
from diffusers import UNetSpatioTemporalConditionModel

from minivid.attention import attention_layers, capture, explicit, processors
from minivid.unet_video import VideoUNet, VideoUNetConfig
from minivid.weights import load_manifest
from minivid.weights.diffusers_names import diffusers_to_original, original_to_diffusers
from minivid.weights import svd_names  # noqa: F401  (registers the svd_* tables)

from _builders import diffusers_kwargs, max_err

ROOT = pathlib.Path(__file__).resolve().parents[1]
PREFIX = "model.diffusion_model."
TOL = 1e-5


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (norm affines, zero-initialised output convs, mix factors), so
    every parameter moves the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mix_factor"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and name.endswith("weight"):                      # GroupNorm / LayerNorm scales
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model.eval()


def sgm_groupnorm_eps_(model: nn.Module) -> nn.Module:
    """Set the oracle's ResBlock GroupNorms to sgm's eps (1e-5)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.GroupNorm) and ".resnets." in name:
            m.eps = 1e-5
    return model


def to_diffusers(unet: VideoUNet, sgm_eps: bool = True) -> UNetSpatioTemporalConditionModel:
    oracle = UNetSpatioTemporalConditionModel(**diffusers_kwargs(unet.cfg)).eval()
    oracle.load_state_dict(original_to_diffusers("svd_unet", unet.state_dict()), strict=True)
    return sgm_groupnorm_eps_(oracle) if sgm_eps else oracle


def inputs(cfg: VideoUNetConfig, B: int, F: int, h: int, w: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, F, cfg.in_channels, h, w, generator=g)
    c_noise = 0.25 * torch.log(torch.tensor([0.5, 30.0, 700.0][:B]))
    embeds = torch.randn(B, 1, cfg.context_dim, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02], [3.0, 40.0, 0.3], [24.0, 255.0, 1.0]][:B])
    return x, c_noise, embeds, ids


@pytest.fixture(scope="module")
def pair():
    unet = randomize_(VideoUNet(VideoUNetConfig.preset("tiny")))
    return unet, to_diffusers(unet)


# ---------------------------------------------------------------- parity with diffusers

@pytest.mark.parametrize("B, F, h, w", [(2, 3, 8, 12), (1, 5, 12, 8), (3, 1, 4, 4)])
def test_tiny_parity_with_diffusers(pair, B, F, h, w):
    unet, oracle = pair
    x, c_noise, embeds, ids = inputs(unet.cfg, B, F, h, w)
    with torch.no_grad():
        ours, ref = unet(x, c_noise, embeds, ids), oracle(x, c_noise, embeds, ids).sample
    assert max_err(ours, ref) <= TOL
    assert ref.abs().max() > 0.1


def test_tiny_parity_depth2_scalar_c_noise_odd_latent():
    """Two transformer blocks per level (the spatial/temporal interleaving), a 0-d c_noise, and
    latent sides that are not multiples of the downsampling (upsamplers meet their skips' size)."""
    unet = randomize_(VideoUNet(VideoUNetConfig.preset("tiny", transformer_depth=2)), seed=1)
    oracle = to_diffusers(unet)
    x, _, embeds, ids = inputs(unet.cfg, 2, 3, 10, 6)
    c_noise = torch.tensor(0.25 * torch.log(torch.tensor(3.0)).item())
    with torch.no_grad():
        assert max_err(unet(x, c_noise, embeds, ids), oracle(x, c_noise, embeds, ids).sample) <= TOL


def test_diffusers_groupnorm_eps_is_the_only_difference(pair):
    """diffusers' own eps (1e-6 in cross-attention down blocks and up blocks) moves the output by
    about 1e-5 relative; with sgm's eps restored the two models agree to rounding."""
    unet, _ = pair
    stock = to_diffusers(unet, sgm_eps=False)
    eps = sorted({m.eps for n, m in stock.named_modules() if isinstance(m, nn.GroupNorm) and ".resnets." in n})
    assert eps == [1e-6, 1e-5]
    x, c_noise, embeds, ids = inputs(unet.cfg, 2, 3, 8, 12)
    with torch.no_grad():
        ours, ref = unet(x, c_noise, embeds, ids), stock(x, c_noise, embeds, ids).sample
    rel = max_err(ours, ref) / ref.abs().max().item()
    assert 1e-8 < rel < 1e-3


def test_blocks_with_image_only_indicator_match_diffusers(pair):
    """diffusers' UNet always passes an all-zeros indicator; its blocks take one: compare the
    video ResBlock and the spatio-temporal transformer with some frames flagged as images."""
    unet, oracle = pair
    from minivid.unet_video import VideoCond

    B, F, h, w = 2, 3, 8, 12
    C, E = unet.cfg.model_channels, 4 * unet.cfg.model_channels
    x = torch.randn(B * F, C, h, w)
    emb = torch.randn(B * F, E)
    context = torch.randn(B, 1, unet.cfg.context_dim).repeat_interleave(F, dim=0)
    indicator = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    cond = VideoCond(emb=emb, context=context, frames=F, image_only_indicator=indicator)
    with torch.no_grad():
        res = unet.input_blocks[1][0](x, cond)
        res_ref = oracle.down_blocks[0].resnets[0](x, emb, image_only_indicator=indicator)
        att = unet.input_blocks[1][1](x, cond)
        att_ref = oracle.down_blocks[0].attentions[0](x, context, image_only_indicator=indicator).sample
        res_video = unet.input_blocks[1][0](x, VideoCond(emb=emb, context=context, frames=F))
    assert max_err(res, res_ref) <= TOL and max_err(att, att_ref) <= TOL
    assert max_err(res, res_video) > 1e-3                                    # the indicator matters


def test_weights_round_trip_through_the_table(pair):
    unet, oracle = pair
    back = diffusers_to_original("svd_unet", oracle.state_dict())
    ours = unet.state_dict()
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)


# ---------------------------------------------------------------- official names and shapes

@pytest.mark.parametrize("preset, manifest", [("svd", "svd"), ("svd_xt", "svd_xt")])
def test_full_size_keys_and_shapes_equal_the_manifest(preset, manifest):
    with torch.device("meta"):
        unet = VideoUNet(VideoUNetConfig.preset(preset))
    ours = {PREFIX + k: tuple(v.shape) for k, v in unet.state_dict().items()}
    official = {k: tuple(s) for k, (s, _) in load_manifest(manifest).tensors.items() if k.startswith(PREFIX)}
    assert len(official) == 1428
    assert ours == official


def test_presets_equal_the_sgm_inference_config():
    params = yaml.safe_load((ROOT / "minivid" / "configs" / "svd.yaml").read_text())["model"]["params"]["network_config"]["params"]
    for preset, frames in (("svd", 14), ("svd_xt", 25)):
        cfg = VideoUNetConfig.preset(preset)
        assert (cfg.in_channels, cfg.out_channels, cfg.model_channels) == (params["in_channels"], params["out_channels"], params["model_channels"])
        assert list(cfg.channel_mult) == params["channel_mult"] and list(cfg.attention_resolutions) == params["attention_resolutions"]
        assert cfg.num_res_blocks == params["num_res_blocks"] and cfg.num_head_channels == params["num_head_channels"]
        assert cfg.context_dim == params["context_dim"] and cfg.adm_in_channels == params["adm_in_channels"]
        assert cfg.transformer_depth == params["transformer_depth"] and cfg.use_linear_in_transformer == params["use_linear_in_transformer"]
        assert list(cfg.video_kernel_size) == params["video_kernel_size"] and params["merge_strategy"] == "learned_with_images"
        assert cfg.num_frames == frames and cfg.prediction == "v"


def test_init_matches_sgm():
    """mix_factor starts at sgm's merge_factor 0.5; temporal ResBlocks start as the identity (zero last conv)."""
    unet = VideoUNet(VideoUNetConfig.preset("tiny"))
    mixers = [p for n, p in unet.named_parameters() if n.endswith("time_mixer.mix_factor")]
    assert mixers and all(p.item() == 0.5 for p in mixers)
    assert torch.all(unet.input_blocks[1][0].time_stack.out_layers[3].weight == 0)


# ---------------------------------------------------------------- blending and frame mixing

def test_temporal_layers_mix_frames_unless_frames_are_images(pair):
    """A change in frame 0 reaches frame 2 through the temporal layers; with every frame flagged by
    image_only_indicator (α = 1) the frames are processed independently."""
    unet, _ = pair
    x, c_noise, embeds, ids = inputs(unet.cfg, 1, 3, 8, 8)
    x2 = x.clone()
    x2[:, 0] += 1.0
    images = torch.ones(1, 3)
    with torch.no_grad():
        video = unet(x, c_noise, embeds, ids), unet(x2, c_noise, embeds, ids)
        still = unet(x, c_noise, embeds, ids, images), unet(x2, c_noise, embeds, ids, images)
    assert max_err(video[0][:, 2], video[1][:, 2]) > 1e-3
    assert max_err(still[0][:, 1:], still[1][:, 1:]) == 0.0


def test_image_frames_equal_a_model_without_temporal_branch(pair):
    """Flagged frames take α = 1: the same as sigmoid(mix_factor) = 1 everywhere."""
    unet, _ = pair
    x, c_noise, embeds, ids = inputs(unet.cfg, 2, 2, 8, 8)
    spatial_only = randomize_(VideoUNet(unet.cfg))
    spatial_only.load_state_dict(unet.state_dict())
    with torch.no_grad():
        for n, p in spatial_only.named_parameters():
            if n.endswith("mix_factor"):
                p.fill_(100.0)                                                       # sigmoid = 1 in fp32
        flagged = unet(x, c_noise, embeds, ids, torch.ones(2, 2))
        assert max_err(flagged, spatial_only(x, c_noise, embeds, ids)) <= TOL


# ---------------------------------------------------------------- attention extension points

def test_temporal_attention_layers_are_attention_modules(pair):
    unet, _ = pair
    names = list(attention_layers(unet, "*time_stack*"))
    assert "input_blocks.1.1.time_stack.0.attn1" in names and "middle_block.1.time_stack.0.attn2" in names
    x, c_noise, embeds, ids = inputs(unet.cfg, 2, 3, 8, 12)
    with torch.no_grad(), capture(unet, "input_blocks.1.1.time_stack.0.attn1", kinds=("q", "probs")) as store:
        base = unet(x, c_noise, embeds, ids)
    q = store["input_blocks.1.1.time_stack.0.attn1"]["q"][0]
    heads = unet.input_blocks[1][1].time_stack[0].attn1.heads
    assert tuple(q.shape) == (2 * 8 * 12, heads, 3, unet.cfg.num_head_channels)   # [(B·H·W), heads, F, d]
    probs = store["input_blocks.1.1.time_stack.0.attn1"]["probs"][0]
    assert tuple(probs.shape) == (2 * 8 * 12, heads, 3, 3)
    with torch.no_grad(), processors(unet, "*time_stack*", explicit):
        assert max_err(unet(x, c_noise, embeds, ids), base) <= TOL
    with torch.no_grad(), processors(unet, "*time_stack.*.attn1", lambda q, k, v, ctx: torch.zeros_like(q)):
        assert max_err(unet(x, c_noise, embeds, ids), base) > 1e-3


def test_temporal_processor_sees_the_token_grid(pair):
    unet, _ = pair
    seen = {}

    def spy(q, k, v, ctx):
        seen[ctx.name] = (ctx.hw, q.shape[0], q.shape[2])
        return explicit(q, k, v, ctx)

    x, c_noise, embeds, ids = inputs(unet.cfg, 1, 4, 8, 12)
    with torch.no_grad(), processors(unet, "*time_stack.*.attn1", spy):
        unet(x, c_noise, embeds, ids)
    assert seen["input_blocks.1.1.time_stack.0.attn1"] == ((8, 12), 96, 4)
    assert seen["input_blocks.4.1.time_stack.0.attn1"] == ((4, 6), 24, 4)


# ---------------------------------------------------------------- dtypes and errors

def test_bf16_forward_is_close_to_fp32(pair):
    unet, _ = pair
    half = VideoUNet(unet.cfg)
    half.load_state_dict(unet.state_dict())
    half = half.to(torch.bfloat16).eval()
    x, c_noise, embeds, ids = inputs(unet.cfg, 1, 3, 8, 8)
    with torch.no_grad():
        ref, out = unet(x, c_noise, embeds, ids), half(x, c_noise, embeds, ids)
    assert out.dtype == torch.float32                                         # back in x's dtype
    assert max_err(out, ref) / ref.abs().max().item() < 0.1


def test_bad_inputs_raise_clear_errors(pair):
    unet, _ = pair
    x, c_noise, embeds, ids = inputs(unet.cfg, 2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"x must be \[B, F, 8, h, w\]"):
        unet(x[:, :, :4], c_noise, embeds, ids)
    with pytest.raises(ValueError, match="image_embeds must be"):
        unet(x, c_noise, embeds[:1], ids)
    with pytest.raises(ValueError, match="added_time_ids must be"):
        unet(x, c_noise, embeds, ids[:, :2])
    with pytest.raises(ValueError, match="image_only_indicator must be"):
        unet(x, c_noise, embeds, ids, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="c_noise must be"):
        unet(x, torch.zeros(3), embeds, ids)


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="adm_in_channels"):
        VideoUNetConfig.preset("tiny", adm_in_channels=40)
    with pytest.raises(ValueError, match="video_kernel_size"):
        VideoUNetConfig.preset("tiny", video_kernel_size=(2, 1, 1))
    with pytest.raises(ValueError, match="unknown video UNet preset"):
        VideoUNetConfig.preset("sd14")
    with pytest.raises(TypeError, match="VideoUNetConfig"):
        from minivid.unet import UNetConfig
        VideoUNet(UNetConfig.preset("tiny"))
