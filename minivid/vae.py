"""The KL autoencoders of Stable Diffusion (ldm `AutoencoderKL`) and of Stable Video Diffusion
(sgm `AutoencodingEngine` with the temporal `VideoDecoder`).

Module names are the original checkpoint keys below `first_stage_model.`:

    encoder.conv_in                                   3 -> ch, 3x3
    encoder.down.{L}.block.{j}                        ResnetBlock (norm1, conv1, norm2, conv2[, nin_shortcut])
    encoder.down.{L}.downsample.conv                  pad (0,1,0,1), 3x3 stride 2, no padding (all but the last level)
    encoder.mid.{block_1, attn_1, block_2}            attn_1: single-head attention, 1x1 convs q, k, v, proj_out
    encoder.norm_out, encoder.conv_out                -> 2·z_channels (mean and log-variance)
    quant_conv, post_quant_conv                       1x1 convs around the latent (SD only; SVD has none)
    decoder.conv_in, decoder.mid.*                    z_channels -> ch·ch_mult[-1]
    decoder.up.{L}.block.{j}, decoder.up.{L}.upsample.conv
    decoder.norm_out, decoder.conv_out

`decoder.up` is indexed by resolution level like `encoder.down` (up.0 is the full-resolution
level), so it runs in REVERSE order: up.{n-1} is applied first (ldm builds it by prepending).

SVD's decoder (`VideoDecoder`, sgm time_mode "conv-only") makes every decoder ResnetBlock a
`VideoResBlock`: the spatial block, then `time_stack` (a ResBlock of (3,1,1) Conv3d over frames)
blended as  out = a·temporal + (1 − a)·spatial,  a = sigmoid(mix_factor); and `conv_out` gets a
`time_mix_conv` (Conv3d (3,1,1)) after it. The mid attention stays spatial.

Latents are returned and taken UNSCALED; the diffusion models see `latent · SD_LATENT_SCALE`
(the scale lives on the pipeline). See docs/vae.md for the numerics matched and for why only
batch/clip chunking (exact) is offered and spatial tiling is not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from minivid.attention import AttnContext, Processor, sdpa
from minivid.layers import Conv2d, Conv3d, normalization, zero_module

__all__ = [
    "SD_LATENT_SCALE", "VAEConfig", "VAE_PRESETS", "DiagonalGaussian",
    "ResnetBlock", "AttnBlock", "Downsample", "Upsample", "Encoder", "Decoder",
    "TemporalResBlock", "VideoResBlock", "FrameConv2d", "TimeMixConv", "VideoDecoder",
    "AutoencoderKL", "TemporalAutoencoder", "build_vae",
]

SD_LATENT_SCALE = 0.18215   # `scale_factor` of SD 1.x/2.x and SVD: diffusion latent = VAE latent · 0.18215


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class VAEConfig:
    """Shape of an autoencoder (the ldm `ddconfig` plus the two switches SVD needs)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2                 # per encoder level; decoder levels have one more
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 4
    embed_dim: int = 4                      # latent channels after quant_conv
    quant_conv: bool = True                 # ldm AutoencoderKL: yes; sgm AutoencodingEngine (SVD): no
    temporal: bool = False                  # SVD VideoDecoder
    video_kernel_size: tuple[int, int, int] = (3, 1, 1)

    def __post_init__(self) -> None:
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % 32 for w in widths):
            raise ValueError(f"VAEConfig: every width ch·ch_mult {widths} must be a multiple of 32 (GroupNorm groups)")
        if not self.quant_conv and self.embed_dim != self.z_channels:
            raise ValueError("VAEConfig: without quant convs embed_dim must equal z_channels")
        if any(k % 2 == 0 for k in self.video_kernel_size):
            raise ValueError(f"VAEConfig: video_kernel_size {self.video_kernel_size} must be odd")

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def preset(cls, name: str) -> "VAEConfig":
        if name not in VAE_PRESETS:
            raise ValueError(f"unknown VAE preset {name!r}; choose from {sorted(VAE_PRESETS)}")
        return VAE_PRESETS[name]


VAE_PRESETS: dict[str, VAEConfig] = {
    "sd": VAEConfig(),                                                   # SD 1.x and 2.x, f=8
    "tiny": VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1),       # f=4, tests
    "svd": VAEConfig(quant_conv=False, temporal=True),                   # SVD / SVD-XT first_stage_model
    # two res blocks: diffusers' TemporalDecoder ties its mid-block depth to layers_per_block
    "tiny_svd": VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, quant_conv=False, temporal=True),
}


