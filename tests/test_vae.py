"""VAE tests: parity with diffusers on tiny configs, full-size key sets against the manifests,
exact chunking, the SVD decoder's temporal coupling, and the error paths."""
from __future__ import annotations

import contextlib
import json
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from minivid.vae import (
    SD_LATENT_SCALE, AutoencoderKL, TemporalAutoencoder, VAEConfig, build_vae,
)

from _builders import max_err

MANIFESTS = Path(__file__).resolve().parents[1] / "weights" / "manifests"
PREFIX = "first_stage_model."
TOL = 1e-5


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, including norms, zero-initialised convs and mix factors,
    so that every parameter moves the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("mix_factor"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and ("norm" in name or "layers.0" in name) and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model.eval()


def manifest_keys(name: str) -> dict[str, list]:
    tensors = json.loads((MANIFESTS / f"{name}.json").read_text())["tensors"]
    return {k: v for k, v in tensors.items() if k.startswith(PREFIX)}


def original_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {PREFIX + k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- full-size key sets

@pytest.mark.parametrize("preset, manifest", [("sd", "sd-v1-4"), ("sd", "sd-v2-1"), ("svd", "svd"), ("svd", "svd_xt")])
def test_full_size_keys_and_shapes_equal_manifest(preset, manifest):
    with torch.device("meta"):
        vae = build_vae(preset)
    ours = {PREFIX + k: [list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in vae.state_dict().items()}
    ref = manifest_keys(manifest)
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert ours == ref


def test_svd_has_no_quant_convs_and_sd_does():
    assert not any("quant_conv" in k for k in manifest_keys("svd"))
    with torch.device("meta"):
        assert hasattr(build_vae("sd"), "quant_conv")
        assert not hasattr(build_vae("svd"), "quant_conv")


# ---------------------------------------------------------------- SD VAE parity (diffusers' own converter)

def diffusers_sd_vae(cfg: VAEConfig, original: dict[str, torch.Tensor]):
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    levels = len(cfg.ch_mult)
    dvae = DAutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.embed_dim, norm_num_groups=32,
    )
    converted = convert_ldm_vae_checkpoint(original, dvae.config)
    dvae.load_state_dict(converted, strict=True)
    return dvae.eval()


def test_sd_vae_parity_with_diffusers():
    cfg = VAEConfig.preset("tiny")
    vae = randomize(AutoencoderKL(cfg))
    dvae = diffusers_sd_vae(cfg, original_state_dict(vae))
    x = torch.rand(2, 3, 24, 40) * 2 - 1                        # non-square
    z = torch.randn(2, 4, 6, 10)
    with torch.no_grad():
        post, dpost = vae.encode(x), dvae.encode(x).latent_dist
        out, dout = vae.decode(z), dvae.decode(z).sample
        s = post.sample(torch.Generator().manual_seed(3))
        ds = dpost.sample(torch.Generator().manual_seed(3))
    assert post.mean.shape == (2, 4, 6, 10) and out.shape == (2, 3, 24, 40)
    errs = {"mean": max_err(post.mean, dpost.mean), "std": max_err(post.std, dpost.std),
            "decode": max_err(out, dout), "sample": max_err(s, ds)}
    assert max(errs.values()) <= TOL, errs
    assert torch.equal(post.mode(), post.mean)
    assert out.abs().max() > 0.1 and post.std.std() > 0        # a non-degenerate comparison


def test_latent_distribution_clamps_logvar():
    from minivid.vae import DiagonalGaussian

    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], dim=1)
    post = DiagonalGaussian(moments)
    assert torch.all(post.logvar == 20.0) and torch.allclose(post.std, torch.exp(torch.tensor(10.0)))
    assert DiagonalGaussian(-moments).logvar.min() == -30.0
    assert SD_LATENT_SCALE == 0.18215


def test_decoder_up_runs_in_reverse_index_order():
    """up.{n-1} (lowest resolution) is applied first: its blocks see the smallest feature map."""
    vae = AutoencoderKL("tiny").eval()
    seen: dict[int, int] = {}

    def record(i):
        def hook(_m, _a, out):
            seen[i] = out.shape[-1]
        return hook

    hooks = [vae.decoder.up[i].block[0].register_forward_hook(record(i)) for i in range(len(vae.decoder.up))]
    with torch.no_grad():
        vae.decode(torch.randn(1, 4, 5, 5))
    for h in hooks:
        h.remove()
    assert list(seen) == [2, 1, 0] and seen[2] < seen[1] < seen[0]


# ---------------------------------------------------------------- chunking

@contextlib.contextmanager
def batch_invariant_kernels():
    """oneDNN picks its convolution algorithm by batch size, so a batch of 1 and a batch of 5
    round differently (~1e-6). PyTorch's native kernels compute each batch element alike."""
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = saved


