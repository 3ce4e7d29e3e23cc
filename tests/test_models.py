"""StableDiffusion: presets vs the official manifests, loading and saving both formats, checked by code
we did not write (diffusers' save_pretrained / from_pretrained and its single-file converters,
transformers' CLIP), and the error paths of StableDiffusion.load.

Every comparison runs the same input through minivid and the oracle; tolerance 1e-5 (fp32).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import pytest
import safetensors.torch
import torch
import torch.nn as nn

from minivid import weights as W
from minivid.clip import CLIPTextConfig
from minivid.models import METADATA_KEY, SD_PRESETS, SDConfig, StableDiffusion
from minivid.tokenizer import load_bpe
from minivid.unet import UNetConfig
from minivid.vae import VAEConfig

from _builders import max_err, randomize_

TOL = 1e-5
PROMPTS = ["a photo of a cat", "an astronaut riding a horse, highly detailed", ""]
SD2_PREFIX = "cond_stage_model.model."


def strip(d: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


def inputs(sd: StableDiffusion, seed: int = 0):
    """(latents [2, 4, 8, 8], timesteps [2], context [2, 77, D], images [2, 3, 32, 32], token ids)."""
    g = torch.Generator().manual_seed(seed)
    D = sd.config.text.width
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, D, generator=g),
            torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, sd.tokenizer(PROMPTS))


def hf_tokenizer(tmp_path, pad: str):
    from transformers import CLIPTokenizer

    vocab, merges = load_bpe()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                         encoding="utf-8")
    return CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"), pad_token=pad)


def assert_components_equal(sd: StableDiffusion, unet, vae, text, hidden=lambda out: out.last_hidden_state):
    """minivid's components against diffusers/transformers modules on the same inputs."""
    x, t, ctx, img, ids = inputs(sd)
    with torch.no_grad():
        assert max_err(sd.unet(x, t, ctx), unet(x, t, encoder_hidden_states=ctx).sample) <= TOL
        ours, theirs = sd.vae.encode(img), vae.encode(img).latent_dist
        assert max_err(ours.mean, theirs.mean) <= TOL and max_err(ours.std, theirs.std) <= TOL
        assert max_err(sd.vae.decode(x), vae.decode(x).sample) <= TOL
        assert max_err(sd.text_encoder(ids), hidden(text(input_ids=ids, output_hidden_states=True))) <= TOL


# ---------------------------------------------------------------- configs and presets

@pytest.mark.parametrize("preset, manifest", [("sd14", "sd-v1-4"), ("sd21", "sd-v2-1"), ("sd21_base", "sd-v2-1")])
def test_full_size_presets_equal_the_manifests(preset, manifest):
    """Built on the meta device: every official tensor name and shape, nothing else; only the listed
    harmless extras (schedule buffers, model_ema scalars, position_ids) are absent."""
    sd = StableDiffusion.from_config(preset, device="meta")
    report = W.compare_to_manifest(sd.original_state_dict(), manifest)
    assert report.ok, report.summary()
    assert all(W.is_harmless(k) for k in report.missing_optional)
    assert report.extra_harmless == []


def test_presets():
    assert SDConfig.preset("sd14").kind == "sd1" and SDConfig.preset("sd14").pad == "end"
    for name in ("sd21", "sd21_base", "tiny_sd2"):
        cfg = SDConfig.preset(name)
        assert cfg.kind == "sd2" and cfg.pad == "zero" and cfg.text.conditioning_layer == "penultimate"
    assert SDConfig.preset("sd21").prediction == "v" and SDConfig.preset("sd21").image_size == 768
    assert SDConfig.preset("sd21_base").prediction == "eps"
    assert SDConfig.preset("tiny_sd2").unet.prediction == "v" and SDConfig.preset("tiny").prediction == "eps"
    for name, cfg in SD_PRESETS.items():
        assert SDConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, name
    with pytest.raises(ValueError, match="unknown Stable Diffusion preset"):
        SDConfig.preset("sd3")
    with pytest.raises(ValueError, match="context_dim"):
        SDConfig(UNetConfig.preset("tiny_sd2"), VAEConfig.preset("tiny"), CLIPTextConfig.preset("tiny_sd1"))
    with pytest.raises(ValueError, match="prediction"):
        SDConfig.preset("tiny", prediction="sample")


