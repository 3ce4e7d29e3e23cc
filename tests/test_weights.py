"""minivid.weights: reading files, refusing bad ones, detection, strict loading, manifests."""
import builtins
import json
import pickle

import pytest
import safetensors.torch
import torch
import torch.nn as nn

from minivid import weights as W
from minivid.weights import WeightsError


def _sd():
    return {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "n.ids": torch.arange(5)}


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("ext", [".safetensors", ".ckpt", ".pt", ".pth", ".bin"])
def test_read_each_format(tmp_path, ext):
    sd = _sd()
    path = tmp_path / f"m{ext}"
    if ext == ".safetensors":
        safetensors.torch.save_file(sd, str(path))
    elif ext == ".ckpt":
        torch.save({"state_dict": sd, "global_step": 470000, "epoch": 6}, path)  # Lightning layout
    else:
        torch.save(sd, path)
    got = W.read_state_dict(path)
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert W.read_shapes(path) == {k: (tuple(v.shape), str(v.dtype)[6:]) for k, v in sd.items()}


def test_read_legacy_pickle_checkpoint(tmp_path):
    sd = _sd()
    torch.save(sd, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    got = W.read_state_dict(tmp_path / "old.pt")
    assert all(torch.equal(got[k], sd[k]) for k in sd)


def test_missing_path(tmp_path):
    with pytest.raises(WeightsError, match=r"no such file or folder.*weights/README.md") as e:
        W.read_state_dict(tmp_path / "sd-v1-4.ckpt")
    assert "sd-v1-4.ckpt" in str(e.value)


def test_folder_without_model_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(WeightsError, match=r"no model weights in this folder \(it holds: notes.txt\)"):
        W.read_state_dict(tmp_path)


def test_pipeline_folder_points_to_read_diffusers_folder(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(WeightsError, match="read_diffusers_folder"):
        W.read_state_dict(tmp_path)


def test_unsupported_extension(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\0" * 16)
    with pytest.raises(WeightsError, match=r"unsupported file type '.onnx'.*\.safetensors"):
        W.read_state_dict(tmp_path / "model.onnx")


def _safetensors_bytes(tmp_path):
    safetensors.torch.save_file({"w": torch.randn(64, 64), "b": torch.randn(64)}, str(tmp_path / "full.safetensors"))
    return (tmp_path / "full.safetensors").read_bytes()


@pytest.mark.parametrize("cut", [100, 4000, 16400])
def test_truncated_safetensors(tmp_path, cut):
    data = _safetensors_bytes(tmp_path)
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) - cut])
    for read in (W.read_state_dict, W.read_shapes):
        with pytest.raises(WeightsError, match=r"cut.safetensors: .*(truncated|header).*Download it again"):
            read(bad)


def test_corrupt_safetensors(tmp_path):
    data = bytearray(_safetensors_bytes(tmp_path))
    data[10:20] = b"\xff" * 10  # inside the JSON header
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"bad.safetensors: corrupt safetensors header"):
        W.read_state_dict(bad)
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(WeightsError, match=r"only 3 bytes long"):
        W.read_state_dict(tmp_path / "tiny.safetensors")


def test_truncated_ckpt(tmp_path):
    torch.save({"state_dict": _sd()}, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"cut.ckpt: could not read this checkpoint.*truncated, corrupt"):
        W.read_state_dict(tmp_path / "cut.ckpt")