def test_chunked_encode_decode_equal_unchunked():
    vae = randomize(AutoencoderKL("tiny"))
    x = torch.rand(5, 3, 16, 24) * 2 - 1
    z = torch.randn(5, 4, 4, 6)
    with torch.no_grad():
        with batch_invariant_kernels():                     # bit-exact: no element sees another
            full_enc, full_dec = vae.encode(x), vae.decode(z)
            for n in (1, 2, 5, 7):
                enc = vae.encode(x, chunk=n)
                assert torch.equal(enc.mean, full_enc.mean) and torch.equal(enc.std, full_enc.std)
                assert torch.equal(vae.decode(z, chunk=n), full_dec)
        # default (oneDNN) kernels: equal up to their batch-size-dependent rounding
        assert max_err(vae.decode(z, chunk=2), vae.decode(z)) <= TOL
        assert max_err(vae.encode(x, chunk=2).mean, vae.encode(x).mean) <= TOL


# ---------------------------------------------------------------- SVD temporal VAE parity

# original (sgm) key -> diffusers AutoencoderKLTemporalDecoder key; {U} is the reversed up index.
_SVD_RULES = [
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.nin_shortcut\.", r"encoder.down_blocks.\1.resnets.\2.conv_shortcut."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", r"encoder.down_blocks.\1.resnets.\2."),
    (r"^encoder\.down\.(\d+)\.downsample\.conv\.", r"encoder.down_blocks.\1.downsamplers.0.conv."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^encoder\.mid\.block_(\d)\.", lambda m: f"encoder.mid_block.resnets.{int(m[1]) - 1}."),
    (r"^encoder\.norm_out\.", "encoder.conv_norm_out."),
    # decoder: every resnet is spatial_res_block + temporal_res_block + time_mixer
    (r"^decoder\.mid\.block_(\d)\.", lambda m: f"decoder.mid_block.resnets.{int(m[1]) - 1}."),
    (r"^decoder\.up\.(\d+)\.block\.(\d+)\.", lambda m: f"decoder.up_blocks.{{U{m[1]}}}.resnets.{m[2]}."),
    (r"^decoder\.up\.(\d+)\.upsample\.conv\.", lambda m: f"decoder.up_blocks.{{U{m[1]}}}.upsamplers.0.conv."),
    (r"\.time_stack\.in_layers\.0\.", ".temporal_res_block.norm1."),
    (r"\.time_stack\.in_layers\.2\.", ".temporal_res_block.conv1."),
    (r"\.time_stack\.out_layers\.0\.", ".temporal_res_block.norm2."),
    (r"\.time_stack\.out_layers\.3\.", ".temporal_res_block.conv2."),
    (r"\.mix_factor$", ".time_mixer.mix_factor"),
    (r"(decoder\.(?:mid_block|up_blocks\.\{U\d+\})\.resnets\.\d+\.)(norm1|conv1|norm2|conv2)\.", r"\1spatial_res_block.\2."),
    (r"(decoder\.(?:mid_block|up_blocks\.\{U\d+\})\.resnets\.\d+\.)nin_shortcut\.", r"\1spatial_res_block.conv_shortcut."),
    (r"^decoder\.conv_out\.time_mix_conv\.", "decoder.time_conv_out."),
    (r"^decoder\.norm_out\.", "decoder.conv_norm_out."),
]