def test_from_config_is_deterministic_and_every_layer_is_random():
    a, b = StableDiffusion.from_config("tiny", seed=3), StableDiffusion.from_config("tiny", seed=3)
    c = StableDiffusion.from_config("tiny", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["unet.out.2.weight"], sc["unet.out.2.weight"])
    assert sa["unet.out.2.weight"].abs().max() > 0                      # ldm zero-inits it; "random" does not
    default = StableDiffusion.from_config("tiny", init="default")
    assert default.unet.out[2].weight.abs().max() == 0
    assert a.kind == "sd1" and a.prediction == "eps" and a.latent_scale == 0.18215


def test_public_api_shapes(tiny_sd):
    sd = tiny_sd("tiny_sd2", seed=5)
    ids = sd.tokenizer(["a prompt"])
    assert ids.dtype == torch.long and ids.shape == (1, 77) and int(ids[0, -1]) == 0   # SD 2 pads with 0
    with torch.no_grad():
        ctx = sd.text_encoder(ids)
        assert ctx.shape == (1, 77, 48) and torch.equal(ctx, sd.encode_prompt("a prompt"))
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        z = sd.encode_images(x)
        assert z.shape == (1, 4, 8, 8) and torch.allclose(z, sd.vae.encode(x).mean * sd.latent_scale)
        assert sd.unet(z, 500, ctx).shape == z.shape
        img = sd.decode_latents(z)
        assert img.shape == x.shape and img.abs().max() <= 1
    import minivid
    assert minivid.StableDiffusion is StableDiffusion


# ---------------------------------------------------------------- diffusers folders

def diffusers_pipeline(kind: str, tmp_path):
    """Tiny diffusers/transformers components, written independently of minivid's config mapping."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFConfig, CLIPTextModel

    common = dict(sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    if kind == "sd1":
        unet = UNet2DConditionModel(**common, attention_head_dim=2, cross_attention_dim=32)
        text = HFConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        hidden_act="quick_gelu", vocab_size=49408, max_position_embeddings=77)
        pad, prediction = "<|endoftext|>", "epsilon"
    else:  # SD 2 layout: heads of a fixed width (16), Linear projections, 2 blocks per transformer, upcast
        unet = UNet2DConditionModel(**common, attention_head_dim=(2, 4, 4), cross_attention_dim=48,
                                    use_linear_projection=True, transformer_layers_per_block=2, upcast_attention=True)
        text = HFConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        hidden_act="gelu", vocab_size=49408, max_position_embeddings=77)
        pad, prediction = "!", "v_prediction"
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4, sample_size=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction)
    (tmp_path / "tok").mkdir()
    return StableDiffusionPipeline(
        vae=randomize_(vae, 1), text_encoder=randomize_(CLIPTextModel(text), 2), tokenizer=hf_tokenizer(tmp_path / "tok", pad),
        unet=randomize_(unet, 3), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_folder_written_by_diffusers_loads_with_equal_outputs(kind, tmp_path):
    pipe = diffusers_pipeline(kind, tmp_path)
    pipe.save_pretrained(tmp_path / "pipe")
    sd = StableDiffusion.load(tmp_path / "pipe")
    assert sd.kind == kind and sd.prediction == ("eps" if kind == "sd1" else "v")
    assert sd.tokenizer.pad == ("end" if kind == "sd1" else "zero")
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(sd.tokenizer(PROMPTS), ids)
    assert_components_equal(sd, pipe.unet, pipe.vae, pipe.text_encoder)


@pytest.mark.parametrize("preset", ["tiny", "tiny_sd2"])
def test_minivid_diffusers_folder_loads_in_diffusers_with_equal_outputs(preset, tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    sd = tiny_sd(preset, seed=5)
    sd.save(tmp_path / "pipe", format="diffusers")
    assert sorted(p.name for p in (tmp_path / "pipe" / "tokenizer").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.scheduler.config.prediction_type == ("epsilon" if sd.prediction == "eps" else "v_prediction")
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(sd.tokenizer(PROMPTS), ids)
    assert_components_equal(sd, pipe.unet, pipe.vae, pipe.text_encoder)
    back = StableDiffusion.load(tmp_path / "pipe")        # and back into minivid
    assert back.prediction == sd.prediction and back.tokenizer.pad == sd.tokenizer.pad
    assert_components_equal(back, pipe.unet, pipe.vae, pipe.text_encoder)
    if preset == "tiny_sd2":   # 23-of-24 rule at tiny size: the folder holds the blocks SD 2 runs
        assert back.config.text.layers == sd.config.text.layers - 1
        assert back.config.text.conditioning_layer == "last" and not hasattr(back.text_encoder, "text_projection")


# ---------------------------------------------------------------- original single files

def ldm_configs(cfg: SDConfig) -> dict:
    """The ldm inference-yaml parameters `cfg` stands for, as diffusers' converters read them."""
    u = cfg.unet
    unet = dict(in_channels=u.in_channels, out_channels=u.out_channels, model_channels=u.model_channels,
                channel_mult=list(u.channel_mult), num_res_blocks=u.num_res_blocks,
                attention_resolutions=list(u.attention_resolutions), context_dim=u.context_dim,
                use_linear_in_transformer=u.use_linear_in_transformer, transformer_depth=u.transformer_depth)
    unet.update({"num_heads": u.num_heads} if u.num_heads else {"num_head_channels": u.num_head_channels})
    v = cfg.vae
    ddconfig = dict(ch=v.ch, ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks, in_channels=v.in_channels,
                    out_ch=v.out_ch, z_channels=v.z_channels)
    return {"model": {"params": {"unet_config": {"params": unet}, "scale_factor": cfg.latent_scale,
                                 "first_stage_config": {"params": {"ddconfig": ddconfig}}}}}


