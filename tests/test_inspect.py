"""`minivid inspect`: through minivid.cli.main, on files and diffusers folders.

Full-size files are written as header-only sparse safetensors (the official names and shapes,
no data on disk): inspect reads only headers, so it reports them like the real downloads.
"""
import json
import struct

import pytest
import torch

import minivid.cli as cli
from minivid import weights as W

_CODES = {"float32": ("F32", 4), "float16": ("F16", 2), "int64": ("I64", 8), "int32": ("I32", 4)}


@pytest.fixture
def run(monkeypatch, capsys):
    """main([...]) -> (exit code, stdout, stderr), with only the inspect subcommand registered
    (the others are tested in their own files)."""
    assert "inspect" in cli.SUBCOMMANDS
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["inspect"])

    def call(*argv):
        code = cli.main(["inspect", *map(str, argv)])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def write_sparse_safetensors(path, info, dtype=None):
    """A valid safetensors file with these names/shapes whose data is a hole (no disk used)."""
    header, offset = {}, 0
    for name, (shape, file_dtype) in info.items():
        code, size = _CODES[dtype or file_dtype] if not file_dtype.startswith("int") else _CODES[file_dtype]
        n = size
        for s in shape:
            n *= s
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def test_write_tiny_then_inspect(tmp_path, run):
    code, out, _ = run("--write-tiny", tmp_path)
    path = tmp_path / "tiny-sd-v1-4.safetensors"
    assert code == 0 and path.is_file() and f"wrote {path}" in out
    assert "model       sd1: Stable Diffusion 1.x" in out
    assert "prediction  eps" in out
    assert "dtypes: float16 1130, int64 1" in out
    assert "manifest    sd-v1-4: 0 missing, 0 unexpected, 1123 with another shape" in out
    assert "model.diffusion_model.input_blocks.0.0.weight  [32, 4, 3, 3] vs official [320, 4, 3, 3]" in out
    assert "1113 more (--all lists every one)" in out
    assert "14 listed harmless extras absent" in out

    code, out, _ = run(path, "--json")
    report = json.loads(out)
    assert report["model"] == "sd1" and report["tensors"] == 1131
    assert report["manifest"]["missing"] == [] and report["manifest"]["unexpected"] == []
    assert len(report["manifest"]["shapes"]) == 1123
    assert report["components"]["unet"] == {"prefix": "model.diffusion_model.", "tensors": 686, "params": 8685156}

    code, out, _ = run(path, "--all")
    assert out.count(" vs official ") == 1123


def test_write_tiny_sd2_reports_the_prediction_the_loader_uses(tmp_path, run):
    from minivid.models import StableDiffusion

    code, out, _ = run("--write-tiny", tmp_path, "--like", "sd-v2-1", "--json")
    report = json.loads(out)
    assert report["model"] == "sd2" and report["manifest"]["missing"] == [] and report["manifest"]["unexpected"] == []
    # the name "tiny-sd-v2-1" says neither 768 nor 512, but the file's minivid metadata says v: inspect and
    # the loader read the same rule (weights.guess_prediction)
    sd = StableDiffusion.load(tmp_path / "tiny-sd-v2-1.safetensors")
    assert report["prediction"] == sd.prediction == "v" and "metadata" in report["prediction_reason"]


def test_unstated_sd2_prediction_is_eps_with_one_warning(tmp_path, run, caplog):
    """The same tensors without minivid's metadata under a name that says nothing: eps, as the loader; the
    warning appears once (in the report), not also as a log line."""
    import logging

    import safetensors.torch

    from minivid.weights.tiny import write_tiny_checkpoint

    tensors = safetensors.torch.load_file(write_tiny_checkpoint(tmp_path / "w", like="sd-v2-1"))
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    with caplog.at_level(logging.WARNING):
        code, out, err = run(path)
    logged = [r for r in caplog.records if "says neither" in r.getMessage()]
    assert code == 0 and "prediction  eps: WARNING: " in out
    assert (out + err).count("says neither 768") == 1 and not logged
    assert W.guess_prediction(path, "sd2")[0] == "eps"        # the rule StableDiffusion.load applies (it warns once)


def test_write_tiny_svd(tmp_path, run):
    """The SVD layout: exactly the official names (the conditioning-VAE copy included), smaller shapes."""
    code, out, _ = run("--write-tiny", tmp_path, "--like", "svd", "--json")
    report = json.loads(out)
    assert code == 0 and report["model"] == "svd" and report["tensors"] == len(W.load_manifest("svd").tensors)
    assert report["manifest"]["missing"] == [] and report["manifest"]["unexpected"] == []
    assert report["manifest"]["shapes"]


