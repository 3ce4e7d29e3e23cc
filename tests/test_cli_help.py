"""`--help` of every command builds its parser without torch (issue 17.10), and the defaults and choices the
method options show without torch (minivid.cli.method_options) are the methods' own."""
from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys

import pytest

from minivid.cli import SUBCOMMANDS

HEAVY = ("torch", "minivid.jobs", "minivid.models", "minivid.svd")

_PROBE = """
import contextlib, io, sys
from minivid.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
    code = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m in {heavy!r} or m.startswith("minivid.methods."))
print(code, "usage: minivid" in out.getvalue(), heavy)
"""


@pytest.mark.parametrize("argv", [[]] + [["--help"]] + [[name, "--help"] for name in SUBCOMMANDS])
def test_help_of_every_command_imports_no_torch(argv):
    """In a fresh interpreter: the help is printed (exit 0; a bare `minivid` prints the usage and exits 2)
    and neither torch nor a method, job or model module was imported to build it. Each command in a
    process of its own, so one cannot hide another."""
    out = subprocess.run([sys.executable, "-c", _PROBE.format(heavy=HEAVY), *argv],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().split(None, 2) == ["0" if argv else "2", "True", "[]"], out.stdout


def test_python_m_minivid_edit_help_imports_no_torch():
    """The same through `python -m minivid` (its __main__), for the two commands that list every method's options."""
    code = ("import runpy, sys, contextlib, io\n"
            "for cmd in ('edit', 'tune'):\n"
            "    sys.argv = ['minivid', cmd, '--help']\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            runpy.run_module('minivid', run_name='__main__')\n"
            "        except SystemExit as e:\n"
            "            assert e.code == 0, e.code\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- the torch-free copies equal the methods'

def _modules(method: str, *names: str) -> list:
    """The modules `minivid.methods.<method>.<name>` (a package may export a function of a module's name)."""
    return [importlib.import_module(f"minivid.methods.{method}.{name}") for name in names]


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def test_cove_options_are_coveconfig_defaults():
    from minivid.cli import method_options as mo
    attention, pipeline = _modules("cove", "attention", "pipeline")

    defaults = _defaults(pipeline.COVEConfig)
    assert mo.COVE == {k: defaults[k] for k in mo.COVE}
    assert mo.COVE_MODES == attention.MODES
    assert mo.COVE_STORE_DTYPES == tuple(pipeline.STORE_DTYPES)
    assert mo.COVE_RESOLUTIONS == attention._RESOLUTIONS


def test_ei2_options_are_ei2_defaults():
    from minivid.cli import ei2 as cli
    from minivid.cli import method_options as mo
    from minivid.tuning import TuneConfig

    edit, model = _modules("ei2", "edit", "model")

    defaults = _defaults(model.EI2Config)
    assert mo.EI2 == {k: defaults[k] for k in mo.EI2}
    assert mo.EI2_ORDERS == model.ORDERS
    tune = _defaults(TuneConfig)
    assert mo.EI2_TUNE == {k: tune[k] for k in mo.EI2_TUNE}
    assert (cli.DEFAULT_TUNE_STEPS, cli.DEFAULT_LR) == (tune["steps"], tune["lr"])
    assert mo.EI2_EDIT == {"steps": edit.DEFAULT_STEPS, "guidance": edit.DEFAULT_GUIDANCE}


def test_tcve_options_are_tcve_defaults():
    from minivid.cli import method_options as mo
    edit, stu, tune = _modules("tcve", "edit", "stu", "tune")

    assert mo.TCVE_ABLATIONS == tuple(stu.ABLATIONS)
    cfg = tune.tune_config()
    assert mo.TCVE_TUNE == {k: getattr(cfg, k) for k in mo.TCVE_TUNE}
    assert mo.TCVE_EDIT == {"steps": edit.EDIT_STEPS, "guidance": edit.EDIT_GUIDANCE}


def test_i2vedit_options_are_i2vedit_defaults():
    """Read from minivid.methods.i2vedit (the CLI only mirrors them)."""
    from minivid.cli import i2vedit as cli
    from minivid.cli import method_options as mo
    clips, edit, lora, matching, tune = _modules("i2vedit", "clips", "edit", "lora", "matching", "tune")

    defaults = _defaults(edit.I2VEditConfig)
    assert mo.I2VEDIT == {k: defaults[k] for k in mo.I2VEDIT}
    assert mo.I2VEDIT_PRESETS == matching.PRESETS
    assert mo.I2VEDIT_LAYER_SETS == matching.LAYER_SETS
    assert mo.I2VEDIT_STORES == edit.STORES and mo.I2VEDIT_INVERT_DTYPES == edit.INVERT_DTYPES
    assert mo.I2VEDIT_RECIPES == clips.RECIPES
    assert mo.I2VEDIT_TIME_IDS_ORDERS == tune.TIME_IDS_ORDERS
    assert mo.I2VEDIT_TUNE == {"steps": tune.DEFAULT_STEPS, "lr": tune.DEFAULT_LR,
                               "checkpoint_every": tune.DEFAULT_CHECKPOINT_EVERY, "use_step": tune.DEFAULT_USE_STEP,
                               "rank": lora.DEFAULT_RANK, "dropout": lora.DEFAULT_DROPOUT}
    assert cli.DEFAULT_CHECKPOINT_EVERY == tune.DEFAULT_CHECKPOINT_EVERY
    for name, recipe in (("first", clips.FIRST), ("subsequent", clips.SUBSEQUENT)):
        assert mo.I2VEDIT_CLIPS[name] == {"length": recipe.clip_len, "sample_fps": recipe.sample_fps,
                                          "output_fps": recipe.output_fps, "tune_steps": recipe.tune_steps}


def test_the_parsers_defaults_are_what_the_configs_use(capsys):
    """Parsing with no method options gives what the method's config takes by default: the unset options
    stay None (the config's default applies), the set defaults equal the config's."""
    from minivid.cli import build_parser

    args = build_parser("edit").parse_args(["edit", "--method", "cove", "--video", "x.mp4", "--prompt", "p"])
    from minivid.cli.cove import config_from_args
    from minivid.methods.cove.pipeline import COVEConfig

    assert config_from_args(args) == COVEConfig()
    from minivid.cli.i2vedit import _config
    from minivid.methods.i2vedit import I2VEditConfig
    import torch

    assert _config(args) == I2VEditConfig(edit_dtype=torch.float32)
    tune = build_parser("tune").parse_args(["tune", "--method", "i2vedit", "--video", "x.mp4"])
    from minivid.methods.i2vedit import MotionTuneConfig

    assert (tune.i2vedit_rank, tune.i2vedit_dropout, tune.i2vedit_time_ids) == (
        MotionTuneConfig.rank, MotionTuneConfig.dropout, MotionTuneConfig.time_ids_order)
