"""Small helpers the test files share (fixtures live in conftest.py)."""
from __future__ import annotations

import torch
import torch.nn as nn

from minivid.unet_video import VideoUNetConfig


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference of two tensors of the same shape, computed in float32."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere (norm affines too) so a misplaced tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim <= 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model.eval()


def diffusers_kwargs(cfg: VideoUNetConfig) -> dict:
    """UNetSpatioTemporalConditionModel keyword arguments for a minivid SVD UNet config."""
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    att = [2 ** i in cfg.attention_resolutions for i in range(len(channels))]
    return dict(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=tuple(channels),
        down_block_types=tuple("CrossAttnDownBlockSpatioTemporal" if a else "DownBlockSpatioTemporal" for a in att),
        up_block_types=tuple("CrossAttnUpBlockSpatioTemporal" if a else "UpBlockSpatioTemporal" for a in reversed(att)),
        addition_time_embed_dim=cfg.addition_time_embed_dim, projection_class_embeddings_input_dim=cfg.adm_in_channels,
        layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
        transformer_layers_per_block=cfg.transformer_depth, num_attention_heads=tuple(cfg.heads(c)[0] for c in channels),
        num_frames=cfg.num_frames,
    )


def svd_shaped_tiny_config():
    """A tiny SVD whose UNet has SVD's layout: 4 levels, attention at downscales 1, 2, 4 (none at 8), so
    6 down / 1 middle / 9 up temporal transformer blocks (16, as at full size: the same layer names,
    input_blocks.7/.8 at positions ≥ 4 of the down path) and 192 motion-LoRA Linears; narrow channels."""
    import dataclasses

    from minivid.svd import SVD_PRESETS

    unet = VideoUNetConfig.preset("tiny", channel_mult=(1, 2, 2, 2), attention_resolutions=(1, 2, 4))
    return dataclasses.replace(SVD_PRESETS["tiny"], unet=unet)


def tiny_unet_all_paths(seed: int = 0):
    """The tiny SD UNet with its zero-initialised output layers made non-zero, so every path matters."""
    import torch

    from minivid.unet import UNet, UNetConfig

    torch.manual_seed(seed)
    model = UNet(UNetConfig.preset("tiny")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("out_layers.3.weight", "proj_out.weight", "out.2.weight")):
                p.normal_(0, 0.05)
    return model