# ---------------------------------------------------------------- latent distribution

class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), logvar clamped to [-30, 20] as in ldm."""

    def __init__(self, moments: torch.Tensor):
        # moments: [B, 2·Z, h, w] -> mean, logvar: [B, Z, h, w]
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std·ε. A CPU generator draws ε on the CPU and moves it (as diffusers does),
        so a seed gives the same latent on every device."""
        device = self.mean.device
        if generator is not None and generator.device.type != device.type:
            if generator.device.type != "cpu":
                raise ValueError(f"cannot draw a {device} tensor from a {generator.device} generator")
            device = generator.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


# ---------------------------------------------------------------- blocks

def Normalize(channels: int) -> nn.GroupNorm:
    """ldm/sgm VAE `Normalize`: plain GroupNorm, 32 groups, eps 1e-6, computed in the input dtype
    (unlike the UNet's GroupNorm32, it does not upcast to float32)."""
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """ldm VAE ResnetBlock: (GN, swish, conv3x3) twice, plus a 1x1 `nin_shortcut` when widths differ.

    `frames` is accepted and unused, so image and video decoder blocks share one call signature.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        # x: [B, C_in, H, W] -> [B, C_out, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """ldm VAE self-attention: one head of width C over all H·W positions, with 1x1 conv
    projections `q`, `k`, `v`, `proj_out` (checkpoint layout) and a residual.

    The arithmetic is a minivid attention processor on (B, 1, H·W, C), `sdpa` by default; set
    `block.processor` to swap it (this block is not an `Attention`, so globbing `set_processor`
    does not reach it).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)
        self.processor: Processor = sdpa
        self.name = ""   # dotted name, set by the autoencoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> (B, 1, N=H·W, C)
        q, k, v = (p(h).flatten(2).transpose(1, 2).unsqueeze(1) for p in (self.q, self.k, self.v))
        ctx = AttnContext(self, self.name, is_cross=False, scale=C ** -0.5, upcast=False, hw=(H, W), state={})
        out = self.processor(q, k, v, ctx)                       # (B, 1, N, C)
        out = out.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Pad right and bottom by one (asymmetric, ldm), then a 3x3 stride-2 conv without padding."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class FrameConv2d(Conv2d):
    """A Conv2d whose forward also takes the frame count (unused): the image decoder's `conv_out`,
    so that it and the video decoder's `TimeMixConv` are called alike."""

    def forward(self, x: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        return super().forward(x)


class _Level(nn.Module):
    """One resolution level: `block` (a list of ResnetBlocks), then `downsample`/`upsample` if any."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class _Mid(nn.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution."""

    def __init__(self, make_resblock: Callable[[int, int], nn.Module], channels: int):
        super().__init__()
        self.block_1 = make_resblock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = make_resblock(channels, channels)

    def forward(self, h: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h, frames)), frames)


# ---------------------------------------------------------------- encoder and decoder

class Encoder(nn.Module):
    """x [B, 3, H, W] -> moments [B, 2·z_channels, H/f, W/f] (f = 2^(levels − 1))."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = cfg.ch
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c, width))
                c = width
            stage = _Level(blocks)
            if level != len(widths) - 1:
                stage.downsample = Downsample(c)
            self.down.append(stage)
        self.mid = _Mid(ResnetBlock, c)
        self.norm_out = Normalize(c)
        self.conv_out = Conv2d(c, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z [B, z_channels, h, w] -> image [B, 3, h·f, w·f].

    Subclasses change the blocks through the factories `_make_resblock` and `_make_conv_out`
    (as sgm's VideoDecoder does); every block is called as `block(h, frames)`.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.ch * m for m in cfg.ch_mult]
        c = widths[-1]
        self.conv_in = Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _Mid(self._make_resblock, c)
        levels = []                                   # built in the order they run: lowest resolution first
        for level in reversed(range(len(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(self._make_resblock(c, widths[level]))
                c = widths[level]
            stage = _Level(blocks)
            if level != 0:
                stage.upsample = Upsample(c)
            levels.append(stage)
        self.up = nn.ModuleList(reversed(levels))     # up.{L} is resolution level L (ldm key layout)
        self.norm_out = Normalize(c)
        self.conv_out = self._make_conv_out(c, cfg.out_ch)

    def _make_resblock(self, in_channels: int, out_channels: int) -> nn.Module:
        return ResnetBlock(in_channels, out_channels)

    def _make_conv_out(self, in_channels: int, out_channels: int) -> nn.Module:
        return FrameConv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        h = self.mid(self.conv_in(z), frames)
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h, frames)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)), frames)


# ---------------------------------------------------------------- SVD temporal decoder (sgm temporal_ae.py)

def _to_video(x: torch.Tensor, frames: int) -> torch.Tensor:
    """[(B·F), C, H, W] -> [B, C, F, H, W]"""
    if x.shape[0] % frames:
        raise ValueError(f"{x.shape[0]} frames in the batch is not a multiple of frames={frames}")
    return x.unflatten(0, (-1, frames)).transpose(1, 2)


def _to_frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [(B·F), C, H, W]"""
    return x.transpose(1, 2).flatten(0, 1)


