"""Honest resume (issue 13): a tune folder is continued only by the same run (source, prompt,
options, seed, base weights); otherwise a diff of the fields, unless `--restart`, which keeps the old
checkpoints aside; `--steps` below the saved step is an error."""
import json

import pytest
import torch
import torch.nn as nn

from minivid.cli import main
from minivid.tuning import (
    TuneConfig, TuningError, fingerprint_diff, frames_digest, latest_checkpoint, run_fingerprint, select_parameters,
    tune,
)
from minivid.video import write_video


def toy():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 4))


def run(out, steps=2, lr=1e-2, meta=None, resume=True, seed=0):
    m = toy()
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    loss_fn = lambda step, gen: (m(x + 0.01 * torch.randn(8, 4, generator=gen)) - x).square().mean()  # noqa: E731
    cfg = TuneConfig(steps=steps, lr=lr, progress=False, checkpoint_every=1, seed=seed)
    return tune(m, select_parameters(m, ["*"]), loss_fn, cfg, out, resume=resume,
                meta=meta or {"prompt": "a", "source": "f00d", "base_fingerprint": [0.5, 0.25]})


def test_fingerprint_keeps_what_defines_the_run():
    meta = {"config": {"steps": 3, "lr": 1e-3, "checkpoint_every": 1, "progress": True, "betas": (0.9, 0.99)},
            "prompt": "p", "base": {"weights": "/a/sd.ckpt", "tiny_seed": None}, "ei2": {"r": 2, "ffam_backend": "auto"},
            "world_size": 2, "step": 4}
    assert run_fingerprint(meta) == {"config.lr": 1e-3, "config.betas": [0.9, 0.99], "prompt": "p",
                                     "base.tiny_seed": None, "ei2.r": 2}
    other = {**meta, "config": {**meta["config"], "steps": 9}, "base": {"weights": "/b/sd.ckpt", "tiny_seed": None}}
    assert fingerprint_diff(meta, other) == {}
    assert fingerprint_diff({"base_fingerprint": [1.0, 2.0]}, {"base_fingerprint": [1.001, 2.0]}) == {}
    assert set(fingerprint_diff({"base_fingerprint": [1.0], "prompt": "p"},
                                {"base_fingerprint": [1.5], "prompt": "q"})) == {"base_fingerprint", "prompt"}


def test_frames_digest_sees_the_frames_not_float_noise():
    f = torch.rand(2, 3, 8, 8) * 2 - 1
    assert frames_digest(f) == frames_digest(f + 1e-6 * (f.abs() < 0.5))
    assert frames_digest(f) != frames_digest(f.flip(0)) and frames_digest(f) != frames_digest(f[:1])


def test_same_run_resumes(tmp_path):
    run(tmp_path, steps=2)
    res = run(tmp_path, steps=4)
    assert res.start_step == 2 and len(res.losses) == 2


@pytest.mark.parametrize("change, field", [
    (dict(lr=1e-3), "config.lr"), (dict(seed=5), "config.seed"),
    (dict(meta={"prompt": "b", "source": "f00d", "base_fingerprint": [0.5, 0.25]}), "prompt"),
    (dict(meta={"prompt": "a", "source": "beef", "base_fingerprint": [0.5, 0.25]}), "source"),
    (dict(meta={"prompt": "a", "source": "f00d", "base_fingerprint": [0.9, 0.25]}), "base_fingerprint"),
])
def test_another_run_is_refused_with_the_fields_that_differ(tmp_path, change, field):
    run(tmp_path, steps=2)
    with pytest.raises(TuningError, match=rf"differs in 1 field\(s\): {field}: .*\(checkpoint\) vs .*\(now\)"):
        run(tmp_path, steps=4, **change)
    assert latest_checkpoint(tmp_path).name == "tuned-000002.safetensors"        # nothing was touched


def test_steps_below_the_saved_step_is_an_error(tmp_path):
    run(tmp_path, steps=3)
    with pytest.raises(TuningError, match="already at step 3.*past the 2 steps"):
        run(tmp_path, steps=2)
    assert run(tmp_path, steps=3).losses == []                                      # at the step: nothing to do


def test_restart_keeps_the_old_checkpoints_aside(tmp_path):
    run(tmp_path, steps=2)
    before = (tmp_path / "tuned-000002.safetensors").read_bytes()
    res = run(tmp_path, steps=1, lr=1e-3, resume=False)
    assert res.start_step == 0
    assert sorted(p.name for p in (tmp_path / "previous-1").iterdir()) == sorted(
        f"tuned-00000{s}{x}.safetensors" for s in (1, 2) for x in ("", ".optim"))
    assert (tmp_path / "previous-1" / "tuned-000002.safetensors").read_bytes() == before
    assert latest_checkpoint(tmp_path).name == "tuned-000001.safetensors"
    run(tmp_path, steps=1, resume=False)
    assert (tmp_path / "previous-2" / "tuned-000001.safetensors").is_file()


# ---------------------------------------------------------------- through `minivid tune`

@pytest.fixture
def clips(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = write_video(tmp_path / "a.mp4", torch.rand(2, 3, 32, 32, generator=g) * 2 - 1)
    b = write_video(tmp_path / "b.mp4", torch.rand(2, 3, 32, 32, generator=g) * 2 - 1)
    return a, b


@pytest.mark.parametrize("method", ["ei2", "tcve"])
def test_tune_cli_resume_refuse_restart(tmp_path, clips, capsys, method):
    a, b = clips
    out = tmp_path / "tune"
    common = ["tune", "--method", method, "--tiny", "--frames", "2", "--checkpoint-every", "1", "--out", str(out)]
    assert main([*common, "--video", str(a), "--prompt", "a clip", "--steps", "1"]) == 0
    grid = (out / "source_grid.png").read_bytes()
    capsys.readouterr()
    # another video, prompt and lr: refused, naming each field; nothing replaced
    assert main([*common, "--video", str(b), "--prompt", "another", "--lr", "1e-3", "--steps", "2"]) == 1
    err = capsys.readouterr().err
    assert "holds another tuning run" in err and "Traceback" not in err
    for field in ("source:", "prompt: 'a clip' (checkpoint) vs 'another' (now)", "config.lr:"):
        assert field in err
    assert (out / "source_grid.png").read_bytes() == grid and not (out / "tuned-000002.safetensors").exists()
    # the same run goes on; --steps below the saved step is an error
    assert main([*common, "--video", str(a), "--prompt", "a clip", "--steps", "2"]) == 0
    assert json.loads((out / "record.json").read_text())["results"]["start_step"] == 1
    capsys.readouterr()
    assert main([*common, "--video", str(a), "--prompt", "a clip", "--steps", "1"]) == 1
    assert "already at step 2" in capsys.readouterr().err
    # --restart: start over with the other run, the old checkpoints kept aside
    assert main([*common, "--video", str(b), "--prompt", "another", "--steps", "1", "--restart"]) == 0
    assert (out / "previous-1" / "tuned-000002.safetensors").is_file()
    assert json.loads((out / "record.json").read_text())["results"]["start_step"] == 0
    assert latest_checkpoint(out).name == "tuned-000001.safetensors"