class _Evil:
    """Unpickling this would create a file (it calls open(path, "w"))."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return builtins.open, (str(self.path), "w")


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_not_executed(tmp_path, how):
    marker = tmp_path / "PWNED"
    payload = {"state_dict": {"a": torch.zeros(2), "evil": _Evil(marker)}}
    path = tmp_path / "evil.ckpt"
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    assert not marker.exists()
    with pytest.raises(WeightsError, match=r"evil.ckpt: refused: .*never executes"):
        W.read_state_dict(path)
    assert not marker.exists(), "the pickle's code ran"


def test_non_tensor_entries_refused(tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(2), "step": 3}}, tmp_path / "odd.ckpt")
    with pytest.raises(WeightsError, match=r"1 entries .* not name -> tensor.*'step'"):
        W.read_state_dict(tmp_path / "odd.ckpt")


def test_diffusers_folder_reading(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    u, v = {"conv_in.weight": torch.randn(2, 2)}, {"decoder.conv_out.bias": torch.randn(3)}
    # unet only as an fp16 variant; vae sharded with an index
    safetensors.torch.save_file(u, str(tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    safetensors.torch.save_file(v, str(tmp_path / "vae" / "diffusion_pytorch_model-00001-of-00001.safetensors"))
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"decoder.conv_out.bias": "diffusion_pytorch_model-00001-of-00001.safetensors"}}))
    got = W.read_diffusers_folder(tmp_path)
    assert set(got) == {"unet", "vae"}
    assert torch.equal(got["unet"]["conv_in.weight"], u["conv_in.weight"])
    assert torch.equal(got["vae"]["decoder.conv_out.bias"], v["decoder.conv_out.bias"])
    kind, comps = W.detect_path(tmp_path)
    assert kind == "diffusers-sd" and set(comps) == {"unet", "vae"}
    # a component folder alone reads as one state dict
    assert set(W.read_state_dict(tmp_path / "unet")) == {"conv_in.weight"}


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize("name,filename,expected", [
    ("sd-v1-4", "sd-v1-4.ckpt", "sd1"),
    ("sd-v2-1", "v2-1_768-ema-pruned.safetensors", "sd2"),
    ("svd", "svd.safetensors", "svd"),
    ("svd_xt", "svd_xt.safetensors", "svd_xt"),
    ("svd_xt", "model.safetensors", "svd"),        # identical keys: only the name tells
    ("svd", "stable-video-diffusion-img2vid-xt-1-1.safetensors", "svd_xt"),
])
def test_detect_official_layouts(name, filename, expected):
    man = W.load_manifest(name)
    assert W.detect(man.tensors, filename) == expected            # names and shapes
    assert W.detect(list(man.tensors), filename) == expected      # names only


def test_detect_svd_reason_says_ambiguous():
    model, reason = W.describe_detection(W.load_manifest("svd").tensors, "weights.safetensors")
    assert model == "svd" and "identical" in reason and "svd (or svd_xt)" in reason


def test_detect_another_model():
    sdxl = {
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.empty(49408, 768, device="meta"),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": torch.empty(3840, 1280, device="meta"),
        "model.diffusion_model.label_emb.0.0.weight": torch.empty(1280, 2816, device="meta"),
        "model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 4, 3, 3, device="meta"),
    }
    model, reason = W.describe_detection(sdxl)
    assert model == "unknown" and "SDXL" in reason
    assert W.detect(["foo.bar", "baz"]) == "unknown"
    assert W.detect(["down_blocks.0.resnets.0.norm1.weight"]) == "unknown"
    sd1 = dict(W.load_manifest("sd-v1-4").tensors)
    sd1["model.diffusion_model.input_blocks.0.0.weight"] = ((320, 9, 3, 3), "float32")  # an inpainting UNet
    assert W.describe_detection(sd1)[0] == "unknown"
    sd1 = dict(W.load_manifest("sd-v1-4").tensors)
    sd1["model.diffusion_model.input_blocks.1.1.proj_in.weight"] = ((320, 320), "float32")
    assert W.detect(sd1) == "unknown"


@pytest.mark.parametrize("filename,expected,warned", [
    ("v2-1_768-ema-pruned.safetensors", "v", False),
    ("768-v-ema.ckpt", "v", False),
    ("v2-1_512-ema-pruned.ckpt", "eps", False),
    ("512-base-ema.ckpt", "eps", False),
    ("sd-v2-1.safetensors", "eps", True),   # "-v2" is not a v token
    ("model.safetensors", "eps", True),
])
def test_guess_prediction_sd2_by_name(tmp_path, filename, expected, warned):
    pred, reason = W.guess_prediction(tmp_path / filename, model="sd2")
    assert pred == expected and reason.startswith("WARNING") == warned


def test_guess_prediction_fixed_models_and_folders(tmp_path):
    assert W.guess_prediction(tmp_path / "x768.ckpt", model="sd1")[0] == "eps"
    assert W.guess_prediction(tmp_path / "svd.safetensors", model="svd")[0] == "v"
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    assert W.guess_prediction(tmp_path, model="sd2") == ("v", "scheduler/scheduler_config.json prediction_type=v_prediction")


def _fake_pipeline(root, cls, unet_cfg, text_cfg=None):
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    for comp, cfg in (("unet", unet_cfg), ("vae", {}), ("text_encoder" if text_cfg is not None else "image_encoder", text_cfg or {})):
        (root / comp).mkdir()
        (root / comp / "config.json").write_text(json.dumps(cfg))
        safetensors.torch.save_file({"x": torch.zeros(1)}, str(root / comp / "model.safetensors"))


def test_detect_folder(tmp_path):
    _fake_pipeline(tmp_path / "sd2", "StableDiffusionPipeline",
                   {"cross_attention_dim": 1024, "use_linear_projection": True}, {"num_hidden_layers": 23})
    assert W.detect_folder(tmp_path / "sd2")[0] == "sd2"
    _fake_pipeline(tmp_path / "sd1", "StableDiffusionPipeline", {"cross_attention_dim": 768}, {})
    assert W.detect_folder(tmp_path / "sd1")[0] == "sd1"
    _fake_pipeline(tmp_path / "xt", "StableVideoDiffusionPipeline", {"num_frames": 25})
    assert W.detect_path(tmp_path / "xt")[0] == "diffusers-svd"
    assert W.detect_folder(tmp_path / "xt")[0] == "svd_xt"
    _fake_pipeline(tmp_path / "xl", "StableDiffusionXLPipeline",
                   {"cross_attention_dim": 2048, "addition_embed_type": "text_time"}, {})
    assert W.detect_folder(tmp_path / "xl")[0] == "unknown"
    # other widths (tiny test models): SD 1.x / 2.x from the structure; a mix of both is refused
    _fake_pipeline(tmp_path / "tiny1", "StableDiffusionPipeline", {"cross_attention_dim": 32}, {"hidden_act": "quick_gelu"})
    assert W.detect_folder(tmp_path / "tiny1")[0] == "sd1"
    _fake_pipeline(tmp_path / "tiny2", "StableDiffusionPipeline", {"cross_attention_dim": 48, "use_linear_projection": True},
                   {"hidden_act": "gelu"})
    assert W.detect_folder(tmp_path / "tiny2")[0] == "sd2"
    _fake_pipeline(tmp_path / "mixed", "StableDiffusionPipeline", {"cross_attention_dim": 48, "use_linear_projection": True},
                   {"hidden_act": "quick_gelu"})
    kind, reason = W.detect_folder(tmp_path / "mixed")
    assert kind == "unknown" and "mixing SD 1.x and 2.x" in reason


# ----------------------------------------------------------------------------- splitting and strict loading


class _Tiny(nn.Module):
    """A stand-in model: a conv, a norm, a linear and a persistent buffer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.proj = nn.Linear(4, 5)
        self.register_buffer("scale", torch.ones(5))


