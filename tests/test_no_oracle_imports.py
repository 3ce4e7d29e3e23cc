"""minivid and its kernels never import the oracles or heavy optional packages, with one exception:
minivid/parity.py (`minivid parity`) imports diffusers/transformers, and only inside its functions."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {"diffusers", "transformers", "torchvision", "open_clip"}
ORACLES = {"diffusers", "transformers"}
PARITY = ROOT / "minivid" / "parity.py"          # the one module allowed to import ORACLES, lazily


def _imports(path: pathlib.Path, top_level_only: bool = False) -> set[str]:
    """Top-level package names `path` imports (top_level_only: outside every function body)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    inside: set[int] = set()
    if top_level_only:
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inside |= {id(n) for n in ast.walk(fn) if n is not fn}
    names = set()
    for node in ast.walk(tree):
        if id(node) in inside:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__"):
            for a in node.args[:1]:
                if isinstance(a, ast.Constant) and isinstance(a.value, str):
                    names.add(a.value.split(".")[0])
    return names


SOURCES = sorted([*(ROOT / "minivid").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])


@pytest.mark.parametrize("path", [p for p in SOURCES if p != PARITY], ids=lambda p: str(p.relative_to(ROOT)))
def test_library_does_not_import_oracles(path):
    bad = _imports(path) & FORBIDDEN
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_parity_module_imports_oracles_only_inside_functions():
    assert _imports(PARITY) & ORACLES == ORACLES                       # it does use them ...
    assert not _imports(PARITY, top_level_only=True) & FORBIDDEN       # ... but never at import time
    assert not _imports(PARITY) & (FORBIDDEN - ORACLES)


def test_checker_sees_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import os\nfrom diffusers.models import UNet2DConditionModel\nimportlib.import_module('open_clip')\n"
                 "def f():\n    import transformers\n")
    assert _imports(f) >= {"diffusers", "open_clip", "transformers"}
    assert _imports(f, top_level_only=True) == {"os", "diffusers", "open_clip"}


def test_importing_minivid_loads_no_oracle():
    """Every module, minivid.parity and minivid.cli.parity included, imports without pulling an oracle."""
    import subprocess
    import sys

    code = (
        "import sys, minivid, minivid.attention, minivid.cli, minivid.parity, minivid.cli.parity\n"
        "import pkgutil, importlib\n"
        "for m in pkgutil.walk_packages(minivid.__path__, 'minivid.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "minivid.cli.build_parser()\n"
        "bad = sorted({'diffusers','transformers','torchvision','open_clip','triton'} & set(sys.modules))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing minivid pulled in: {out}"
