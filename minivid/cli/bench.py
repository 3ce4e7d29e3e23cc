"""`minivid bench NAME`: run one benchmark script of the repository's `benchmarks/` folder.

Benchmarks compare minivid with the reference libraries (diffusers), which the library
itself never imports; so they live beside the tests, outside the package, and need a
source checkout (`pip install -e .`). Each script defines `add_arguments(parser)` and
`run(args) -> int` and prints a table of ratios measured in one run. Every benchmark takes
`--full` (the paper-size run; the default run finishes in a few minutes on a 2-core CPU) and
`--write` (replace its marked section of docs/benchmarks.md); this command adds both, and
prints the machine (CPU model, vector ISA, cores, BLAS, threads) before the run and the 1-minute
load average before and after it. Runs use one torch thread unless
`--threads` says otherwise (before NAME, or the benchmark's own `--threads` after it).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib

from minivid.cli.common import SEED, THREADS, integer, number

# a benchmark's own integer options are counts and sizes (≥ 1), except these (≥ 0)
ZERO_OK = {"seed", "step"}

help = "run a benchmark (minivid vs the reference, measured in one run)"
BENCH_DIR = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def available() -> dict[str, pathlib.Path]:
    if not BENCH_DIR.is_dir():
        return {}
    return {p.stem.replace("_", "-"): p for p in sorted(BENCH_DIR.glob("*.py")) if not p.stem.startswith("_")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="benchmark name: " + (", ".join(available()) or "(none found)"))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark (see `minivid bench NAME --help`)")
    p.add_argument("--threads", type=THREADS, default=1,
                   help="CPU threads for torch (≥ 1), given before NAME (default 1: on a shared, loaded machine every "
                        "OpenMP region of a multi-threaded run stalls, which made 2-thread runs 5-10× slower here)")


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
    # the scripts put their folder FIRST on sys.path (for `_common`); there benchmarks/kernels.py would
    # stand in for the installed PyPI package `kernels` that transformers imports: move it to the end
    import sys

    here = str(BENCH_DIR)
    if here in sys.path:
        sys.path[:] = [p for p in sys.path if p != here] + [here]
    return mod


def parser_for(name: str, mod) -> argparse.ArgumentParser:
    """The argument parser of benchmark `name`: its own arguments plus --full and --write."""
    doc = (mod.__doc__ or "").strip()
    parser = argparse.ArgumentParser(prog=f"minivid bench {name}", description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--full", action="store_true",
                        help="the paper-size run (long); the default run finishes in a few minutes on a 2-core CPU")
    parser.add_argument("--write", action="store_true", help="replace this benchmark's section of docs/benchmarks.md")
    mod.add_arguments(parser)
    ranged(parser)
    return parser


def machine_line() -> str:
    """CPU model, vector ISA, cores, torch, BLAS and threads (benchmarks/_common.machine)."""
    import sys

    common = sys.modules.get("_common")                 # the module the benchmark scripts import
    if common is None:
        spec = importlib.util.spec_from_file_location("_common", BENCH_DIR / "_common.py")
        common = sys.modules["_common"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(common)
    return common.machine()


def ranged(parser: argparse.ArgumentParser) -> None:
    """Give every plain `type=int` / `type=float` option of a benchmark script a checked range, so a bad
    value is argparse's one-line error (exit 2) like every other minivid option: --threads [1, 4096],
    --seed [0, 2^63 - 1], --step ≥ 0, other integers (counts, sizes) [1, 10^7], floats finite ≥ 0."""
    for action in parser._actions:
        if action.type is int:
            action.type = (THREADS if action.dest == "threads" else SEED if action.dest == "seed"
                           else integer(0 if action.dest in ZERO_OK else 1, 10_000_000))
        elif action.type is float:
            action.type = number(0, None)


def _load1() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def command_line(args: argparse.Namespace) -> str:
    """The command as run (`--threads` always stated: it changes every figure); what `--write` puts in
    docs/benchmarks.md's Command: line."""
    import shlex

    return shlex.join(["minivid", "bench", "--threads", str(args.threads), args.name, *args.rest])


def run(args: argparse.Namespace) -> int:
    mod = load(args.name)
    try:
        ns = parser_for(args.name, mod).parse_args(args.rest)
    except SystemExit as e:                 # a bad option of the benchmark: argparse's message, exit 2
        return 2 if isinstance(e.code, str) else int(e.code or 0)
    os.environ["MINIVID_BENCH_COMMAND"] = command_line(args)        # read by benchmarks/_common.with_command
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        if getattr(ns, "threads", None) is None and hasattr(ns, "threads"):
            ns.threads = args.threads                     # a benchmark's own --threads default yields to it
    print(f"Machine: {machine_line()}")
    before = _load1()
    code = int(mod.run(ns) or 0)
    print(f"1-minute load average: {before:.2f} before, {_load1():.2f} after")
    return code
