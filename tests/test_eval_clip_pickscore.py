"""Any transformers CLIP folder for the CLIP metrics (issue 17.9), PickScore (TCVE Table I), the
default "every metric whose weights are present", and the frame-consistency pair labels (issue 21)."""

import json

import pytest
import torch

from minivid.cli import main
from minivid.eval import load_clip
from minivid.eval.encoders import CLIP_PRESETS, EncoderError, clip_configs_from_transformers
from minivid.eval.loading import load_evaluator
from minivid.eval.metrics import pickscore
from minivid.eval.preprocess import clip_preprocess_hf, to_uint8
from minivid.clip import CLIPTextConfig, CLIPVisionConfig
from minivid.tokenizer import CLIPTokenizer
from minivid.video import write_video

from _builders import max_err
from test_clip import randomize, shapes
from test_eval import PROMPTS, TOL, features, hf_clip_config, tiny_files  # noqa: F401  (fixture)

# ViT-B/32-like and ViT-L/14-336-like shapes (tiny), each with its own activation: not the L/14 preset
ARCHITECTURES = {
    "b32_quick_gelu": (CLIPTextConfig("openai", width=40, layers=2, heads=5, mlp_width=72, act="quick_gelu",
                                      projection_dim=16, context_length=77),
                       CLIPVisionConfig("openai", width=56, layers=3, heads=7, mlp_width=80, act="quick_gelu",
                                        projection_dim=16, image_size=64, patch_size=32)),
    "h14_gelu_336": (CLIPTextConfig("openai", width=32, layers=2, heads=4, mlp_width=64, act="gelu", projection_dim=12),
                     CLIPVisionConfig("openai", width=48, layers=2, heads=6, mlp_width=64, act="gelu",
                                      projection_dim=12, image_size=42, patch_size=14)),
}


def oracle_folder(tmp_path, text, vision, name="clip", seed=0):
    """A transformers CLIPModel at random, saved as its folder (config.json + model.safetensors)."""
    from transformers import CLIPModel

    torch.manual_seed(seed)
    oracle = randomize(CLIPModel(hf_clip_config(text, vision)))
    with torch.no_grad():
        oracle.logit_scale.fill_(4.1)                # a trained scale (PickScore's is learnt), not the init value
    folder = tmp_path / name
    oracle.save_pretrained(folder)
    return oracle, folder


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_any_transformers_clip_folder_equals_clipmodel(tmp_path, arch):
    text, vision = ARCHITECTURES[arch]
    oracle, folder = oracle_folder(tmp_path, text, vision)
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors"}
    enc = load_clip(folder)
    assert enc.kind == "openai" and enc.image_size == vision.image_size and enc.embed_dim == text.projection_dim
    assert (enc.model.cfg, enc.model.vision.cfg) == (text, vision)          # the architecture read from config.json
    ids = CLIPTokenizer(pad="end")(PROMPTS)
    pixels = torch.randn(3, 3, vision.image_size, vision.image_size)
    with torch.no_grad():
        assert max_err(enc.encode_text(ids), features(oracle.get_text_features(input_ids=ids))) <= TOL
        assert max_err(enc.encode_image(pixels), features(oracle.get_image_features(pixel_values=pixels))) <= TOL
    assert enc.logit_scale == pytest.approx(oracle.logit_scale.exp().item(), rel=1e-7)


def test_a_bare_file_of_another_architecture_asks_for_its_folder(tmp_path):
    _, folder = oracle_folder(tmp_path, *ARCHITECTURES["b32_quick_gelu"])
    with pytest.raises(EncoderError, match="config.json"):
        load_clip(folder / "model.safetensors")


