"""The examples in examples/ run as the docs show them (`python examples/NAME.py`), each ending with its
own check that can fail; only the frame-0 example imports an oracle (diffusers), inside one function."""
import os
import pathlib
import subprocess
import sys

import pytest

from test_no_oracle_imports import FORBIDDEN, ORACLES, _imports

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
ORACLE_EXAMPLE = ROOT / "examples" / "frame0_attention.py"     # its check compares with diffusers


def test_the_three_examples_are_there():
    assert [p.name for p in EXAMPLES] == ["attention_maps.py", "cga_in_ei2.py", "frame0_attention.py"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_and_its_check_passes(path, tmp_path):
    # one thread, as the suite runs (tests/conftest.py): tiny models gain nothing from more on shared cores
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "check passed" in out.stdout


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_import_oracles_only_where_documented(path):
    if path == ORACLE_EXAMPLE:
        assert _imports(path) & ORACLES == {"diffusers"}                  # the check's oracle ...
        assert not _imports(path, top_level_only=True) & FORBIDDEN        # ... imported inside a function
    else:
        assert not _imports(path) & FORBIDDEN