def converted_by_diffusers(path, cfg: SDConfig):
    """The file's UNet, VAE and text encoder in diffusers/transformers models, through diffusers' own
    single-file converters (code minivid did not write)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint, create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm)
    from transformers import CLIPTextConfig as HFConfig, CLIPTextModel

    ckpt = safetensors.torch.load_file(str(path))
    original = ldm_configs(cfg)
    ucfg = create_unet_diffusers_config_from_ldm(original, ckpt, image_size=32)
    ucfg["upcast_attention"] = cfg.unet.upcast_attention
    unet = UNet2DConditionModel(**ucfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, ucfg), strict=True)
    vcfg = create_vae_diffusers_config_from_ldm(original, ckpt, image_size=32)
    vae = AutoencoderKL(**vcfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vcfg), strict=True)
    t = cfg.text
    text = CLIPTextModel(HFConfig(hidden_size=t.width, intermediate_size=t.mlp_width, num_hidden_layers=t.layers,
                                  num_attention_heads=t.heads, hidden_act=t.act, vocab_size=t.vocab_size,
                                  max_position_embeddings=t.context_length))
    if cfg.kind == "sd1":
        text_sd = convert_ldm_clip_checkpoint(ckpt)
    else:
        text_sd = convert_open_clip_checkpoint(text, ckpt, prefix=SD2_PREFIX)
    text.load_state_dict(strip(text_sd, "text_model."), strict=True)
    return unet.eval(), vae.eval(), text.eval()


@pytest.mark.parametrize("preset", ["tiny", "tiny_sd2"])
def test_original_file_round_trip_and_diffusers_converters(preset, tiny_sd, tmp_path):
    sd = tiny_sd(preset, seed=5)
    path = sd.save(tmp_path / "model.safetensors")
    back = StableDiffusion.load(path)
    assert back.config == sd.config
    ours, theirs = sd.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    names = set(safetensors.torch.load_file(str(path)))
    assert names == set(sd.original_state_dict())
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in names)
    unet, vae, text = converted_by_diffusers(path, sd.config)
    if sd.kind == "sd1":
        assert_components_equal(back, unet, vae, text)
    else:  # SD 2 conditions on the penultimate block followed by the final LayerNorm
        assert_components_equal(back, unet, vae, text, lambda out: text.final_layer_norm(out.hidden_states[-2]))


def rule_following(kind: str) -> SDConfig:
    """Tiny widths that follow SD's head rules (UNet: 8 heads / 64-wide heads; text: 12 / 16 heads),
    so a file without metadata can be read like an official one."""
    vae = VAEConfig.preset("tiny")
    if kind == "sd1":
        return SDConfig(UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(1, 2), num_heads=8,
                                   context_dim=96),
                        vae, CLIPTextConfig("openai", width=96, layers=2, heads=12, mlp_width=384, act="quick_gelu"))
    return SDConfig(UNetConfig(model_channels=64, channel_mult=(1, 2, 2), attention_resolutions=(1, 2), num_heads=None,
                               num_head_channels=64, context_dim=128, use_linear_in_transformer=True,
                               upcast_attention=True),
                    vae, CLIPTextConfig("openclip", width=128, layers=3, heads=16, mlp_width=512, act="gelu",
                                        conditioning_layer="penultimate", projection_dim=128),
                    pad="zero", prediction="v", image_size=768)


@pytest.mark.parametrize("kind, name, prediction", [
    ("sd1", "sd-v1-4.safetensors", "eps"),
    ("sd2", "v2-1_768-ema-pruned.safetensors", "v"),
    ("sd2", "v2-1_512-ema-pruned.safetensors", "eps"),
])
def test_official_style_file_without_metadata(kind, name, prediction, tmp_path, caplog):
    """Configuration from the shapes and SD's rules; ε/v from the file name (and logged)."""
    sd = StableDiffusion.from_config(rule_following(kind), seed=2)
    path = tmp_path / name
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.original_state_dict().items()}, str(path))
    with caplog.at_level(logging.INFO, logger="minivid.models"):
        back = StableDiffusion.load(path)
    assert back.prediction == prediction and f"{prediction}-prediction" in caplog.text
    assert ("SD 1.x is trained with epsilon" if kind == "sd1" else "file name") in caplog.text
    expected = sd.config
    if kind == "sd2" and prediction == "eps":   # the rule: upcast attention for v-models only; 512 pixels
        expected = dataclasses.replace(sd.config, unet=dataclasses.replace(sd.config.unet, upcast_attention=False),
                                       prediction="eps", image_size=512)
    assert back.config == expected
    assert all(torch.equal(a, b) for a, b in zip(sd.state_dict().values(), back.state_dict().values()))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="minivid.models"):
        forced = StableDiffusion.load(path, prediction="v")
    assert forced.prediction == "v" and "the prediction= argument" in caplog.text


