"""CLIP text/vision encoders: parity with transformers on tiny configs, full-size keys vs the manifests.

Key mapping of the original layouts is checked by code we did not write: minivid's state dict
(original names, with the checkpoint prefix) goes through diffusers' single-file converters
(`convert_ldm_clip_checkpoint` for SD 1.x, `convert_open_clip_checkpoint` for SD 2.x) into
transformers' CLIPTextModel. transformers 5's CLIPTextModel has no `text_model.` level any more
(CLIPTextModelWithProjection still has), so that prefix is stripped for the bare model.
The OpenCLIP vision tower has no converter in diffusers/transformers: its mapping to HF names
is written here (OPENCLIP_VISION_TO_HF), independently of minivid's code.
"""
import json
import re
from pathlib import Path

import pytest
import torch

from minivid.attention import explicit
from minivid.clip import (
    CHECKPOINT_EXTRAS, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel, OpenAICLIPTextModel,
    OpenCLIPModel, OpenCLIPTextModel, OpenCLIPVisionTransformer, clip_normalize, clip_preprocess, svd_preprocess,
    svd_resize,
)
from minivid.tokenizer import CLIPTokenizer

from _builders import max_err

MANIFESTS = Path(__file__).resolve().parents[1] / "weights" / "manifests"
TOL = 1e-5
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on mars, highly detailed", "", "🎉 café 日本"]


def manifest_group(name: str, prefix: str) -> dict[str, list[int]]:
    tensors = json.loads((MANIFESTS / f"{name}.json").read_text())["tensors"]
    return {k[len(prefix):]: shape for k, (shape, _dtype) in tensors.items() if k.startswith(prefix)}


def shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def hf_text_config(cfg: CLIPTextConfig, **changes):
    from transformers import CLIPTextConfig as HFConfig

    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
              num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.context_length,
              hidden_act=cfg.act, layer_norm_eps=cfg.eps, projection_dim=cfg.projection_dim or cfg.width,
              eos_token_id=49407, bos_token_id=49406, pad_token_id=1)
    kw.update(changes)
    return HFConfig(**kw)


def hf_vision_config(cfg: CLIPVisionConfig):
    from transformers import CLIPVisionConfig as HFConfig

    return HFConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp_width, num_hidden_layers=cfg.layers,
                    num_attention_heads=cfg.heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
                    hidden_act=cfg.act, layer_norm_eps=cfg.eps, projection_dim=cfg.projection_dim)


def strip(d: dict, prefix: str) -> dict:
    assert all(k.startswith(prefix) for k in d), "converter output outside the expected prefix"
    return {k[len(prefix):]: v for k, v in d.items()}


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random LayerNorm affines too (defaults are 1/0), so every parameter matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if re.search(r"(ln|norm|layrnorm)[^.]*\.(weight|bias)$", name):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def prompt_ids():
    return {"end": CLIPTokenizer(pad="end")(PROMPTS), "zero": CLIPTokenizer(pad="zero")(PROMPTS)}


# ---------------------------------------------------------------- full-size keys on the meta device

def test_sd1_text_keys_match_manifest():
    with torch.device("meta"):
        model = CLIPTextModel("sd1")
    assert isinstance(model, OpenAICLIPTextModel)
    expected = manifest_group("sd-v1-4", "cond_stage_model.transformer.")
    assert set(CHECKPOINT_EXTRAS) <= set(expected)
    for k in CHECKPOINT_EXTRAS:
        expected.pop(k)
    assert shapes(model) == expected


def test_sd2_text_keys_match_manifest():
    with torch.device("meta"):
        model = CLIPTextModel("sd2")
    assert isinstance(model, OpenCLIPTextModel)
    assert shapes(model) == manifest_group("sd-v2-1", "cond_stage_model.model.")


@pytest.mark.parametrize("name", ["svd", "svd_xt"])
def test_svd_image_encoder_keys_match_manifest(name):
    with torch.device("meta"):
        model = OpenCLIPModel.from_preset("svd")
    assert shapes(model) == manifest_group(name, "conditioner.embedders.0.open_clip.model.")