@pytest.mark.parametrize("name,filename,model,prediction", [
    ("sd-v1-4", "sd-v1-4.safetensors", "sd1", "eps"),
    ("sd-v2-1", "v2-1_768-ema-pruned.safetensors", "sd2", "v"),
    ("sd-v2-1", "v2-1_512-ema-pruned.safetensors", "sd2", "eps"),
    ("svd_xt", "svd_xt.safetensors", "svd_xt", "v"),
])
def test_official_layouts_have_no_differences(tmp_path, run, name, filename, model, prediction):
    path = write_sparse_safetensors(tmp_path / filename, W.load_manifest(name).tensors, dtype="float16")
    code, out, _ = run(path)
    assert code == 0
    assert f"model       {model}:" in out and f"prediction  {prediction}:" in out
    assert f"manifest    {name}: no differences in names or shapes" in out


def test_svd_without_xt_in_the_name_says_so(tmp_path, run):
    path = write_sparse_safetensors(tmp_path / "video.safetensors", W.load_manifest("svd_xt").tensors)
    code, out, _ = run(path)
    assert "model       svd:" in out and "svd (or svd_xt)" in out


def _diffusers_folder(root, name, unet_cfg, prediction):
    """A full-size diffusers pipeline folder, made by our tables from the manifest (header-only files)."""
    man = W.load_manifest(name)
    meta = {k: torch.empty(s, device="meta") for k, (s, d) in man.tensors.items() if d == "float32"}
    table, text_prefix = ("text_sd1", "cond_stage_model.transformer.") if name == "sd-v1-4" else ("text_sd2", "cond_stage_model.model.")
    parts = {
        "unet": W.original_to_diffusers("unet", {k[22:]: v for k, v in meta.items() if k.startswith("model.diffusion_model.")}),
        "vae": W.original_to_diffusers("vae", {k[18:]: v for k, v in meta.items() if k.startswith("first_stage_model.")}),
        "text_encoder": W.original_to_diffusers(table, {k[len(text_prefix):]: v for k, v in meta.items() if k.startswith(text_prefix)}),
    }
    (root / "scheduler").mkdir(parents=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction}))
    files = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
             "text_encoder": "model.safetensors"}
    for comp, sd in parts.items():
        write_sparse_safetensors(root / comp / files[comp], {k: (tuple(v.shape), "float16") for k, v in sd.items()})
    (root / "unet" / "config.json").write_text(json.dumps(unet_cfg))
    return parts


def test_diffusers_folder_sd2(tmp_path, run):
    parts = _diffusers_folder(tmp_path / "sd21", "sd-v2-1", {"cross_attention_dim": 1024, "use_linear_projection": True},
                              "v_prediction")
    assert len(parts["text_encoder"]) == 372  # 23 layers
    code, out, _ = run(tmp_path / "sd21", "--json")
    report = json.loads(out)
    assert report["layout"] == "diffusers-sd" and report["model"] == "sd2" and report["prediction"] == "v"
    m = report["manifest"]
    assert m["ok"] and m["missing"] == [] and m["unexpected"] == [] and m["shapes"] == []
    assert len(m["not_in_diffusers_format"]) == 14  # resblocks.23 (12), text_projection, logit_scale
    assert report["components"]["text_encoder"]["tensors"] == 372
    code, out, _ = run(tmp_path / "sd21")
    assert "no differences in names or shapes" in out and "14 official tensors the diffusers format does not hold" in out


def test_diffusers_folder_with_a_wrong_component(tmp_path, run):
    parts = _diffusers_folder(tmp_path / "sd14", "sd-v1-4", {"cross_attention_dim": 768}, "epsilon")
    vae = {k: (tuple(v.shape), "float16") for k, v in parts["vae"].items()}
    del vae["decoder.conv_out.bias"]
    vae["decoder.conv_out.weight"] = ((3, 128, 1, 1), "float16")
    write_sparse_safetensors(tmp_path / "sd14" / "vae" / "diffusion_pytorch_model.safetensors", vae)
    code, out, _ = run(tmp_path / "sd14")
    assert "model       sd1:" in out
    assert "sd-v1-4: 1 missing, 0 unexpected, 1 with another shape" in out
    assert "first_stage_model.decoder.conv_out.bias" in out
    assert "first_stage_model.decoder.conv_out.weight  [3, 128, 1, 1] vs official [3, 128, 3, 3]" in out


def test_unknown_model_and_manifest_override(tmp_path, run):
    path = tmp_path / "other.safetensors"
    write_sparse_safetensors(path, {"encoder.layer.0.weight": ((8, 8), "float32")})
    code, out, _ = run(path)
    assert code == 0 and "model       unknown:" in out and "manifest    none" in out
    code, out, _ = run(path, "--manifest", "sd-v1-4")
    assert "sd-v1-4: 1130 missing, 1 unexpected, 0 with another shape" in out


def test_errors_name_the_file(tmp_path, run):
    code, out, err = run(tmp_path / "nothing.ckpt")
    assert code == 1 and "nothing.ckpt: no such file or folder" in err
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    code, out, err = run(tmp_path / "cut.safetensors")
    assert code == 1 and "cut.safetensors" in err and "Download it again" in err
    code, out, err = run()
    assert code == 1 and "give a PATH" in err
