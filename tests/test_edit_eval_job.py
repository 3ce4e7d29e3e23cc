"""`minivid edit --eval` scores inside the edit's job: the folder's lock is held while the metrics are computed,
and record.json is written once, through minivid.outputs' writer, with the metrics in it."""
from __future__ import annotations

import json

import pytest
import torch

from minivid import outputs
from minivid.cli import main
from minivid.video import write_video


@pytest.fixture
def clip(tmp_path):
    video = tmp_path / "in.mp4"
    write_video(video, torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1, fps=4)
    return video


def _edit(video, out, *more):
    return main(["edit", "--method", "cove", "--tiny", "--video", str(video), "--frames", "3", "--prompt", "a disc",
                 "--steps", "1", "--cove-inversion-steps", "1", "--eval", "--eval-metrics", "clip_frame_consistency",
                 "--out", str(out), *more])


def _watch_writes(monkeypatch) -> list:
    """Every file minivid.outputs' writer writes: (path, bytes)."""
    written = []
    real = outputs.write_bytes

    def write_bytes(path, data, **kw):
        written.append((str(path), data))
        return real(path, data, **kw)
    monkeypatch.setattr(outputs, "write_bytes", write_bytes)
    return written


def test_eval_runs_inside_the_locked_job_and_the_record_is_written_once(clip, tmp_path, monkeypatch):
    import minivid.cli.eval as cli_eval

    out = tmp_path / "job"
    seen = {}
    real = cli_eval.evaluate_videos

    def evaluate_videos(*a, **kw):
        with pytest.raises(outputs.FolderBusyError):          # another run cannot take the folder now
            outputs.FolderLock(out).acquire()
        seen["record_before"] = (out / "record.json").exists()
        seen["edited_in_place"] = (out / "edited.mp4").exists()
        return real(*a, **kw)
    monkeypatch.setattr(cli_eval, "evaluate_videos", evaluate_videos)
    written = _watch_writes(monkeypatch)
    assert _edit(clip, out) == 0
    # scored while the job held the lock, from the staged video, before any record.json existed
    assert seen == {"record_before": False, "edited_in_place": False}
    records = [data for path, data in written if path.endswith("record.json")]
    assert len(records) == 1                                  # one write, through the writer, metrics inside
    record = json.loads(records[0])
    assert record == json.loads((out / "record.json").read_text())
    assert set(record["results"]["eval"]["metrics"]) == {"clip_frame_consistency"}
    assert record["timings_s"]["eval"] > 0 and "eval" not in record["results"]["cove"]
    assert not (out / outputs.FolderLock.NAME).exists()      # released at the end


def test_a_failing_eval_keeps_the_edit_and_says_so(clip, tmp_path, monkeypatch, capsys):
    import minivid.cli.eval as cli_eval

    def evaluate_videos(*a, **kw):
        raise RuntimeError("encoder exploded")
    monkeypatch.setattr(cli_eval, "evaluate_videos", evaluate_videos)
    out = tmp_path / "job"
    assert _edit(clip, out) == 1
    err = capsys.readouterr().err
    assert "--eval failed after the edit" in err and "encoder exploded" in err and "Traceback" not in err
    record = json.loads((out / "record.json").read_text())
    assert record["results"]["eval"] == {"error": "RuntimeError: encoder exploded"}
    assert (out / "edited.mp4").is_file() and not (out / outputs.FolderLock.NAME).exists()
