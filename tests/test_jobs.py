"""Job output folders: the folder is the job's own (a rerun replaces its files), inputs are never written onto."""
from __future__ import annotations

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
    Job("a", tmp_path, {}).write_grid("grid.png", FRAMES)
    job = Job("b", tmp_path, {}, overwrite=False)
    with pytest.raises(FileExistsError, match="grid.png"):
        job.write_grid("grid.png", FRAMES)
    job.write_grid("other.png", FRAMES)


def test_inputs_are_never_written_onto(tmp_path):
    video = tmp_path / "source.mp4"
    Job("make", tmp_path, {}).write_video("source.mp4", FRAMES)
    job = Job("edit", tmp_path, {"video": str(video)})
    with pytest.raises(FileExistsError, match="input"):
        job.write_video("source.mp4", FRAMES)
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    job = Job("edit", frames_dir, {"video": str(frames_dir), "weights": None})     # a folder of frames as input
    with pytest.raises(FileExistsError, match="input"):
        job.write_grid("grid.png", FRAMES)
    job = Job("edit", tmp_path / "out", {}, inputs=[video])
    with pytest.raises(FileExistsError, match="input"):
        job.output_path("../source.mp4")