def svd_to_diffusers(original: dict[str, torch.Tensor], levels: int, latent: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in original.items():
        k = key.removeprefix(PREFIX)
        for pattern, repl in _SVD_RULES:
            k = re.sub(pattern, repl, k)
        k = re.sub(r"\{U(\d+)\}", lambda m: str(levels - 1 - int(m[1])), k)
        if ".attentions.0.to_" in k and t.ndim == 4:                  # 1x1 conv -> Linear
            t = t[:, :, 0, 0]
        out[k] = t
    # diffusers keeps a quant_conv that the original lacks: the identity reproduces it exactly
    out["quant_conv.weight"] = torch.eye(2 * latent)[:, :, None, None]
    out["quant_conv.bias"] = torch.zeros(2 * latent)
    return out


def diffusers_svd_vae(cfg: VAEConfig, original: dict[str, torch.Tensor]):
    from diffusers import AutoencoderKLTemporalDecoder

    levels = len(cfg.ch_mult)
    dvae = AutoencoderKLTemporalDecoder(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch,
        down_block_types=("DownEncoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.embed_dim,
    )
    dvae.load_state_dict(svd_to_diffusers(original, levels, cfg.embed_dim), strict=True)
    return dvae.eval()


@pytest.fixture(scope="module")
def svd_pair():
    cfg = VAEConfig.preset("tiny_svd")
    vae = randomize(TemporalAutoencoder(cfg), seed=1)
    return vae, diffusers_svd_vae(cfg, original_state_dict(vae))


def test_svd_vae_parity_with_diffusers(svd_pair):
    vae, dvae = svd_pair
    F_ = 3
    x = torch.rand(2 * F_, 3, 16, 24) * 2 - 1
    z = torch.randn(2 * F_, 4, 4, 6)                                  # two clips of three frames
    with torch.no_grad():
        post, dpost = vae.encode(x), dvae.encode(x).latent_dist
        out, dout = vae.decode(z, num_frames=F_), dvae.decode(z, num_frames=F_).sample
    errs = {"mean": max_err(post.mean, dpost.mean), "std": max_err(post.std, dpost.std), "decode": max_err(out, dout)}
    assert max(errs.values()) <= TOL, errs
    assert out.abs().max() > 0.1


def test_svd_decode_chunk_size_matches_diffusers_pipeline(svd_pair):
    from diffusers import StableVideoDiffusionPipeline

    vae, dvae = svd_pair
    B, F_, n = 2, 5, 3                                                # chunks of 3 straddle the clip border
    latents = torch.randn(B, F_, 4, 4, 6)                             # pipeline layout, scaled latents
    with torch.no_grad():
        ref = StableVideoDiffusionPipeline.decode_latents(
            types.SimpleNamespace(vae=dvae), latents, num_frames=F_, decode_chunk_size=n)   # [B, 3, F, H, W]
        z = latents.flatten(0, 1) / SD_LATENT_SCALE
        ours = vae.decode(z, num_frames=F_, decode_chunk_size=n)
        full = vae.decode(z, num_frames=F_)
    ours = ours.unflatten(0, (B, F_)).transpose(1, 2)
    assert max_err(ours, ref) <= TOL
    # decoding pieces as separate clips changes the result: it is a documented option, not the default
    assert max_err(ours, full.unflatten(0, (B, F_)).transpose(1, 2)) > 1e-3


def test_svd_clip_chunking_is_exact_and_clips_are_independent(svd_pair):
    vae, _ = svd_pair
    F_ = 3
    z = torch.randn(3 * F_, 4, 4, 6)
    with torch.no_grad(), batch_invariant_kernels():
        full = vae.decode(z, num_frames=F_)
        assert torch.equal(vae.decode(z, num_frames=F_, chunk=F_), full)
        assert torch.equal(vae.decode(z, num_frames=F_, chunk=2 * F_), full)
        enc_x = torch.rand(4, 3, 16, 24)
        assert torch.equal(vae.encode(enc_x, chunk=3).mean, vae.encode(enc_x).mean)


def test_svd_decoder_mixes_frames_within_a_clip(svd_pair):
    """Temporal layers couple the frames of one clip: changing frame 0's latent changes frame 1's
    output; the image decoder (SD) keeps frames independent."""
    vae, _ = svd_pair
    z = torch.randn(3, 4, 4, 6)
    z2 = z.clone()
    z2[0] += 1.0
    with torch.no_grad():
        a, b = vae.decode(z, num_frames=3), vae.decode(z2, num_frames=3)
        assert max_err(a[1], b[1]) > 1e-3 and max_err(a[2], b[2]) > 1e-3   # stacked (3,1,1) convs reach 2 frames away
        sd = randomize(AutoencoderKL("tiny"))
        assert torch.equal(sd.decode(z)[1], sd.decode(z2)[1])


def test_svd_init_matches_sgm():
    """sgm initialises time_stack's last conv to zero and mix_factor to 0 (blend weight 0.5)."""
    vae = TemporalAutoencoder("tiny_svd")
    blk = vae.decoder.up[0].block[0]
    assert torch.all(blk.time_stack.out_layers[3].weight == 0) and blk.mix_factor.item() == 0.0


# ---------------------------------------------------------------- error paths

def test_errors():
    vae = AutoencoderKL("tiny")
    tvae = TemporalAutoencoder("tiny_svd")
    z = torch.randn(4, 4, 4, 4)
    with pytest.raises(ValueError, match="unknown VAE preset"):
        VAEConfig.preset("sdxl")
    with pytest.raises(ValueError, match="multiple of 32"):
        VAEConfig(ch=48)
    with pytest.raises(ValueError, match="TemporalAutoencoder"):
        AutoencoderKL("tiny_svd")
    with pytest.raises(ValueError, match="temporal VAEConfig"):
        TemporalAutoencoder("tiny")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vae.encode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\]"):
        vae.decode(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="positive int"):
        vae.decode(z, chunk=0)
    with pytest.raises(ValueError, match="whole number of clips"):
        tvae.decode(z, num_frames=3)
    with pytest.raises(ValueError, match="multiple of num_frames"):
        tvae.decode(z, num_frames=2, chunk=3)
    with pytest.raises(ValueError, match="not both"):
        tvae.decode(z, num_frames=2, chunk=2, decode_chunk_size=2)
