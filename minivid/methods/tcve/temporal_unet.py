"""TCVE's temporal UNet (§IV-B): a UNet of 1-D convolutions over the frame axis.

The noisy video latent [B, C=4, F, H, W] is read as B·H·W independent sequences of length F,
F_tem(X) = [(B·H·W), 4, F], and run through a UNet whose every layer is a Conv1d over frames.
It keeps the latent resolution H×W throughout: only the frame axis is down- and upsampled.

The layout mirrors the spatial SD UNet level by level (ldm names, so that `output_blocks.k` of
this network pairs with `output_blocks.k` of the SD UNet):

    input_blocks.0        Conv1d 4 -> C0, kernel 7, padding 3 (frame length kept)
    input_blocks.n        ResBlock1d per res block; Downsample1d (stride-2 Conv1d) between levels
    middle_block          ResBlock1d, ResBlock1d
    output_blocks.n       ResBlock1d on cat(x, skip); Upsample1d (nearest ×2, Conv1d k3) ending each level but the last

ResBlock1d = x + Conv1d_k3(SiLU(GroupNorm32(x))) with a 1×1 Conv1d on the skip when the width
changes; one conv and no time embedding, as in the authors' code (`*_TempUnet` layers). The
paper describes the input -> 2c, f/2 progression generically; the authors' code uses the SD
UNet's widths (320/640/1280/1280 for SD 1.4), and so do we: each level's features then have the
channel count of the SD UNet block they are fused into, and the STU needs no projection.

Any frame count works. The authors' code needs F divisible by 2^(levels-1) (8 for SD), because
after ⌈F/2⌉ downsampling a ×2 upsampling overshoots odd lengths and the skip concat fails.
Here every upsampling produces the length of the skip it meets next (nearest ×2, then the one
extra frame, if any, is dropped) — the rule the SD UNet applies to odd spatial sizes. For F
divisible by 2^(levels-1) this is exactly the authors' network.

The STUs consume this network's features after the middle block and after the last output block
of every level (where the SD UNet's up blocks end); `forward` returns those, by block name.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from minivid.layers import Conv1d, normalization

if TYPE_CHECKING:
    from minivid.unet import UNetConfig

__all__ = ["ResBlock1d", "Downsample1d", "Upsample1d", "TemporalUNet", "to_temporal", "stu_points"]


def stu_points(channel_mult: tuple[int, ...], num_res_blocks: int) -> list[str]:
    """Where the STUs sit in an ldm UNet: after `middle_block` and after each up level's last block.

    SD 1.4 (4 levels, 2 res blocks): middle_block, output_blocks.2, .5, .8, .11.
    """
    per_level = num_res_blocks + 1
    return ["middle_block"] + [f"output_blocks.{(i + 1) * per_level - 1}" for i in range(len(channel_mult))]


def to_temporal(x: torch.Tensor, frames: int) -> torch.Tensor:
    """F_tem: frames of a batch of videos [(B·F), C, H, W] -> sequences over frames [(B·H·W), C, F]."""
    BF, C, H, W = x.shape
    B = BF // frames
    return x.view(B, frames, C, H, W).permute(0, 3, 4, 2, 1).reshape(B * H * W, C, frames)


class ResBlock1d(nn.Module):
    """x + Conv1d_k3(SiLU(GroupNorm32(x))): [S, C, L] -> [S, C_out, L]; 1×1 conv skip on a width change."""

    def __init__(self, channels: int, out_channels: int | None = None, groups: int = 32):
        super().__init__()
        out = out_channels or channels
        self.in_layers = nn.Sequential(
            normalization(channels, groups=groups), nn.SiLU(), Conv1d(channels, out, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out == channels else Conv1d(channels, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip_connection(x) + self.in_layers(x)


class Downsample1d(nn.Module):
    """Stride-2 Conv1d over frames (`op`, kernel 3, padding 1): [S, C, L] -> [S, C, ⌈L/2⌉]."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv1d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample1d(nn.Module):
    """Nearest ×2 over frames, cut to `length` (the next skip's), then Conv1d k3: [S, C, L] -> [S, C, length]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv1d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, length: int | None = None) -> torch.Tensor:
        x = x.repeat_interleave(2, dim=-1)                                    # nearest ×2
        return self.conv(x if length is None else x[..., :length])


class TemporalUNet(nn.Module):
    """Temporal UNet: [(B·H·W), C_in, F] -> {STU point name: [(B·H·W), C_l, F_l]}.

    Widths follow the SD UNet it runs beside (`model_channels`, `channel_mult`, `num_res_blocks`).
    The returned features, in `self.points` order: after `middle_block` (deepest width,
    F_l = F reduced by 2^(levels-1)), then after each up level (its width; frames back to F
    at the two finest levels for SD's layout).
    """

    def __init__(
        self,
        in_channels: int = 4,
        model_channels: int = 320,
        channel_mult: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        stem_kernel: int = 7,
        groups: int = 32,
    ):
        super().__init__()
        C0 = model_channels
        self.points = stu_points(tuple(channel_mult), num_res_blocks)
        self.input_blocks = nn.ModuleList([Conv1d(in_channels, C0, stem_kernel, padding=stem_kernel // 2)])
        skip_channels, ch = [C0], C0
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.input_blocks.append(ResBlock1d(ch, C0 * mult, groups))
                ch = C0 * mult
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Downsample1d(ch))
                skip_channels.append(ch)

        self.middle_block = nn.Sequential(ResBlock1d(ch, ch, groups), ResBlock1d(ch, ch, groups))

        self.output_blocks = nn.ModuleList()
        self.channels = {"middle_block": ch}                                  # width of each returned feature
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = nn.ModuleList([ResBlock1d(ch + skip_channels.pop(), C0 * mult, groups)])
                ch = C0 * mult
                if level and i == num_res_blocks:
                    layers.append(Upsample1d(ch))
                self.output_blocks.append(layers)
            self.channels[f"output_blocks.{len(self.output_blocks) - 1}"] = ch

    @classmethod
    def for_unet(cls, cfg: "UNetConfig", **kw) -> "TemporalUNet":
        """The temporal UNet matching an SD `UNetConfig` (widths, levels, res blocks, input channels)."""
        return cls(cfg.in_channels, cfg.model_channels, tuple(cfg.channel_mult), cfg.num_res_blocks, **kw)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: [(B·H·W), C_in, F] (see `to_temporal`) -> {name: [(B·H·W), C_l, F_l]} for `self.points`."""
        if x.ndim != 3:
            raise ValueError(f"TemporalUNet: x must be [(B·H·W), C, F], got shape {tuple(x.shape)}")
        skips = []
        for block in self.input_blocks:
            x = block(x)
            skips.append(x)
        x = self.middle_block(x)
        feats = {"middle_block": x}
        for k, layers in enumerate(self.output_blocks):
            x = torch.cat([x, skips.pop()], dim=1)
            for layer in layers:
                x = layer(x, skips[-1].shape[-1]) if isinstance(layer, Upsample1d) else layer(x)
            name = f"output_blocks.{k}"
            if name in self.channels:
                feats[name] = x
        return feats
