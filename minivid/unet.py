"""The Stable Diffusion 1.x / 2.x UNet (ldm `openaimodel.UNetModel`), under the original key names.

An official checkpoint's `model.diffusion_model.*` tensors load into `UNet` with the prefix
stripped and `strict=True`. The module tree reads like the architecture:

    time_embed            Linear(C0, 4·C0) → SiLU → Linear(4·C0, 4·C0)      (`time_embed.0`, `time_embed.2`)
    input_blocks.0        conv 3×3, in_channels → C0
    input_blocks.N        [ResBlock, (SpatialTransformer)] per res block; [Downsample] between levels
    middle_block          ResBlock, SpatialTransformer, ResBlock
    output_blocks.N       [ResBlock on cat(x, skip), (SpatialTransformer), (Upsample)]
    out                   GroupNorm → SiLU → conv 3×3                         (`out.0`, `out.2`)

Every layer of a block is called as `layer(x, cond)`; `Cond` carries what the blocks are
conditioned on (time embedding, cross-attention context, and the size an upsampler must
reach). Methods extend the UNet by subclassing `BasicTransformerBlock` / `ResBlock` and
swapping instances (the factory methods `make_resblock` / `make_transformer` serve the same
purpose for subclasses of `UNet`), by attention processors (minivid.attention), and by forward
hooks on `middle_block` / `output_blocks.N`, whose outputs are plain tensors.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from minivid.attention import Attention, name_layers
from minivid.layers import Conv2d, FeedForward, Linear, normalization, timestep_embedding, zero_module

__all__ = [
    "UNetConfig", "UNet", "Cond", "TimestepEmbedSequential", "ResBlock", "SpatialTransformer",
    "BasicTransformerBlock", "Downsample", "Upsample", "InputConv",
]


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class UNetConfig:
    """The ldm `UNetModel` parameters that SD 1.x / 2.x use (names as in the inference yaml).

    Exactly one of `num_heads` (SD 1.x: a fixed head count, head width grows with the channels)
    and `num_head_channels` (SD 2.x: fixed head width 64) is set. `attention_resolutions` are
    downsampling factors (1 = the latent resolution) at which blocks get a SpatialTransformer.
    `prediction` does not change the network; it tells samplers what the output means.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int | None = 8
    num_head_channels: int | None = None
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    transformer_depth: int = 1
    upcast_attention: bool = False
    prediction: str = "eps"

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        if (self.num_heads is None) == (self.num_head_channels is None):
            raise ValueError("UNetConfig: set exactly one of num_heads (SD 1.x) and num_head_channels (SD 2.x)")
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"UNetConfig: prediction must be 'eps' or 'v', got {self.prediction!r}")
        for mult in self.channel_mult:
            ch = self.model_channels * mult
            if ch % 32:
                raise ValueError(f"UNetConfig: channel width {ch} is not divisible by the 32 GroupNorm groups")
            heads, dim_head = self.heads(ch)
            if heads * dim_head != ch:
                raise ValueError(f"UNetConfig: channel width {ch} does not split into heads ({heads} × {dim_head})")

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of a SpatialTransformer on `channels` channels."""
        if self.num_head_channels is not None:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads

    @property
    def downsample_factor(self) -> int:
        """Total spatial downsampling of the deepest level."""
        return 2 ** (len(self.channel_mult) - 1)

    @classmethod
    def preset(cls, name: str, **changes: Any) -> "UNetConfig":
        """A named configuration ("sd14", "sd21", "sd21_base", "tiny", "tiny_sd2"), optionally changed."""
        if name not in PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **changes)

    @classmethod
    def from_ldm(cls, params: dict[str, Any], prediction: str = "eps", upcast_attention: bool = False) -> "UNetConfig":
        """From the `unet_config.params` of an original inference yaml (ldm UNetModel arguments).

        ldm writes -1 for the unused one of num_heads / num_head_channels.
        """
        heads, head_ch = params.get("num_heads", -1), params.get("num_head_channels", -1)
        return cls(
            in_channels=params["in_channels"],
            out_channels=params["out_channels"],
            model_channels=params["model_channels"],
            channel_mult=tuple(params["channel_mult"]),
            num_res_blocks=params["num_res_blocks"],
            attention_resolutions=tuple(params["attention_resolutions"]),
            num_heads=None if head_ch != -1 else heads,
            num_head_channels=head_ch if head_ch != -1 else None,
            context_dim=params["context_dim"],
            use_linear_in_transformer=params.get("use_linear_in_transformer", False),
            transformer_depth=params.get("transformer_depth", 1),
            upcast_attention=upcast_attention,
            prediction=prediction,
        )


_SD2 = dict(num_heads=None, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)

PRESETS: dict[str, UNetConfig] = {
    # v1-inference.yaml
    "sd14": UNetConfig(),
    # v2-inference-v.yaml (768, v-prediction); attention upcast as in diffusers' config of SD 2.1,
    # since the v model overflows in fp16 without it
    "sd21": UNetConfig(**_SD2, upcast_attention=True, prediction="v"),
    # v2-inference.yaml (512, eps)
    "sd21_base": UNetConfig(**_SD2),
    # test sizes: same layout rules (attention on all levels but the deepest, ldm block order)
    "tiny": UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(1, 2), num_heads=2, context_dim=32),
    "tiny_sd2": UNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(1, 2), num_heads=None, num_head_channels=16,
        context_dim=48, use_linear_in_transformer=True, transformer_depth=2, upcast_attention=True, prediction="v",
    ),
}


# ---------------------------------------------------------------- blocks

@dataclass(frozen=True)
class Cond:
    """What the UNet blocks are conditioned on, passed to every layer as `layer(x, cond)`."""

    emb: torch.Tensor                          # [B, 4·C0] timestep embedding (after `time_embed`)
    context: torch.Tensor                      # [B, M, D] cross-attention context (text tokens)
    upsample_to: tuple[int, int] | None = None  # (H, W) an Upsample must produce: the skip it meets next


class TimestepEmbedSequential(nn.ModuleList):
    """One entry of `input_blocks` / `output_blocks` / `middle_block` (ldm's name): layers applied in order."""

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        for layer in self:
            x = layer(x, cond)
        return x


class InputConv(Conv2d):
    """The first 3×3 conv (`input_blocks.0.0`), with the block-layer signature."""

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        return super().forward(x)


class ResBlock(nn.Module):
    """ldm ResBlock: GN → SiLU → conv, + projected time embedding, GN → SiLU → conv, + skip.

    x: [B, C, H, W] -> [B, C_out, H, W]. The skip is a 1×1 conv when the width changes.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None):
        super().__init__()
        out = out_channels or channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), Conv2d(channels, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, out))
        self.out_layers = nn.Sequential(
            normalization(out), nn.SiLU(), nn.Dropout(0.0), zero_module(Conv2d(out, out, 3, padding=1))
        )
        self.skip_connection = nn.Identity() if out == channels else Conv2d(channels, out, 1)

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(cond.emb).to(h.dtype)[:, :, None, None]   # [B, C_out, 1, 1] broadcast
        return self.skip_connection(x) + self.out_layers(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm and residual.

    x: [B, N, D] tokens of an H×W grid (`hw`), context: [B, M, context_dim].
    Subclass and swap instances (keeping submodule names) to change a block; the three
    lines of `forward` are the whole block.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool = False):
        super().__init__()
        self.add_block_layers(dim, heads, dim_head, context_dim, upcast)

    def add_block_layers(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool) -> None:
        """norm1/attn1, norm2/attn2, norm3/ff, created in this order (it fixes a seeded random init).
        sgm's VideoTransformerBlock creates its own layers first, then these."""
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, dim_head, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, dim_head, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), hw=hw)
        x = x + self.attn2(self.norm2(x), context, hw=hw)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm (eps 1e-6) → proj_in → transformer blocks over the H·W tokens → proj_out → + x.

    proj_in / proj_out are 1×1 convs (SD 1.x) or Linear layers on the tokens (SD 2.x,
    `use_linear`); both orders are kept as ldm has them because the keys' shapes differ.
    x: [B, C, H, W] -> same.
    """

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
        use_linear: bool = False, upcast: bool = False,
    ):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = Linear(channels, inner) if use_linear else Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, upcast) for _ in range(depth)
        )
        self.proj_out = zero_module(Linear(inner, channels) if use_linear else Conv2d(inner, channels, 1))

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        # the permuted tokens are a transposed view: one copy here, or every LayerNorm of the
        # residual stream copies it (and a frozen Linear proj_in takes a slow batched matmul)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, -1).contiguous()       # [B, N, D]
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, cond.context, hw=(H, W))
        if self.use_linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()        # [B, D, H, W]
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


class Downsample(nn.Module):
    """Stride-2 3×3 conv (`op`): [B, C, H, W] -> [B, C, ⌈H/2⌉, ⌈W/2⌉]."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a 3×3 `conv`.

    The target is the size of the skip the next output block concatenates (`cond.upsample_to`),
    which is 2× except for latents whose sides are not multiples of the total downsampling;
    this is what diffusers does (ldm would fail there), and equals ×2 nearest otherwise.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        size = cond.upsample_to or (2 * x.shape[-2], 2 * x.shape[-1])
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


