"""Bad input never reaches a traceback, a black image or a half-written folder.

`CASES` is a table of bad command lines run in-process through `minivid.cli.main(argv)`: each must
exit non-zero, print a message naming the problem (every listed fragment), print no traceback, leave
the inputs as they were and write nothing (no new file anywhere under the test's folder, no empty
output folder). docs/errors.md lists the same table with each message. Then the paths the table
cannot show: Ctrl-C (exit 130, where it stopped, what was kept, how to resume), a closed stdout, an
internal error (short traceback, record.failed.json, a request to report), and the API's exceptions.
"""
from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch

from minivid import checks, jobs
from minivid.cli import main

FILES: dict[str, pathlib.Path] = {}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> pathlib.Path:
    """The inputs: a clip, an image, a text file, tiny SD and SVD checkpoints, and each with a NaN in it."""
    from minivid.models import StableDiffusion
    from minivid.svd import StableVideoDiffusion
    from minivid.video import save_grid, write_video

    root = tmp_path_factory.mktemp("bad_inputs")
    g = torch.Generator().manual_seed(0)
    write_video(root / "clip.mp4", torch.rand(4, 3, 40, 48, generator=g) * 2 - 1)
    save_grid(root / "image.png", torch.rand(1, 3, 40, 48, generator=g) * 2 - 1)
    (root / "notes.txt").write_text("not a video\n")
    sd = StableDiffusion.from_config("tiny", seed=0)
    sd.save(root / "sd.safetensors")
    with torch.no_grad():
        sd.unet.input_blocks[1][0].in_layers[2].weight[0, 0, 0, 0] = float("nan")
        sd.vae.decoder.conv_out.bias[0] = float("inf")
    sd.save(root / "sd_nan.safetensors")
    torch.manual_seed(0)
    svd = StableVideoDiffusion.from_config("tiny")
    svd.save(root / "svd.safetensors")
    with torch.no_grad():
        next(svd.unet.parameters()).view(-1)[0] = float("nan")
    svd.save(root / "svd_nan.safetensors")
    # round two: paths that are not plain files, elongated sources, a batch plan
    for name in ("loop.mp4", "loop.ckpt", "loop.png", "loopdir"):
        os.symlink(root / name, root / name)                    # a symlink pointing at itself
    os.mkfifo(root / "fifo.mp4")
    (root / "adir").mkdir()
    (root / "adir" / "keep.txt").write_text("a folder, not an image\n")
    save_grid(root / "wide.png", torch.rand(1, 3, 16, 4000, generator=g) * 2 - 1)
    write_video(root / "wide.mp4", torch.rand(2, 3, 8, 2200, generator=g) * 2 - 1)
    (root / "plan.jsonl").write_text('{"id": "a", "command": "generate", "args": {"tiny": true, "prompt": "x"}}\n')
    return root


@pytest.fixture(autouse=True)
def _at_most_16_gib(monkeypatch):
    """The memory check sees at most 16 GiB available, so the huge cases are refused on any CI machine."""
    from minivid.cli import common

    real = common.available_memory
    monkeypatch.setattr(common, "available_memory", lambda device="cpu": (min(real(device)[0], 16 * 2 ** 30),
                                                                          real(device)[1]))


def _snapshot(root: pathlib.Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (os.lstat(p).st_size, os.lstat(p).st_mtime_ns) for p in root.rglob("*")}


T = ["--tiny", "--video", "{clip}"]
INV = ["invert", *T]
GEN = ["generate", "--tiny", "--prompt", "a fox"]
ANI = ["animate", "--tiny", "--steps", "1"]
TUNE = ["tune", "--method", "tcve", "--tiny", "--video", "{clip}", "--prompt", "a ball"]
EDIT = ["edit", "--tiny", "--video", "{clip}", "--prompt", "x", "--method"]