class TemporalResBlock(nn.Module):
    """sgm `time_stack`: the openaimodel ResBlock with dims=3 and no timestep embedding.

    in_layers = (GroupNorm32 eps 1e-5, SiLU, Conv3d k), out_layers = (GroupNorm32, SiLU, Dropout,
    Conv3d k, zero-initialised); identity skip. k = (3, 1, 1) mixes each pixel over 3 frames.
    """

    def __init__(self, channels: int, kernel_size: tuple[int, int, int] = (3, 1, 1)):
        super().__init__()
        padding = tuple(k // 2 for k in kernel_size)
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), Conv3d(channels, channels, kernel_size, padding=padding),
        )
        self.out_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Dropout(0.0),
            zero_module(Conv3d(channels, channels, kernel_size, padding=padding)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, F, H, W]
        return x + self.out_layers(self.in_layers(x))


class VideoResBlock(ResnetBlock):
    """sgm VideoResBlock, merge strategy "learned" (the VAE's own blender, not the UNet's AlphaBlender):

        out = a·time_stack(spatial) + (1 − a)·spatial,   a = sigmoid(mix_factor)

    Note the weight `a` multiplies the TEMPORAL branch here (the UNet's blender weights the spatial one).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int] = (3, 1, 1)):
        super().__init__(in_channels, out_channels)
        self.time_stack = TemporalResBlock(out_channels, kernel_size)
        self.mix_factor = nn.Parameter(torch.zeros(1))      # sgm alpha=0.0 -> a = 0.5 at init

    def forward(self, x: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        if frames is None:
            raise ValueError("VideoResBlock needs frames (the clip length)")
        spatial = _to_video(super().forward(x), frames)     # [B, C, F, H, W]
        a = torch.sigmoid(self.mix_factor)
        return _to_frames(a * self.time_stack(spatial) + (1.0 - a) * spatial)


class TimeMixConv(FrameConv2d):
    """sgm `AE3DConv`: the 3x3 output conv, then `time_mix_conv` (Conv3d (3,1,1)) across frames (no residual)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int, int] = (3, 1, 1)):
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.time_mix_conv = Conv3d(
            out_channels, out_channels, kernel_size, padding=tuple(k // 2 for k in kernel_size)
        )

    def forward(self, x: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        if frames is None:
            raise ValueError("TimeMixConv needs frames (the clip length)")
        return _to_frames(self.time_mix_conv(_to_video(super().forward(x), frames)))


class VideoDecoder(Decoder):
    """SVD's decoder: every ResnetBlock becomes a VideoResBlock, conv_out a TimeMixConv.
    Input [(B·F), z, h, w] with `frames` = F; frames of one clip are mixed, clips are independent."""

    def _make_resblock(self, in_channels: int, out_channels: int) -> nn.Module:
        return VideoResBlock(in_channels, out_channels, self.cfg.video_kernel_size)

    def _make_conv_out(self, in_channels: int, out_channels: int) -> nn.Module:
        return TimeMixConv(in_channels, out_channels, self.cfg.video_kernel_size)


# ---------------------------------------------------------------- autoencoders

def _check_chunk(chunk: int | None, n: int) -> int:
    if chunk is None:
        return max(n, 1)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    return chunk


class AutoencoderKL(nn.Module):
    """SD's VAE (ldm `AutoencoderKL`). encode: x in [-1, 1] -> DiagonalGaussian; decode: unscaled z -> x.

    `chunk=n` runs n batch elements at a time; batch elements never interact, so the result is the
    same as one call (lower peak memory for long videos).
    """

    def __init__(self, config: VAEConfig | str = "sd"):
        super().__init__()
        cfg = VAEConfig.preset(config) if isinstance(config, str) else config
        if cfg.temporal and type(self) is AutoencoderKL:
            raise ValueError("a temporal VAEConfig builds a TemporalAutoencoder (use build_vae)")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = self._make_decoder(cfg)
        if cfg.quant_conv:
            self.quant_conv = Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
            self.post_quant_conv = Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        for name, m in self.named_modules():
            if isinstance(m, AttnBlock):
                m.name = name

    def _make_decoder(self, cfg: VAEConfig) -> Decoder:
        return Decoder(cfg)

    def _check_input(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be [B, {channels}, H, W], got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor, chunk: int | None = None) -> DiagonalGaussian:
        """x: [B, 3, H, W] in [-1, 1] -> posterior over [B, 4, H/f, W/f] latents."""
        self._check_input(x, self.config.in_channels, "encode input")
        step = _check_chunk(chunk, x.shape[0])
        moments = []
        for piece in x.split(step):
            h = self.encoder(piece)
            moments.append(self.quant_conv(h) if self.config.quant_conv else h)
        return DiagonalGaussian(torch.cat(moments))

    def _decode(self, z: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        if self.config.quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z, frames)

    def decode(self, z: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """z: unscaled latents [B, 4, h, w] -> images [B, 3, h·f, w·f] (about [-1, 1])."""
        self._check_input(z, self.config.embed_dim, "decode input")
        step = _check_chunk(chunk, z.shape[0])
        return torch.cat([self._decode(piece) for piece in z.split(step)])


class TemporalAutoencoder(AutoencoderKL):
    """SVD's VAE (sgm AutoencodingEngine): the image encoder, no quant convs, a VideoDecoder.

    decode(z, num_frames=F): z holds B clips of F frames, [(B·F), 4, h, w], frame-major per clip.
    - `chunk=n` (a multiple of F) decodes n/F whole clips at a time: same result as one call.
    - `decode_chunk_size=n` reproduces diffusers' SVD pipeline (and sgm's `decoding_t`): the
      flattened frames are cut into consecutive pieces of n and EACH PIECE IS DECODED AS ITS OWN
      CLIP, so temporal mixing stops at piece borders and the output differs from a full decode
      unless n is a multiple of F. Use it for pipeline parity.
    """

    def __init__(self, config: VAEConfig | str = "svd"):
        cfg = VAEConfig.preset(config) if isinstance(config, str) else config
        if not cfg.temporal:
            raise ValueError("TemporalAutoencoder needs a temporal VAEConfig (e.g. 'svd', 'tiny_svd')")
        super().__init__(cfg)

    def _make_decoder(self, cfg: VAEConfig) -> Decoder:
        return VideoDecoder(cfg)

    def decode(
        self,
        z: torch.Tensor,
        num_frames: int,
        chunk: int | None = None,
        decode_chunk_size: int | None = None,
    ) -> torch.Tensor:
        """z: [(B·F), 4, h, w] unscaled -> frames [(B·F), 3, h·f, w·f]."""
        self._check_input(z, self.config.embed_dim, "decode input")
        if not isinstance(num_frames, int) or num_frames < 1 or z.shape[0] % num_frames:
            raise ValueError(f"decode: {z.shape[0]} latent frames is not a whole number of clips of num_frames={num_frames}")
        if chunk is not None and decode_chunk_size is not None:
            raise ValueError("decode: give chunk (exact, whole clips) or decode_chunk_size (diffusers), not both")
        if decode_chunk_size is not None:
            step = _check_chunk(decode_chunk_size, z.shape[0])
            return torch.cat([self._decode(piece, frames=piece.shape[0]) for piece in z.split(step)])
        step = _check_chunk(chunk, z.shape[0])
        if step % num_frames:
            raise ValueError(f"decode: chunk={step} must be a multiple of num_frames={num_frames} (frames of a clip are mixed)")
        return torch.cat([self._decode(piece, frames=num_frames) for piece in z.split(step)])


def build_vae(config: VAEConfig | str) -> AutoencoderKL:
    """The autoencoder a config describes: TemporalAutoencoder if `config.temporal`, else AutoencoderKL."""
    cfg = VAEConfig.preset(config) if isinstance(config, str) else config
    return TemporalAutoencoder(cfg) if cfg.temporal else AutoencoderKL(cfg)
