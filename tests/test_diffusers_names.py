"""The diffusers rename tables, checked against code we did not write: diffusers' own
single-file converters and diffusers/transformers models.

Full size: the official manifests become meta tensors (no memory); diffusers' converters
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`) and our tables must give the same names and shapes, which must
be those of the diffusers models built on the meta device; converting back must give the
manifest again, minus the listed tensors the diffusers format does not hold.
Tiny size: random weights of diffusers models round-trip exactly, value for value.
"""
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as sfu
from transformers import CLIPTextConfig, CLIPTextModel

import minivid
from minivid import weights as W
from minivid.weights import TextSD2Layout, WeightsError

CONFIGS = Path(minivid.__file__).parent / "configs"
UNET, VAE = "model.diffusion_model.", "first_stage_model."
TEXT = {"sd-v1-4": "cond_stage_model.transformer.", "sd-v2-1": "cond_stage_model.model."}
TEXT_TABLE = {"sd-v1-4": "text_sd1", "sd-v2-1": "text_sd2"}
YAML = {"sd-v1-4": "v1-inference.yaml", "sd-v2-1": "v2-inference-v.yaml"}
# the diffusers text encoders of the official repos (CompVis/stable-diffusion-v1-4, stabilityai/stable-diffusion-2-1)
HF_TEXT = {
    "sd-v1-4": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "sd-v2-1": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                    hidden_act="gelu"),
}


def _meta_checkpoint(name):
    return {k: torch.empty(s, dtype=getattr(torch, d), device="meta") for k, (s, d) in W.load_manifest(name).tensors.items()}


def _strip(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def _equal(a, b):
    assert a.keys() == b.keys(), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module", params=["sd-v1-4", "sd-v2-1"])
def full(request):
    name = request.param
    ckpt = _meta_checkpoint(name)
    cfg = yaml.safe_load((CONFIGS / YAML[name]).read_text())
    return name, ckpt, cfg


def test_full_unet_matches_diffusers_converter(full):
    name, ckpt, cfg = full
    config = sfu.create_unet_diffusers_config_from_ldm(cfg, ckpt)
    theirs = sfu.convert_ldm_unet_checkpoint(ckpt, config)
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    assert _shapes(theirs) == _shapes(model.state_dict())
    ours = W.original_to_diffusers("unet", _strip(ckpt, UNET))
    assert len(ours) == 686 and _shapes(ours) == _shapes(theirs)
    assert _shapes(W.diffusers_to_original("unet", theirs)) == _shapes(_strip(ckpt, UNET))


def test_full_vae_matches_diffusers_converter(full):
    name, ckpt, cfg = full
    config = sfu.create_vae_diffusers_config_from_ldm(cfg, ckpt)
    theirs = sfu.convert_ldm_vae_checkpoint(ckpt, config)
    with torch.device("meta"):
        model = AutoencoderKL(**config)
    assert _shapes(theirs) == _shapes(model.state_dict())
    ours = W.original_to_diffusers("vae", _strip(ckpt, VAE))
    assert len(ours) == 248 and _shapes(ours) == _shapes(theirs)
    mid = "encoder.mid_block.attentions.0.to_q.weight"
    assert ours[mid].shape == (512, 512) and ckpt[VAE + "encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert _shapes(W.diffusers_to_original("vae", theirs)) == _shapes(_strip(ckpt, VAE))


def test_full_text_matches_diffusers_converter(full):
    name, ckpt, cfg = full
    table, prefix = TEXT_TABLE[name], TEXT[name]
    if name == "sd-v1-4":
        theirs = sfu.convert_ldm_clip_checkpoint(ckpt)
    else:
        theirs = sfu.convert_open_clip_checkpoint(None, ckpt)
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**HF_TEXT[name]))
    # transformers 5 drops the "text_model." prefix of the files and no longer stores position_ids
    model_keys = {"text_model." + k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: v for k, v in _shapes(theirs).items() if not W.is_harmless(k)} == model_keys
    ours = W.original_to_diffusers(table, _strip(ckpt, prefix))
    assert _shapes(ours) == _shapes(theirs)
    assert len(ours) == {"sd-v1-4": 197, "sd-v2-1": 372}[name]
    back = W.diffusers_to_original(table, theirs)
    original = _strip(ckpt, prefix)
    absent = W.original_only(table, list(original))
    assert _shapes(back) == {k: v for k, v in _shapes(original).items() if k not in absent}
    if name == "sd-v2-1":  # the 24th resblock, text_projection and logit_scale: 12 + 2 tensors
        assert len(absent) == 14 and {"text_projection", "logit_scale"} <= set(absent)
        assert all(k.startswith("transformer.resblocks.23.") for k in absent if "resblocks" in k)
    else:
        assert absent == []