def test_prediction_argument_overrides_the_file_with_a_warning(tiny_sd, tmp_path, caplog):
    path = tiny_sd("tiny", seed=5).save(tmp_path / "tiny.safetensors")
    with caplog.at_level(logging.INFO, logger="minivid.models"):
        sd = StableDiffusion.load(path, prediction="v")
    assert sd.prediction == "v" and sd.unet.cfg.prediction == "v"
    assert "overrides the minivid config in the file's metadata" in caplog.text


def test_tiny_official_names_checkpoint_loads(tmp_path):
    """`minivid inspect --write-tiny`'s fp16 files (official names, SD proportions) load into fp32; the config
    in their metadata gives the head counts (the SD 2 rule, 64-wide heads, does not fit 32 channels)."""
    from minivid.weights.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path, "sd-v1-4")
    sd = StableDiffusion.load(path)
    assert sd.kind == "sd1" and sd.dtype == torch.float32 and sd.config.unet.model_channels == 32
    assert sd.config.text.width == 96 and sd.config.text.layers == 12 and sd.config.vae.ch_mult == (1, 2, 4, 4)
    file = safetensors.torch.load_file(str(path))
    assert torch.equal(sd.unet.out[2].weight, file["model.diffusion_model.out.2.weight"].float())
    sd2_path = write_tiny_checkpoint(tmp_path, "sd-v2-1")
    sd2 = StableDiffusion.load(sd2_path)
    assert sd2.kind == "sd2" and sd2.prediction == "v" and sd2.config.unet.num_head_channels == 8
    assert sd2.config.text.heads == 16 and sd2.config.text.width == 128
    bare = tmp_path / "no-metadata.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(str(sd2_path)), str(bare))
    with pytest.raises(W.WeightsError, match="config="):        # SD 2 rule: 64-wide heads do not fit 32 channels
        StableDiffusion.load(bare)


def test_tiny_svd_checkpoint_loads(tmp_path):
    from minivid.svd import StableVideoDiffusion
    from minivid.weights.tiny import tiny_svd_config, write_tiny_checkpoint

    svd = StableVideoDiffusion.load(write_tiny_checkpoint(tmp_path, "svd"))
    assert svd.config == tiny_svd_config("svd") and svd.load_info["conditioning_encoder_difference"] == 0.0


