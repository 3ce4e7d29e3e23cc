"""`minivid generate`, `minivid invert` and `minivid demo` through minivid.cli.main on tiny models."""
from __future__ import annotations

import json
import sys
import types

import torch

from minivid.cli import main
from minivid.models import StableDiffusion
from minivid.video import read_video, write_video


def record(folder) -> dict:
    return json.loads((folder / "record.json").read_text())


def test_generate_tiny(tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(["generate", "--tiny", "--prompt", "a red fox", "--steps", "2", "--num-images", "2", "--out", str(out)]) == 0
    rec = record(out)
    assert rec["outputs"] == ["image_00.png", "image_01.png", "grid.png"]
    assert all((out / name).stat().st_size > 0 for name in rec["outputs"])
    assert rec["settings"]["prompt"] == "a red fox" and rec["settings"]["seed"] == 0
    assert rec["results"] == {"images": 2, "size": [32, 32]} and "generate" in rec["timings_s"]
    assert rec["model"]["kind"] == "sd1" and rec["model"]["prediction"] == "eps"
    assert "wrote 2 image(s)" in capsys.readouterr().out


def test_generate_from_weights_file(tmp_path):
    """--weights with a (tiny, SD 2-style) file written by StableDiffusion.save; --prediction overrides."""
    path = StableDiffusion.from_config("tiny_sd2").save(tmp_path / "tiny_sd2.safetensors")
    out = tmp_path / "gen"
    assert main(["generate", "--weights", str(path), "--prompt", "a boat", "--steps", "1", "--height", "16",
                 "--width", "32", "--prediction", "eps", "--out", str(out)]) == 0
    rec = record(out)
    assert rec["results"]["size"] == [16, 32] and rec["model"] == {**rec["model"], "kind": "sd2", "prediction": "eps"}


def test_generate_needs_weights(tmp_path, capsys):
    assert main(["generate", "--prompt", "x", "--out", str(tmp_path / "o")]) == 1
    assert "--weights" in capsys.readouterr().err
    assert main(["generate", "--weights", str(tmp_path / "missing.ckpt"), "--prompt", "x",
                 "--out", str(tmp_path / "o")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_invert_video_and_image(tmp_path, capsys):
    frames = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    video = write_video(tmp_path / "clip.mp4", frames)
    out = tmp_path / "inv"
    assert main(["invert", "--tiny", "--video", str(video), "--frames", "3", "--steps", "3", "--prompt", "a clip",
                 "--save-latents", "--out", str(out)]) == 0
    rec = record(out)
    assert set(rec["outputs"]) == {"source_grid.png", "reconstruction_grid.png", "reconstruction.mp4",
                                   "side_by_side.mp4", "latents.safetensors"}
    # short side to the tiny model's 32 px (48x40 -> 38x32), cropped only to its VAE factor 4 -> 36x32
    assert read_video(out / "reconstruction.mp4").shape == (3, 3, 32, 36)
    assert rec["ran"]["size"] == [32, 36] and rec["ran"]["frames"] == 3 and rec["ran"]["model"] == "tiny"
    assert read_video(out / "side_by_side.mp4").shape == (3, 3, 32, 72)
    res = rec["results"]
    assert len(res["psnr_db_per_frame"]) == 3 and res["psnr_db"] > 0 and res["vae_psnr_db"] > 0
    assert res["latent_relative_rmse"] >= 0
    assert "reconstruction PSNR" in capsys.readouterr().out

    image = tmp_path / "frame.png"
    from minivid.video import save_grid
    save_grid(image, frames[:1])
    out = tmp_path / "inv_image"
    assert main(["invert", "--tiny", "--image", str(image), "--steps", "2", "--out", str(out)]) == 0   # --image = --video
    assert set(record(out)["outputs"]) == {"source_grid.png", "reconstruction_grid.png", "side_by_side.png"}
    assert main(["invert", "--tiny", "--video", str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "x")]) == 1


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--steps", "3", "--frames", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "no real images" in text and "reconstruction PSNR" in text
    rec = record(out)
    assert set(rec["outputs"]) == {"generated.png", "clip.mp4", "clip_grid.png", "reconstruction.mp4",
                                   "side_by_side.mp4"}
    assert rec["results"]["psnr_db"] > 15 and "random weights" in rec["results"]["note"]
    assert torch.get_num_threads() == 1                  # restored (conftest's single thread)


def test_demo_method(tmp_path, capsys, monkeypatch):
    assert main(["demo", "--method", "nope", "--out", str(tmp_path / "a")]) == 1
    assert "unknown method" in capsys.readouterr().err
    fake = types.ModuleType("minivid.cli.cove")     # a method CLI without a demo
    fake.add_arguments = lambda group: None
    monkeypatch.setitem(sys.modules, "minivid.cli.cove", fake)
    assert main(["demo", "--method", "cove", "--out", str(tmp_path / "b")]) == 1
    assert "has no demo" in capsys.readouterr().err

    def demo(args, job):
        job.write_grid("picture.png", torch.zeros(1, 3, 8, 8))
        return {"answer": 42}

    fake.demo = demo
    assert main(["demo", "--method", "cove", "--out", str(tmp_path / "c")]) == 0
    rec = record(tmp_path / "c")
    assert rec["job"] == "demo-cove" and rec["results"] == {"answer": 42} and rec["outputs"] == ["picture.png"]