# ----------------------------------------------------------------------------- tiny, value for value


def _randomise(model):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


UNET_CONFIGS = {
    "sd1-like": dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                     block_out_channels=(32, 64), cross_attention_dim=24, attention_head_dim=8),
    "sd2-like": dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                     block_out_channels=(32, 64, 64), cross_attention_dim=24, attention_head_dim=(2, 4, 4),
                     use_linear_projection=True, transformer_layers_per_block=2),
    "attention-in-the-middle": dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                    block_out_channels=(32, 32, 64), layers_per_block=1, cross_attention_dim=16),
}


@pytest.mark.parametrize("variant", list(UNET_CONFIGS))
def test_tiny_unet_values_round_trip_through_diffusers_converter(variant):
    config = dict(sample_size=8, norm_num_groups=32, **{"layers_per_block": 2, **UNET_CONFIGS[variant]})
    theirs = _randomise(UNet2DConditionModel(**config))
    original = W.diffusers_to_original("unet", theirs)
    layout = W.layout_of("unet", list(original), "original")
    assert layout == W.UNetLayout.from_keys(list(theirs), "diffusers")
    assert layout.levels == len(config["block_out_channels"]) and layout.num_res_blocks == config["layers_per_block"]
    # diffusers' converter, fed our original-named dict, must give back its own model's tensors exactly
    converted = sfu.convert_ldm_unet_checkpoint({UNET + k: v for k, v in original.items()}, config)
    _equal(converted, theirs)
    _equal(W.original_to_diffusers("unet", original), theirs)
    proj = "input_blocks.1.1.proj_in.weight" if variant != "attention-in-the-middle" else "input_blocks.3.1.proj_in.weight"
    assert original[proj].dim() == (2 if variant == "sd2-like" else 4)


@pytest.mark.parametrize("layers_per_block", [1, 2])
def test_tiny_vae_values_round_trip_through_diffusers_converter(layers_per_block):
    config = dict(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=layers_per_block,
                  norm_num_groups=32, sample_size=32)
    theirs = _randomise(AutoencoderKL(**config))
    original = W.diffusers_to_original("vae", theirs)
    assert original["encoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert "decoder.up.0.block.2.conv1.weight" in original or layers_per_block == 1
    _equal(sfu.convert_ldm_vae_checkpoint({VAE + k: v for k, v in original.items()}, config), theirs)
    _equal(W.original_to_diffusers("vae", original), theirs)


def test_old_diffusers_vae_attention_names_are_read():
    config = dict(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                  latent_channels=4, layers_per_block=1, norm_num_groups=32)
    new = _randomise(AutoencoderKL(**config))
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in new.items():
        for a, b in old_names.items():
            k = k.replace(f"attentions.0.{a}.", f"attentions.0.{b}.")
        old[k] = v
    assert old.keys() != new.keys()
    _equal(W.diffusers_to_original("vae", old), W.diffusers_to_original("vae", new))


def _tiny_clip(layers, act="quick_gelu"):
    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         vocab_size=1000, max_position_embeddings=77, hidden_act=act, eos_token_id=2)
    return {"text_model." + k: v for k, v in _randomise(CLIPTextModel(cfg)).items()}


def test_tiny_text_sd1_round_trip():
    theirs = _tiny_clip(2)
    original = W.diffusers_to_original("text_sd1", theirs)
    assert original.keys() == theirs.keys()  # HF names on both sides
    _equal(sfu.convert_ldm_clip_checkpoint({"cond_stage_model.transformer." + k: v for k, v in original.items()}), theirs)
    _equal(W.original_to_diffusers("text_sd1", original), theirs)