def _tiny_file_dict(dtype=torch.float16):
    return {k: torch.randn(v.shape).to(dtype) for k, v in _Tiny().state_dict().items()}


def test_split_by_prefix():
    sd = {"model.diffusion_model.a": torch.zeros(1), "first_stage_model.b": torch.zeros(1),
          "cond_stage_model.transformer.text_model.c": torch.zeros(1), "betas": torch.zeros(3),
          "model_ema.decay": torch.zeros(()), "model_ema.diffusion_modelinput_blocks00weight": torch.zeros(1),
          "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(3)}
    parts = W.split_by_prefix(sd, W.SD_PREFIXES["sd1"], source="x.ckpt")
    assert parts["unet"].keys() == {"a"} and parts["vae"].keys() == {"b"}
    assert parts["text"].keys() == {"text_model.c", "text_model.embeddings.position_ids"}
    sd["conditioner.embedders.1.model.x"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"x.ckpt: 1 tensors belong to no component.*conditioner.embedders.1.model.x.*another model"):
        W.split_by_prefix(sd, W.SD_PREFIXES["sd1"], source="x.ckpt")
    assert W.split_by_prefix(sd, W.SD_PREFIXES["sd1"], strict=False)[W.REST].keys() == {"conditioner.embedders.1.model.x"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_load_strict_converts_dtypes(dtype):
    file = _tiny_file_dict(torch.float16)
    file["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # a listed harmless extra
    model = _Tiny().to(dtype)
    W.load_strict(model, file, "f.safetensors", "unet")
    for k, v in model.state_dict().items():
        assert v.dtype == dtype and torch.equal(v, file[k].to(dtype))


def test_load_strict_into_meta_module():
    file = _tiny_file_dict(torch.float16)
    with torch.device("meta"):
        model = _Tiny()
    W.load_strict(model, file, "f.safetensors", "unet")
    assert not any(t.is_meta for t in model.state_dict().values())
    assert model.conv.weight.dtype == torch.float32 and torch.equal(model.conv.weight, file["conv.weight"].float())


def test_load_strict_missing_and_unexpected():
    file = _tiny_file_dict()
    del file["proj.bias"]
    file["proj.extra"] = torch.zeros(1)
    model = _Tiny()
    before = model.conv.weight.clone()
    with pytest.raises(WeightsError) as e:
        W.load_strict(model, file, "weights/x.safetensors", "unet")
    msg = str(e.value)
    assert msg.startswith("weights/x.safetensors: the unet weights do not match minivid's _Tiny: 1 missing, 1 unexpected")
    assert "missing from the file (1): proj.bias" in msg and "unexpected in the file (1): proj.extra" in msg
    assert torch.equal(model.conv.weight, before), "nothing may be copied when the check fails"


def test_load_strict_shape_mismatch_lists_first_ten_with_count():
    class Wide(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(n, n) for _ in range(12))

    file = Wide(8).state_dict()
    with pytest.raises(WeightsError) as e:
        W.load_strict(Wide(4), file, "big.ckpt", "text")
    msg = str(e.value)
    assert "0 missing, 0 unexpected, 24 with another shape" in msg
    assert "shape differs (24): layers.0.bias file [8] vs [4]" in msg and "(14 more)" in msg


def test_load_strict_refuses_another_models_checkpoint():
    other = {f"conditioner.embedders.1.model.w{i}": torch.zeros(1) for i in range(5)}
    with pytest.raises(WeightsError, match=r"Nearly nothing matches: a checkpoint of another model"):
        W.load_strict(_Tiny(), other, "sdxl.safetensors", "unet")


# ----------------------------------------------------------------------------- manifests


def test_manifests_and_compare():
    man = W.load_manifest("sd-v1-4")
    assert len(man.tensors) == 1145
    info = {k: (s, "float16") for k, (s, d) in man.tensors.items() if not k.startswith("model_ema")}
    rep = W.compare_to_manifest(info, "sd-v1-4")
    assert rep.ok and rep.missing_optional == ["model_ema.decay", "model_ema.num_updates"]
    assert rep.dtypes == {"float16": 1143}
    info["model_ema.diffusion_modelinput_blocks00weight"] = ((320, 4, 3, 3), "float32")   # full-EMA checkpoints
    info["model.diffusion_model.out.2.weight"] = ((4, 320, 1, 1), "float32")
    del info["first_stage_model.quant_conv.bias"]
    info["something.else"] = ((1,), "float32")
    rep = W.compare_to_manifest(info, "sd-v1-4")
    assert not rep.ok
    assert rep.missing == ["first_stage_model.quant_conv.bias"] and rep.unexpected == ["something.else"]
    assert rep.shapes == [("model.diffusion_model.out.2.weight", (4, 320, 1, 1), (4, 320, 3, 3))]
    assert rep.extra_harmless == ["model_ema.diffusion_modelinput_blocks00weight"]
    with pytest.raises(WeightsError, match=r"no such manifest. Available: amt-s, musiq-spaq, pickscore-v1, sd-v1-4, sd-v2-1, svd, svd_xt"):
        W.load_manifest("sdxl")


def test_every_manifest_extra_is_listed():
    """The names no network needs, per the manifests' own info, are exactly what HARMLESS_EXTRAS lists."""
    for name in ("sd-v1-4", "sd-v2-1"):
        man = W.load_manifest(name)
        components = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
        outside = {k for k in man.tensors if not k.startswith(components)}
        assert outside == set(W.SCHEDULE_BUFFERS) | {"model_ema.decay", "model_ema.num_updates"}
        assert all(W.is_harmless(k) for k in outside | set(man.info["checkpoint_only_keys"]))
