"""Progress bars: on for a terminal, off with --quiet or when stderr is not a terminal; the jobs pass
the decision to their long loops (the demo included)."""
from __future__ import annotations

import argparse
import io
import sys

import pytest

from minivid.cli import build_parser, main
from minivid.cli.common import show_progress


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_show_progress(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())                       # not a terminal
    assert show_progress(argparse.Namespace(quiet=False)) is False
    monkeypatch.setattr(sys, "stderr", _TTY())
    assert show_progress(argparse.Namespace(quiet=False)) is True
    assert show_progress(argparse.Namespace(quiet=True)) is False
    for job in ("demo", "generate", "invert", "edit", "tune", "animate"):
        assert "--quiet" in build_parser()._subparsers._group_actions[0].choices[job].format_help(), job


class _Stop(BaseException):   # not an Exception: main() turns those into an exit status
    pass


@pytest.mark.parametrize("argv, expected", [([], True), (["--quiet"], False)])
def test_demo_passes_progress_to_its_loops(argv, expected, monkeypatch, tmp_path):
    import minivid.pipelines.sd as sd_pipelines

    seen = []

    def fake(*args, progress=None, **kwargs):
        seen.append(progress)
        raise _Stop

    monkeypatch.setattr(sd_pipelines, "text_to_image", fake)
    monkeypatch.setattr(sys, "stderr", _TTY())
    with pytest.raises(_Stop):
        main(["demo", "--out", str(tmp_path / "job"), *argv])
    assert seen == [expected]
