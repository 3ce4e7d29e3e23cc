"""Stable Video Diffusion as a whole: the full pipeline against diffusers' StableVideoDiffusionPipeline with
fixed noise, official key sets at full size, the original <-> diffusers round trip (diffusers has no SVD
single-file converter, so the mapping is checked through a saved folder that diffusers itself loads),
loading errors, conditioning details, and `minivid animate --tiny`.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn as nn
from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                       UNetSpatioTemporalConditionModel)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

import minivid
from minivid.pipelines.svd import image_to_video
from minivid.svd import SVD_SCHEDULER_CONFIG, SVDConfig, StableVideoDiffusion
from minivid.vae import AutoencoderKL, VAEConfig
from minivid.weights import WeightsError, load_manifest
from minivid.weights.diffusers_names import original_to_diffusers
from minivid.weights.svd_names import SVD_KNOWN_EXTRAS, identity_quant_conv

from _builders import max_err

PIPE_TOL = 1e-4
TOL = 1e-5


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mix_factor"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim <= 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model.eval()


def sgm_groupnorm_eps_(unet: nn.Module) -> nn.Module:
    """diffusers builds some video ResBlocks with GroupNorm eps 1e-6; sgm uses 1e-5 (test_unet_video.py)."""
    for name, m in unet.named_modules():
        if isinstance(m, nn.GroupNorm) and ".resnets." in name:
            m.eps = 1e-5
    return unet


def diffusers_pipeline(svd: StableVideoDiffusion) -> StableVideoDiffusionPipeline:
    """The oracle pipeline, built from tiny diffusers/transformers components holding minivid's weights."""
    from minivid.svd import _unet_config_to_diffusers, _vae_config_to_diffusers, _vision_config_to_transformers

    cfg = svd.config
    plain = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    unet = UNetSpatioTemporalConditionModel(**plain(_unet_config_to_diffusers(cfg.unet))).eval()
    unet.load_state_dict(original_to_diffusers("svd_unet", svd.unet.state_dict()), strict=True)
    vae = AutoencoderKLTemporalDecoder(**plain(_vae_config_to_diffusers(cfg.vae, cfg.latent_scale))).eval()
    vae.load_state_dict({**original_to_diffusers("svd_vae", svd.vae.state_dict()),
                         **identity_quant_conv(cfg.vae.embed_dim)}, strict=True)
    vision = {k: v for k, v in _vision_config_to_transformers(cfg.vision).items()
              if k not in ("architectures", "model_type", "torch_dtype")}
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)).eval()
    encoder.load_state_dict(original_to_diffusers("svd_image_encoder", svd.image_encoder.state_dict()), strict=True)
    pipe = StableVideoDiffusionPipeline(
        vae=vae, image_encoder=encoder, unet=sgm_groupnorm_eps_(unet),
        scheduler=EulerDiscreteScheduler.from_config(SVD_SCHEDULER_CONFIG), feature_extractor=CLIPImageProcessor(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomize_(StableVideoDiffusion.from_config("tiny"))


@pytest.fixture(scope="module")
def picture():
    """A uint8 RGB picture and the same in minivid's [-1, 1] layout (diffusers' arithmetic)."""
    arr = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    image = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255.0 * 2.0 - 1.0
    return arr, image


# ---------------------------------------------------------------- whole pipeline

@pytest.mark.parametrize("steps, frames, max_guidance, chunk, size", [(8, 4, 3.0, 3, (64, 96)), (4, 3, 1.0, None, (40, 72))])
def test_pipeline_parity_with_diffusers(tiny, picture, steps, frames, max_guidance, chunk, size):
    """Same image, same noise-augmentation draw (generator), same initial latents: frames agree.
    Case 1: frame-wise CFG ramp 1 -> 3, decoding in pieces of 3 frames; case 2: no guidance, and a
    latent (10×18) the UNet's downsampling does not divide (upsamplers meet their skips' size)."""
    import PIL.Image

    H, W = size
    arr, image = picture[0][:H, :W], picture[1][..., :H, :W]
    pipe = diffusers_pipeline(tiny)
    latents = torch.randn(1, frames, 4, H // 4, W // 4, generator=torch.Generator().manual_seed(1))
    kw = dict(num_frames=frames, num_inference_steps=steps, fps=9, motion_bucket_id=60, noise_aug_strength=0.1,
              max_guidance_scale=max_guidance, decode_chunk_size=chunk)
    with torch.no_grad():
        ref = pipe(PIL.Image.fromarray(np.ascontiguousarray(arr)), height=H, width=W, generator=torch.Generator().manual_seed(3),
                   latents=latents, output_type="pt", **kw).frames                       # [B, F, 3, H, W] in [0, 1]
    out = image_to_video(tiny, image, num_frames=frames, num_steps=steps, max_guidance=max_guidance, fps=9,
                         motion_bucket_id=60, noise_aug_strength=0.1, decode_chunk_size=chunk,
                         generator=torch.Generator().manual_seed(3), latents=latents, progress=False)
    ours = (out.frames / 2 + 0.5).clamp(0, 1)
    assert max_err(ours, ref) <= PIPE_TOL
    assert ref.std() > 0.05 and ours.shape == (1, frames, 3, H, W)


# ---------------------------------------------------------------- official format

@pytest.mark.parametrize("preset", ["svd", "svd_xt"])
def test_full_size_presets_equal_the_manifests(preset):
    """The three networks carry exactly the official names and shapes; the only official tensors
    minivid does not hold are the listed extra (sgm's conditioning-VAE copy)."""
    with torch.device("meta"):
        svd = StableVideoDiffusion(preset)
    ours = {k: tuple(v.shape) for k, v in svd.original_state_dict().items()}
    official = {k: tuple(s) for k, (s, _) in load_manifest(preset).tensors.items()}
    extras = {k for k in official if k not in ours}
    assert extras and all(k.startswith(tuple(p.rstrip("*") for p in SVD_KNOWN_EXTRAS)) for k in extras)
    assert len(extras) == 248
    assert ours == {k: s for k, s in official.items() if k not in extras}
    assert svd.num_frames == (25 if preset == "svd_xt" else 14)


def test_round_trip_original_to_diffusers_folder(tiny, tmp_path):
    """original file -> minivid -> diffusers folder -> diffusers' own from_pretrained: every network
    gives minivid's outputs; and the folder loads back into minivid."""
    file = tiny.save(tmp_path / "tiny_svd.safetensors", format="original")
    loaded = StableVideoDiffusion.load(file)
    assert loaded.load_info["format"] == "original" and loaded.config == tiny.config
    ref_sd = tiny.original_state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in loaded.original_state_dict().items())
    folder = loaded.save(tmp_path / "diffusers", format="diffusers")
    pipe = StableVideoDiffusionPipeline.from_pretrained(folder)
    sgm_groupnorm_eps_(pipe.unet)
    assert pipe.unet.config.num_frames == tiny.num_frames

    x = torch.randn(2, 3, 8, 16, 24)
    c_noise, embeds, ids = torch.tensor([0.2, -0.4]), torch.randn(2, 1, 32), torch.tensor([[6.0, 127, 0.02]] * 2)
    pixels = torch.randn(2, 3, 224, 224)
    image = torch.rand(3, 3, 32, 48) * 2 - 1
    z = torch.randn(6, 4, 8, 12)
    with torch.no_grad():
        assert max_err(tiny.unet(x, c_noise, embeds, ids), pipe.unet(x, c_noise, embeds, ids).sample) <= TOL
        assert max_err(tiny.image_encoder(pixels), pipe.image_encoder(pixels).image_embeds) <= TOL
        assert max_err(tiny.vae.encode(image).mean, pipe.vae.encode(image).latent_dist.mean) <= TOL
        assert max_err(tiny.vae.decode(z, num_frames=3), pipe.vae.decode(z, num_frames=3).sample) <= TOL

    back = StableVideoDiffusion.load(folder)
    assert back.load_info["format"] == "diffusers" and back.config.unet == tiny.config.unet
    with torch.no_grad():
        assert torch.equal(back.unet(x, c_noise, embeds, ids), tiny.unet(x, c_noise, embeds, ids))
        assert torch.equal(back.image_encoder(pixels), tiny.image_encoder(pixels))
    with pytest.raises(WeightsError, match="text tower's leftovers"):
        back.save(tmp_path / "again.safetensors", format="original")


def _tiny_cond_vae(svd: StableVideoDiffusion, perturb: float = 0.0) -> dict[str, torch.Tensor]:
    """An sgm-style conditioning-VAE copy: the first-stage encoder with an explicit quant_conv Q
    (a scaled permutation, exactly invertible) whose inverse is folded into conv_out."""
    cfg = svd.config.vae
    copy = AutoencoderKL(VAEConfig(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks))
    sd = copy.state_dict()
    sd.update({k: v.clone() for k, v in svd.vae.state_dict().items() if k.startswith("encoder.")})
    n = 2 * cfg.z_channels
    perm = torch.eye(n)[torch.randperm(n)]
    q, q_inv = 2.0 * perm, 0.5 * perm.T
    sd["quant_conv.weight"], sd["quant_conv.bias"] = q[:, :, None, None], torch.zeros(n)
    sd["encoder.conv_out.weight"] = torch.einsum("oi,ichw->ochw", q_inv, sd["encoder.conv_out.weight"])
    sd["encoder.conv_out.bias"] = q_inv @ sd["encoder.conv_out.bias"]
    if perturb:
        sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"] + perturb
    return {"conditioner.embedders.3.encoder." + k: v for k, v in sd.items()}


def test_conditioning_vae_copy_is_compared_with_the_first_stage(tiny, tmp_path, caplog):
    import safetensors.torch

    from minivid.svd import CONFIG_METADATA_KEY

    meta = {CONFIG_METADATA_KEY: tiny.config.to_json()}
    same, other = tmp_path / "svd_same.safetensors", tmp_path / "svd_other.safetensors"
    base = {k: v.contiguous() for k, v in tiny.original_state_dict().items()}
    safetensors.torch.save_file({**base, **_tiny_cond_vae(tiny)}, str(same), metadata=meta)
    safetensors.torch.save_file({**base, **_tiny_cond_vae(tiny, perturb=0.01)}, str(other), metadata=meta)
    with caplog.at_level(logging.INFO, logger="minivid.svd"):
        assert StableVideoDiffusion.load(same).load_info["conditioning_encoder_difference"] == 0.0
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert StableVideoDiffusion.load(other).load_info["conditioning_encoder_difference"] > 1e-3
    assert any("conditioner.embedders.3" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_loading_errors(tiny, tmp_path):
    import safetensors.torch

    from minivid.svd import CONFIG_METADATA_KEY

    meta = {CONFIG_METADATA_KEY: tiny.config.to_json()}
    base = {k: v.contiguous() for k, v in tiny.original_state_dict().items()}

    sd_like = tmp_path / "sd.safetensors"
    safetensors.torch.save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
                                 "cond_stage_model.transformer.text_model.x": torch.zeros(1)}, str(sd_like))
    with pytest.raises(WeightsError, match="not a Stable Video Diffusion checkpoint"):
        StableVideoDiffusion.load(sd_like)

    extra = tmp_path / "svd_extra.safetensors"
    safetensors.torch.save_file({**base, "conditioner.embedders.9.mystery": torch.zeros(2)}, str(extra), metadata=meta)
    with pytest.raises(WeightsError, match="belong to no component"):
        StableVideoDiffusion.load(extra)

    missing = tmp_path / "svd_missing.safetensors"
    dropped = "model.diffusion_model.input_blocks.1.1.time_stack.0.attn1.to_q.weight"
    safetensors.torch.save_file({k: v for k, v in base.items() if k != dropped}, str(missing), metadata=meta)
    with pytest.raises(WeightsError, match="1 missing"):
        StableVideoDiffusion.load(missing)

    full = tmp_path / "svd_tiny_but_official_name.safetensors"
    safetensors.torch.save_file(base, str(full))                        # no config metadata: the official preset
    with pytest.raises(WeightsError, match="with another shape"):
        StableVideoDiffusion.load(full)

    folder = tiny.save(tmp_path / "folder", format="diffusers")
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    vae_sd = safetensors.torch.load_file(str(vae_file))
    vae_sd["quant_conv.weight"] = vae_sd["quant_conv.weight"] * 1.5
    safetensors.torch.save_file(vae_sd, str(vae_file))
    with pytest.raises(WeightsError, match="quant_conv is not the identity"):
        StableVideoDiffusion.load(folder)

    with pytest.raises(ValueError, match="format must be"):
        tiny.save(tmp_path / "x", format="ckpt")
    with pytest.raises(ValueError, match="unknown SVD preset"):
        StableVideoDiffusion.from_config("sd14")


# ---------------------------------------------------------------- conditioning and decoding

def test_conditioning_matches_its_definition(tiny, picture):
    _, image = picture
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        latent = tiny.encode_condition(image, 0.3, generator=torch.Generator().manual_seed(5))
        assert torch.equal(latent, tiny.vae.encode(image + 0.3 * noise).mean)          # posterior mode, unscaled
        embeds = tiny.encode_image(image)
    assert tuple(embeds.shape) == (1, 1, 32)
    assert tiny.added_time_ids(7, 127, 0.02, batch=2).tolist() == [[6.0, 127.0, 0.019999999552965164]] * 2


def test_decode_latents_chunking(tiny):
    latents = torch.randn(2, 3, 4, 8, 12)
    with torch.no_grad():
        full = tiny.decode_latents(latents)
        assert torch.allclose(tiny.decode_latents(latents, decode_chunk_size=3), full, atol=1e-6)
        pieces = tiny.decode_latents(latents, decode_chunk_size=2)                      # pieces straddle clips
    assert full.shape == (2, 3, 3, 32, 48) and max_err(pieces, full) > 1e-4


def test_bf16_pipeline_runs_and_stays_close(tiny, picture):
    _, image = picture
    half = StableVideoDiffusion(tiny.config)
    half.load_state_dict(tiny.state_dict())
    half = half.to(torch.bfloat16).eval()
    latents = torch.randn(1, 3, 4, 16, 24, generator=torch.Generator().manual_seed(2))
    kw = dict(num_frames=3, num_steps=3, latents=latents, progress=False)
    ref = image_to_video(tiny, image, generator=torch.Generator().manual_seed(0), **kw)
    out = image_to_video(half, image, generator=torch.Generator().manual_seed(0), **kw)
    assert out.latents.dtype == torch.bfloat16 and torch.isfinite(out.frames).all()
    assert (out.frames - ref.frames).abs().mean() / ref.frames.abs().mean() < 0.1       # mean relative error


def test_pipeline_input_errors(tiny, picture):
    _, image = picture
    with pytest.raises(ValueError, match="not a positive multiple of 4"):
        image_to_video(tiny, image[..., :62], num_frames=2, num_steps=2, progress=False)
    with pytest.raises(ValueError, match="latents must be"):
        image_to_video(tiny, image, num_frames=2, num_steps=2, latents=torch.zeros(1, 3, 4, 16, 24), progress=False)


def test_public_name_resolves():
    assert minivid.StableVideoDiffusion is StableVideoDiffusion
    assert SVDConfig.preset("svd_xt").num_frames == 25


# ---------------------------------------------------------------- command line

def test_animate_tiny_demo(tmp_path):
    from minivid.cli import main

    out = tmp_path / "job"
    assert main(["animate", "--tiny", "--frames", "3", "--steps", "2", "--out", str(out)]) == 0
    for name in ("result.mp4", "grid.png", "source.png", "source_result.mp4", "record.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    record = json.loads((out / "record.json").read_text())
    assert record["results"]["frames"] == 3 and record["results"]["fps_id"] == 6      # non-finite latents raise
    assert record["ran"] == {"model": "tiny", "dtype": "fp32", "device": "cpu", "frames": 3, "size": [48, 64]}
    assert main(["animate", "--out", str(tmp_path / "none")]) == 1                      # neither --weights nor --tiny


def test_full_size_tables_give_the_diffusers_models_names_and_shapes():
    """On the meta device: the official-size networks renamed by the svd_* tables have exactly the tensor
    names and shapes of diffusers' / transformers' SVD components at their official configs."""
    from minivid.svd import _unet_config_to_diffusers, _vae_config_to_diffusers, _vision_config_to_transformers

    plain = lambda d: {k: v for k, v in d.items() if not k.startswith("_")}  # noqa: E731
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items()}  # noqa: E731
    cfg = SVDConfig.preset("svd_xt")
    vision = {k: v for k, v in _vision_config_to_transformers(cfg.vision).items()
              if k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device("meta"):
        ours = StableVideoDiffusion(cfg)
        unet = UNetSpatioTemporalConditionModel(**plain(_unet_config_to_diffusers(cfg.unet)))
        vae = AutoencoderKLTemporalDecoder(**plain(_vae_config_to_diffusers(cfg.vae, cfg.latent_scale)))
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
    assert list(unet.config.num_attention_heads) == [5, 10, 20, 20] and unet.config.num_frames == 25
    assert shapes(original_to_diffusers("svd_unet", ours.unet.state_dict())) == shapes(unet.state_dict())
    vae_sd = {**original_to_diffusers("svd_vae", ours.vae.state_dict()), **identity_quant_conv(4)}
    assert shapes(vae_sd) == shapes(vae.state_dict())
    assert shapes(original_to_diffusers("svd_image_encoder", ours.image_encoder.state_dict())) == shapes(encoder.state_dict())
