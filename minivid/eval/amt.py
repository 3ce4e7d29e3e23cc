"""AMT-S (Li et al., "AMT: All-Pairs Multi-Field Transforms for Efficient Frame Interpolation",
CVPR 2023, arXiv:2304.09790) and VBench's motion smoothness, which runs it.

The official file is `amt-s.pth` (the AMT authors' release; VBench downloads it from the Hugging
Face Hub, lalala125/AMT); its `state_dict` entry has this module's names:
`feat_encoder` (RAFT's small encoder, instance norm: `conv1`, `layer{1,2,3}.{0,1}.{conv1, conv2,
conv3, downsample.0}`, `conv2`), `encoder.pyramid{1..4}` (two conv + PReLU each), `decoder4`
(InitDecoder), `decoder3`, `decoder2` (IntermediateDecoder), `decoder1` (MultiFlowDecoder), each a
`convblock` of conv + PReLU, a ResBlock and a transposed convolution; `update{4,3,2}` (the small
RAFT-style update blocks: `convc1`, `convf1`, `convf2`, `conv`, `gru`, `feat_head`, `flow_head`);
`comb_block`.

The forward follows the authors' `networks/AMT-S.py` (as VBench vendors it,
vbench/third_party/amt): the two frames minus their joint mean; bidirectional all-pairs
correlation of the 1/8-resolution features, pooled into `corr_levels` levels; a 4-level feature
pyramid of each frame; coarse-to-fine decoders that predict the flows from the intermediate frame
to both inputs and an intermediate feature, each refined once by an update block that looks the
correlation up (radius `corr_radius`) at the positions the flows point to, scaled to 0->1 and
1->0 under a linear-motion assumption; the finest decoder predicts `num_flows` flow pairs with
blend masks and residuals; each pair warps both frames, and the warped candidates are averaged
plus a learned combination (`comb_block`), clamped to [0, 1].

VBench's motion smoothness (vbench/motion_smoothness.py): the frames of even index are padded
(replicate) to a multiple of 16, each pair of neighbours is interpolated at t = 1/2, the
predictions are unpadded and turned into uint8 by truncation (`(x·255).clip(0, 255).astype(uint8)`),
and the score is (255 - m) / 255 where m is the mean over the interpolated frames of the mean
absolute difference (over pixels and channels) with the real frame of odd index it stands for.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "AMTConfig", "AMT_PRESETS", "AMT", "AMT_SOURCE", "load_amt", "InputPadder", "interpolate_odd_frames",
    "motion_smoothness", "motion_smoothness_score", "to_uint8_truncate", "check_frame_size", "correlation_bytes",
]

AMT_SOURCE = ("the AMT authors' release (MCG-NKU/AMT), mirrored on the Hugging Face Hub: lalala125/AMT, file "
              "amt-s.pth (https://huggingface.co/lalala125/AMT/resolve/main/amt-s.pth, the URL VBench downloads)")


@dataclass(frozen=True)
class AMTConfig:
    """AMT-S's sizes (`networks/AMT-S.py`, `cfgs/AMT-S.yaml`); the update-block sizes are the
    literals of AMT-S's `_get_updateblock`, the feature encoder's RAFT's SmallEncoder."""

    channels: tuple[int, int, int, int] = (20, 32, 44, 56)
    skip_channels: int = 20
    feat_dim: int = 84                          # the correlation features (SmallEncoder output_dim)
    feat_widths: tuple[int, int, int] = (32, 64, 96)   # SmallEncoder's stem / layer widths
    hidden_dim: int = 76
    flow_dim: int = 20
    corr_dim: int = 64
    fc_dim: int = 68
    corr_radius: int = 3
    corr_levels: int = 4
    num_flows: int = 3

    def __post_init__(self) -> None:
        if self.skip_channels > min(2 * self.channels[3], 3 * min(self.channels[:3])):
            raise ValueError(f"skip_channels {self.skip_channels} exceeds a decoder's width")

    @property
    def min_size(self) -> int:
        """Smallest padded frame side: the coarsest correlation level must be at least 2 wide
        (the lookup divides by its width - 1)."""
        return 8 * 2 ** self.corr_levels


