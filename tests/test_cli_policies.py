"""The command line's shared policies, each decided in one place: torch threads (one for a tiny model on the
CPU, --threads wins), progress bars (--quiet, batch's --no-progress alias), `--help` without torch,
per-method defaults in the help, and a demo that runs what its options and record say."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from minivid.cli import build_parser, main
from minivid.cli.common import default_threads, torch_threads


def ns(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"threads": None, "device": "cpu", "tiny": False, "command": "generate", **kw})


def test_thread_policy():
    assert default_threads(ns(tiny=True)) == 1                      # a tiny model on the CPU: one thread
    assert default_threads(ns(command="demo")) == 1                 # every demo is tiny
    assert default_threads(ns(tiny=True, threads=3)) == 3           # an explicit --threads wins
    assert default_threads(ns(threads=2)) == 2
    assert default_threads(ns()) is None                            # weights: torch's own choice
    assert default_threads(ns(tiny=True, device="cuda:0")) is None  # not on the CPU


def test_torch_threads_sets_and_restores():
    import torch

    before = torch.get_num_threads()
    with torch_threads(ns(tiny=True)) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(ns()) as n:
        assert n is None and torch.get_num_threads() == before


def _job_replaced_by(run, command: str, monkeypatch) -> None:
    """`minivid.cli.main` parses `command`'s real options, then runs `run(args)` instead of the job."""
    parser = build_parser(command)
    real_parse = parser.parse_args

    def parse(a):
        args = real_parse(a)
        args._run = run
        return args

    monkeypatch.setattr(parser, "parse_args", parse)
    monkeypatch.setattr("minivid.cli.build_parser", lambda command=None: parser)


@pytest.mark.parametrize("argv", [["generate", "--tiny"], ["invert", "--tiny"], ["edit", "--method", "cove", "--tiny"],
                                  ["demo"], ["animate", "--tiny"]])
def test_main_runs_tiny_jobs_on_one_thread(argv, monkeypatch):
    """Every command goes through the one policy in minivid.cli.main (the job itself is replaced)."""
    import torch

    seen = []

    def run(args):
        seen.append(torch.get_num_threads())
        return 0

    _job_replaced_by(run, argv[0], monkeypatch)
    extra = {"generate": ["--prompt", "p"], "invert": ["--video", "x.mp4"],
             "edit": ["--video", "x.mp4", "--prompt", "p"]}.get(argv[0], [])
    assert main(argv + extra) == 0
    assert main(argv + extra + ["--threads", "2"]) == 0
    assert seen == [1, 2]


def test_help_lists_read_without_import_equal_the_modules():
    """What `--help` reads from the sources (no torch) is what the modules hold."""
    from minivid.cli import _module_help, source_constant
    from minivid.eval import catalog, loading, metrics
    from minivid.parity import TOLERANCES

    assert source_constant("minivid.parity", "TOLERANCES") == TOLERANCES
    assert source_constant("minivid.cli.eval", "no_such_name", default="x") == "x"
    assert source_constant("minivid.no_such_module", "help") is None and _module_help("no_such_job") is None
    assert metrics.METRICS is catalog.METRICS and metrics.NEEDS_PROMPT is catalog.NEEDS_PROMPT
    assert {k: (str(f.path), f.what) for k, f in loading.DEFAULT_FILES.items()} == catalog.FILES
    assert all(f.source for f in loading.DEFAULT_FILES.values())


def test_top_level_help_lists_every_subcommand(capsys):
    import importlib

    from minivid.cli import SUBCOMMANDS

    assert main(["--help"]) == 0
    out = "".join(capsys.readouterr().out.split())          # argparse wraps (and breaks at hyphens)
    for name in SUBCOMMANDS:                       # the help line read from the source is the module's `help`
        assert name + "".join(importlib.import_module(f"minivid.cli.{name}").help.split()) in out