def test_half_precision_files_load_into_any_dtype(tiny_sd, tmp_path):
    sd = tiny_sd("tiny_sd2", seed=5)
    path = sd.save(tmp_path / "half.safetensors", dtype=torch.float16)
    assert {str(v.dtype) for v in safetensors.torch.load_file(str(path)).values()} == {"torch.float16"}
    full = StableDiffusion.load(path, dtype=torch.float32)
    ref = sd.state_dict()
    assert all(v.dtype == torch.float32 and torch.equal(v, ref[k].half().float()) for k, v in full.state_dict().items())
    bf16 = StableDiffusion.load(path, dtype=torch.bfloat16)
    assert {v.dtype for v in bf16.state_dict().values()} == {torch.bfloat16}
    with torch.no_grad():
        x, t, ctx, _, _ = inputs(bf16)
        assert torch.isfinite(bf16.unet(x, t, ctx)).all()


# ---------------------------------------------------------------- errors surface through load

def test_load_errors(tiny_sd, tmp_path):
    sd = tiny_sd("tiny", seed=5)
    with pytest.raises(W.WeightsError, match="no such file"):
        StableDiffusion.load(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(W.WeightsError, match="no model weights"):
        StableDiffusion.load(tmp_path / "empty")
    safetensors.torch.save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(tmp_path / "bert.safetensors"))
    with pytest.raises(W.WeightsError, match="not a Stable Diffusion"):
        StableDiffusion.load(tmp_path / "bert.safetensors")

    path = sd.save(tmp_path / "tiny.safetensors")
    tensors = safetensors.torch.load_file(str(path))
    meta = {METADATA_KEY: json.dumps(sd.config.to_dict())}
    gone = dict(tensors)
    del gone["model.diffusion_model.middle_block.1.proj_out.weight"]
    safetensors.torch.save_file(gone, str(tmp_path / "missing_key.safetensors"), metadata=meta)
    with pytest.raises(W.WeightsError, match=r"missing.*middle_block\.1\.proj_out\.weight"):
        StableDiffusion.load(tmp_path / "missing_key.safetensors")
    bent = dict(tensors)
    bent["first_stage_model.quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    safetensors.torch.save_file(bent, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(W.WeightsError, match=r"quant_conv\.weight"):
        StableDiffusion.load(tmp_path / "shape.safetensors")
    stray = dict(tensors, **{"conditioner.embedders.1.model.ln_final.weight": torch.ones(4)})
    safetensors.torch.save_file(stray, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(W.WeightsError, match="SDXL"):
        StableDiffusion.load(tmp_path / "sdxl.safetensors")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(W.WeightsError, match="truncated"):
        StableDiffusion.load(tmp_path / "cut.safetensors")
    with pytest.raises(W.WeightsError, match="config is sd2"):
        StableDiffusion.load(path, config=SDConfig.preset("tiny_sd2"))


def test_folder_errors(tiny_sd, tmp_path):
    sd = tiny_sd("tiny", seed=5)
    folder = sd.save(tmp_path / "pipe", format="diffusers")
    with pytest.raises(W.WeightsError, match="one component"):
        StableDiffusion.load(folder / "unet")
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "unet" / "config.json").read_text())
    (bad / "unet" / "config.json").write_text(json.dumps({**cfg, "act_fn": "gelu"}))
    with pytest.raises(W.WeightsError, match="act_fn"):
        StableDiffusion.load(bad)
    (bad / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (bad / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(W.WeightsError, match="no model weights"):
        StableDiffusion.load(bad)
    sched = bad.parent / "sched"
    shutil.copytree(folder, sched)
    (sched / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "sample"}))
    with pytest.raises(W.WeightsError, match="prediction_type"):
        StableDiffusion.load(sched)


def test_save_errors(tiny_sd, tmp_path):
    sd = tiny_sd("tiny", seed=5)
    path = sd.save(tmp_path / "a.safetensors")
    with pytest.raises(FileExistsError):
        sd.save(path)
    assert sd.save(path, overwrite=True) == path
    with pytest.raises(ValueError, match="format"):
        sd.save(tmp_path / "b", format="ckpt")
    with pytest.raises(ValueError, match=".safetensors"):
        sd.save(tmp_path / "c.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]   # no temporary files left behind


def test_config_argument(tiny_sd, tmp_path):
    """config= replaces the inferred configuration and states the prediction (an argument still wins)."""
    sd = tiny_sd("tiny_sd2", seed=5)
    folder = sd.save(tmp_path / "pipe", format="diffusers")
    cfg = StableDiffusion.load(folder).config
    assert StableDiffusion.load(folder, config=cfg).config == cfg
    assert StableDiffusion.load(folder, config=cfg, prediction="eps").prediction == "eps"
    path = sd.save(tmp_path / "m.safetensors")
    assert StableDiffusion.load(path, config=sd.config).config == sd.config
