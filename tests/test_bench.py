"""`minivid bench`: every registered benchmark takes --full and --write, and --write replaces only its
marked section of docs/benchmarks.md (on a temporary copy). No benchmark is run and nothing is timed."""
import argparse
import importlib.util
import pathlib
import shutil

import pytest

from minivid.cli import bench

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _common():
    spec = importlib.util.spec_from_file_location("bench_common_under_test", ROOT / "benchmarks" / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_registered_benchmarks_include_the_kernels_check():
    names = set(bench.available())
    assert {"frame-attention", "kernels", "unet", "svd-unet", "tcve", "cove"} <= names
    assert not any(n.startswith("-") or n.startswith("_") for n in names)


@pytest.mark.parametrize("name", sorted(bench.available()))
def test_every_benchmark_takes_full_and_write(name):
    parser = bench.parser_for(name, bench.load(name))
    ns = parser.parse_args(["--full", "--write"])
    assert ns.full is True and ns.write is True
    ns = parser.parse_args([])
    assert ns.full is False and ns.write is False


def test_unknown_benchmark_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown benchmark 'nope'; available: .*frame-attention"):
        bench.load("nope")


def test_sizes_fill_only_unset_arguments():
    common = _common()
    ns = argparse.Namespace(full=False, frames=None, latent=32)
    common.sizes(ns, dict(frames=4, latent=8), dict(frames=14, latent=16))
    assert (ns.frames, ns.latent) == (4, 32)
    ns = argparse.Namespace(full=True, frames=None, latent=None)
    common.sizes(ns, dict(frames=4, latent=8), dict(frames=14, latent=16))
    assert (ns.frames, ns.latent) == (14, 16)


def test_write_replaces_only_its_marked_section(tmp_path):
    common = _common()
    doc = tmp_path / "benchmarks.md"
    shutil.copy(ROOT / "docs" / "benchmarks.md", doc)
    original = doc.read_text()
    common.write_section("A new section", "| a |\n|---|\n| value-one |", path=doc)
    first = doc.read_text()
    assert first.startswith(original.rstrip())                            # appended, nothing else touched
    assert first.count("<!-- bench: A new section -->") == 1 and "| value-one |" in first
    common.write_section("A new section", "| a |\n|---|\n| value-two |", path=doc)
    second = doc.read_text()
    assert "| value-one |" not in second and "| value-two |" in second
    assert second.count("<!-- bench: A new section -->") == second.count("<!-- /bench: A new section -->") == 1
    assert second.replace("| value-two |", "| value-one |").split("Measured")[0] == first.split("Measured")[0]
    assert list(tmp_path.iterdir()) == [doc]                                # the temporary file was renamed


def test_write_keeps_the_sections_around_it(tmp_path):
    common = _common()
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n\n## Old unmarked\n\nold body\n\n"
                   "<!-- bench: Other -->\n## Other\n\nother body\n<!-- /bench: Other -->\n\n## Last\n\nlast body\n")
    common.write_section("Old unmarked", "new body", path=doc)              # an unmarked section of an older file
    text = doc.read_text()
    assert "old body" not in text and "new body" in text
    assert "<!-- bench: Other -->\n## Other\n\nother body\n<!-- /bench: Other -->" in text
    assert text.index("new body") < text.index("other body") < text.index("last body")
    common.write_section("Other", "other body 2", path=doc)
    text = doc.read_text()
    assert "other body\n" not in text and "other body 2" in text and "new body" in text and "last body" in text
    assert text.startswith("# Benchmarks\n\nintro\n\n")


@pytest.mark.parametrize("flags, isa", [("fpu sse2 avx avx2 fma", "AVX2"), ("avx2 avx512f avx512bw", "AVX-512"),
                                        ("fpu sse2 sse4_2", "no AVX2")])
def test_machine_names_cpu_model_isa_and_threads(monkeypatch, flags, isa):
    """Every figure is stamped with the CPU model, its vector ISA and the thread count."""
    common = _common()
    info = {"model name": "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "cpu family": "6", "model": "106",
            "flags": flags}
    monkeypatch.setattr(common, "_cpuinfo", lambda: info)
    line = common.machine(threads=2)
    assert line.startswith("Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz (family 6, model 106), " + isa + ", ")
    assert line.endswith(", 2 threads") and common.machine(threads=1).endswith(", 1 thread")


def test_bench_prints_the_machine_line(monkeypatch, capsys):
    """`minivid bench NAME` prints the machine line before the benchmark's own output."""
    class Fake:
        __doc__ = "fake"

        @staticmethod
        def add_arguments(p):
            pass

        @staticmethod
        def run(ns):
            print("benchmark output")
            return 0

    monkeypatch.setattr(bench, "load", lambda name: Fake)
    assert bench.run(argparse.Namespace(name="fake", rest=[], threads=1)) == 0
    out = capsys.readouterr().out
    assert out.index("Machine: ") < out.index("benchmark output")
    machine = out.split("Machine: ", 1)[1].splitlines()[0]
    assert any(isa in machine for isa in ("AVX-512", "AVX2", "no AVX2")) and machine.endswith("1 thread")


def test_written_command_line_is_the_command_that_ran(monkeypatch):
    """`--write` puts the invocation with every option used into the Command: line, whatever the script wrote."""
    from minivid.cli import build_parser

    c = _common()

    ns = build_parser("bench").parse_args(["bench", "--threads", "2", "cove", "--frames", "4", "--prompt", "a b", "--write"])
    cmd = bench.command_line(ns)
    assert cmd == "minivid bench --threads 2 cove --frames 4 --prompt 'a b' --write"
    monkeypatch.setenv("MINIVID_BENCH_COMMAND", cmd)
    assert c.with_command("table\n\nCommand: `minivid bench cove`.") == f"table\n\nCommand: `{cmd}`."
    assert c.with_command("table") == f"table\n\nCommand: `{cmd}`."
    monkeypatch.delenv("MINIVID_BENCH_COMMAND")
    assert c.with_command("table\n\nCommand: `x`.") == "table\n\nCommand: `x`."


def test_peak_memory_keeps_the_profiler_lines_off_stderr(capfd):
    import torch

    c = _common()
    assert c.peak_memory(lambda: torch.ones(1000, 1000)) >= 4_000_000
    assert "USDT" not in capfd.readouterr().err
