"""The Stable Video Diffusion spatio-temporal UNet (sgm `VideoUNet`), under the original key names.

An official `svd.safetensors` / `svd_xt.safetensors` holds it under `model.diffusion_model.*`;
with the prefix stripped it loads into `VideoUNet` with `strict=True`. It is the SD 2.x UNet
(minivid.unet: same levels, `num_head_channels=64`, Linear proj_in/out) in which every block
gains a temporal twin, blended with the spatial result by a learned weight:

    input_blocks.0.0            conv 3×3, 8 → 320   (noisy latent ⊕ conditioning latent)
    *.N.0  VideoResBlock        ResBlock (per frame), then `time_stack`: a ResBlock of (3,1,1) Conv3d
                                over the frames of each clip; `time_mixer` blends the two
    *.N.1  SpatialVideoTransformer
                                per depth d: `transformer_blocks.d` (spatial, per frame) then
                                `time_stack.d` (attention over the F frames of each pixel, after
                                adding `time_pos_embed` of the frame index); `time_mixer` blends
    label_emb.0                 Linear(768, 1280) → SiLU → Linear: the added time ids
                                (fps id, motion bucket id, noise augmentation), each embedded
                                sinusoidally to 256 and concatenated; added to the time embedding

Blending (sgm `AlphaBlender`, merge strategy "learned_with_images", the class SVD's VideoUNet
builds for both block kinds; sgm's `LegacyAlphaBlenderWithBug` is used only by other models):

    out = α·spatial + (1 − α)·temporal,   α = sigmoid(mix_factor),   α = 1 for frames flagged
                                          by `image_only_indicator` (they ignore the temporal path)

Note the weight multiplies the SPATIAL branch here; the SVD VAE decoder's blender weights the
temporal one (minivid.vae.VideoResBlock).

Frames travel as a batch of B·F images (clip-major, frame index fastest); every block receives
the clip length through `VideoCond.frames`. Temporal attention layers are minivid `Attention`
modules like the spatial ones, named e.g. `input_blocks.1.1.time_stack.0.attn1`; their processors
see q, k, v of shape [(B·H·W), heads, F, d] (and `ctx.hw = (H, W)`), so processors, capture and
injection work on them unchanged (I2VEdit's motion LoRA and temporal attention matching).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from minivid.layers import Conv3d, FeedForward, Linear, normalization, timestep_embedding, zero_module
from minivid.unet import BasicTransformerBlock, Cond, ResBlock, SpatialTransformer, UNet, UNetConfig

__all__ = [
    "VideoUNetConfig", "VIDEO_PRESETS", "VideoUNet", "VideoCond", "AlphaBlender", "TemporalResBlock",
    "VideoResBlock", "VideoTransformerBlock", "SpatialVideoTransformer", "to_video", "to_frames",
]


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class VideoUNetConfig(UNetConfig):
    """sgm `VideoUNet` parameters of SVD (configs/svd.yaml `network_config`), on top of the image UNet's.

    `adm_in_channels` = 3 · `addition_time_embed_dim` (three added time ids). `merge_factor` is the
    initial `mix_factor` (sgm default 0.5, i.e. α = sigmoid(0.5) at initialisation). `num_frames`
    is the clip length the model was trained for (14 for SVD, 25 for SVD-XT); it is only a default,
    the network takes any F.
    """

    in_channels: int = 8
    num_heads: int | None = None
    num_head_channels: int | None = 64
    context_dim: int = 1024
    use_linear_in_transformer: bool = True
    prediction: str = "v"
    addition_time_embed_dim: int = 256
    adm_in_channels: int = 768
    video_kernel_size: tuple[int, int, int] = (3, 1, 1)
    merge_factor: float = 0.5
    num_frames: int = 14

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "video_kernel_size", tuple(self.video_kernel_size))
        if self.adm_in_channels != 3 * self.addition_time_embed_dim:
            raise ValueError(
                f"VideoUNetConfig: adm_in_channels ({self.adm_in_channels}) must be 3 × addition_time_embed_dim "
                f"({self.addition_time_embed_dim}): fps id, motion bucket id and noise augmentation are each embedded")
        if len(self.video_kernel_size) != 3 or any(k % 2 == 0 for k in self.video_kernel_size):
            raise ValueError(f"VideoUNetConfig: video_kernel_size {self.video_kernel_size} must be 3 odd sizes")
        if self.addition_time_embed_dim % 2:
            raise ValueError("VideoUNetConfig: addition_time_embed_dim must be even (cos and sin halves)")

    @classmethod
    def preset(cls, name: str, **changes: Any) -> "VideoUNetConfig":  # type: ignore[override]
        """A named configuration ("svd", "svd_xt", "tiny"), optionally changed."""
        if name not in VIDEO_PRESETS:
            raise ValueError(f"unknown video UNet preset {name!r}; choose from {sorted(VIDEO_PRESETS)}")
        return dataclasses.replace(VIDEO_PRESETS[name], **changes)


VIDEO_PRESETS: dict[str, VideoUNetConfig] = {
    # configs/svd.yaml; SVD and SVD-XT share the architecture and differ in the trained clip length
    "svd": VideoUNetConfig(),
    "svd_xt": VideoUNetConfig(num_frames=25),
    # test size: every branch (skip convs, attention and attention-free levels, up/down sampling)
    "tiny": VideoUNetConfig(
        model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(1, 2), num_head_channels=16,
        context_dim=32, addition_time_embed_dim=16, adm_in_channels=48, num_frames=14,
    ),
}


@dataclass(frozen=True)
class VideoCond(Cond):
    """`Cond` of the video UNet: per-frame embeddings plus the clip facts the temporal layers need."""

    frames: int = 1                                   # F, the clip length (batch is B·F)
    image_only_indicator: torch.Tensor | None = None  # [B, F], 1 = frame treated as a still image


def to_video(x: torch.Tensor, frames: int) -> torch.Tensor:
    """[(B·F), ...] -> [B, F, ...]"""
    return x.unflatten(0, (-1, frames))


def to_frames(x: torch.Tensor) -> torch.Tensor:
    """[B, F, ...] -> [(B·F), ...]"""
    return x.flatten(0, 1)


# ---------------------------------------------------------------- blending

class AlphaBlender(nn.Module):
    """sgm `AlphaBlender` with merge strategy "learned_with_images" (`mix_factor`, one scalar).

    forward(spatial, temporal, image_only_indicator): tensors [B, F, ...], indicator [B, F] or None
    -> α·spatial + (1 − α)·temporal, α = sigmoid(mix_factor), forced to 1 on flagged frames.
    """

    def __init__(self, alpha: float = 0.5):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.tensor([float(alpha)]))

    def alpha(self, image_only_indicator: torch.Tensor | None) -> torch.Tensor:
        """[1] (no indicator) or [B, F] blend weights of the spatial branch."""
        a = torch.sigmoid(self.mix_factor)
        if image_only_indicator is None:
            return a
        return torch.where(image_only_indicator.bool(), torch.ones_like(a), a)

    def forward(
        self, spatial: torch.Tensor, temporal: torch.Tensor, image_only_indicator: torch.Tensor | None = None
    ) -> torch.Tensor:
        a = self.alpha(image_only_indicator)
        if a.ndim == 2:
            a = a.reshape(*a.shape, *([1] * (spatial.ndim - 2)))          # [B, F, 1, ...]
        return a.to(spatial.dtype) * spatial + (1.0 - a).to(spatial.dtype) * temporal


# ---------------------------------------------------------------- video ResBlock

class TemporalResBlock(nn.Module):
    """`time_stack` of a VideoResBlock: sgm's openaimodel ResBlock with dims=3, kernel (3, 1, 1).

    GN → SiLU → Conv3d, + the frame's projected time embedding, GN → SiLU → Conv3d (zero init), + x.
    x: [B, C, F, H, W], emb: [B, F, E] -> [B, C, F, H, W]. Unlike the VAE's temporal block
    (minivid.vae.TemporalResBlock) it takes the time embedding (`emb_layers`).
    """

    def __init__(self, channels: int, emb_channels: int, kernel_size: tuple[int, int, int] = (3, 1, 1)):
        super().__init__()
        padding = tuple(k // 2 for k in kernel_size)
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), Conv3d(channels, channels, kernel_size, padding=padding)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, channels))
        self.out_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Dropout(0.0),
            zero_module(Conv3d(channels, channels, kernel_size, padding=padding)),
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)                              # [B, F, C]
        h = h + e.transpose(1, 2)[..., None, None]                         # [B, C, F, 1, 1] (sgm exchange_temb_dims)
        return x + self.out_layers(h)


class VideoResBlock(ResBlock):
    """sgm VideoResBlock: the image ResBlock per frame, then `time_stack` over frames, blended.

    x: [(B·F), C, H, W] -> [(B·F), C_out, H, W].
    """

    def __init__(
        self, channels: int, emb_channels: int, out_channels: int | None = None,
        kernel_size: tuple[int, int, int] = (3, 1, 1), merge_factor: float = 0.5,
    ):
        super().__init__(channels, emb_channels, out_channels)
        out = out_channels or channels
        self.time_stack = TemporalResBlock(out, emb_channels, kernel_size)
        self.time_mixer = AlphaBlender(merge_factor)

    def forward(self, x: torch.Tensor, cond: VideoCond) -> torch.Tensor:  # type: ignore[override]
        F = cond.frames
        spatial = to_video(super().forward(x, cond), F)                    # [B, F, C, H, W]
        temporal = self.time_stack(spatial.transpose(1, 2), to_video(cond.emb, F)).transpose(1, 2)
        return to_frames(self.time_mixer(spatial, temporal, cond.image_only_indicator))


# ---------------------------------------------------------------- spatio-temporal transformer

class VideoTransformerBlock(BasicTransformerBlock):
    """sgm VideoTransformerBlock (one entry of `time_stack`): attention over the frames of each token.

    x: [(B·F), N, D] is rearranged to [(B·N), F, D]; then
        x = x + ff_in(norm_in(x))              (SVD's `extra_ff_mix_layer`)
        x = x + attn1(norm1(x))                self-attention over the F frames
        x = x + attn2(norm2(x), context)       cross-attention to the first frame's context
        x = x + ff(norm3(x))
    and rearranged back. context: [(B·N), M, context_dim]; hw = (H, W) of the N tokens.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool = False):
        nn.Module.__init__(self)                   # sgm's order: norm_in/ff_in first, then the image block's layers
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = FeedForward(dim)
        self.add_block_layers(dim, heads, dim_head, context_dim, upcast)

    def forward(self, x: torch.Tensor, context: torch.Tensor, frames: int,  # type: ignore[override]
                hw: tuple[int, int]) -> torch.Tensor:
        _, N, D = x.shape
        x = to_video(x, frames).transpose(1, 2).reshape(-1, frames, D)  # [(B·N), F, D]
        x = super().forward(x + self.ff_in(self.norm_in(x)), context, hw)   # then attn1, attn2, ff as the image block
        return to_frames(x.reshape(-1, N, frames, D).transpose(1, 2).contiguous())   # [(B·F), N, D], dense for the Linears