def test_tiny_text_sd2_round_trip_and_the_extra_resblock():
    theirs = _tiny_clip(2, act="gelu")                       # diffusers: the 2 layers SD 2 runs
    original = W.diffusers_to_original("text_sd2", theirs)
    assert original["transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    assert not any(k.startswith("transformer.resblocks.2.") for k in original)
    # the original file stores one resblock more, plus the contrastive head
    g = torch.Generator().manual_seed(1)
    full = dict(original)
    full.update({k.replace("resblocks.1.", "resblocks.2."): torch.randn(v.shape, generator=g)
                 for k, v in original.items() if k.startswith("transformer.resblocks.1.")})
    full["text_projection"], full["logit_scale"] = torch.randn(32, 32, generator=g), torch.tensor(4.6)
    layout = TextSD2Layout(layers=2)
    ours = W.original_to_diffusers("text_sd2", full, layout)
    _equal(ours, theirs)
    # diffusers' converter drops only the hard-coded full-size resblock 23; at this size it keeps layer 2
    converted = sfu.convert_open_clip_checkpoint(None, {"cond_stage_model.model." + k: v for k, v in full.items()})
    _equal({k: v for k, v in converted.items() if ".layers.2." not in k}, theirs)
    assert sorted(W.original_only("text_sd2", list(full), layout))[:2] == ["logit_scale", "text_projection"]
    assert len(W.original_only("text_sd2", list(full), layout)) == 2 + 12
    # without the layout the default (SD 2: 23 layers run) does not fit a 3-resblock file: a clear error
    with pytest.raises(WeightsError, match=r"stores 3 resblocks but the layout says SD 2 runs 23"):
        W.original_to_diffusers("text_sd2", full)
    # an older diffusers text encoder file with the position_ids buffer: dropped (listed diffusers-only)
    with_ids = {**theirs, "text_model.embeddings.position_ids": torch.arange(77)[None]}
    assert W.diffusers_only("text_sd2", list(with_ids)) == ["text_model.embeddings.position_ids"]
    _equal(W.diffusers_to_original("text_sd2", with_ids), original)


@pytest.mark.parametrize("table, act", [("text_sd1", "quick_gelu"), ("text_sd2", "gelu")])
def test_text_tables_read_transformers5_names_without_text_model(table, act):
    """transformers 5 saves CLIPTextModel tensors without the `text_model.` level: the same tensors."""
    theirs = _tiny_clip(2, act=act)
    flat = {k.removeprefix("text_model."): v for k, v in theirs.items()}
    original = W.diffusers_to_original(table, flat)
    _equal(original, W.diffusers_to_original(table, theirs))
    layout = TextSD2Layout(layers=2) if table == "text_sd2" else None
    _equal(W.original_to_diffusers(table, original, layout), theirs)      # written with the level, as before


def test_unknown_names_are_errors():
    with pytest.raises(WeightsError, match=r"1 tensor names of the unet state dict are not in its original-names table.*"
                                           r"input_blocks.1.0.bogus.weight"):
        W.original_to_diffusers("unet", {"input_blocks.1.0.bogus.weight": torch.zeros(1),
                                         **{k: torch.zeros(1) for k in ("input_blocks.3.0.op.weight", "input_blocks.5.0.in_layers.0.weight")}})
    with pytest.raises(WeightsError, match="no rename table for component 'sdxl_unet'"):
        W.original_to_diffusers("sdxl_unet", {})
    with pytest.raises(WeightsError, match=r"q/k/v"):
        W.diffusers_to_original("text_sd2", {"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(3, 3)})


def test_tiny_checkpoint_is_a_consistent_sd1_architecture():
    """The file `minivid inspect --write-tiny` writes loads, converted by our tables, into diffusers/transformers
    models of the documented tiny widths with every name and shape accounted for."""
    from minivid.weights.tiny import tiny_state_dict

    sd = tiny_state_dict("sd-v1-4", dtype=torch.float32)
    unet = UNet2DConditionModel(block_out_channels=(32, 64, 128, 128), cross_attention_dim=96, attention_head_dim=8,
                                norm_num_groups=32, sample_size=8)
    unet.load_state_dict(W.original_to_diffusers("unet", _strip(sd, UNET)), strict=True)
    vae = AutoencoderKL(block_out_channels=(32, 64, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, norm_num_groups=32)
    vae.load_state_dict(W.original_to_diffusers("vae", _strip(sd, VAE)), strict=True)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=12, num_attention_heads=12))
    text_sd = {k.removeprefix("text_model."): v for k, v in _strip(sd, TEXT["sd-v1-4"]).items() if not W.is_harmless(k)}
    text.load_state_dict(text_sd, strict=True)