def test_openai_vit_l14_vision_keys_match_transformers():
    from transformers import CLIPVisionConfig as HFConfig, CLIPVisionModelWithProjection

    with torch.device("meta"):
        ours = CLIPVisionModel("openai_vit_l14")
        # openai/clip-vit-large-patch14's vision config
        theirs = CLIPVisionModelWithProjection(HFConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                        num_attention_heads=16, image_size=224, patch_size=14,
                                                        projection_dim=768))
    assert shapes(ours) == shapes(theirs)


def test_official_sd1_state_dict_loads_strict_with_position_ids():
    model = CLIPTextModel("tiny_sd1")
    sd = model.state_dict()
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    assert not model.load_state_dict(sd, strict=True).missing_keys


def test_position_ids_wrong_shape_or_values(caplog):
    model = CLIPTextModel("tiny_sd1")
    sd = model.state_dict()
    sd["text_model.embeddings.position_ids"] = torch.arange(76)[None]
    with pytest.raises(ValueError, match="position_ids"):
        model.load_state_dict(sd, strict=True)
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None].flip(1)
    model.load_state_dict(sd, strict=True)
    assert "is ignored" in caplog.text


# ---------------------------------------------------------------- text parity

def test_sd1_text_matches_transformers(prompt_ids):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel as HFTextModel

    ours = randomize(CLIPTextModel("tiny_sd1"))
    ckpt = {"cond_stage_model.transformer." + k: v for k, v in ours.state_dict().items()}
    oracle = HFTextModel(hf_text_config(ours.cfg)).eval()
    oracle.load_state_dict(strip(convert_ldm_clip_checkpoint(ckpt), "text_model."), strict=True)
    for pad, ids in prompt_ids.items():
        with torch.no_grad():
            ref = oracle(input_ids=ids)
            assert max_err(ours(ids), ref.last_hidden_state) <= TOL
            assert max_err(ours(ids, output="pooled"), ref.pooler_output) <= TOL


def test_openai_text_projection_matches_transformers(prompt_ids):
    from transformers import CLIPTextModelWithProjection

    ours = randomize(CLIPTextModel(CLIPTextConfig.preset("tiny_sd1", projection_dim=24)))
    oracle = CLIPTextModelWithProjection(hf_text_config(ours.cfg)).eval()
    oracle.load_state_dict(ours.state_dict(), strict=True)
    ids = prompt_ids["end"]
    with torch.no_grad():
        assert max_err(ours(ids, output="projected"), oracle(input_ids=ids).text_embeds) <= TOL


def test_sd2_text_matches_transformers(prompt_ids):
    """Penultimate block + ln_final, checked two ways: the full oracle's hidden_states[-2] through
    its final LN, and diffusers' SD 2 layout (one block fewer, last_hidden_state)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModel as HFTextModel

    ours = randomize(CLIPTextModel("tiny_sd2"))
    L = ours.cfg.layers
    prefix = "cond_stage_model.model."
    ckpt = {prefix + k: v for k, v in ours.state_dict().items()}
    full = HFTextModel(hf_text_config(ours.cfg)).eval()
    converted = strip(convert_open_clip_checkpoint(full, ckpt, prefix=prefix), "text_model.")
    full.load_state_dict(converted, strict=True)
    short = HFTextModel(hf_text_config(ours.cfg, num_hidden_layers=L - 1)).eval()
    short.load_state_dict({k: v for k, v in converted.items() if not k.startswith(f"encoder.layers.{L - 1}.")}, strict=True)
    for pad, ids in prompt_ids.items():
        with torch.no_grad():
            cond = ours(ids)
            ref = full(input_ids=ids, output_hidden_states=True)
            assert len(ref.hidden_states) == L + 1
            assert max_err(cond, full.final_layer_norm(ref.hidden_states[-2])) <= TOL
            assert max_err(cond, short(input_ids=ids).last_hidden_state) <= TOL
            assert max_err(ours(ids, output="pooled"), ref.pooler_output) <= TOL


def test_openclip_text_projection_matches_transformers(prompt_ids):
    """SDXL's OpenCLIP prefix keeps text_projection in diffusers' converter (transposed into a Linear)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModelWithProjection

    ours = randomize(CLIPTextModel("tiny_sd2"))
    prefix = "conditioner.embedders.1.model."
    ckpt = {prefix + k: v for k, v in ours.state_dict().items()}
    oracle = CLIPTextModelWithProjection(hf_text_config(ours.cfg)).eval()
    oracle.load_state_dict(convert_open_clip_checkpoint(oracle, ckpt, prefix=prefix), strict=True)
    for ids in prompt_ids.values():
        with torch.no_grad():
            assert max_err(ours(ids, output="projected"), oracle(input_ids=ids).text_embeds) <= TOL


