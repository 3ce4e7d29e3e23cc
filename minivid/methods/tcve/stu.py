"""TCVE's Spatial-Temporal modeling Unit (STU, §IV-B, Eq. 7) and the temporal branch around the SD UNet.

The STU fuses a block output of the SD UNet, X_spa, with the temporal UNet's feature X_tem:

    X_tem'    = resize X_tem to X_spa's (F, h, w)               nearest, as the authors' code
    X_tem^att = X_tem' + attn_temp(norm_temp(X_tem'))           attention over frames at each location (Eq. 7)
    X_fuse    = X_spa + λ·X_tem^att                             λ = 0.1
    out       = X_spa + SiLU(Conv3d_3×3×3(GroupNorm_8(X_fuse))) Conv3d zero-initialised

so the unit is exactly the identity at initialisation (SiLU(0) = 0), whatever X_tem is. The
residual around the 3-D conv block and the GroupNorm(8) come from the authors' code (`STBlock`);
the paper only says "a 3D convolutional block". GroupNorm and Conv3d see the whole video
[B, C, F, h, w]: the normalisation statistics span the frames too.

Channels: X_tem has the width of the SD block it is fused into, because the temporal UNet copies
the SD UNet's widths level by level (as the authors' code), so no projection is needed.

Placement (`TemporalBranch`): after `middle_block` and after the last block of every up level of
the ldm UNet (SD 1.4: output_blocks.2, .5, .8, .11), computed from the UNet config. The authors'
code also builds STUs for the down blocks but never calls them; we do not build them.

Ablations (paper Tables II, III), `ablation=`:
    "no_temporal_unet"       w/o TU: no temporal UNet; X_fuse = X_spa (no attention: nothing to attend to)
    "no_stu"                 w/o STU: out = X_spa + λ·X_tem' (plain sum, no parameters)
    "no_temporal_attention"  w/o TA: X_tem^att = X_tem'
    "no_conv3d"              w/o 3DConv: out = X_fuse
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from minivid.attention import Attention, attention_layers, name_layers, replace_outputs
from minivid.layers import Conv3d, GroupNorm32
from minivid.methods.tcve.temporal_unet import TemporalUNet, stu_points, to_temporal
from minivid.methods.tuneavideo import frames_of

if TYPE_CHECKING:
    from minivid.unet import UNetConfig

__all__ = ["ABLATIONS", "to_video", "from_video", "resize_temporal", "STU", "TemporalBranch"]

# ablation name -> (temporal UNet present, STU temporal attention, STU 3-D conv block)
ABLATIONS: dict[str, tuple[bool, bool, bool]] = {
    "none": (True, True, True),
    "no_temporal_unet": (False, False, True),
    "no_stu": (True, False, False),
    "no_temporal_attention": (True, False, True),
    "no_conv3d": (True, True, False),
}


def to_video(x: torch.Tensor, frames: int) -> torch.Tensor:
    """[(B·F), C, h, w] -> [B, C, F, h, w]."""
    BF, C, h, w = x.shape
    return x.view(BF // frames, frames, C, h, w).transpose(1, 2)


def from_video(x: torch.Tensor) -> torch.Tensor:
    """[B, C, F, h, w] -> [(B·F), C, h, w]."""
    B, C, F_, h, w = x.shape
    return x.transpose(1, 2).reshape(B * F_, C, h, w)


def resize_temporal(x_tem: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """Nearest resize of a temporal feature video [B, C, F_t, H, W] to (F, h, w)."""
    if tuple(x_tem.shape[2:]) == tuple(size):
        return x_tem
    return F.interpolate(x_tem, size=tuple(size), mode="nearest")


class STU(nn.Module):
    """Spatial-Temporal modeling Unit: (X_spa [(B·F), C, h, w], X_tem [B, C, F_t, H, W] or None) -> [(B·F), C, h, w].

    Module names follow the authors' `STBlock` (norm_temp, attn_temp, norm, conv_3d).
    `temporal_attention` / `conv3d` switch the two parts off (ablations); with both off the
    unit is the plain sum X_spa + λ·X_tem'. `zero_bias=False` leaves the attention's output bias
    at PyTorch's default, as the authors' code (only the weight is zeroed there); it does not
    affect the identity at initialisation, which the zero Conv3d guarantees.
    """

    def __init__(
        self,
        channels: int,
        heads: int = 8,
        groups: int = 8,
        lam: float = 0.1,
        temporal_attention: bool = True,
        conv3d: bool = True,
        zero_bias: bool = True,
    ):
        super().__init__()
        if channels % heads:
            raise ValueError(f"STU: {channels} channels do not split into {heads} heads")
        self.channels, self.lam = channels, lam
        self.norm_temp = self.attn_temp = None
        if temporal_attention:
            self.norm_temp = nn.LayerNorm(channels)
            self.attn_temp = Attention(channels, None, heads, channels // heads)
            nn.init.zeros_(self.attn_temp.to_out[0].weight)
            if zero_bias:
                nn.init.zeros_(self.attn_temp.to_out[0].bias)
        self.norm = self.conv_3d = None
        if conv3d:
            self.norm = GroupNorm32(groups, channels, eps=1e-5)
            self.conv_3d = Conv3d(channels, channels, 3, padding=1)
            nn.init.zeros_(self.conv_3d.weight)
            nn.init.zeros_(self.conv_3d.bias)
        self.act = nn.SiLU()

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 7 with a residual: x + attn_temp(norm_temp(x)) over frames; x: [B, C, F, h, w] -> same."""
        B, C, F_, h, w = x.shape
        xt = x.permute(0, 3, 4, 2, 1).reshape(B * h * w, F_, C)                  # [(B·h·w), F, C]
        xt = xt + self.attn_temp(self.norm_temp(xt))
        return xt.view(B, h, w, F_, C).permute(0, 4, 3, 1, 2)

    def forward(self, x_spa: torch.Tensor, x_tem: torch.Tensor | None, frames: int) -> torch.Tensor:
        spa = to_video(x_spa, frames)                                              # [B, C, F, h, w]
        fuse = spa
        if x_tem is not None:
            if x_tem.shape[:2] != spa.shape[:2]:
                raise ValueError(
                    f"STU: temporal feature [B, C] = {list(x_tem.shape[:2])} does not match the block's {list(spa.shape[:2])}"
                )
            tem = resize_temporal(x_tem.to(spa.dtype), spa.shape[2:])
            if self.attn_temp is not None:
                tem = self.attend(tem)
            fuse = spa + self.lam * tem                                            # X_fuse
        if self.conv_3d is None:
            return from_video(fuse)
        return from_video(spa + self.act(self.conv_3d(self.norm(fuse))))


