"""Helpers shared by the benchmark scripts: timing, peak memory (allocator and RSS), the load average,
default vs `--full` sizes, random weights, markdown tables and the marked sections of docs/benchmarks.md.

Every script's default run finishes in a few minutes on a 2-core CPU; `--full` (added by
`minivid bench`) selects the paper-size run. `--write` replaces the script's marked section of
docs/benchmarks.md (`<!-- bench: TITLE -->` ... `<!-- /bench: TITLE -->`), leaving the rest alone.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch
import torch.nn as nn

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
BENCH_DIR = pathlib.Path(__file__).resolve().parent


def load_average() -> float:
    """The 1-minute load average (0.0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


START_LOAD = load_average()            # when the benchmark script was loaded, i.e. before it ran


def load_note() -> str:
    """'1-minute load average X before, Y after' (the machine is shared: read the interleaved ratios)."""
    return (f"1-minute load average {START_LOAD:.1f} before, {load_average():.1f} after "
            "(a shared machine: absolute times vary, the interleaved ratios are the figures to read)")


def section_title(title: str, args) -> str:
    """The docs/benchmarks.md section of a run: `title` for --full (the paper-size figures), else
    `title — default run`, so a quick run never overwrites the paper-size section."""
    return title if getattr(args, "full", False) else f"{title} — default run"


def sizes(args, default: dict, full: dict) -> None:
    """Fill every argument left at None from `full` (with --full) or `default`, in place."""
    for key, value in (full if getattr(args, "full", False) else default).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median seconds per function, runs interleaved (a, b, a, b, ...) so drift hits all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def interleaved_clocks(fns: dict[str, Callable[[], object]], repeats: int = 5,
                       warmup: int = 1) -> dict[str, tuple[float, float]]:
    """Like `interleaved`, two clocks per run: median (wall s, process CPU s). Process CPU time
    counts every thread of this process (BLAS and worker threads, spin-waits included) and not
    the time other jobs hold the cores: on a loaded machine its ratios are the steadier ones."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            w, c = time.perf_counter(), time.process_time()
            f()
            times[k].append((time.perf_counter() - w, time.process_time() - c))
    return {k: (statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)) for k, v in times.items()}


@contextlib.contextmanager
def _stderr_to_devnull():
    """File descriptor 2 to /dev/null for the block: Kineto (the profiler's C++ backend) writes
    `USDT:... profiler_start` / `profiler_stop` lines there that no environment variable turns off."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by torch's CPU allocator while `fn` runs, via the profiler (whose start and
    stop lines are kept off stderr; what `fn` itself writes there is not)."""
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _stderr_to_devnull():
        prof.__enter__()
    try:
        fn()
    finally:
        with _stderr_to_devnull():
            prof.__exit__(None, None, None)
    # each event's OWN allocations (self_*): the inclusive figure counts nested calls twice
    peak = cur = 0
    events = sorted(
        (e for e in prof.events() if getattr(e, "self_cpu_memory_usage", 0)), key=lambda e: e.time_range.start
    )
    for e in events:
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def _rss(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def measure_rss(warm: Callable[[], object], fn: Callable[[], object]) -> float:
    """Extra peak resident memory (MiB) of one call of `fn`, in this process (Linux).

    `warm` runs first (it pages in the code `fn` uses, which RSS would count otherwise); then
    freed memory goes back to the OS (malloc_trim), the peak-RSS mark is reset
    (/proc/self/clear_refs) and the figure is VmHWM after `fn` minus VmRSS before it.
    """
    import ctypes

    warm()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss("VmRSS")
    out = fn()
    peak = _rss("VmHWM") - base
    del out
    return peak / 2 ** 20


def peak_rss(script: str, job: str, *args, threads: int | None = None) -> float | None:
    """`measure_rss(*benchmarks/<script>.<job>(*args))` in a fresh Python process, so that no earlier
    allocation of this one hides or inflates the figure. None where it cannot be measured (not Linux)."""
    if not pathlib.Path("/proc/self/clear_refs").exists():
        return None
    code = (
        "import importlib.util, json, sys, torch\n"
        f"sys.path.insert(0, {str(BENCH_DIR)!r})\n"
        "from _common import measure_rss\n"
        f"spec = importlib.util.spec_from_file_location('bench_child', {str(BENCH_DIR / (script + '.py'))!r})\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        + (f"torch.set_num_threads({int(threads)})\n" if threads else "")
        + f"warm, fn = mod.{job}(*json.loads({json.dumps(json.dumps(args))}))\n"
        "with torch.inference_mode():\n"
        "    print(json.dumps(measure_rss(warm, fn)))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"peak_rss({script}.{job}{args}) failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def random_weights_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fan-in-scaled uniform weights, norms at identity, small biases: finite O(1) activations, no
    denormals (which would make the timings meaningless)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                bound = (3 / m.weight[0].numel()) ** 0.5
                m.weight.uniform_(-bound, bound, generator=g)
                if m.bias is not None:
                    m.bias.uniform_(-0.05, 0.05, generator=g)
    return model


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n", 1)[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if k.strip()}


def cpu_isa() -> str:
    """The CPU's widest x86 vector ISA: 'AVX-512' (avx512f), 'AVX2', or what is known otherwise
    (torch's own kernels pick theirs by the same test: torch.backends.cpu.get_cpu_capability())."""
    flags = set(_cpuinfo().get("flags", "").split())
    if flags:
        return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    cap = torch.backends.cpu.get_cpu_capability()             # no /proc/cpuinfo (not Linux)
    return {"AVX512": "AVX-512", "AVX2": "AVX2"}.get(cap, f"{platform.machine()} ({cap})")


def cpu_model() -> str:
    """The CPU model as the OS names it (/proc/cpuinfo 'model name' with its family and model
    numbers), else platform.processor()."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in info and "model" in info:               # a VM may show only "AMD EPYC": add the generation
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def blas() -> str:
    """The BLAS torch was built with (MKL / OpenBLAS / ...), from torch.__config__."""
    cfg = torch.__config__.show()
    for name, key in (("MKL", "BLAS_INFO=mkl"), ("OpenBLAS", "BLAS_INFO=open"), ("BLIS", "BLAS_INFO=blis")):
        if key in cfg:
            return name
    return "BLAS unknown"


def machine(threads: int | str | None = None) -> str:
    """What a figure was measured on: 'CPU model, vector ISA, cores, torch, BLAS, threads', e.g.
    'AMD EPYC, AVX-512, 2 cores, torch 2.13.0+cpu (MKL), 2 threads'. `minivid bench` prints it
    before every run and `write_section` stamps it on every section of docs/benchmarks.md."""
    n = torch.get_num_threads() if threads is None else threads
    return (f"{cpu_model()}, {cpu_isa()}, {os.cpu_count()} cores, torch {torch.__version__} ({blas()}), "
            f"{n} thread{'s' if n != 1 else ''}")   # a str: e.g. '2/1', the counts of a run's phases


def table(headers: list[str], rows: list[list[object]]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def with_command(body: str) -> str:
    """`body` with its `Command: `...`` line replaced by the command that ran, as `minivid bench` recorded it
    in $MINIVID_BENCH_COMMAND (every option given, in order; a script composing the line itself drops what
    it does not know); appended when the body has none. Unchanged when the script ran outside `minivid bench`."""
    import re

    cmd = os.environ.get("MINIVID_BENCH_COMMAND")
    if not cmd:
        return body
    line = f"Command: `{cmd}`."
    new, n = re.subn(r"Command: `[^`]*`\.?", lambda _m: line, body)
    return new if n else body.rstrip() + "\n\n" + line


def write_section(title: str, body: str, path: str | os.PathLike | None = None,
                  threads: int | str | None = None) -> pathlib.Path:
    """Replace the marked section `title` of docs/benchmarks.md (or `path`, or $MINIVID_BENCH_DOCS).

    The section is `<!-- bench: title -->`, `## title`, the stamp (date, machine, load average),
    `body`, `<!-- /bench: title -->`. An unmarked `## title` section (older files) is replaced up to
    the next `## `; otherwise the section is appended. Everything else is kept byte for byte; the
    file is written to a temporary file and renamed.
    """
    path = pathlib.Path(path or os.environ.get("MINIVID_BENCH_DOCS") or DOCS)
    body = with_command(body)
    begin, end = f"<!-- bench: {title} -->", f"<!-- /bench: {title} -->"
    stamp = datetime.date.today().isoformat()
    section = (f"{begin}\n## {title}\n\nMeasured {stamp} on {machine(threads)}; {load_note()}.\n\n"
               f"{body.strip()}\n{end}\n")
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery figure below was printed by `minivid bench ...` in one run.\n"
    if begin in text and end in text.split(begin, 1)[1]:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1].lstrip("\n")
    elif f"\n## {title}\n" in text:
        head, rest = text.split(f"\n## {title}\n", 1)
        ends = [i for i in (rest.find("\n## "), rest.find("\n<!-- bench: ")) if i >= 0]
        tail = rest[min(ends) + 1:] if ends else ""
        text = head.rstrip("\n") + "\n\n" + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip() + "\n\n" + section
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path

