"""minivid and its kernels never import the oracles or heavy optional packages."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FORBIDDEN = {"diffusers", "transformers", "torchvision", "open_clip"}


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
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


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_does_not_import_oracles(path):
    bad = _imports(path) & FORBIDDEN
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_checker_sees_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import os\nfrom diffusers.models import UNet2DConditionModel\nimportlib.import_module('open_clip')\n")
    assert _imports(f) >= {"diffusers", "open_clip"}


def test_importing_minivid_loads_no_oracle():
    import subprocess
    import sys

    code = (
        "import sys, minivid, minivid.attention, minivid.cli\n"
        "import pkgutil, importlib\n"
        "for m in pkgutil.walk_packages(minivid.__path__, 'minivid.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "bad = sorted({'diffusers','transformers','torchvision','open_clip','triton'} & set(sys.modules))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing minivid pulled in: {out}"