class TemporalBranch(nn.Module):
    """TCVE's temporal branch: the temporal UNet and one STU per fusion point of an SD UNet.

    `attach(unet)` is a scoped context: while it is open, every call of `unet` first runs the
    temporal UNet on the call's noisy latent x [(B·F), 4, H, W] (F from `call_state(unet, frames=F)`)
    and then replaces the outputs of `middle_block` and of each up level's last block by their STU
    fusion. The SD UNet itself is never modified; on exit the hooks are removed.

    `official_reshape=True` reproduces the authors' code, which unflattens the up levels' temporal
    features [(B·H·W), C, F_l] with the height of the SD block (h) instead of the latent height H
    (a wrong layout for every up level coarser than the latent); default False implements the
    intended design: unflatten at (H, W), then resize to (F, h, w).
    """

    def __init__(
        self,
        in_channels: int = 4,
        model_channels: int = 320,
        channel_mult: tuple[int, ...] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        *,
        ablation: str = "none",
        lam: float = 0.1,
        heads: int = 8,
        groups: int = 8,
        official_reshape: bool = False,
        zero_bias: bool = True,
    ):
        super().__init__()
        if ablation not in ABLATIONS:
            raise ValueError(f"unknown TCVE ablation {ablation!r}; choose from {sorted(ABLATIONS)}")
        use_tu, use_ta, use_conv = ABLATIONS[ablation]
        self.ablation, self.official_reshape = ablation, official_reshape
        self.points = stu_points(tuple(channel_mult), num_res_blocks)
        widths = [model_channels * channel_mult[-1]] + [model_channels * m for m in reversed(channel_mult)]
        self.temporal_unet = (
            TemporalUNet(in_channels, model_channels, tuple(channel_mult), num_res_blocks) if use_tu else None
        )
        self.stus = nn.ModuleList(STU(c, heads, groups, lam, use_ta, use_conv, zero_bias) for c in widths)
        name_layers(self)

    @classmethod
    def for_unet(cls, cfg: "UNetConfig", **kw) -> "TemporalBranch":
        """The branch for an SD `UNetConfig` (widths, levels, res blocks, latent channels)."""
        return cls(cfg.in_channels, cfg.model_channels, tuple(cfg.channel_mult), cfg.num_res_blocks, **kw)

    def temporal_features(self, x: torch.Tensor, frames: int) -> dict[str, torch.Tensor]:
        """X_tem at every fusion point: x [(B·F), C_in, H, W] -> {name: [(B·H·W), C_l, F_l]} ({} without a TU)."""
        if self.temporal_unet is None:
            return {}
        dtype = next(self.temporal_unet.parameters()).dtype
        return self.temporal_unet(to_temporal(x.to(dtype), frames))

    def unflatten(self, name: str, x_tem: torch.Tensor, batch: int, latent_hw: tuple[int, int], block_h: int) -> torch.Tensor:
        """[(B·H·W), C, F_l] -> [B, C, F_l, H, W] (or the authors' layout with h = block_h, see class doc)."""
        S, C, F_ = x_tem.shape
        H, W = latent_hw
        if self.official_reshape and name != "middle_block":
            if (H * W) % block_h:
                raise ValueError(f"official_reshape: H·W = {H * W} is not divisible by the block height {block_h}")
            H, W = block_h, H * W // block_h
        return x_tem.view(batch, H, W, C, F_).permute(0, 3, 4, 1, 2)

    def fuse(
        self, name: str, x_spa: torch.Tensor, feats: dict[str, torch.Tensor], frames: int, latent_hw: tuple[int, int]
    ) -> torch.Tensor:
        """The STU at fusion point `name` on the SD block output x_spa [(B·F), C, h, w]."""
        x_tem = feats.get(name)
        if x_tem is not None:
            x_tem = self.unflatten(name, x_tem, x_spa.shape[0] // frames, latent_hw, x_spa.shape[-2])
        return self.stus[self.points.index(name)](x_spa, x_tem, frames).to(x_spa.dtype)

    @contextlib.contextmanager
    def attach(self, unet: nn.Module, frames: int | None = None) -> Iterator[None]:
        """Scoped: fuse this branch into every call of `unet` (an ldm-layout SD UNet) while open."""
        layers = attention_layers(unet)
        probe = next(iter(layers.values()), None)        # its `.state` is the UNet's call state
        call: dict = {}

        def before(_m, args, kwargs):
            x = args[0] if args else kwargs["x"]                                   # [(B·F), C_in, H, W]
            f = frames or frames_of(probe.state if probe is not None else {}, x.shape[0])
            if x.shape[0] % f:
                raise ValueError(f"batch of {x.shape[0]} is not a whole number of videos of {f} frames")
            call.update(frames=f, hw=tuple(x.shape[-2:]), feats=self.temporal_features(x, f))

        def after(_m, _args, _out):
            call.clear()

        def fuse(name: str, out: torch.Tensor) -> torch.Tensor:
            if not call:
                raise RuntimeError(f"TCVE: {name} ran outside a call of the attached UNet")
            return self.fuse(name, out, call["feats"], call["frames"], call["hw"])

        handles = [unet.register_forward_pre_hook(before, with_kwargs=True), unet.register_forward_hook(after)]
        try:
            with contextlib.ExitStack() as stack:
                for name in self.points:
                    stack.enter_context(replace_outputs(unet, name, fuse))
                yield
        finally:
            for h in handles:
                h.remove()