# (id, argv, exit code, fragments the message must hold)
CASES = [
    # numbers: range, finite, integer (argparse's usage error, exit 2, before anything loads)
    ("invert-stride-0", INV + ["--stride", "0"], 2, ["--stride", "integer in [1, 10000]", "got 0"]),
    ("invert-stride-frac", INV + ["--stride", "0.5"], 2, ["--stride", "integer", "'0.5'"]),
    ("invert-frames-0", INV + ["--frames", "0"], 2, ["--frames", "integer in [1, 100000]"]),
    ("invert-steps-0", INV + ["--steps", "0"], 2, ["--steps", "integer in [1, 1000]"]),
    ("invert-steps-1001", INV + ["--steps", "1001"], 2, ["--steps", "[1, 1000]", "1001"]),
    ("invert-guidance-nan", INV + ["--guidance", "nan"], 2, ["--guidance", "finite number in [0, 100]"]),
    ("invert-guidance-inf", INV + ["--guidance", "inf"], 2, ["--guidance", "finite"]),
    ("invert-guidance-negative", INV + ["--guidance", "-1"], 2, ["--guidance", "in [0, 100]", "-1"]),
    ("invert-fps-0", INV + ["--fps", "0"], 2, ["--fps", "[0.01, 1000]"]),
    ("invert-fps-nan", INV + ["--fps", "nan"], 2, ["--fps", "finite"]),
    ("invert-size-0", INV + ["--size", "0"], 2, ["--size", "integer in [8, "]),
    ("invert-size-text", INV + ["--size", "big"], 2, ["--size", "'big'"]),
    ("invert-chunk-0", INV + ["--chunk", "0"], 2, ["--chunk", "integer"]),
    ("invert-threads-0", INV + ["--threads", "0"], 2, ["--threads", "integer in [1, 4096]"]),
    ("invert-threads-negative", INV + ["--threads", "-2"], 2, ["--threads", "-2"]),
    ("invert-seed-negative", INV + ["--seed", "-1"], 2, ["--seed", "integer in [0, 2^63 - 1]", "got -1"]),
    ("invert-device-tpu", INV + ["--device", "tpu"], 2, ["--device", "tpu"]),
    ("invert-dtype-fp8", INV + ["--dtype", "fp8"], 2, ["--dtype", "invalid choice"]),
    ("generate-guidance-nan", GEN + ["--guidance", "nan"], 2, ["--guidance", "finite"]),
    ("generate-guidance-inf", GEN + ["--guidance", "inf"], 2, ["--guidance", "finite"]),
    ("generate-num-images-0", GEN + ["--num-images", "0"], 2, ["--num-images", "integer"]),
    ("generate-height-4", GEN + ["--height", "4"], 2, ["--height", "[8, "]),
    ("generate-steps-frac", GEN + ["--steps", "2.5"], 2, ["--steps", "'2.5'"]),
    ("generate-no-prompt", ["generate", "--tiny"], 2, ["--prompt", "required"]),
    ("animate-frames-0", ANI + ["--frames", "0"], 2, ["--frames", "integer in [1, 100000]"]),
    ("animate-fps-0", ANI + ["--fps", "0"], 2, ["--fps", "integer in [1, 1000]"]),
    ("animate-motion-bucket", ANI + ["--motion-bucket", "-1"], 2, ["--motion-bucket", "[0, 1023]"]),
    ("animate-noise-aug-nan", ANI + ["--noise-aug", "nan"], 2, ["--noise-aug", "finite"]),
    ("animate-max-guidance-inf", ANI + ["--max-guidance", "inf"], 2, ["--max-guidance", "finite"]),
    ("animate-decode-chunk-0", ANI + ["--decode-chunk", "0"], 2, ["--decode-chunk", "integer"]),
    ("demo-frames-0", ["demo", "--frames", "0"], 2, ["--frames", "integer"]),
    ("demo-steps-0", ["demo", "--steps", "0"], 2, ["--steps", "integer"]),
    ("tune-lr-0", TUNE + ["--lr", "0"], 2, ["--lr", "(0, 1]"]),
    ("tune-lr-nan", TUNE + ["--lr", "nan"], 2, ["--lr", "finite"]),
    ("tune-checkpoint-every-0", TUNE + ["--checkpoint-every", "0"], 2, ["--checkpoint-every", "integer"]),
    ("tune-steps-0", TUNE + ["--steps", "0"], 2, ["--steps", "integer"]),
    ("edit-cove-window-even", EDIT + ["cove", "--cove-window", "4"], 2, ["--cove-window", "odd integer"]),
    ("edit-cove-merge-ratio-1", EDIT + ["cove", "--cove-merge-ratio", "1"], 2, ["--cove-merge-ratio", "[0, 1)"]),
    ("edit-cove-point-outside", EDIT + ["cove", "--cove-point", "2,0"], 2, ["--cove-point", "[0, 1]"]),
    ("edit-ei2-r-0", EDIT + ["ei2", "--ei2-r", "0"], 2, ["--ei2-r", "integer in [1, 64]"]),
    ("edit-tcve-vae-chunk-0", EDIT + ["tcve", "--tcve-vae-chunk", "0"], 2, ["--tcve-vae-chunk", "integer"]),
    ("edit-method-unknown", EDIT + ["nope"], 2, ["--method", "invalid choice"]),
    # known errors (exit 1): one line, before the compute
    ("demo-size-not-16", ["demo", "--size", "20"], 1, ["--size a multiple of 16"]),
    ("demo-method-unknown", ["demo", "--method", "nope"], 1, ["unknown method 'nope'"]),
    ("demo-frames-huge", ["demo", "--frames", "100000"], 1, ["100000-frame clip", "needs at least", "GiB", "available of"]),
    ("invert-size-huge", INV + ["--size", "100000"], 1, ["frame(s) of 120000x100000 (48x40 at --size 100000) needs at least", "this machine has"]),
    ("invert-frames-more-than-video", INV + ["--frames", "9"], 1, ["clip.mp4", "has 4 frames", "fewer than the 9"]),
    ("invert-no-model", ["invert", "--video", "{clip}"], 1, ["--weights", "--tiny"]),
    ("invert-video-missing", ["invert", "--tiny", "--video", "{root}/nothere.mp4"], 1, ["nothere.mp4", "no such file"]),
    ("invert-video-not-video", ["invert", "--tiny", "--video", "{root}/notes.txt"], 1, ["notes.txt", "cannot be decoded"]),
    ("invert-weights-missing", ["invert", "--weights", "{root}/none.ckpt", "--video", "{clip}"], 1, ["none.ckpt"]),
    ("invert-weights-nan", ["invert", "--weights", "{root}/sd_nan.safetensors", "--video", "{clip}"], 1,
     ["sd_nan.safetensors", "2 tensor(s) hold NaN/Inf", "first_stage_model.decoder.conv_out.bias",
      "model.diffusion_model.input_blocks.1.0.in_layers.2.weight", "--allow-nonfinite"]),
    ("generate-weights-svd", ["generate", "--weights", "{root}/svd.safetensors", "--prompt", "a"], 1,
     ["svd.safetensors", "not a Stable Diffusion"]),
    ("animate-weights-sd", ["animate", "--weights", "{root}/sd.safetensors", "--image", "{root}/image.png"], 1,
     ["sd.safetensors", "not a Stable Video Diffusion"]),
    ("animate-weights-nan", ["animate", "--weights", "{root}/svd_nan.safetensors", "--image", "{root}/image.png"], 1,
     ["svd_nan.safetensors", "hold NaN/Inf", "model.diffusion_model."]),
    ("animate-no-image", ["animate", "--weights", "{root}/svd.safetensors"], 1, ["--image"]),
    ("animate-height-not-multiple", ANI + ["--height", "50"], 1, ["50x64", "multiple of 4"]),
    ("invert-out-is-input", INV + ["--out", "{clip}"], 1, ["--out", "input --video", "choose another --out"]),
    ("invert-out-holds-input", INV + ["--out", "{root}"], 1, ["--out", "holds the input --video"]),
    ("invert-out-under-file", INV + ["--out", "{root}/notes.txt/sub"], 1, ["--out", "notes.txt is a file"]),
    ("invert-out-unwritable", INV + ["--out", "/proc/minivid-bad-input"], 1, ["--out /proc/minivid-bad-input",
                                                                              "cannot create or write"]),
    ("edit-tuned-missing", EDIT + ["ei2", "--tuned", "{root}/no-tune"], 1, ["no-tune"]),
    ("tune-tcve-fp16", TUNE + ["--dtype", "fp16"], 1, ["TCVE tuning keeps the tuned tensors in float32"]),
    ("inspect-missing", ["inspect", "{root}/nothere.ckpt"], 1, ["nothere.ckpt", "no such file"]),
    # ---- round two (issue 22), by family
    # 2. exit 0 with an empty output: what ffmpeg cannot encode is refused up front
    ("invert-fps-tiny", INV + ["--fps", "1e-300"], 2, ["--fps", "[0.01, 1000]"]),
    ("invert-side-by-side-too-wide", ["invert", "--tiny", "--video", "{root}/wide.mp4", "--frames", "2"], 1,
     ["wide.mp4", "2200x8", "side-by-side video", "16384 px"]),
    # 6. tracebacks on plain input: symlink loops, options nobody checked
    ("invert-video-symlink-loop", ["invert", "--tiny", "--video", "{root}/loop.mp4"], 1,
     ["--video", "loop.mp4", "symlink loop"]),
    ("invert-weights-symlink-loop", ["invert", "--weights", "{root}/loop.ckpt", "--video", "{clip}"], 1,
     ["--weights", "loop.ckpt", "symlink loop"]),
    ("invert-out-symlink-loop", INV + ["--out", "{root}/loopdir"], 1, ["--out", "loopdir", "symlink loop"]),
    ("edit-i2vedit-first-frame-symlink-loop", EDIT + ["i2vedit", "--first-frame", "{root}/loop.png"], 1,
     ["--first-frame", "loop.png", "symlink loop"]),
    ("eval-stride-0", ["eval", "{clip}", "--tiny", "--stride", "0"], 2, ["--stride", "integer in [1, 10000]"]),
    ("eval-frames-0", ["eval", "{clip}", "--tiny", "--frames", "0"], 2, ["--frames", "integer in [1, 100000]"]),
    ("eval-frames-negative", ["eval", "{clip}", "--tiny", "--frames", "-1"], 2, ["--frames", "got -1"]),
    ("eval-device-tpu", ["eval", "{clip}", "--tiny", "--device", "tpu"], 2, ["--device", "'tpu'"]),
    ("eval-threads-negative", ["eval", "{clip}", "--tiny", "--threads", "-1"], 2, ["--threads", "[1, 4096]"]),
    ("eval-threads-huge", ["eval", "{clip}", "--tiny", "--threads", str(2 ** 70)], 2, ["--threads", "[1, 4096]"]),
    ("batch-threads-huge", ["batch", "{root}/plan.jsonl", "--threads", str(2 ** 70)], 2, ["--threads", "[1, 4096]"]),
    ("edit-cove-store-device-tpu", EDIT + ["cove", "--cove-store-device", "tpu"], 2, ["--cove-store-device", "'tpu'"]),
    ("bench-repeats-0", ["bench", "kernels", "--repeats", "0"], 2, ["--repeats", "integer in [1, 10000000]"]),
    ("bench-threads-huge", ["bench", "cove", "--threads", str(2 ** 70)], 2, ["--threads", "[1, 4096]"]),
    ("bench-seed-negative", ["bench", "kernels", "--seed", "-1"], 2, ["--seed", "[0, 2^63 - 1]"]),
    # 7. the memory check sizes the job that will run
    ("invert-elongated-source", ["invert", "--tiny", "--video", "{root}/wide.png", "--size", "256"], 1,
     ["frame(s) of 64000x256 (4000x16 at --size 256) needs at least", "this machine has"]),
    ("tune-i2vedit-size-huge", ["tune", "--method", "i2vedit", "--tiny", "--video", "{clip}", "--sample-fps", "0",
                                "--frames", "4", "--i2vedit-clip-length", "3", "--i2vedit-size", "100000x100000"], 1,
     ["a clip of 3 frame(s) at --i2vedit-size 100000x100000 needs at least", "GiB", "smaller --i2vedit-size"]),
    # 8. mistakes accepted in silence
    ("invert-tiny-and-weights", INV + ["--weights", "{root}/sd.safetensors"], 1, ["--tiny and --weights", "give one"]),
    ("edit-cove-tuned", EDIT + ["cove", "--tuned", "{root}/sd.safetensors"], 1,
     ["--method cove takes no --tuned", "would be ignored"]),
    ("edit-i2vedit-tuned", EDIT + ["i2vedit", "--tuned", "{root}/sd.safetensors"], 1, ["given with --lora"]),
    # 9. messages that say the wrong thing
    ("invert-video-fifo", ["invert", "--tiny", "--video", "{root}/fifo.mp4"], 1,
     ["--video", "fifo.mp4", "is a FIFO (named pipe), not a regular file"]),
    ("edit-i2vedit-first-frame-folder", EDIT + ["i2vedit", "--first-frame", "{root}/adir"], 1,
     ["--first-frame", "adir: is a folder; expected a file"]),
    ("edit-i2vedit-first-frame-fifo", EDIT + ["i2vedit", "--first-frame", "{root}/fifo.mp4"], 1,
     ["--first-frame", "is a FIFO"]),
    ("batch-out-is-a-file", ["batch", "{root}/plan.jsonl", "--out", "{root}/notes.txt"], 1,
     ["--out", "notes.txt is a file, not a folder"]),
]
if not torch.cuda.is_available():
    CASES.append(("invert-device-cuda-without-cuda", INV + ["--device", "cuda"], 2, ["--device", "no usable CUDA"]))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_through_the_cli(case, files, capsys):
    name, argv, code, fragments = case
    argv = [a.format(clip=files / "clip.mp4", root=files) for a in argv]
    if "--out" not in argv and argv[0] not in ("inspect", "eval", "bench"):
        argv += ["--out", str(files / f"out-{name}")]
    before = _snapshot(files)
    assert main(argv) == code
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert "Traceback" not in err
    assert _snapshot(files) == before          # inputs untouched, nothing written, no empty folder left
    assert not jobs.ACTIVE


