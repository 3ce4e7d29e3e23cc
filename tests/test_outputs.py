"""Issue 22 (bad input, round two) beyond the table of tests/test_bad_inputs.py: the one writer, the one
lock per output folder, the one signal path, a failing rerun that keeps the earlier run, the memory
check's allocation failure, and the mistakes that used to pass in silence. Each test names its family
(docs/errors.md, "Round two"). Everything runs in-process through `minivid.cli.main` on tiny models.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import signal
import stat

import pytest
import torch

from minivid import jobs, outputs
from minivid.cli import main


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> pathlib.Path:
    from minivid.video import write_video

    root = tmp_path_factory.mktemp("outputs")
    write_video(root / "clip.mp4", torch.rand(4, 3, 40, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    return root / "clip.mp4"


def digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_state(folder: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def invert(clip, out, *extra) -> list[str]:
    return ["invert", "--tiny", "--video", str(clip), "--frames", "2", "--steps", "1", "--out", str(out), *extra]


# ---------------------------------------------------------------- 1. an input overwritten

def test_family1_a_planted_symlink_at_the_old_temporary_name_is_never_followed(clip, tmp_path, capsys):
    """`.record.json.tmp` (the fixed name minivid used) planted as a symlink to the input video: the job
    writes its record elsewhere (an unpredictable name, created exclusively) and the video is untouched."""
    out = tmp_path / "out"
    out.mkdir()
    before = digest(clip)
    for name in (".record.json.tmp", "record.json.tmp", ".grid.png.tmp"):
        os.symlink(clip, out / name)
    assert main(invert(clip, out)) == 0
    assert digest(clip) == before
    assert json.loads((out / "record.json").read_text())["job"] == "invert"
    assert not (out / "record.json").is_symlink() and (out / ".record.json.tmp").is_symlink()
    # eval --json: the same writer
    (tmp_path / ".metrics.json.tmp").symlink_to(clip)
    (tmp_path / "metrics.json.tmp").symlink_to(clip)
    assert main(["eval", str(clip), "--tiny", "--json", str(tmp_path / "metrics.json")]) == 0
    assert digest(clip) == before and json.loads((tmp_path / "metrics.json").read_text())["tiny"] is True


def test_family1_the_writer_never_renames_onto_an_input(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"input")
    (tmp_path / "link.bin").symlink_to(source)
    for target in (source, tmp_path / "link.bin"):
        with pytest.raises(FileExistsError, match="input"):
            outputs.write_bytes(target, b"result", inputs=[source])
    assert source.read_bytes() == b"input"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.bin", "source.bin"]   # no temporary file left


# ---------------------------------------------------------------- 2. exit 0 with an empty output

def test_family2_an_encoder_that_writes_nothing_is_an_error_and_replaces_nothing(tmp_path, monkeypatch):
    from minivid import video

    frames = torch.zeros(2, 3, 8, 8)
    path = video.write_video(tmp_path / "v.mp4", frames)
    before = digest(path)
    monkeypatch.setattr(video, "_encode", lambda tmp, *a, **k: None)          # ffmpeg failed silently
    with pytest.raises(outputs.WriteError, match=r"v.mp4: the writer produced 0 bytes.*nothing was replaced"):
        video.write_video(path, frames, overwrite=True)
    monkeypatch.setattr(video, "_encode", lambda tmp, *a, **k: pathlib.Path(tmp).write_bytes(b"not a video"))
    with pytest.raises(outputs.WriteError, match="does not decode"):
        video.write_video(path, frames, overwrite=True)
    assert digest(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_family2_through_the_cli_a_failed_encode_exits_1_and_writes_no_final_file(clip, tmp_path, capsys, monkeypatch):
    from minivid import video

    monkeypatch.setattr(video, "_encode", lambda tmp, *a, **k: None)
    out = tmp_path / "out"
    assert main(invert(clip, out)) == 1
    err = capsys.readouterr().err
    assert "reconstruction.mp4: the writer produced 0 bytes" in err and "Traceback" not in err
    assert not out.exists()


# ---------------------------------------------------------------- 3. an earlier run lost

def test_family3_a_failing_rerun_leaves_the_earlier_run_as_it_was(clip, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(invert(clip, out)) == 0
    first = folder_state(out)
    assert "source_grid.png" in first and "record.json" in first
    real = outputs.write_file

    def disk_full_at_the_video(path, *a, **k):          # a full disk after the grids were written
        if pathlib.Path(path).suffix == ".mp4":
            raise outputs.WriteError(errno.ENOSPC, f"{path}: writing failed (no space left on the device); "
                                                   f"nothing was replaced")
        return real(path, *a, **k)

    monkeypatch.setattr(outputs, "write_file", disk_full_at_the_video)
    assert main(invert(clip, out, "--seed", "1")) == 1
    err = capsys.readouterr().err
    assert "reconstruction.mp4: writing failed (no space left on the device)" in err
    assert folder_state(out) == first                                         # every file as it was
    assert sorted(p.name for p in out.iterdir()) == sorted(first)              # no staging folder, no lock
    monkeypatch.undo()
    assert main(invert(clip, out, "--seed", "1")) == 0                         # a rerun that succeeds replaces
    assert json.loads((out / "record.json").read_text())["settings"]["seed"] == 1


def test_family3_an_interrupted_rerun_says_the_earlier_files_are_as_they_were(clip, tmp_path, capsys, monkeypatch):
    import minivid.samplers as S

    out = tmp_path / "out"
    assert main(invert(clip, out)) == 0
    first = folder_state(out)
    real = S.step_done

    def interrupt(loop, i, n, x=None, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "step_done", interrupt)
    assert main(invert(clip, out)) == 130
    err = capsys.readouterr().err
    assert f"the files already in {out} before this run are as they were" in err and "nothing was kept" not in err
    assert folder_state(out) == first
    monkeypatch.setattr(S, "step_done", real)


# ---------------------------------------------------------------- 4. two runs into one --out

def test_family4_a_second_run_into_a_locked_folder_is_refused(clip, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with outputs.FolderLock(out):                    # another run holds the folder (flock: per open file)
        assert main(invert(clip, out)) == 1
        err = capsys.readouterr().err
        assert f"--out {out}: another minivid run (process {os.getpid()}) is writing into this folder" in err
        assert sorted(p.name for p in out.iterdir()) == [".minivid.lock"]
    assert main(invert(clip, out)) == 0              # released: the next run goes ahead, and leaves no lock
    assert not (out / ".minivid.lock").exists() and not list(out.glob(".minivid-new.*"))


def test_family4_a_second_batch_into_one_folder_is_refused(tmp_path, capsys):
    plan = tmp_path / "plan.jsonl"
    plan.write_text('{"id": "a", "command": "generate", "args": {"tiny": true, "prompt": "x", "steps": 1}}\n')
    out = tmp_path / "batch"
    out.mkdir()
    with outputs.FolderLock(out, name=".minivid-batch-0.lock"):
        assert main(["batch", str(plan), "--out", str(out)]) == 1
    assert "another minivid run" in capsys.readouterr().err and not (out / "a").exists()


def test_family4_the_lock_is_exclusive_between_processes(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    code = ("import sys; from minivid import outputs\n"
            "try:\n    outputs.FolderLock(sys.argv[1]).acquire()\nexcept outputs.FolderBusyError as e:\n"
            "    print(e); sys.exit(3)\n")
    with outputs.FolderLock(out):
        run = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 3 and "another minivid run" in run.stdout
    assert subprocess.run([sys.executable, "-c", code, str(out)], timeout=120).returncode == 0


# ---------------------------------------------------------------- 5. signals

def test_family5_sigterm_gets_what_ctrl_c_gets(clip, tmp_path, capsys, monkeypatch):
    import minivid.samplers as S

    real = S.step_done

    def term_at_one(loop, i, n, x=None, **k):
        real(loop, i, n, x, **k)
        os.kill(os.getpid(), signal.SIGTERM)          # a real signal, through the handler main installs

    monkeypatch.setattr(S, "step_done", term_at_one)
    out = tmp_path / "out"
    assert main(invert(clip, out)) == 143
    err = capsys.readouterr().err
    assert "interrupted by SIGTERM at step 1/1 of DDIM inversion; nothing was kept" in err and "Traceback" not in err
    assert not out.exists() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL   # handler restored


def test_family5_a_signal_while_the_outputs_are_put_in_place_waits_for_them(clip, tmp_path, capsys, monkeypatch):
    real = outputs.remove_tree
    calls = {"n": 0}

    def interrupt_inside_finish(folder):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGINT)      # Ctrl-C in the middle of finish's renames
        return real(folder)

    monkeypatch.setattr(outputs, "remove_tree", interrupt_inside_finish)
    out = tmp_path / "out"
    assert main(invert(clip, out)) == 130
    err = capsys.readouterr().err
    record = json.loads((out / "record.json").read_text())
    assert all((out / name).is_file() for name in record["outputs"])            # the job is entirely in place
    assert "after the job had finished; 1 finished job(s) kept their outputs" in err and "nothing was kept" not in err


def test_family5_ctrl_c_while_starting_prints_no_traceback(capsys, monkeypatch):
    import minivid.cli as cli

    def slow_import(*a):
        raise KeyboardInterrupt                      # Ctrl-C while torch is being imported

    monkeypatch.setattr(cli, "build_parser", slow_import)
    assert main(["invert", "--help"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "minivid: interrupted while starting; nothing was written"


def test_family5_a_signal_that_breaks_an_import_is_still_an_interrupt(capsys, monkeypatch):
    import minivid.cli as cli

    def import_torch(*a):
        try:
            os.kill(os.getpid(), signal.SIGTERM)     # arrives inside an extension's initialisation ...
        except KeyboardInterrupt:
            raise ImportError("cannot load module more than once per process") from None   # ... which says this

    monkeypatch.setattr(cli, "build_parser", import_torch)
    assert main(["invert", "--help"]) == 143
    err = capsys.readouterr().err
    assert err.strip() == "minivid: interrupted by SIGTERM while starting; nothing was written"


def test_family5_an_interrupted_batch_names_the_finished_items(tmp_path, capsys, monkeypatch):
    import minivid.samplers as S

    plan = tmp_path / "plan.jsonl"
    plan.write_text("".join(json.dumps({"id": i, "command": "generate", "args": {"tiny": True, "prompt": "x",
                                                                               "steps": 1}}) + "\n"
                            for i in ("first", "second")))
    real, calls = S.step_done, {"n": 0}

    def interrupt_second(loop, i, n, x=None, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(loop, i, n, x, **k)

    monkeypatch.setattr(S, "step_done", interrupt_second)
    out = tmp_path / "batch"
    assert main(["batch", str(plan), "--out", str(out), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert f"1 finished job(s) kept their outputs ({out / 'first'})" in err and "nothing was kept" not in err
    assert (out / "first" / "record.json").is_file() and not (out / "second").exists()


# ---------------------------------------------------------------- 7. the memory check

def test_family7_an_allocation_failure_is_a_known_error_with_the_numbers(clip, tmp_path, capsys, monkeypatch):
    import minivid.pipelines.sd as P

    def alloc(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 128849018880 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(P, "invert_video", alloc)
    out = tmp_path / "out"
    assert main(invert(clip, out)) == 1
    err = capsys.readouterr().err
    assert "error: out of memory: " in err and "128849018880 bytes" in err and "GiB available of" in err
    assert "Traceback" not in err and "internal error" not in err and not out.exists()


# ---------------------------------------------------------------- 8. mistakes accepted in silence

def test_family8_an_explicit_size_with_tiny_is_honoured(clip, tmp_path):
    out = tmp_path / "out"
    assert main(invert(clip, out, "--size", "16")) == 0
    assert json.loads((out / "record.json").read_text())["ran"]["size"] == [16, 16]   # 48x40 -> 19x16 -> 16x16


def test_family8_batch_reruns_an_item_whose_options_changed(tmp_path, capsys):
    plan = tmp_path / "plan.jsonl"
    out = tmp_path / "batch"

    def run(seed: int) -> dict:
        plan.write_text(json.dumps({"id": "a", "command": "generate",
                                    "args": {"tiny": True, "prompt": "x", "steps": 1, "seed": seed}}) + "\n")
        assert main(["batch", str(plan), "--out", str(out), "--no-progress"]) == 0
        return json.loads((out / "batch.json").read_text())["counts"]

    assert run(0) == {"done": 1, "skipped": 0, "failed": 0}
    assert run(0) == {"done": 0, "skipped": 1, "failed": 0}            # unchanged: skipped
    assert run(5) == {"done": 1, "skipped": 0, "failed": 0}            # --seed changed: run again
    assert json.loads((out / "a" / "record.json").read_text())["settings"]["seed"] == 5


def test_family8_an_int8_tensor_in_a_checkpoint_is_refused(tmp_path):
    import safetensors.torch

    from minivid.models import StableDiffusion
    from minivid.weights import WeightsError

    path = tmp_path / "sd.safetensors"
    StableDiffusion.from_config("tiny", seed=0).save(path)
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
    name = "first_stage_model.decoder.conv_out.bias"
    tensors[name] = tensors[name].to(torch.int8)
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    with pytest.raises(WeightsError, match=r"stored as integers where the model holds floats .*conv_out.bias \(torch.int8\)"):
        StableDiffusion.load(path)


def test_family8_a_resume_without_optimizer_moments_says_so(tmp_path, caplog):
    import torch.nn as nn

    from minivid.tuning import TuningError, load_trainable, save_trainable

    model = nn.Linear(2, 2)
    trainable = dict(model.named_parameters())
    opt = torch.optim.AdamW(trainable.values())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    path = save_trainable(tmp_path / "tuned-000001.safetensors", trainable, 1, opt)
    optim = tmp_path / "tuned-000001.optim.safetensors"
    optim.write_bytes(optim.read_bytes()[:40])                          # truncated
    with pytest.raises(TuningError, match="tuned-000001.optim.safetensors: not a readable safetensors file"):
        load_trainable(path, model, torch.optim.AdamW(trainable.values()), trainable)
    optim.unlink()
    with caplog.at_level("WARNING"):
        assert load_trainable(path, model, torch.optim.AdamW(trainable.values()), trainable) == 1
    assert "no optimizer moments beside it" in caplog.text and "differ from an uninterrupted run" in caplog.text


# ---------------------------------------------------------------- 9. messages

def test_family9_bad_json_in_weights_names_the_file(tmp_path):
    from minivid.models import StableDiffusion
    from minivid.weights import WeightsError

    folder = tmp_path / "diffusers"
    StableDiffusion.from_config("tiny", seed=0).save(folder, format="diffusers")
    (folder / "scheduler" / "scheduler_config.json").write_text("[1, 2]")
    with pytest.raises(WeightsError, match=r"scheduler_config.json: expected a JSON object .*got a JSON list"):
        StableDiffusion.load(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text("{")
    with pytest.raises(WeightsError, match=r"scheduler_config.json: not valid JSON \(.* at line 1 column 2\)"):
        StableDiffusion.load(folder)
    import safetensors.torch

    single = tmp_path / "sd.safetensors"
    StableDiffusion.from_config("tiny", seed=0).save(single)
    tensors = safetensors.torch.load_file(str(single))
    safetensors.torch.save_file(tensors, str(single), metadata={"format": "pt", "minivid_config": "{\"unet\": "})
    with pytest.raises(WeightsError, match=r"sd.safetensors \(metadata 'minivid_config'\): not valid JSON"):
        StableDiffusion.load(single)


def test_family9_a_full_disk_names_the_file(tmp_path, monkeypatch):
    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(outputs.WriteError, match=r"r.json: writing failed \(no space left on the device\); nothing was replaced"):
        outputs.write_file(tmp_path / "r.json", full)
    assert (tmp_path / "r.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


# ---------------------------------------------------------------- issue 17 item 11: file modes

@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_17_11_outputs_get_the_umask_mode(clip, tmp_path, mask):
    from minivid.models import StableDiffusion

    old = os.umask(mask)
    try:
        out = tmp_path / "out"
        assert main(invert(clip, out)) == 0
        StableDiffusion.from_config("tiny", seed=0).save(tmp_path / "saved", format="diffusers")
        StableDiffusion.from_config("tiny", seed=0).save(tmp_path / "saved.safetensors")
    finally:
        os.umask(old)
    files = [p for p in [*out.rglob("*"), *(tmp_path / "saved").rglob("*"), tmp_path / "saved.safetensors"]]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in files}
    want = {p: (0o777 if (tmp_path / p).is_dir() else 0o666) & ~mask for p in modes}
    assert modes == want and stat.S_IMODE((tmp_path / "saved").stat().st_mode) == 0o777 & ~mask
    assert len([p for p in modes if p.startswith("out/")]) >= 4 and not jobs.ACTIVE