def test_causal_text_ignores_padding(prompt_ids):
    """Causal attention: positions up to the end token do not see the padding, so SD1- and
    SD2-style padding give the same features there."""
    model = CLIPTextModel("tiny_sd1").eval()
    end, zero = prompt_ids["end"], prompt_ids["zero"]
    with torch.no_grad():
        a, b = model(end), model(zero)
    for i in range(len(PROMPTS)):
        n = int((zero[i] != 0).sum())
        assert max_err(a[i, :n], b[i, :n]) <= TOL
        assert max_err(a[i, n:], b[i, n:]) > 1e-3
    assert torch.equal(model(end, output="pooled"), model(zero, output="pooled"))


def test_processor_is_swappable():
    model = CLIPTextModel("tiny_sd2").eval()
    ids = CLIPTokenizer(pad="zero")(PROMPTS)
    with torch.no_grad():
        ref = model(ids)
        for block in model.blocks:
            block.attn.processor = explicit
        assert max_err(model(ids), ref) <= TOL


# ---------------------------------------------------------------- vision parity

def test_openai_vision_matches_transformers():
    from transformers import CLIPVisionModelWithProjection

    ours = randomize(CLIPVisionModel("tiny_openai"))
    oracle = CLIPVisionModelWithProjection(hf_vision_config(ours.cfg)).eval()
    oracle.load_state_dict(ours.state_dict(), strict=True)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert max_err(ours(pixels), oracle(pixel_values=pixels).image_embeds) <= TOL
        pooled = oracle.vision_model(pixel_values=pixels).pooler_output
        assert max_err(ours(pixels, output="pooled"), pooled) <= TOL