AMT_PRESETS: dict[str, AMTConfig] = {
    "amt_s": AMTConfig(),
    "tiny_amt": AMTConfig(channels=(4, 6, 8, 10), skip_channels=4, feat_dim=8, feat_widths=(8, 8, 12), hidden_dim=8,
                          flow_dim=4, corr_dim=8, fc_dim=8, corr_radius=2, corr_levels=3, num_flows=2),
}


# ---------------------------------------------------------------- sampling helpers (RAFT / IFRNet)

def resize(x: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """AMT's `resize`: bilinear by a scale factor (align_corners=False)."""
    return F.interpolate(x, scale_factor=scale_factor, mode="bilinear", align_corners=False)


def warp(img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp: out(p) = img(p + flow(p)), bilinear, border padding (AMT's flow_utils.warp)."""
    b, _, h, w = flow.shape
    xx = torch.linspace(-1.0, 1.0, w, dtype=torch.float32, device=flow.device).view(1, 1, 1, w).expand(b, -1, h, -1)
    yy = torch.linspace(-1.0, 1.0, h, dtype=torch.float32, device=flow.device).view(1, 1, h, 1).expand(b, -1, -1, w)
    grid = torch.cat([xx, yy], 1).to(img)          # a float32 grid, as the authors build it, in the image dtype
    flow_ = torch.cat([flow[:, 0:1] / ((w - 1.0) / 2.0), flow[:, 1:2] / ((h - 1.0) / 2.0)], 1)
    return F.grid_sample(img, (grid + flow_).permute(0, 2, 3, 1), mode="bilinear", padding_mode="border",
                         align_corners=True)


def coords_grid(batch: int, h: int, w: int, device) -> torch.Tensor:
    """[B, 2, h, w] pixel coordinates (x, y)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([xs, ys], dim=0).float()[None].repeat(batch, 1, 1, 1)


def bilinear_sampler(img: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """grid_sample at pixel coordinates [..., 2] (align_corners=True, zero padding)."""
    h, w = img.shape[-2:]
    x, y = coords.split([1, 1], dim=-1)
    return F.grid_sample(img, torch.cat([2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1], dim=-1), align_corners=True)


class BidirCorrBlock:
    """All-pairs correlation fmap0ᵀ·fmap1 / sqrt(D) both ways, average-pooled into `levels` levels;
    called with the lookup centres in frame 1 (for frame 0's pixels) and in frame 0 (for frame
    1's), it returns each level's (2r+1)² neighbourhood, concatenated: [B, levels·(2r+1)², h, w] twice."""

    def __init__(self, fmap0: torch.Tensor, fmap1: torch.Tensor, levels: int, radius: int):
        self.levels, self.radius = levels, radius
        b, d, h, w = fmap0.shape
        corr = fmap0.view(b, d, h * w).transpose(1, 2) @ fmap1.view(b, d, h * w)
        corr = corr.view(b, h, w, 1, h, w) / torch.sqrt(torch.tensor(d).float())
        corr_t = corr.clone().permute(0, 4, 5, 3, 1, 2)
        self.pyramid = [corr.reshape(b * h * w, 1, h, w)]
        self.pyramid_t = [corr_t.reshape(b * h * w, 1, h, w)]
        for _ in range(levels - 1):
            self.pyramid.append(F.avg_pool2d(self.pyramid[-1], 2, stride=2))
            self.pyramid_t.append(F.avg_pool2d(self.pyramid_t[-1], 2, stride=2))

    def __call__(self, coords0: torch.Tensor, coords1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.radius
        coords0, coords1 = coords0.permute(0, 2, 3, 1), coords1.permute(0, 2, 3, 1)
        b, h, w, _ = coords0.shape
        d = torch.linspace(-r, r, 2 * r + 1, device=coords0.device)
        delta = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1).view(1, 2 * r + 1, 2 * r + 1, 2)
        out, out_t = [], []
        for i in range(self.levels):
            c0 = coords0.reshape(b * h * w, 1, 1, 2) / 2 ** i + delta
            c1 = coords1.reshape(b * h * w, 1, 1, 2) / 2 ** i + delta
            out.append(bilinear_sampler(self.pyramid[i], c0).view(b, h, w, -1))
            out_t.append(bilinear_sampler(self.pyramid_t[i], c1).view(b, h, w, -1))
        # (the authors' code ends with .float(), a no-op in float32; here the input's dtype is kept)
        return torch.cat(out, -1).permute(0, 3, 1, 2).contiguous(), torch.cat(out_t, -1).permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- the feature encoder (RAFT's SmallEncoder)

class BottleneckBlock(nn.Module):
    """RAFT's bottleneck with instance norm (no parameters): 1x1, 3x3 (stride), 1x1; `downsample.0` on strides."""

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes // 4, 1)
        self.conv2 = nn.Conv2d(planes // 4, planes // 4, 3, padding=1, stride=stride)
        self.conv3 = nn.Conv2d(planes // 4, planes, 1)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride), nn.InstanceNorm2d(planes))
                           if stride != 1 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(F.instance_norm(self.conv1(x)))
        y = F.relu(F.instance_norm(self.conv2(y)))
        y = F.relu(F.instance_norm(self.conv3(y)))
        return F.relu((self.downsample(x) if self.downsample is not None else x) + y)


class SmallEncoder(nn.Module):
    """`feat_encoder`: 7x7 stride-2 conv, instance norm, three pairs of bottlenecks (strides 1, 2, 2), 1x1 conv: 1/8 resolution."""

    def __init__(self, cfg: AMTConfig):
        super().__init__()
        w0, w1, w2 = cfg.feat_widths
        self.conv1 = nn.Conv2d(3, w0, 7, stride=2, padding=3)
        layers, cin = [], w0
        for width, stride in ((w0, 1), (w1, 2), (w2, 2)):
            layers.append(nn.Sequential(BottleneckBlock(cin, width, stride), BottleneckBlock(width, width)))
            cin = width
        self.layer1, self.layer2, self.layer3 = layers
        self.conv2 = nn.Conv2d(w2, cfg.feat_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.instance_norm(self.conv1(x)))
        return self.conv2(self.layer3(self.layer2(self.layer1(x))))


# ---------------------------------------------------------------- IFRNet-style pyramid and decoders

def convrelu(cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.PReLU(cout))


class ResBlock(nn.Module):
    """IFRNet's ResBlock: the last `side` channels get their own convolutions between the full ones."""

    def __init__(self, channels: int, side: int):
        super().__init__()
        self.side = side
        self.conv1, self.conv2 = convrelu(channels, channels), convrelu(side, side)
        self.conv3, self.conv4 = convrelu(channels, channels), convrelu(side, side)
        self.conv5 = nn.Conv2d(channels, channels, 3, padding=1)
        self.prelu = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.side
        out = self.conv1(x)
        out = self.conv3(torch.cat([out[:, :-s], self.conv2(out[:, -s:])], 1))
        out = self.conv5(torch.cat([out[:, :-s], self.conv4(out[:, -s:])], 1))
        return self.prelu(x + out)


class Encoder(nn.Module):
    """`encoder`: pyramid1..4, each a stride-2 conv + PReLU and a conv + PReLU (1/2 .. 1/16 resolution)."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        prev = 3
        for i, ch in enumerate(channels, 1):
            self.add_module(f"pyramid{i}", nn.Sequential(convrelu(prev, ch, 3, 2, 1), convrelu(ch, ch)))
            prev = ch
        self.depth = len(channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i in range(1, self.depth + 1):
            x = getattr(self, f"pyramid{i}")(x)
            feats.append(x)
        return feats


def _convblock(cin: int, width: int, skip: int, cout: int) -> nn.Sequential:
    return nn.Sequential(convrelu(cin, width), ResBlock(width, skip), nn.ConvTranspose2d(width, cout, 4, 2, 1))


class InitDecoder(nn.Module):
    """`decoder4`: from both 1/16 features and t, the flows t->0, t->1 and the feature at 1/8."""

    def __init__(self, cin: int, cout: int, skip: int):
        super().__init__()
        self.convblock = _convblock(2 * cin + 1, 2 * cin, skip, cout + 4)

    def forward(self, f0, f1, embt):
        out = self.convblock(torch.cat([f0, f1, embt.expand(f0.shape[0], 1, *f0.shape[2:])], 1))
        flow0, flow1 = out[:, :4].chunk(2, 1)
        return flow0, flow1, out[:, 4:]


class IntermediateDecoder(nn.Module):
    """`decoder3`, `decoder2`: warp both features by the current flows, predict residual flows (added
    to the 2x-upsampled, doubled flows) and the next feature."""

    def __init__(self, cin: int, cout: int, skip: int):
        super().__init__()
        self.convblock = _convblock(3 * cin + 4, 3 * cin, skip, cout + 4)

    def forward(self, ft, f0, f1, flow0, flow1):
        out = self.convblock(torch.cat([ft, warp(f0, flow0), warp(f1, flow1), flow0, flow1], 1))
        d0, d1 = out[:, :4].chunk(2, 1)
        return d0 + 2.0 * resize(flow0, 2.0), d1 + 2.0 * resize(flow1, 2.0), out[:, 4:]


class MultiFlowDecoder(nn.Module):
    """`decoder1`: `num_flows` flow pairs at full resolution, their blend masks (sigmoid) and residuals."""

    def __init__(self, cin: int, skip: int, num_flows: int):
        super().__init__()
        self.num_flows = num_flows
        self.convblock = _convblock(3 * cin + 4, 3 * cin, skip, 8 * num_flows)

    def forward(self, ft, f0, f1, flow0, flow1):
        n = self.num_flows
        out = self.convblock(torch.cat([ft, warp(f0, flow0), warp(f1, flow1), flow0, flow1], 1))
        d0, d1, mask, res = torch.split(out, [2 * n, 2 * n, n, 3 * n], 1)
        flow0 = d0 + 2.0 * resize(flow0, 2.0).repeat(1, n, 1, 1)
        flow1 = d1 + 2.0 * resize(flow1, 2.0).repeat(1, n, 1, 1)
        return flow0, flow1, torch.sigmoid(mask), res


class SmallUpdateBlock(nn.Module):
    """`update4/3/2`: from the correlation lookup, the flows and the feature (brought to 1/8 first),
    a residual feature and flow update (brought back up; flows scaled with it)."""

    def __init__(self, cfg: AMTConfig, cdim: int, scale_factor: int | None):
        super().__init__()
        planes = cfg.corr_levels * (2 * cfg.corr_radius + 1) ** 2
        h = cfg.hidden_dim
        self.scale_factor = scale_factor
        self.convc1 = nn.Conv2d(2 * planes, cfg.corr_dim, 1)
        self.convf1 = nn.Conv2d(4, 2 * cfg.flow_dim, 7, padding=3)
        self.convf2 = nn.Conv2d(2 * cfg.flow_dim, cfg.flow_dim, 3, padding=1)
        self.conv = nn.Conv2d(cfg.corr_dim + cfg.flow_dim, cfg.fc_dim, 3, padding=1)
        lrelu = lambda: nn.LeakyReLU(0.1)                          # noqa: E731
        self.gru = nn.Sequential(nn.Conv2d(cfg.fc_dim + 4 + cdim, h, 3, padding=1), lrelu(), nn.Conv2d(h, h, 3, padding=1))
        self.feat_head = nn.Sequential(nn.Conv2d(h, h, 3, padding=1), lrelu(), nn.Conv2d(h, cdim, 3, padding=1))
        self.flow_head = nn.Sequential(nn.Conv2d(h, h, 3, padding=1), lrelu(), nn.Conv2d(h, 4, 3, padding=1))

    def forward(self, net, flow, corr):
        sf = self.scale_factor
        if sf is not None:
            net = resize(net, 1 / sf)
        cor = F.leaky_relu(self.convc1(corr), 0.1)
        flo = F.leaky_relu(self.convf2(F.leaky_relu(self.convf1(flow), 0.1)), 0.1)
        inp = F.leaky_relu(self.conv(torch.cat([cor, flo], 1)), 0.1)
        out = self.gru(torch.cat([inp, flow, net], 1))
        delta_net, delta_flow = self.feat_head(out), self.flow_head(out)
        if sf is not None:
            delta_net, delta_flow = resize(delta_net, sf), sf * resize(delta_flow, sf)
        return delta_net, delta_flow


class AMT(nn.Module):
    """AMT-S: forward(img0, img1 [B, 3, H, W] in [0, 1], H and W multiples of 16, embt [B or 1, 1, 1, 1]
    the time in (0, 1)) -> the interpolated frame [B, 3, H, W] in [0, 1]. `scale_factor` < 1 runs
    the network on downscaled frames and upsamples its flows (VBench uses it only when GPU memory
    is short; 1 on CPU)."""

    def __init__(self, cfg: AMTConfig | str = "amt_s"):
        super().__init__()
        cfg = AMT_PRESETS[cfg] if isinstance(cfg, str) else cfg
        self.cfg = cfg
        c, skip = cfg.channels, cfg.skip_channels
        self.feat_encoder = SmallEncoder(cfg)
        self.encoder = Encoder(c)
        self.decoder4 = InitDecoder(c[3], c[2], skip)
        self.decoder3 = IntermediateDecoder(c[2], c[1], skip)
        self.decoder2 = IntermediateDecoder(c[1], c[0], skip)
        self.decoder1 = MultiFlowDecoder(c[0], skip, cfg.num_flows)
        self.update4 = SmallUpdateBlock(cfg, c[2], None)
        self.update3 = SmallUpdateBlock(cfg, c[1], 2)
        self.update2 = SmallUpdateBlock(cfg, c[0], 4)
        n = cfg.num_flows
        self.comb_block = nn.Sequential(nn.Conv2d(3 * n, 6 * n, 3, 1, 1), nn.PReLU(6 * n), nn.Conv2d(6 * n, 3, 3, 1, 1))

    @staticmethod
    def _lookup(corr_fn, coord, flow0, flow1, embt, downsample: int):
        """Correlation at the positions the flows t->1, t->0 reach when rescaled to 0->1 (·1/t) and
        1->0 (·1/(1-t)), the flows first brought to 1/8 resolution."""
        if downsample != 1:
            inv = 1 / downsample
            flow0, flow1 = inv * resize(flow0, inv), inv * resize(flow1, inv)
        corr0, corr1 = corr_fn(coord + flow1 * (1.0 / embt), coord + flow0 * (1.0 / (1.0 - embt)))
        return torch.cat([corr0, corr1], 1), torch.cat([flow0, flow1], 1)

    def _refine(self, update, corr_fn, coord, flow0, flow1, ft, embt, downsample):
        corr, flow = self._lookup(corr_fn, coord, flow0, flow1, embt, downsample)
        delta_ft, delta_flow = update(ft, flow, corr)
        d0, d1 = delta_flow.chunk(2, 1)
        return flow0 + d0, flow1 + d1, ft + delta_ft

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, embt: torch.Tensor, scale_factor: float = 1.0) -> torch.Tensor:
        mean = torch.cat([img0, img1], 2).mean(1, keepdim=True).mean(2, keepdim=True).mean(3, keepdim=True)
        img0, img1 = img0 - mean, img1 - mean
        x0 = resize(img0, scale_factor) if scale_factor != 1.0 else img0
        x1 = resize(img1, scale_factor) if scale_factor != 1.0 else img1
        b, _, h, w = x0.shape
        coord = coords_grid(b, h // 8, w // 8, img0.device)
        fmap0, fmap1 = self.feat_encoder(torch.cat([x0, x1], 0)).split([b, b], 0)
        corr_fn = BidirCorrBlock(fmap0, fmap1, self.cfg.corr_levels, self.cfg.corr_radius)
        f0_1, f0_2, f0_3, f0_4 = self.encoder(x0)
        f1_1, f1_2, f1_3, f1_4 = self.encoder(x1)

        flow0, flow1, ft = self.decoder4(f0_4, f1_4, embt)                                     # 1/8
        flow0, flow1, ft = self._refine(self.update4, corr_fn, coord, flow0, flow1, ft, embt, 1)
        flow0, flow1, ft = self.decoder3(ft, f0_3, f1_3, flow0, flow1)                         # 1/4
        flow0, flow1, ft = self._refine(self.update3, corr_fn, coord, flow0, flow1, ft, embt, 2)
        flow0, flow1, ft = self.decoder2(ft, f0_2, f1_2, flow0, flow1)                         # 1/2
        flow0, flow1, ft = self._refine(self.update2, corr_fn, coord, flow0, flow1, ft, embt, 4)
        flow0, flow1, mask, res = self.decoder1(ft, f0_1, f1_1, flow0, flow1)                  # 1
        if scale_factor != 1.0:
            up = 1.0 / scale_factor
            flow0, flow1 = resize(flow0, up) * up, resize(flow1, up) * up
            mask, res = resize(mask, up), resize(res, up)
        return self.combine(img0, img1, flow0, flow1, mask, res, mean).clamp(0, 1)

    def combine(self, img0, img1, flow0, flow1, mask, res, mean) -> torch.Tensor:
        """AMT's multi_flow_combine: each flow pair warps both frames, blended by its mask, plus the
        mean and its residual; the candidates' average plus `comb_block` of all of them."""
        b, c, h, w = flow0.shape
        n = c // 2
        flow0, flow1 = flow0.reshape(b * n, 2, h, w), flow1.reshape(b * n, 2, h, w)
        mask, res = mask.reshape(b * n, 1, h, w), res.reshape(b * n, 3, h, w)
        img0 = img0[:, None].expand(b, n, 3, h, w).reshape(b * n, 3, h, w)
        img1 = img1[:, None].expand(b, n, 3, h, w).reshape(b * n, 3, h, w)
        mean = mean[:, None].expand(b, n, 1, 1, 1).reshape(b * n, 1, 1, 1)
        warps = (mask * warp(img0, flow0) + (1 - mask) * warp(img1, flow1) + mean + res).reshape(b, n, 3, h, w)
        return warps.mean(1) + self.comb_block(warps.view(b, n * 3, h, w))


def load_amt(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> AMT:
    """`amt-s.pth` (its `state_dict` entry; read with weights_only=True) -> AMT, strict."""
    from minivid.eval.encoders import _load_strict, _read, match_preset

    sd = _read(path, "AMT-S", AMT_SOURCE)
    builders = {name: (lambda c=c: AMT(c)) for name, c in AMT_PRESETS.items()}
    _, build = match_preset(path, sd, builders, "AMT-S (amt-s.pth)")
    return _load_strict(build, sd).to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------- VBench's motion smoothness

class InputPadder:
    """AMT's InputPadder: replicate-pad H and W up to multiples of `divisor`, the extra split
    floor/ceil between the two sides; `unpad` crops it off."""

    def __init__(self, h: int, w: int, divisor: int = 16):
        pad_h = (((h // divisor) + 1) * divisor - h) % divisor
        pad_w = (((w // divisor) + 1) * divisor - w) % divisor
        self.h, self.w = h, w
        self.pad_ = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad_, mode="replicate")

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        left, _, top, _ = self.pad_
        return x[..., top:top + self.h, left:left + self.w]


def check_frame_size(cfg: AMTConfig, h: int, w: int, scale_factor: float = 1.0) -> None:
    """ValueError unless h x w frames, padded to a multiple of 16 (/ scale_factor), are large enough
    for the correlation pyramid (`AMTConfig.min_size` px per side at the network's scale)."""
    padder = InputPadder(h, w, int(16 / scale_factor))
    ph, pw = h + sum(padder.pad_[2:]), w + sum(padder.pad_[:2])
    if min(ph, pw) * scale_factor < cfg.min_size:
        raise ValueError(f"frames of {h}x{w} are too small for AMT: its correlation pyramid needs at least "
                         f"{cfg.min_size} px per side (after padding to a multiple of 16)")


def correlation_bytes(cfg: AMTConfig, h: int, w: int, element_size: int = 4) -> int:
    """Memory of one pair's correlation volumes (both directions, all levels) for h x w frames: the
    all-pairs volume is (h/8 · w/8)² per direction, 1.07 G elements for 1080p, 16.8 M for 512²."""
    ph, pw = -(-h // 16) * 16 // 8, -(-w // 16) * 16 // 8
    n = ph * pw
    per_level = sum(n * (ph >> i) * (pw >> i) for i in range(cfg.corr_levels))
    return 2 * per_level * element_size


def to_uint8_truncate(x: torch.Tensor) -> torch.Tensor:
    """AMT's tensor2img: (x·255) clipped to [0, 255] and truncated to uint8 (not rounded)."""
    return (x * 255.0).clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def interpolate_odd_frames(model: AMT, frames: torch.Tensor, batch_size: int = 4, scale_factor: float = 1.0,
                           progress: bool = False) -> torch.Tensor:
    """uint8 frames [F, 3, H, W] (F >= 3) -> uint8 [F_even - 1, 3, H, W]: frame 2i+1 predicted from frames
    2i and 2i+2 at t = 1/2, as VBench's MotionSmoothness.motion_score runs AMT-S."""
    from tqdm.auto import tqdm

    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be uint8 [F, 3, H, W], got {getattr(frames, 'dtype', type(frames))} "
                         f"{tuple(getattr(frames, 'shape', ()))}")
    if len(frames) < 3:
        raise ValueError(f"motion smoothness needs at least 3 frames (two of even index), got {len(frames)}")
    if scale_factor <= 0 or scale_factor > 1:
        raise ValueError(f"scale_factor must be in (0, 1], got {scale_factor}")
    p = next(model.parameters())
    h, w = frames.shape[-2:]
    check_frame_size(model.cfg, h, w, scale_factor)
    padder = InputPadder(h, w, int(16 / scale_factor))
    even = frames[0::2]
    embt = torch.full((1, 1, 1, 1), 0.5, device=p.device, dtype=p.dtype)
    out = []
    starts = range(0, len(even) - 1, batch_size)
    for i in tqdm(starts, desc="AMT-S", disable=not progress, leave=False):
        pair = even[i:i + batch_size + 1].to(device=p.device).to(p.dtype) / 255.0
        x = padder.pad(pair)
        pred = model(x[:-1], x[1:], embt, scale_factor=scale_factor)
        out.append(to_uint8_truncate(padder.unpad(pred).float()).cpu())
    return torch.cat(out)


def motion_smoothness_score(frames: torch.Tensor, interpolated: torch.Tensor) -> tuple[float, list[float]]:
    """VBench's score from the real frames (uint8 [F, 3, H, W]) and the interpolated odd ones (uint8):
    (255 - mean_i MAE_i) / 255 -> (score, per-frame MAE_i on 0..255)."""
    real = frames[1::2][:len(interpolated)]
    if len(real) != len(interpolated) or real.shape[1:] != interpolated.shape[1:]:
        raise ValueError(f"{len(interpolated)} interpolated frames {tuple(interpolated.shape[1:])} do not match the "
                         f"{len(real)} real frames of odd index {tuple(real.shape[1:])}")
    mae = (real.to(torch.int16) - interpolated.to(torch.int16)).abs().double().mean(dim=(1, 2, 3))
    return ((255.0 - mae.mean()) / 255.0).item(), mae.tolist()


def motion_smoothness(model: AMT, frames: torch.Tensor, batch_size: int = 4, progress: bool = False) -> tuple[float, list[float]]:
    """VBench's motion smoothness of one video (uint8 frames [F, 3, H, W], F >= 3) -> (score, per-frame MAE)."""
    return motion_smoothness_score(frames, interpolate_odd_frames(model, frames, batch_size, progress=progress))
