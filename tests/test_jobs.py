"""Job output folders: the folder is the job's own (a rerun replaces its files), inputs are never written onto."""
from __future__ import annotations

import datetime
import json

import pytest
import torch

from minivid.jobs import Job

FRAMES = torch.zeros(2, 3, 8, 8)


def test_a_rerun_in_the_same_folder_replaces_the_jobs_own_files(tmp_path):
    for value in (-1.0, 1.0):
        job = Job("tune", tmp_path, {"seed": 0})
        job.write_grid("grid.png", FRAMES + value)
        job.add_output(job.path("grid.png"))                 # listed once
        record = json.loads(job.finish(value=value).read_text())
    assert record["outputs"] == ["grid.png"] and record["results"]["value"] == 1.0


def test_overwrite_false_refuses_existing_files(tmp_path):
    first = Job("a", tmp_path, {})
    first.write_grid("grid.png", FRAMES)
    first.finish()
    job = Job("b", tmp_path, {}, overwrite=False)
    with pytest.raises(FileExistsError, match="grid.png"):
        job.write_grid("grid.png", FRAMES)
    job.write_grid("other.png", FRAMES)
    job.abort()


def test_inputs_are_never_written_onto(tmp_path):
    video = tmp_path / "source.mp4"
    make = Job("make", tmp_path, {})
    make.write_video("source.mp4", FRAMES)
    make.finish()
    with pytest.raises(FileExistsError, match="holds the input --video"):     # the folder holds an input
        Job("edit", tmp_path, {"video": str(video)})
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    with pytest.raises(FileExistsError, match="is .or lies inside. the input --video"):   # a folder of frames
        Job("edit", frames_dir, {"video": str(frames_dir), "weights": None})
    with pytest.raises(FileExistsError, match="lies inside"):
        Job("edit", frames_dir / "out", {"video": str(frames_dir)})
    with pytest.raises(FileExistsError, match="--tuned"):                     # a tune folder is an input of edit
        Job("edit", tmp_path / "tuned", {"tuned": str(tmp_path / "tuned")})
    job = Job("edit", tmp_path / "out", {}, inputs=[video])
    with pytest.raises(FileExistsError, match="input"):                       # checked again at write time
        job.output_path("../source.mp4")


def test_unwritable_or_file_out_is_refused_before_anything(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        Job("edit", tmp_path / "afile" / "sub", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_abort_removes_what_the_job_wrote_and_the_folders_it_made(tmp_path):
    out = tmp_path / "a" / "b"
    job = Job("edit", out, {})
    job.write_grid("grid.png", FRAMES)
    (out / "tuned-000004.safetensors").write_bytes(b"kept")       # a checkpoint written by the tuning engine
    job.add_output(out / "tuned-000004.safetensors", keep=True)
    job.abort(RuntimeError("boom"))
    assert job.kept() == ["tuned-000004.safetensors"]
    out = tmp_path / "c" / "d"
    job = Job("edit", out, {})
    job.write_grid("grid.png", FRAMES)
    (out / "sub").mkdir()
    job.abort(KeyboardInterrupt())
    assert not (tmp_path / "c").exists()                          # created by the job, left empty: removed
    existing = tmp_path / "mine"
    existing.mkdir()
    job = Job("edit", existing, {})
    job.abort(None)
    assert existing.is_dir()                                      # not the job's to remove


def test_failed_record_is_kept_on_request(tmp_path):
    job = Job("edit", tmp_path / "o", {"seed": 1})
    record = job.abort(ZeroDivisionError("x"), keep_record=True)
    data = json.loads(record.read_text())
    assert record.name == "record.failed.json" and data["error"] == "ZeroDivisionError: x"


def test_record_is_strict_json_with_times_commit_and_memory(tmp_path):
    job = Job("edit", tmp_path, {"guidance": float("nan")})
    job.ran(size=[48, 64], frames=3, model="tiny", dtype="fp32")
    text = job.finish(loss=float("inf"), losses=[1.0, float("nan")], t=torch.tensor(2.5)).read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["results"] == {"loss": None, "losses": [1.0, None], "t": 2.5}
    assert data["non_finite"] == ["settings.guidance", "results.loss", "results.losses[1]"]
    assert data["ran"] == {"size": [48, 64], "frames": 3, "model": "tiny", "dtype": "fp32"}
    for key in ("started", "finished"):
        assert datetime.datetime.fromisoformat(data[key]).tzinfo is not None
    assert data["peak_memory_bytes"]["cpu_rss"] > 0 and "torch_allocated" in data["peak_memory_bytes"]
    git = data["versions"]["git"]
    assert git is None or len(git["commit"]) == 40