OPENCLIP_VISION_TO_HF = [   # (OpenCLIP `visual` name, transformers CLIPVisionModelWithProjection name)
    (r"^conv1\.weight$", "vision_model.embeddings.patch_embedding.weight"),
    (r"^class_embedding$", "vision_model.embeddings.class_embedding"),
    (r"^positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
    (r"^ln_pre\.", "vision_model.pre_layrnorm."),
    (r"^ln_post\.", "vision_model.post_layernorm."),
    (r"^transformer\.resblocks\.(\d+)\.ln_1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^transformer\.resblocks\.(\d+)\.ln_2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^transformer\.resblocks\.(\d+)\.attn\.out_proj\.", r"vision_model.encoder.layers.\1.self_attn.out_proj."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"vision_model.encoder.layers.\1.mlp.fc1."),
    (r"^transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"vision_model.encoder.layers.\1.mlp.fc2."),
]


def openclip_visual_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if key == "proj":
            out["visual_projection.weight"] = value.T                      # x @ proj == Linear with weight proj.T
            continue
        m = re.match(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key)
        if m:
            for name, part in zip("qkv", value.chunk(3, dim=0)):         # in_proj = [q; k; v]
                out[f"vision_model.encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = part
            continue
        for pattern, repl in OPENCLIP_VISION_TO_HF:
            if re.search(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            raise KeyError(key)
    return out


def test_openclip_vision_matches_transformers():
    from transformers import CLIPVisionModelWithProjection

    ours = randomize(OpenCLIPModel.from_preset("tiny_svd"))
    assert isinstance(ours.visual, OpenCLIPVisionTransformer)
    oracle = CLIPVisionModelWithProjection(hf_vision_config(ours.visual.cfg)).eval()
    visual = {k[len("visual."):]: v for k, v in ours.state_dict().items() if k.startswith("visual.")}
    oracle.load_state_dict(openclip_visual_to_hf(visual), strict=True)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = oracle(pixel_values=pixels)
        assert max_err(ours(pixels), ref.image_embeds) <= TOL
        pooled = oracle.vision_model(pixel_values=pixels).pooler_output
        assert max_err(ours.visual(pixels, output="pooled"), pooled) <= TOL


# ---------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("hw", [(576, 1024), (320, 320), (224, 224), (100, 150), (257, 131)])
def test_svd_resize_matches_diffusers(hw):
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

    images = torch.rand(2, 3, *hw) * 2 - 1
    ours = svd_resize(images, (224, 224))
    assert ours.shape == (2, 3, 224, 224)
    assert max_err(ours, _resize_with_antialiasing(images, (224, 224))) <= 1e-6


def test_svd_preprocess_normalises():
    images = torch.rand(1, 3, 300, 400) * 2 - 1
    out = svd_preprocess(images)
    assert torch.allclose(out, clip_normalize((svd_resize(images) + 1) / 2))


def test_clip_preprocess():
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    assert torch.allclose(clip_preprocess(x), clip_normalize((x + 1) / 2))          # already 224²: no resampling
    const = torch.full((1, 3, 300, 500), 0.2)
    out = clip_preprocess(const)
    assert out.shape == (1, 3, 224, 224)
    assert torch.allclose(out, clip_normalize(torch.full((1, 3, 224, 224), 0.6)), atol=1e-5)
    # centre crop: a 224 x 300 image keeps columns 38..261
    wide = torch.rand(1, 3, 224, 300) * 2 - 1
    assert torch.allclose(clip_preprocess(wide), clip_normalize((wide[..., 38:262] + 1) / 2))
    tall = torch.rand(1, 3, 448, 448) * 2 - 1
    assert clip_preprocess(tall, size=112).shape == (1, 3, 112, 112)


# ---------------------------------------------------------------- errors

def test_text_errors():
    model = CLIPTextModel("tiny_sd1")
    ids = CLIPTokenizer()(["a cat"])
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        model(ids[0])
    with pytest.raises(TypeError, match="integer"):
        model(ids.float())
    with pytest.raises(ValueError, match="positions"):
        model(torch.cat([ids, ids[:, :1]], dim=1))
    with pytest.raises(ValueError, match="lie in"):
        model(ids + 100)
    with pytest.raises(ValueError, match="output"):
        model(ids, output="tokens")
    with pytest.raises(RuntimeError, match="text_projection"):
        model(ids, output="projected")
    with pytest.raises(RuntimeError, match="no transformer blocks"):
        OpenCLIPModel.from_preset("tiny_svd").encode_text(ids)


def test_vision_and_config_errors():
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        CLIPVisionModel("tiny_openclip")(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="unknown CLIP text preset"):
        CLIPTextModel("sd3")
    with pytest.raises(ValueError, match="unknown CLIP vision preset"):
        CLIPVisionConfig.preset("vit_g")
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig.preset("tiny_sd1", heads=5)
    with pytest.raises(ValueError, match="flavour"):
        CLIPTextConfig.preset("tiny_sd1", flavour="hf")
    with pytest.raises(ValueError, match="patch_size"):
        CLIPVisionConfig.preset("tiny_openai", image_size=30)
    with pytest.raises(ValueError, match="openclip"):
        OpenCLIPModel("tiny_sd2", "tiny_openai")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        clip_preprocess(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        svd_resize(torch.rand(3, 64, 64))


def test_openclip_text_without_projection_loads_diffusers_sd2_layout():
    """A diffusers SD 2 folder stores 23 layers and no text_projection/logit_scale: that config
    builds, conditions on its last layer, and equals the 24-layer penultimate output."""
    full = CLIPTextModel("tiny_sd2")
    cfg = CLIPTextConfig.preset("tiny_sd2", layers=full.cfg.layers - 1, conditioning_layer="last", projection_dim=None)
    short = CLIPTextModel(cfg)
    keep = {k: v for k, v in full.state_dict().items()
            if not k.startswith(f"transformer.resblocks.{full.cfg.layers - 1}.") and k not in ("text_projection", "logit_scale")}
    short.load_state_dict(keep, strict=True)
    assert "text_projection" not in short.state_dict()
    ids = torch.randint(0, full.cfg.vocab_size, (2, 77))
    assert torch.allclose(short(ids), full(ids), atol=1e-6)
    with pytest.raises(RuntimeError, match="no text_projection"):
        short(ids, output="projected")