def test_help_texts(capsys):
    from minivid.cli.common import available_clis
    from minivid.methods import METHODS

    assert main(["edit", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    defaults = {n: getattr(m, "DEFAULT_FRAMES", 8) for n, m in available_clis().items()}
    assert defaults["i2vedit"] == 26 and "I2VEdit 26" in out and "COVE 8" in out
    assert main(["demo", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in METHODS)
    from minivid.cli.demo import METHOD_NAMES

    assert set(METHOD_NAMES) == set(METHODS)


def test_inspect_tiny_layouts_match_the_writer():
    from minivid.cli.inspect import TINY_LAYOUTS
    from minivid.weights import tiny

    assert TINY_LAYOUTS == tiny.TINY_LAYOUTS


def test_batch_quiet_and_its_old_spelling():
    p = build_parser("batch")
    for flag in ("--quiet", "--no-progress"):
        assert p.parse_args(["batch", "plan.jsonl", "--out", "o", flag]).quiet is True
    assert p.parse_args(["batch", "plan.jsonl", "--out", "o"]).quiet is False


def test_cove_demo_refuses_a_model_it_cannot_run(tmp_path, capsys):
    assert main(["demo", "--method", "cove", "--model", "tiny", "--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err
    assert "--model tiny" in err and "tiny_sd2" in err and not (tmp_path / "d").exists()
    assert main(["demo", "--method", "i2vedit", "--model", "tiny", "--out", str(tmp_path / "e")]) == 1
    assert "does not apply" in capsys.readouterr().err


def test_demo_options_take_the_methods_defaults():
    from minivid.cli.demo import resolve_demo_model

    args = build_parser("demo").parse_args(["demo", "--method", "cove"])
    resolve_demo_model(args)
    assert (args.model, args.size) == ("tiny_sd2", 48)
    args = build_parser("demo").parse_args(["demo", "--method", "cove", "--size", "32"])
    resolve_demo_model(args)
    assert (args.model, args.size) == ("tiny_sd2", 32)                    # honoured, not replaced by 48
    args = build_parser("demo").parse_args(["demo"])
    resolve_demo_model(args)
    assert (args.model, args.size) == ("tiny", 32)


def test_cove_demo_records_what_ran(tmp_path):
    out = tmp_path / "d"
    assert main(["demo", "--method", "cove", "--model", "tiny_sd2", "--size", "32", "--steps", "2", "--frames", "2",
                 "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["settings"]["size"] == 32 and record["ran"]["size"] == [32, 32]
    assert record["settings"]["model"] == record["ran"]["model"] == "tiny_sd2"
    stages = {k: v for k, v in record["timings_s"].items() if k != "total"}
    assert sum(stages.values()) == pytest.approx(record["timings_s"]["total"], abs=0.01)     # the stages add up


def test_a_warning_is_printed_once_per_run(monkeypatch, caplog):
    """The same message from a repeated step (a LoRA checked, then loaded) appears once; a new run starts afresh."""
    import logging

    def run(args):
        for _ in range(3):
            logging.getLogger("minivid.test").warning("no checkpoint of step 250; using tuned-000004")
        logging.getLogger("minivid.test").warning("another message")
        return 0

    _job_replaced_by(run, "inspect", monkeypatch)
    with caplog.at_level(logging.WARNING):
        assert main(["inspect", "x"]) == 0
        assert [r.getMessage() for r in caplog.records] == ["no checkpoint of step 250; using tuned-000004",
                                                            "another message"]
        assert main(["inspect", "x"]) == 0
        assert len(caplog.records) == 4


def test_no_info_lines_by_default(tmp_path, capfd):
    """A run prints warnings and errors, not the loaders' info lines (-v shows them)."""
    code = ("import logging, sys\nfrom minivid.cli import main\n"
            "main(['inspect', '--write-tiny', sys.argv[1], '--like', 'sd-v1-4'])\n"
            "logging.getLogger('minivid.x').info('an info line')\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "INFO" not in out.stderr and "wrote" in out.stdout


# ---------------------------------------------------------------- every printed hint runs

HINT_MODULES = ["demo", "cove", "ei2", "tcve", "i2vedit"]
# what each job needs to finish in seconds on a tiny checkpoint (appended: the last value of an option wins)
FAST = {"generate": ["--steps", "1", "--height", "32", "--width", "32"],
        "invert": ["--steps", "1", "--size", "32", "--frames", "2"],
        "tune": ["--steps", "1", "--size", "32", "--frames", "2"],
        "edit": ["--steps", "1", "--size", "32", "--frames", "2"],
        # EI²'s FFAM needs r = 2 ≤ the deepest feature map: 128 px on the official 4-level layout
        "tune ei2": ["--steps", "1", "--size", "128", "--frames", "2"],
        "edit ei2": ["--steps", "1", "--size", "128", "--frames", "2"],
        "edit i2vedit": ["--steps", "2", "--frames", "5", "--i2vedit-clip-length", "5", "--i2vedit-size", "32x48",
                         "--sample-fps", "0"]}


@pytest.fixture(scope="module")
def hint_files(tmp_path_factory):
    from minivid.cli.cove import moving_shapes
    from minivid.cli.i2vedit import recolour
    from minivid.video import save_grid, write_video
    from minivid.weights.tiny import write_tiny_checkpoint

    d = tmp_path_factory.mktemp("hints")
    clip = moving_shapes(6, 32)
    write_video(d / "clip.mp4", clip, fps=8)
    save_grid(d / "edited.png", recolour(clip[0])[None], cols=1)
    sd1 = write_tiny_checkpoint(d, like="sd-v1-4")
    return {"PATH": sd1, "sd-v1-4.ckpt": sd1, "v2-1_512-ema-pruned.safetensors": write_tiny_checkpoint(d, like="sd-v2-1"),
            "svd.safetensors": write_tiny_checkpoint(d, like="svd"), "CLIP": d / "clip.mp4",
            "EDITED.png": d / "edited.png", "...": "a red disc"}


@pytest.mark.parametrize("module", HINT_MODULES)
def test_every_printed_hint_runs(module, hint_files, tmp_path, capsys):
    """The commands a demo prints for official weights run as printed, with tiny checkpoints in place of the
    official files (and options appended that make them fast): no required option is missing."""
    import importlib
    import shlex

    hints = importlib.import_module(f"minivid.cli.{module}").DEMO_HINTS
    from minivid.cli.common import print_hints

    print_hints(hints)
    printed = capsys.readouterr().out
    names = {**hint_files, "TUNED": tmp_path / "tuned"}
    for n, hint in enumerate(hints):
        assert hint in printed
        words = shlex.split(hint)
        assert words[0] == "minivid"
        argv = [str(names.get(w, w)) for w in words[1:]]
        method = argv[argv.index("--method") + 1] if "--method" in argv else ""
        argv += FAST.get(f"{argv[0]} {method}", FAST[argv[0]]) + ["--quiet"]
        if "--out" not in argv:
            argv += ["--out", str(tmp_path / f"job{n}")]
        assert main(argv) == 0, (hint, capsys.readouterr().err)


def test_i2vedit_edit_records_what_ran_with_labelled_seeds(hint_files, tmp_path):
    out = tmp_path / "e"
    assert main(["edit", "--method", "i2vedit", "--tiny", "--video", str(hint_files["CLIP"]), "--first-frame",
                 str(hint_files["EDITED.png"]), "--frames", "5", "--i2vedit-clip-length", "5", "--steps", "2",
                 "--i2vedit-size", "32x48", "--sample-fps", "0", "--seed", "3", "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["ran"]["model"] == "tiny SVD (random weights)"
    assert record["ran"]["seeds"] == {"tiny_model_weights": 3, "edit_sampling_noise": 23}
