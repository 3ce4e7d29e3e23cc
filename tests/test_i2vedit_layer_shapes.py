"""`matching.layer_shapes` (every attn1 layer's token grid, heads and head width, from the UNet config)
against its oracle: a forward pass of the real VideoUNet on the meta device, recording what each attn1
processor receives — at SVD's full size and on tiny configs, at even and odd latent sizes."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from minivid.attention import wrap_processors
from minivid.methods.i2vedit.matching import SPATIAL, TEMPORAL, LayerShape, layer_shapes
from minivid.unet_video import VideoUNet, VideoUNetConfig
from _builders import svd_shaped_tiny_config

SVD = VideoUNetConfig.preset("svd")
TINY = VideoUNetConfig.preset("tiny")


def meta_forward_shapes(unet_cfg, latent_hw, frames):
    """The oracle: build the UNet on the meta device and run it, recording (name, kind, hw, heads, d)
    of every spatial and temporal attn1 call in call order."""
    with torch.device("meta"):
        unet = VideoUNet(unet_cfg)
    shapes = []

    def wrap(kind):
        def make(inner):
            def proc(q, k, v, ctx):
                shapes.append(LayerShape(ctx.name, kind, tuple(ctx.hw), q.shape[1], q.shape[-1]))
                return inner(q, k, v, ctx)
            return proc
        return make

    h, w = latent_hw
    with torch.no_grad(), wrap_processors(unet, SPATIAL, wrap("spatial")), wrap_processors(unet, TEMPORAL, wrap("temporal")):
        x = torch.empty(1, frames, unet_cfg.in_channels, h, w, device="meta")
        unet(x, torch.ones((), device="meta"), torch.empty(1, 1, unet_cfg.context_dim, device="meta"),
             torch.empty(1, 3, device="meta"))
    return shapes


def _as_tuples(shapes):
    return [(s.name, s.kind, tuple(s.hw), s.heads, s.dim_head) for s in shapes]


@pytest.mark.parametrize("latent_hw", [(72, 128), (40, 72), (64, 64), (8, 12), (7, 13), (1, 1)])
def test_svd_full_size_matches_the_meta_forward(latent_hw):
    got = layer_shapes(SVD, latent_hw, 3)
    assert _as_tuples(got) == _as_tuples(meta_forward_shapes(SVD, latent_hw, 3))
    assert len(got) == 32                       # 16 spatial + 16 temporal attn1 layers


@pytest.mark.parametrize("cfg", [
    TINY,
    svd_shaped_tiny_config().unet,
    # depth 2, SD 1.x-style fixed head count, attention only at the middle and downscale 2
    dataclasses.replace(TINY, transformer_depth=2, num_heads=2, num_head_channels=None, attention_resolutions=(2,)),
    dataclasses.replace(TINY, num_res_blocks=1, channel_mult=(1, 2, 2, 2, 2), attention_resolutions=(1, 4, 16)),
], ids=["tiny", "svd_shaped_tiny", "depth2_heads", "5_levels"])
@pytest.mark.parametrize("latent_hw", [(4, 6), (5, 9), (11, 3)])
def test_tiny_configs_match_the_meta_forward(cfg, latent_hw):
    assert _as_tuples(layer_shapes(cfg, latent_hw, 2)) == _as_tuples(meta_forward_shapes(cfg, latent_hw, 2))
