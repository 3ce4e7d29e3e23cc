"""`minivid edit --method i2vedit --tiny` and `minivid demo --method i2vedit`: outputs and bad inputs."""
from __future__ import annotations

import json

import pytest
import torch

from minivid.cli import main
from minivid.cli.i2vedit import moving_shapes, recolour
from minivid.video import read_image, read_video, save_grid, write_video


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("i2v_inputs")
    video = moving_shapes(6, 40, 56)
    write_video(d / "in.mp4", video, fps=8)
    save_grid(d / "edited.png", recolour(video[0])[None], cols=1)
    save_grid(d / "edited_big.png", torch.nn.functional.interpolate(recolour(video[0])[None], size=(64, 80)), cols=1)
    return d


def _edit(inputs, out, *extra):
    return main(["edit", "--method", "i2vedit", "--tiny", "--video", str(inputs / "in.mp4"), "--frames", "6",
                 "--sample-fps", "0", "--i2vedit-clip-length", "4", "--steps", "2", "--i2vedit-size", "32x48",
                 "--out", str(out), *extra])


def test_edit_tiny_writes_every_output(inputs, tmp_path):
    out = tmp_path / "job"
    assert _edit(inputs, out, "--first-frame", str(inputs / "edited.png"), "--preset", "shape") == 0
    for name in ("edited.mp4", "grid.png", "side_by_side.mp4", "matching_mask.png", "record.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "record.json").read_text())
    res = record["results"]
    assert res["clips"] == [[0, 4], [3, 6]] and res["frames"] == 6
    assert res["source_size"] == [40, 56] and res["work_size"] == [32, 48]
    assert res["config"]["preset"] == "shape" and res["notes"] == []
    assert res["store_bytes_clip0_measured"]["recompute"] < res["store_bytes_per_clip_estimate"]["official"]
    # what ran, per clip (issue 19.8): the authors' recipe, clip 1 with skip-interval, fp32 throughout
    run = res["clips_run"]
    assert [c["frames"] for c in run] == [[0, 4], [3, 6]] and [c["source_frames"] for c in run] == [[0, 1, 2, 3], [3, 4, 5]]
    assert [c["recipe"] for c in run] == ["first", "subsequent"] and [c["skip_interval"] for c in run] == [False, True]
    assert [c["fps_id"] for c in run] == [4, 6]
    assert all(c["inversion_dtype"] == c["edit_dtype"] == "fp32" and c["lora"] is False for c in run)
    assert res["sampling"]["mode"] == "frames"
    edited = read_video(out / "edited.mp4")
    assert edited.shape == (6, 3, 40, 56)                      # back at the source size, overlap written once
    mask = read_image(out / "matching_mask.png")
    rows, cols = len(res["matching_mask"]["rows_layers"]), len(res["matching_mask"]["columns_steps"])
    assert rows == 11 and cols == 2 and mask.shape[-2] >= rows * 96


def test_first_frame_of_another_size_is_resized_and_said(inputs, tmp_path, capsys):
    out = tmp_path / "job"
    assert _edit(inputs, out, "--first-frame", str(inputs / "edited_big.png")) == 0
    assert "resized to the video's size" in capsys.readouterr().out
    notes = json.loads((out / "record.json").read_text())["results"]["notes"]
    assert notes and "64x80" in notes[0]


@pytest.mark.parametrize("extra, message", [
    ((), "needs --first-frame"),
    (("--first-frame", "missing.png"), "no such file"),
    (("--first-frame", "EDITED", "--i2vedit-clip-length", "11"), "fewer than one clip"),
    (("--first-frame", "EDITED", "--lora", "no_such_folder"), "no such folder"),
    (("--first-frame", "EDITED", "--i2vedit-size", "30x48"), "multiple"),
])
def test_bad_inputs_give_clear_errors(inputs, tmp_path, capsys, extra, message):
    extra = tuple(str(inputs / "edited.png") if e == "EDITED" else e for e in extra)
    out = tmp_path / "job"
    assert _edit(inputs, out, *extra) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (out / "edited.mp4").exists()


def test_edit_with_the_tuned_motion_loras(inputs, tmp_path, capsys):
    """`minivid tune --method i2vedit` writes one LoRA per clip; `edit --lora DIR` loads clip k's for clip k."""
    loras = tmp_path / "loras"
    assert main(["tune", "--method", "i2vedit", "--tiny", "--video", str(inputs / "in.mp4"), "--frames", "6", "--sample-fps", "0",
                 "--i2vedit-clip-length", "4", "--steps", "1", "--i2vedit-size", "32x48", "--i2vedit-clips", "0",
                 "--out", str(loras)]) == 0
    out = tmp_path / "job"
    # only clip 0 was tuned: a clear error before any compute
    assert _edit(inputs, out, "--first-frame", str(inputs / "edited.png"), "--lora", str(loras)) == 1
    assert "no motion LoRA for clip(s) [1]" in capsys.readouterr().err
    assert main(["tune", "--method", "i2vedit", "--tiny", "--video", str(inputs / "in.mp4"), "--frames", "6", "--sample-fps", "0",
                 "--i2vedit-clip-length", "4", "--steps", "1", "--i2vedit-size", "32x48", "--i2vedit-clips", "1",
                 "--out", str(loras)]) == 0
    tuned = json.loads((loras / "record.json").read_text())["results"]["clips"]
    assert tuned[0]["recipe"] == "subsequent" and tuned[0]["skip_interval"] is True    # clip 1 attends to clip 0
    assert _edit(inputs, out, "--first-frame", str(inputs / "edited.png"), "--lora", str(loras)) == 0
    loaded = json.loads((out / "record.json").read_text())["results"]["loras"]
    assert [entry["clip"] for entry in loaded] == [0, 1]
    assert all(entry["path"].endswith("tuned-000001.safetensors") and entry["rank"] == 32 for entry in loaded)
    run = json.loads((out / "record.json").read_text())["results"]["clips_run"]
    assert [c["lora"].endswith("tuned-000001.safetensors") for c in run] == [True, True]


def test_other_methods_still_need_a_prompt(inputs, tmp_path, capsys):
    assert main(["edit", "--method", "cove", "--tiny", "--video", str(inputs / "in.mp4"), "--out", str(tmp_path)]) == 1
    assert "needs --prompt" in capsys.readouterr().err


def test_demo(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--method", "i2vedit", "--steps", "2", "--frames", "5", "--out", str(out)]) == 0
    for name in ("source.mp4", "first_frame.png", "edited.mp4", "grid.png", "side_by_side.mp4", "matching_mask.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "record.json").read_text())["results"]
    assert res["clips"] == [[0, 5]] and res["frames"] == 5


def test_demo_takes_dtype(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--method", "i2vedit", "--steps", "2", "--frames", "6", "--dtype", "bf16", "--out", str(out)]) == 0
    run = json.loads((out / "record.json").read_text())["results"]["clips_run"]
    assert [c["edit_dtype"] for c in run] == ["bf16", "bf16"] and [c["inversion_dtype"] for c in run] == ["fp32", "fp32"]
    assert [c["skip_interval"] for c in run] == [False, True] and run[0]["weights_dtype"] == "fp32"


def test_edit_samples_the_source_over_time(tmp_path):
    """The authors' loader samples over time (data.py linspace): a 3 s clip at 8 fps read at 4 fps takes
    every other frame, and the record says which source frames each clip used."""
    video = moving_shapes(24, 40, 56)
    write_video(tmp_path / "long.mp4", video, fps=8)
    save_grid(tmp_path / "edited.png", recolour(video[0])[None], cols=1)
    out = tmp_path / "job"
    assert main(["edit", "--method", "i2vedit", "--tiny", "--video", str(tmp_path / "long.mp4"), "--frames", "6",
                 "--sample-fps", "4", "--i2vedit-clip-length", "4", "--steps", "2", "--i2vedit-size", "32x48",
                 "--first-frame", str(tmp_path / "edited.png"), "--i2vedit-no-matching", "--out", str(out)]) == 0
    res = json.loads((out / "record.json").read_text())["results"]
    assert res["sampling"]["mode"] == "time" and res["sampling"]["source_frames"] == [0, 2, 4, 6, 8, 10]
    assert [c["source_frames"] for c in res["clips_run"]] == [[0, 2, 4, 6], [6, 8, 10]]


def test_matching_mask_picture_labels():
    from minivid.methods.i2vedit.visualize import heat_colors, mask_legend, row_label

    legend = mask_legend()
    assert legend[0][0] == (0, 0, 0) and legend[-1][0] == (255, 255, 255)          # M = 0 black, M = 1 white
    assert len({c for c, _ in legend}) == len(legend)                                 # distinct swatches
    rgb = (heat_colors(torch.tensor([[1 / 3]]))[:, 0, 0] + 1) / 2
    assert legend[1][0] == tuple(int(round(float(c) * 255)) for c in rgb)
    assert row_label("input_blocks.4.1.transformer_blocks.0.attn1") == "IN 4"
    assert row_label("middle_block.1.transformer_blocks.0.attn1") == "MID"
    assert row_label("output_blocks.10.1.transformer_blocks.0.attn1") == "OUT 10"


def test_eval_scores_the_source_frames_the_edit_used(tmp_path, monkeypatch):
    """`--eval` compares the edit with the source frames I2VEdit sampled (over time), not consecutive ones."""
    import minivid.cli.i2vedit as cli_i2v

    video = moving_shapes(24, 40, 56)
    write_video(tmp_path / "long.mp4", video, fps=8)
    save_grid(tmp_path / "edited.png", recolour(video[0])[None], cols=1)
    calls = []
    real = cli_i2v._read_frames
    monkeypatch.setattr(cli_i2v, "_read_frames", lambda path, idx: calls.append(list(idx)) or real(path, idx))
    out = tmp_path / "job"
    assert main(["edit", "--method", "i2vedit", "--tiny", "--video", str(tmp_path / "long.mp4"), "--frames", "6",
                 "--sample-fps", "4", "--i2vedit-clip-length", "4", "--steps", "2", "--i2vedit-size", "32x48",
                 "--first-frame", str(tmp_path / "edited.png"), "--i2vedit-no-matching", "--eval",
                 "--eval-metrics", "subject_consistency", "--out", str(out)]) == 0
    assert calls == [[0, 2, 4, 6, 8, 10], [0, 2, 4, 6, 8, 10]]             # the edit's read, then the eval's
    ev = json.loads((out / "record.json").read_text())["results"]["eval"]
    assert ev["frames"] == 6 and ev["source"]["frames"] == 6
