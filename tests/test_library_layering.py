"""`minivid/methods/` is a library: no file under it imports `minivid.cli` (the command line is built
on the methods, never the other way round). Relative imports are resolved, and string arguments of
`importlib.import_module` / `__import__` count as imports."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHODS = ROOT / "minivid" / "methods"


def _module_of(path: pathlib.Path) -> list[str]:
    """The dotted package of `path` (minivid/methods/cove/x.py -> ["minivid", "methods", "cove"])."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1]


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module `path` imports, as absolute dotted names."""
    package, names = _module_of(path), set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}     # `from minivid import cli`
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__"):
            for a in node.args[:1]:
                if isinstance(a, ast.Constant) and isinstance(a.value, str):
                    names.add(a.value)
                elif isinstance(a, ast.JoinedStr):               # f"minivid.cli.{name}"
                    names.add("".join(v.value for v in a.values if isinstance(v, ast.Constant)))
    return names


def _is_cli(module: str) -> bool:
    return module == "minivid.cli" or module.startswith("minivid.cli.")


SOURCES = sorted(METHODS.rglob("*.py"))


def test_there_are_method_sources():
    assert len(SOURCES) > 10 and not list(METHODS.rglob("cli.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_methods_import_nothing_from_cli(path):
    bad = sorted(m for m in imported_modules(path) if _is_cli(m))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: minivid/methods/ must not depend on minivid/cli/"


@pytest.mark.parametrize("code", [
    "from minivid.cli.common import load_sd",
    "import minivid.cli",
    "from minivid import cli",
    "from ...cli import common",
    "import importlib\nimportlib.import_module(f'minivid.cli.{name}')",
])
def test_checker_sees_cli_imports(tmp_path, code, monkeypatch):
    f = ROOT / "minivid" / "methods" / "cove" / "_probe_does_not_exist.py"
    monkeypatch.setattr(pathlib.Path, "read_text", lambda self, *a, **k: code)
    assert any(_is_cli(m) for m in imported_modules(f))


def test_checker_allows_library_imports(monkeypatch):
    f = ROOT / "minivid" / "methods" / "cove" / "_probe_does_not_exist.py"
    monkeypatch.setattr(pathlib.Path, "read_text",
                        lambda self, *a, **k: "from .pipeline import x\nfrom minivid.client import y\nimport minivid.clip")
    assert not any(_is_cli(m) for m in imported_modules(f))
