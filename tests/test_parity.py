"""`minivid parity` on random official-layout files written by `minivid inspect --write-tiny` (SD 1.x,
SD 2.x-v, SVD) and on a diffusers folder: every component passes; a file perturbed in one component
(checked against the original with --reference) fails naming that component; the measuring helpers."""
from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from minivid.cli import main
from minivid.parity import TOLERANCES, compare, peak_bytes
from minivid.weights.tiny import write_tiny_checkpoint

FAST = ["--size", "64,64", "--frames", "2", "--repeat", "1", "--quiet", "--timesteps", "999,1"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return {like: write_tiny_checkpoint(folder, like) for like in ("sd-v1-4", "sd-v2-1", "svd")}


def run_json(tmp_path, *argv):
    out = tmp_path / "parity.json"
    code = main(["parity", *map(str, argv), *FAST, "--json", str(out)])
    return code, json.loads(out.read_text())


@pytest.mark.parametrize("like, outputs", [
    ("sd-v1-4", {"unet": ["sample"], "vae": ["encode.mean", "encode.std", "decode"], "text": ["hidden", "pooled"]}),
    ("sd-v2-1", {"unet": ["sample"], "vae": ["encode.mean", "encode.std", "decode"], "text": ["hidden"]}),
    ("svd", {"unet": ["sample"], "vae": ["encode.mean", "encode.std", "decode"], "image": ["embeds"]}),
])
def test_tiny_official_files_pass(like, outputs, files, tmp_path, capsys):
    code, report = run_json(tmp_path, files[like])
    assert code == 0 and report["passed"] and report["failed"] == []
    assert report["tolerance"] == TOLERANCES["fp32"] and report["dtype"] == "fp32"
    got: dict[str, list[str]] = {}
    for row in report["rows"]:
        got.setdefault(row["component"], []).append(row["output"])
        assert row["max_rel"] <= row["tolerance"] and row["passed"]
        assert row["time_ratio"] > 0 and row["peak_minivid"] > 0 and row["peak_reference"] > 0
        assert len(row["worst"]) == len(row["shape"])
    assert got == outputs
    unet = next(r for r in report["rows"] if r["component"] == "unet")
    assert unet["shape"][0] == 2                                   # one sample per --timesteps entry
    text = capsys.readouterr().out
    assert "all components pass" in text and "max rel" in text


def test_diffusers_folder_passes(tiny_sd, tmp_path):
    folder = tiny_sd("tiny_sd2", seed=3).save(tmp_path / "pipe", format="diffusers")
    code, report = run_json(tmp_path, folder, "--size", "32,32")
    assert code == 0 and report["passed"]
    assert {(r["component"], r["output"]) for r in report["rows"]} >= {("text", "hidden"), ("text", "pooled")}


def test_svd_diffusers_folder_passes(tmp_path):
    from minivid.svd import StableVideoDiffusion

    folder = StableVideoDiffusion.from_config("tiny").save(tmp_path / "svd", format="diffusers")
    code, report = run_json(tmp_path, folder, "--frames", "2")
    assert code == 0 and report["passed"]
    assert {r["component"] for r in report["rows"]} == {"unet", "vae", "image"}


@pytest.mark.parametrize("names, failed", [
    (["first_stage_model.decoder.conv_out.weight"], ["vae"]),
    (["model.diffusion_model.out.2.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight"],
     ["unet", "text"]),
])
def test_perturbed_file_fails_naming_the_component(names, failed, files, tmp_path, capsys):
    """minivid reads a copy with tensors scaled by 1.01, the reference the original (--reference)."""
    original = files["sd-v1-4"]
    tensors = safetensors.torch.load_file(str(original))
    for name in names:
        tensors[name] = tensors[name] * 1.01
    with safetensors.safe_open(str(original), "pt") as f:
        meta = f.metadata()
    perturbed = tmp_path / "perturbed.safetensors"
    safetensors.torch.save_file(tensors, str(perturbed), metadata=meta)
    code, report = run_json(tmp_path, perturbed, "--reference", original)
    assert code == 1 and not report["passed"] and report["failed"] == failed
    assert report["components"] == {c: c not in failed for c in ("unet", "vae", "text")}
    assert f"FAIL: {', '.join(failed)}" in capsys.readouterr().out


def test_missing_oracles_say_what_to_install(files, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    assert main(["parity", str(files["sd-v1-4"]), *FAST]) == 1
    err = capsys.readouterr().err
    assert "diffusers" in err and "pip install 'minivid[parity]'" in err


def test_argument_errors(files, tmp_path, capsys):
    assert main(["parity", str(files["sd-v1-4"]), "--components", "unet,image", *FAST]) == 1
    assert "components are unet, vae, text; not image" in capsys.readouterr().err
    assert main(["parity", str(files["svd"]), "--reference", str(files["sd-v1-4"]), *FAST]) == 1
    assert "holds an SD model" in capsys.readouterr().err
    assert main(["parity", str(tmp_path / "nothing.safetensors"), *FAST]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["parity", str(files["sd-v1-4"]), *FAST, "--size", "60,64"]) == 1
    assert "multiples of 64" in capsys.readouterr().err


def test_compare_and_peak_bytes():
    ref = torch.tensor([[1.0, -4.0], [2.0, 0.5]])
    ours = ref.clone()
    ours[1, 0] += 0.02
    c = compare(ours, ref)
    assert c["worst"] == [1, 0] and c["max_abs"] == pytest.approx(0.02) and c["max_rel"] == pytest.approx(0.005)
    assert compare(ours.flatten(), ref)["max_rel"] == float("inf")
    assert compare(ours * float("nan"), ref)["note"].startswith("non-finite")
    # two 4000-byte tensors alive at once (the empty one and the sum); views of parameters cost nothing
    assert peak_bytes(lambda: torch.empty(1000) + 1) == 8000
    lin = torch.nn.Linear(100, 100)
    assert peak_bytes(lambda: lin.weight.t(), [lin]) == 0
    assert peak_bytes(lambda: lin(torch.ones(1, 100)), [lin]) >= 400