def test_folder_errors_name_the_file(tmp_path):
    _, folder = oracle_folder(tmp_path, *ARCHITECTURES["b32_quick_gelu"])
    config = json.loads((folder / "config.json").read_text())
    bad = dict(config, text_config={**config["text_config"], "hidden_act": "relu"})
    (folder / "config.json").write_text(json.dumps(bad))
    with pytest.raises(EncoderError, match=r"config.json: text_config.hidden_act 'relu'"):
        load_clip(folder)
    wrong = dict(config, vision_config={**config["vision_config"], "num_hidden_layers": 2})   # weights have 3
    (folder / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(EncoderError, match=r"model.safetensors: is not the CLIP model .*config.json describes.*unexpected"):
        load_clip(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(EncoderError, match="expected a JSON object"):
        load_clip(folder)
    with pytest.raises(EncoderError, match="model_type"):
        clip_configs_from_transformers({"model_type": "siglip"})


def test_pickscore_equals_loveu_tgve_pick_score(tmp_path):
    """LOVEU-TGVE's pick_score: logit_scale.exp() * normalised text @ normalised image, mean over frames."""
    text, vision = CLIP_PRESETS["tiny_pickscore"]
    oracle, folder = oracle_folder(tmp_path, text, vision, "PickScore_v1", seed=3)
    g = torch.Generator().manual_seed(0)
    frames = (torch.rand(4, 3, 40, 56, generator=g) * 255).round().to(torch.uint8)
    ev = load_evaluator({"pickscore": folder}, ("pickscore",))
    got = ev(frames, PROMPTS[1])["pickscore"]
    with torch.no_grad():
        image = features(oracle.get_image_features(pixel_values=clip_preprocess_hf(frames, vision.image_size)))
        txt = features(oracle.get_text_features(input_ids=CLIPTokenizer(pad="end")([PROMPTS[1]])))
        image, txt = image / image.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        want = oracle.logit_scale.exp() * (txt @ image.T)[0]
    assert max_err(torch.tensor(got["per_frame"]), want) <= TOL * want.abs().max()
    assert got["value"] == pytest.approx(want.mean().item(), rel=TOL)
    # the library function on embeddings: a scaled text alignment
    value, per = pickscore(image, txt[0], 7.0)
    assert value == pytest.approx(7.0 * (image @ txt[0]).mean().item(), rel=1e-6)
    assert to_uint8(frames).dtype == torch.uint8


def test_full_size_pickscore_layout_equals_transformers():
    """PickScore_v1 is CLIP ViT-H/14 (LAION-2B) in transformers' layout: names and shapes on the meta device."""
    from transformers import CLIPConfig, CLIPModel

    from minivid.eval import build_clip

    with torch.device("meta"):
        ours = build_clip("transformers_vit_h14").model
        theirs = CLIPModel(CLIPConfig(
            text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                             hidden_act="gelu", projection_dim=1024),
            vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                               image_size=224, patch_size=14, hidden_act="gelu", projection_dim=1024),
            projection_dim=1024))
    assert shapes(ours) == shapes(theirs)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 986_109_441


def test_default_metrics_are_those_whose_weights_are_present(tmp_path, tiny_files, capsys, monkeypatch):
    write_video(tmp_path / "v.mp4", torch.rand(4, 3, 32, 32) * 2 - 1, fps=4)
    monkeypatch.chdir(tmp_path)                                   # no weights/ here
    assert main(["eval", "v.mp4", "--prompt", "a cat", "--clip", str(tiny_files["clip"]), "--json", "m.json",
                 "--quiet"]) == 0
    cap = capsys.readouterr()
    res = json.loads((tmp_path / "m.json").read_text())
    assert set(res["metrics"]) == {"clip_text_alignment", "clip_frame_consistency"}
    assert set(res["skipped"]) == {"subject_consistency", "aesthetic_quality", "pickscore", "motion_smoothness",
                                   "imaging_quality"}
    assert "skipped subject_consistency: weights/dino_vitbase16_pretrain.pth" in cap.err
    # the pair definition each frame-consistency line uses
    assert "clip_frame_consistency (consecutive pairs)" in cap.out and "clip_frame_consistency (all pairs)" in cap.out
    # named explicitly, a metric without its weights is an error before anything runs
    assert main(["eval", "v.mp4", "--prompt", "a cat", "--clip", str(tiny_files["clip"]), "--metrics",
                 "clip_text_alignment,pickscore"]) == 1
    assert "weights/PickScore_v1" in capsys.readouterr().err
    # a transformers CLIP folder through --clip, and PickScore through --pickscore
    assert main(["eval", "v.mp4", "--prompt", "a cat", "--clip", str(tiny_files["pickscore"]), "--pickscore",
                 str(tiny_files["pickscore"]), "--metrics", "clip_frame_consistency,pickscore", "--json", "p.json"]) == 0
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["metrics"]["pickscore"]["encoder"].startswith("tiny-pickscore")
    assert res["metrics"]["clip_frame_consistency"]["encoder"].startswith("tiny-pickscore")


def test_full_size_pickscore_matches_its_manifest():
    """The manifest of PickScore_v1's model.safetensors (weights/manifests/pickscore-v1.json): every name and shape."""
    from pathlib import Path

    from minivid.eval import build_clip

    manifest = json.loads((Path(__file__).resolve().parents[1] / "weights" / "manifests" / "pickscore-v1.json").read_text())
    with torch.device("meta"):
        ours = build_clip("transformers_vit_h14").model
    assert shapes(ours) == {k: v[0] for k, v in manifest["tensors"].items()}
    assert manifest["info"]["total_elements"] == sum(p.numel() for p in ours.parameters()) 