def test_the_table_has_at_least_40_cases_and_docs_list_them():
    assert len(CASES) >= 90
    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    missing = [c[0] for c in CASES if f"`{c[0]}`" not in doc]
    assert not missing, f"docs/errors.md does not list {missing}"


# ---------------------------------------------------------------- interrupts, pipes, internal errors

def test_ctrl_c_in_sampling_says_where_keeps_nothing_and_exits_130(files, capsys, monkeypatch):
    import minivid.samplers as S

    real = S.step_done

    def interrupt_at_two(loop, i, n, x=None, hint=checks.HINT):
        real(loop, i, n, x, hint)
        if i == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(S, "step_done", interrupt_at_two)
    out = files / "out-ctrl-c"
    before = _snapshot(files)
    assert main(INV[:1] + ["--tiny", "--video", str(files / "clip.mp4"), "--frames", "4", "--steps", "3", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 2/3 of DDIM inversion; nothing was kept" in err and "again to start over" in err
    assert "Traceback" not in err and _snapshot(files) == before and not out.exists()


def test_ctrl_c_in_tuning_keeps_the_checkpoint_and_says_how_to_resume(files, capsys, monkeypatch):
    calls = {"n": 0}
    real = torch.optim.AdamW.step

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = files / "out-tune-ctrl-c"
    argv = [a.format(clip=files / "clip.mp4") for a in TUNE] + ["--frames", "2", "--size", "32", "--steps", "4",
                                                                   "--checkpoint-every", "2", "--out", str(out)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 3/4 of tuning" in err and "tuned-000002.safetensors" in err
    assert f"same --out {out}) to resume" in err and "Traceback" not in err
    # the checkpoint of step 2 and its optimizer moments stay (to resume from); nothing else
    assert sorted(p.name for p in out.iterdir()) == ["tuned-000002.optim.safetensors", "tuned-000002.safetensors"]
    import shutil

    shutil.rmtree(out)


def test_closed_stdout_ends_quietly(files, capsys, monkeypatch):
    import sys

    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["inspect", "--json", str(files / "sd.safetensors")]) == 0
    monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_internal_error_short_traceback_record_and_report(files, capsys, monkeypatch):
    import minivid.pipelines.sd as P

    def broken(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(P, "invert_video", broken)
    out = files / "out-internal"
    assert main(INV[:1] + ["--tiny", "--video", str(files / "clip.mp4"), "--frames", "4", "--steps", "2", "--out", str(out)]) == 70
    err = capsys.readouterr().err
    assert "internal error" in err and "Traceback" in err and "ZeroDivisionError: a bug" in err
    assert f"record: {out / 'record.failed.json'}" in err and "Please report it" in err
    assert len(err.splitlines()) < 20                                       # short
    assert [p.name for p in out.iterdir()] == ["record.failed.json"]        # nothing under a final name
    assert json.loads((out / "record.failed.json").read_text())["error"] == "ZeroDivisionError: a bug"
    with pytest.raises(ZeroDivisionError):                                  # -v shows the whole traceback
        main(["-v", *INV[:1], "--tiny", "--video", str(files / "clip.mp4"), "--frames", "4", "--out",
              str(files / "out-v")])
    assert not (files / "out-v" / "record.json").exists()
    import shutil

    shutil.rmtree(out)
    shutil.rmtree(files / "out-v", ignore_errors=True)


def test_verbose_reraises_a_known_error(files):
    with pytest.raises(FileNotFoundError, match="nothere"):
        main(["-v", "invert", "--tiny", "--video", str(files / "nothere.mp4"), "--out", str(files / "out-vv")])
    assert not (files / "out-vv").exists()


def test_non_finite_latent_stops_the_cli_with_the_step(files, capsys, monkeypatch):
    """A model whose output turns NaN at the second step: the sampler stops there (no black video)."""
    import minivid.pipelines.sd as P

    real = P.ddim_invert
    calls = {"n": 0}

    def poisoned(denoise, *a, **k):
        def nan_at_two(x, t):
            calls["n"] += 1
            out = denoise(x, t)
            return out * float("nan") if calls["n"] == 2 else out
        return real(nan_at_two, *a, **k)

    monkeypatch.setattr(P, "ddim_invert", poisoned)
    out = files / "out-nan-latent"
    assert main(INV[:1] + ["--tiny", "--video", str(files / "clip.mp4"), "--frames", "4", "--steps", "3", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "DDIM inversion: the latent became non-finite at step 2/3" in err and "--dtype fp32" in err
    assert "Traceback" not in err and not out.exists()


def test_allow_nonfinite_loads_for_inspection(files, capsys):
    out = files / "out-allow"
    assert main(["generate", "--weights", str(files / "sd_nan.safetensors"), "--allow-nonfinite", "--prompt", "a",
                 "--steps", "2", "--out", str(out)]) == 1                   # loads, then sampling stops at step 1
    err = capsys.readouterr().err
    assert "non-finite at step 1/2" in err and not out.exists()


# ---------------------------------------------------------------- the API

def test_api_dtype_names(files):
    from minivid.models import StableDiffusion
    from minivid.svd import StableVideoDiffusion
    from minivid.weights import WeightsError

    assert StableDiffusion.load(files / "sd.safetensors", dtype="fp16").dtype == torch.float16
    assert StableDiffusion.load(files / "sd.safetensors", dtype="torch.bfloat16").dtype == torch.bfloat16
    assert StableVideoDiffusion.load(files / "svd.safetensors", dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be a torch dtype or one of fp32, fp16, bf16.*'fp8'"):
        StableDiffusion.load(files / "sd.safetensors", dtype="fp8")
    with pytest.raises(ValueError, match="floating dtype"):
        StableVideoDiffusion.load(files / "svd.safetensors", dtype=torch.int8)
    assert StableDiffusion.from_config("tiny", dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="got 'half-ish'"):
        StableVideoDiffusion.from_config("tiny", dtype="half-ish")
    with pytest.raises(WeightsError, match=r"2 tensor\(s\) hold NaN/Inf: .*in_layers.2.weight \(1 values\)"):
        StableDiffusion.load(files / "sd_nan.safetensors")
    assert not torch.isfinite(StableDiffusion.load(files / "sd_nan.safetensors", allow_nonfinite=True)
                              .vae.decoder.conv_out.bias).all()
    with pytest.raises(WeightsError, match="svd_nan.safetensors: 1 tensor"):
        StableVideoDiffusion.load(files / "svd_nan.safetensors")


@pytest.mark.parametrize("loop", ["ddim_sample", "ddim_invert", "euler_sample", "edm_invert"])
def test_api_samplers_stop_at_the_first_non_finite_latent(loop):
    from minivid import samplers as S

    calls = {"n": 0}

    def denoise(x, t):
        calls["n"] += 1
        return torch.full_like(x, float("inf") if calls["n"] == 3 else 0.1)

    x = torch.zeros(1, 4, 2, 2)
    run = {"ddim_sample": lambda: S.ddim_sample(denoise, x, 5, progress=False),
           "ddim_invert": lambda: S.ddim_invert(denoise, x, 5, progress=False),
           "euler_sample": lambda: S.euler_sample(denoise, x, S.karras_sigmas(5), progress=False),
           "edm_invert": lambda: S.edm_invert(denoise, x, S.karras_sigmas(5), progress=False)}[loop]
    with pytest.raises(checks.NonFiniteError, match=r"non-finite at step 3/5 .*Hint"):
        run()
    assert calls["n"] == 3 and checks.last_step().step == 3


def test_api_job_refuses_inputs_and_unwritable_folders(files):
    with pytest.raises(FileExistsError, match="is .or lies inside. the input"):
        jobs.Job("x", files / "clip.mp4", {}, inputs=[files / "clip.mp4"])
    with pytest.raises(NotADirectoryError, match="is a file"):
        jobs.Job("x", files / "notes.txt" / "o", {})
    assert not jobs.ACTIVE


def test_api_record_is_strict_json(tmp_path):
    path = jobs.write_json(tmp_path / "r.json", {"a": float("nan"), "b": [float("-inf"), 1]})
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 1], "non_finite": ["a", "b[0]"]}
    assert "NaN" not in path.read_text() and not list(tmp_path.glob(".*tmp"))
    os.remove(path)