# ---------------------------------------------------------------- the UNet

class UNet(nn.Module):
    """SD 1.x / 2.x UNet: x [B, 4, h, w], t [B] or scalar, context [B, M, D] -> [B, 4, h, w].

    Frames of a video run as a plain batch (B·F). The parameters may be in any float dtype;
    inputs are cast to it and the output back to x's dtype.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        C0, emb = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = nn.Sequential(Linear(C0, emb), nn.SiLU(), Linear(emb, emb))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([InputConv(cfg.in_channels, C0, 3, padding=1)])])
        skip_channels, ch, ds = [C0], C0, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [self.make_resblock(ch, C0 * mult)]
                ch = C0 * mult
                if ds in cfg.attention_resolutions:
                    layers.append(self.make_transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            [self.make_resblock(ch, ch), self.make_transformer(ch), self.make_resblock(ch, ch)]
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [self.make_resblock(ch + skip_channels.pop(), C0 * mult)]
                ch = C0 * mult
                if ds in cfg.attention_resolutions:
                    layers.append(self.make_transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(layers))

        self.out = nn.Sequential(normalization(ch), nn.SiLU(), zero_module(Conv2d(C0, cfg.out_channels, 3, padding=1)))
        name_layers(self)

    # factories: a subclass (e.g. a video UNet) overrides these to build its own blocks
    def make_resblock(self, channels: int, out_channels: int) -> nn.Module:
        return ResBlock(channels, 4 * self.cfg.model_channels, out_channels)

    def make_transformer(self, channels: int) -> nn.Module:
        cfg = self.cfg
        heads, dim_head = cfg.heads(channels)
        return SpatialTransformer(
            channels, heads, dim_head, cfg.transformer_depth, cfg.context_dim,
            cfg.use_linear_in_transformer, cfg.upcast_attention,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int, context: torch.Tensor) -> torch.Tensor:
        B = self._check_inputs(x, context)
        t = torch.as_tensor(t, device=x.device)
        if t.ndim > 1 or t.numel() not in (1, B):
            raise ValueError(f"UNet: t must be a scalar or have shape [{B}], got shape {tuple(t.shape)}")
        t = t.reshape(-1).expand(B)                                          # [B]
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(self.dtype))
        out = self.forward_blocks(x.to(self.dtype), Cond(emb, context.to(self.dtype)))
        return out.to(x.dtype)

    def forward_blocks(self, x: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The UNet body on latents x [B, C_in, h, w] under `cond` -> [B, C_out, h, w]."""
        skips = []
        for block in self.input_blocks:
            x = block(x, cond)
            skips.append(x)
        x = self.middle_block(x, cond)
        for block in self.output_blocks:
            x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, dataclasses.replace(cond, upsample_to=tuple(skips[-1].shape[-2:]) if skips else None))
        return self.out(x)

    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor) -> int:
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet: x must be [B, {cfg.in_channels}, h, w], got shape {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != cfg.context_dim:
            raise ValueError(
                f"UNet: context must be [{x.shape[0]}, M, {cfg.context_dim}], got shape {tuple(context.shape)}"
            )
        return x.shape[0]
