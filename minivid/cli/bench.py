"""`minivid bench NAME`: run one benchmark script of the repository's `benchmarks/` folder.

Benchmarks compare minivid with the reference libraries (diffusers), which the library
itself never imports; so they live beside the tests, outside the package, and need a
source checkout (`pip install -e .`). Each script defines `add_arguments(parser)` and
`run(args) -> int`, prints a table of ratios measured in one run and can append it to
docs/benchmarks.md with `--write`.
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib

from minivid.cli.common import THREADS

help = "run a benchmark (minivid vs the reference, measured in one run)"
BENCH_DIR = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def available() -> dict[str, pathlib.Path]:
    if not BENCH_DIR.is_dir():
        return {}
    return {p.stem.replace("_", "-"): p for p in sorted(BENCH_DIR.glob("*.py")) if not p.stem.startswith("_")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="benchmark name: " + (", ".join(available()) or "(none found)"))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark (see `minivid bench NAME --help`)")
    p.add_argument("--threads", type=THREADS, help="CPU threads for torch, given before NAME (default: torch's choice)")


def load(name: str):
    scripts = available()
    if name not in scripts:
        raise ValueError(
            f"unknown benchmark {name!r}; available: {', '.join(scripts) or 'none'} "
            f"(benchmarks live in {BENCH_DIR} and need a source checkout of minivid)"
        )
    spec = importlib.util.spec_from_file_location(f"minivid_bench_{name.replace('-', '_')}", scripts[name])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(args: argparse.Namespace) -> int:
    mod = load(args.name)
    parser = argparse.ArgumentParser(prog=f"minivid bench {args.name}", description=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None)
    parser.add_argument("--write", action="store_true", help="append the measured table to docs/benchmarks.md")
    mod.add_arguments(parser)
    return int(mod.run(parser.parse_args(args.rest)) or 0)