class SpatialVideoTransformer(SpatialTransformer):
    """sgm SpatialVideoTransformer: SpatialTransformer whose every block is followed by a temporal one.

    GroupNorm → proj_in → per depth: spatial block, (+ time_pos_embed(frame index)) temporal block,
    `time_mixer` blend → proj_out → + x. x: [(B·F), C, H, W] -> same.
    """

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
        use_linear: bool = True, upcast: bool = False, merge_factor: float = 0.5,
    ):
        super().__init__(channels, heads, dim_head, depth, context_dim, use_linear, upcast)
        inner = heads * dim_head
        self.time_stack = nn.ModuleList(
            VideoTransformerBlock(inner, heads, dim_head, context_dim, upcast) for _ in range(depth)
        )
        self.time_pos_embed = nn.Sequential(Linear(channels, 4 * channels), nn.SiLU(), Linear(4 * channels, channels))
        self.time_mixer = AlphaBlender(merge_factor)
        self.channels = channels

    def frame_embedding(self, batch: int, frames: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """time_pos_embed of the sinusoidal frame index 0…F−1: [(B·F), 1, C]."""
        index = torch.arange(frames, device=device).repeat(batch)          # [(B·F)]
        return self.time_pos_embed(timestep_embedding(index, self.channels).to(dtype))[:, None]

    def forward(self, x: torch.Tensor, cond: VideoCond) -> torch.Tensor:  # type: ignore[override]
        # Linear layers get dense token tensors: torch multiplies a strided 3-D input by a weight that
        # does not require grad (a frozen model) as a batched matmul of the expanded weight, ~10x slower.
        BF, C, H, W = x.shape
        F = cond.frames
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(BF, H * W, -1).contiguous()       # [(B·F), N, D]; dense: see below
        if self.use_linear:
            h = self.proj_in(h)
        # temporal cross-attention context: the first frame's context, once per token   [(B·N), M, Dc]
        time_context = to_video(cond.context, F)[:, 0].repeat_interleave(H * W, dim=0)
        pos = self.frame_embedding(BF // F, F, x.device, h.dtype)
        for block, time_block in zip(self.transformer_blocks, self.time_stack):
            h = block(h, cond.context, hw=(H, W))
            mixed = time_block(h + pos, time_context, F, (H, W))
            h = to_frames(self.time_mixer(to_video(h, F), to_video(mixed, F), cond.image_only_indicator))
        if self.use_linear:
            h = self.proj_out(h)
        h = h.reshape(BF, H, W, -1).permute(0, 3, 1, 2).contiguous()         # [(B·F), D, H, W]
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


# ---------------------------------------------------------------- the UNet

class VideoUNet(UNet):
    """SVD's UNet: x [B, F, 8, h, w], c_noise [B] or scalar, image_embeds [B, M, D], added_time_ids [B, 3]
    -> [B, F, 4, h, w] (the v-prediction F_θ of EDM; see minivid.samplers.edm_denoiser).

    `image_only_indicator` [B, F] (optional, default all zeros = video) makes flagged frames skip
    the temporal layers. Parameters may be in any float dtype; inputs are cast to it and the
    output back to x's dtype.
    """

    cfg: VideoUNetConfig

    def __init__(self, cfg: VideoUNetConfig):
        if not isinstance(cfg, VideoUNetConfig):
            raise TypeError(f"VideoUNet needs a VideoUNetConfig, got {type(cfg).__name__}")
        super().__init__(cfg)
        emb = 4 * cfg.model_channels
        self.label_emb = nn.Sequential(nn.Sequential(Linear(cfg.adm_in_channels, emb), nn.SiLU(), Linear(emb, emb)))

    def make_resblock(self, channels: int, out_channels: int) -> nn.Module:
        cfg = self.cfg
        return VideoResBlock(channels, 4 * cfg.model_channels, out_channels, cfg.video_kernel_size, cfg.merge_factor)

    def make_transformer(self, channels: int) -> nn.Module:
        cfg = self.cfg
        heads, dim_head = cfg.heads(channels)
        return SpatialVideoTransformer(
            channels, heads, dim_head, cfg.transformer_depth, cfg.context_dim,
            cfg.use_linear_in_transformer, cfg.upcast_attention, cfg.merge_factor,
        )

    def embed(self, c_noise: torch.Tensor, added_time_ids: torch.Tensor) -> torch.Tensor:
        """Time embedding plus the added-time-ids embedding: c_noise [B], ids [B, 3] -> [B, 4·C0]."""
        cfg = self.cfg
        emb = self.time_embed(timestep_embedding(c_noise, cfg.model_channels).to(self.dtype))
        ids = timestep_embedding(added_time_ids.reshape(-1), cfg.addition_time_embed_dim)   # [(B·3), 256]
        return emb + self.label_emb(ids.reshape(added_time_ids.shape[0], -1).to(self.dtype))

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        c_noise: torch.Tensor | float,
        image_embeds: torch.Tensor,
        added_time_ids: torch.Tensor,
        image_only_indicator: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, F = self._check_video_inputs(x, image_embeds, added_time_ids, image_only_indicator)
        t = torch.as_tensor(c_noise, device=x.device)
        if t.ndim > 1 or t.numel() not in (1, B):
            raise ValueError(f"VideoUNet: c_noise must be a scalar or have shape [{B}], got shape {tuple(t.shape)}")
        emb = self.embed(t.reshape(-1).expand(B), added_time_ids.to(x.device))              # [B, E]
        cond = VideoCond(
            emb=emb.repeat_interleave(F, dim=0),                                              # [(B·F), E]
            context=image_embeds.to(self.dtype).repeat_interleave(F, dim=0),                  # [(B·F), M, D]
            frames=F,
            image_only_indicator=image_only_indicator,
        )
        out = self.forward_blocks(to_frames(x).to(self.dtype), cond)                          # [(B·F), 4, h, w]
        return to_video(out, F).to(x.dtype)

    def _check_video_inputs(
        self, x: torch.Tensor, image_embeds: torch.Tensor, added_time_ids: torch.Tensor,
        image_only_indicator: torch.Tensor | None,
    ) -> tuple[int, int]:
        cfg = self.cfg
        if x.ndim != 5 or x.shape[2] != cfg.in_channels:
            raise ValueError(f"VideoUNet: x must be [B, F, {cfg.in_channels}, h, w], got shape {tuple(x.shape)}")
        B, F = x.shape[:2]
        if image_embeds.ndim != 3 or image_embeds.shape[0] != B or image_embeds.shape[-1] != cfg.context_dim:
            raise ValueError(
                f"VideoUNet: image_embeds must be [{B}, M, {cfg.context_dim}] (M = 1 for SVD), "
                f"got shape {tuple(image_embeds.shape)}")
        if tuple(added_time_ids.shape) != (B, 3):
            raise ValueError(
                f"VideoUNet: added_time_ids must be [{B}, 3] (fps id, motion bucket id, noise augmentation), "
                f"got shape {tuple(added_time_ids.shape)}")
        if image_only_indicator is not None and tuple(image_only_indicator.shape) != (B, F):
            raise ValueError(
                f"VideoUNet: image_only_indicator must be [{B}, {F}], got shape {tuple(image_only_indicator.shape)}")
        return B, F
