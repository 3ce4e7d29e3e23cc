"""What every command-line job writes: one output folder per run with the result video,
a PNG frame grid, a source|result side-by-side video, pictures the method offers and
`record.json` (every setting, what effectively ran, seed, versions, git commit, timings, peak memory).

The output folder may hold an earlier run's files: a rerun replaces them only when it succeeds. A
job writes its files into a staging folder inside the output folder (`.minivid-new.*`) and `finish`
renames them into place (record.json last) with signals deferred, so a failing or interrupted rerun
leaves the earlier run's files and record as they were; files of the earlier run that the rerun does
not write stay (its record.json does not list them). Only tuning checkpoints are written in place
(they are what a resumed run continues from). While it runs, a job holds the folder's lock
(`minivid.outputs.FolderLock`): a second run into the same folder is refused.

What the job reads is never replaced: the folder must be disjoint from every input (the --video/
--image/--weights/--tuned/--first-frame/--lora paths: not one of them, not inside one, not holding
one), which is checked, with the folder's writability, when the job starts, before any compute; a
write onto an input is refused again at write time. Every file goes through `minivid.outputs`'
writer (exclusive unpredictable temporary names, checked before the rename, the umask's mode).

A job that fails or is interrupted is `abort`ed: its staging folder and the files it wrote in place
are removed (a tuning run's checkpoints stay, to resume from), and so is the folder when the job
created it and nothing else is left in it. `record.json` is written with `allow_nan=False`: a
non-finite number becomes null and its place is listed under "non_finite".
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import pathlib
import platform
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterable, Iterator

import torch

from minivid import __version__, outputs


# settings whose values are paths the job reads: never written onto
INPUT_SETTINGS = ("video", "image", "weights", "tuned", "first_frame", "lora")
ACTIVE: list["Job"] = []          # jobs started and not finished (the CLI aborts them on an error)
FINISHED: list["Job"] = []        # jobs finished in this process since the CLI started (their files are in place)
STAGING_PREFIX = ".minivid-new."
FAILED_RECORD = "record.failed.json"


def now() -> str:
    """The local time, ISO 8601 with its UTC offset (2026-12-01T21:04:05+00:00)."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def default_out_dir(job: str) -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return pathlib.Path("outputs") / f"{job}-{stamp}"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def peak_memory() -> dict[str, Any]:
    """Peak RSS of the process and torch's peak allocated bytes per accelerator (torch's allocator
    statistics exist for CUDA only; on a CPU-only run the entry is null)."""
    out: dict[str, Any] = {"cpu_rss": peak_rss_bytes(), "torch_allocated": None}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_allocated"] = {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())}
        out["cuda"] = torch.cuda.max_memory_allocated()
    return out


def git_commit() -> dict[str, Any] | None:
    """The commit of the checkout minivid runs from ({"commit", "dirty"}), None when not a git checkout."""
    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=5, check=True).stdout.strip()
        return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, Any]:
    return {"minivid": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "git": git_commit()}


def json_safe(value: Any, where: str = "", bad: list[str] | None = None) -> Any:
    """`value` with every non-finite float replaced by None (its place appended to `bad`); tensors and
    numpy scalars become numbers or lists, other objects their str."""
    bad = [] if bad is None else bad
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    elif hasattr(value, "item") and hasattr(value, "dtype"):          # numpy scalar
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            bad.append(where or "(top)")
            return None
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v, f"{where}.{k}" if where else str(k), bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, f"{where}[{i}]", bad) for i, v in enumerate(value)]
    return str(value)


def write_json(path: pathlib.Path, data: dict, inputs: Iterable[str | os.PathLike] = ()) -> pathlib.Path:
    """Write `data` as strict JSON (allow_nan=False; non-finite numbers become null, listed under
    "non_finite") through `minivid.outputs.write_file` (never onto one of `inputs`)."""
    bad: list[str] = []
    clean = json_safe(data, bad=bad)
    if bad:
        clean["non_finite"] = bad
    return outputs.write_json(path, clean, allow_nan=False, inputs=inputs)


def _disjoint(out: pathlib.Path, inputs: list[tuple[str, pathlib.Path]]) -> None:
    for option, source in inputs:
        if out == source or source in out.parents:
            raise FileExistsError(f"--out {out}: is (or lies inside) the input {option}{source}; the job never "
                                  f"writes onto what it reads; choose another --out")
        if out in source.parents:
            raise FileExistsError(f"--out {out}: holds the input {option}{source}; the output folder must be apart "
                                  f"from every input (a result could replace it); choose another --out")


class Job:
    """An output folder and the record of one run.

        job = Job("edit", out_dir, settings=vars(args))
        with job.timed("sampling"):
            ...
        job.write_video("result.mp4", frames)
        job.finish()          # puts the files in place, record.json last

    `overwrite`: whether a write replaces a file already in the folder (True: the folder is the
    job's own; False: FileExistsError). `inputs`: paths the job reads, never written onto
    (default: the settings named in INPUT_SETTINGS).
    """

    def __init__(self, name: str, out_dir: str | os.PathLike | None, settings: dict[str, Any],
                 overwrite: bool = True, inputs: Iterable[str | os.PathLike] | None = None):
        self.name = name
        self.dir = pathlib.Path(out_dir) if out_dir else default_out_dir(name)
        self.overwrite = overwrite
        if inputs is None:
            named = [(f"--{k.replace('_', '-')} ", settings[k]) for k in INPUT_SETTINGS if settings.get(k)]
        else:
            named = [("", p) for p in inputs]
        self.named_inputs = [(k, outputs.resolve(p, k.strip())) for k, p in named]
        self.inputs = [p for _, p in self.named_inputs]
        _disjoint(outputs.resolve(self.dir, "--out"), self.named_inputs)
        self._created = outputs.make_folder(self.dir)
        try:
            self._lock = outputs.FolderLock(self.dir).acquire()
        except OSError:
            self._remove_created()
            raise
        self._before = self._files()                 # the folder as this run found it
        self.stage = pathlib.Path(tempfile.mkdtemp(dir=self.dir, prefix=STAGING_PREFIX))
        self._written: list[pathlib.Path] = []       # written in place this run (removed by abort)
        self._staged: list[pathlib.Path] = []        # written into the stage (put in place by finish)
        self._kept: list[pathlib.Path] = []          # written in place and kept by abort (checkpoints)
        self.record: dict[str, Any] = {
            "job": name,
            "started": now(),
            "settings": {k: v for k, v in settings.items() if not k.startswith("_")},
            "ran": {},
            "versions": versions(),
            "timings_s": {},
            "outputs": [],
            "results": {},
        }
        self._t0 = time.perf_counter()
        ACTIVE.append(self)

    @property
    def created(self) -> bool:
        """Whether this job created its folder (False: the folder was there, maybe with an earlier run)."""
        return bool(self._created)

    def _remove_created(self) -> None:
        for folder in self._created:
            with contextlib.suppress(OSError):
                folder.rmdir()                          # only when empty

    def path(self, name: str) -> pathlib.Path:
        """The final place of `name` in the folder (tuning checkpoints are written there directly)."""
        return self.dir / name

    def output_path(self, name: str) -> pathlib.Path:
        """The path to write the output `name` to: in the staging folder, renamed to `path(name)` by
        `finish`. FileExistsError if the final path is (or lies inside) an input, or if it exists and
        the job does not overwrite."""
        outputs.check_target(self.path(name), self.inputs, self.overwrite)
        staged = self.stage / name
        staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    @contextlib.contextmanager
    def timed(self, label: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record["timings_s"][label] = round(self.record["timings_s"].get(label, 0.0) + time.perf_counter() - t0, 4)

    def add_output(self, path: pathlib.Path, keep: bool = False) -> pathlib.Path:
        """List a file of the job in the record's outputs (once). A file of the staging folder is put in
        place by `finish`; a file written in place is removed by `abort` unless keep=True (a checkpoint
        to resume from). Returns the file's final path."""
        path = pathlib.Path(path)
        if self.stage in path.parents:
            rel = path.relative_to(self.stage)
            if path not in self._staged:
                self._staged.append(path)
        else:
            rel = path.relative_to(self.dir) if self.dir in path.parents else pathlib.Path(path.name)
            listed = self._kept if keep else self._written
            if path not in listed:
                listed.append(path)
        if str(rel) not in self.record["outputs"]:
            self.record["outputs"].append(str(rel))
        return self.dir / rel

    def ran(self, **what: Any) -> None:
        """Record what effectively ran (size, frames, model preset, dtype, ...), beside the settings asked for."""
        self.record["ran"].update(what)

    def write_video(self, name: str, frames: torch.Tensor, fps: float = 8) -> pathlib.Path:
        from minivid.video import write_video

        return self.add_output(write_video(self.output_path(name), frames, fps=fps, overwrite=True,
                                           inputs=self.inputs))

    def write_grid(self, name: str, frames: torch.Tensor, cols: int | None = None, *, rows: list[str] | None = None,
                   legend: list | None = None, title: str | None = None,
                   numbers: list[str] | None = None) -> pathlib.Path:
        """A labelled frame grid (minivid.pictures): `rows` names each row (frames split evenly), the
        columns carry frame numbers; without rows the cells are tiled and numbered; `legend`:
        [(RGB uint8 colour, text)]."""
        from minivid.pictures import save_labelled_grid

        return self.add_output(save_labelled_grid(self.output_path(name), frames, rows=rows, cols=cols, legend=legend,
                                                  title=title, numbers=numbers, overwrite=True,
                                                  inputs=self.inputs))

    def write_image(self, name: str, image: torch.Tensor) -> pathlib.Path:
        """One picture [3, H, W] in [-1, 1] as a PNG, pixel for pixel (no labels)."""
        from minivid.video import save_grid

        return self.add_output(save_grid(self.output_path(name), image[None], overwrite=True, inputs=self.inputs))

    def write_side_by_side(self, name: str, source: torch.Tensor, result: torch.Tensor, fps: float = 8) -> pathlib.Path:
        from minivid.video import side_by_side

        return self.write_video(name, side_by_side(source, result), fps=fps)

    def finish(self, **results: Any) -> pathlib.Path:
        """Write record.json (the results, timings, finished time, peak memory) and put the staged files
        in place, record.json last, with signals deferred: the job is done."""
        self.record["results"].update(results)
        self.record["finished"] = now()
        self.record["timings_s"]["total"] = round(time.perf_counter() - self._t0, 4)
        self._add_untimed()
        self.record["peak_memory_bytes"] = peak_memory()
        staged_record = write_json(self.stage / "record.json", self.record, inputs=self.inputs)
        with outputs.deferred_signals():
            for src in [*self._staged, staged_record]:
                dst = self.dir / src.relative_to(self.stage)
                outputs.check_target(dst, self.inputs, True)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
            with contextlib.suppress(ValueError):
                ACTIVE.remove(self)
            FINISHED.append(self)
            outputs.remove_tree(self.stage)
            self._lock.release()
        return self.path("record.json")

    def _add_untimed(self) -> None:
        """timings_s["untimed"]: the job's time outside its named stages (file writing, small steps between
        them), so that the stages and it add up to the total."""
        t = self.record["timings_s"]
        named = sum(v for k, v in t.items() if k not in ("total", "untimed"))
        t["untimed"] = round(max(0.0, t["total"] - named), 4)

    def abort(self, error: BaseException | None = None, keep_record: bool = False) -> pathlib.Path | None:
        """The job failed or was interrupted: remove its staging folder (nothing staged reaches its final
        name), the files it wrote in place this run (not those added with keep=True), temporary files of
        its writes, and the folders it created that are now empty; the folder's other files (an earlier
        run's) stay as they were. keep_record=True writes record.failed.json (the settings and the error)
        and returns it."""
        with contextlib.suppress(ValueError):
            ACTIVE.remove(self)
        with outputs.deferred_signals():
            outputs.remove_tree(self.stage)
            for path in self._written:
                with contextlib.suppress(OSError):
                    path.unlink()
            if self.dir.is_dir():
                for tmp in [*self.dir.glob(".*.tmp*"), *self.dir.glob(".minivid-write-test.*")]:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                for sub in sorted((p for p in self.dir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    with contextlib.suppress(OSError):
                        sub.rmdir()                     # only empty ones
            record = None
            if keep_record and self.dir.is_dir():
                self.record["failed"] = now()
                self.record["error"] = f"{type(error).__name__}: {error}" if error is not None else None
                self.record["timings_s"]["total"] = round(time.perf_counter() - self._t0, 4)
                self.record["peak_memory_bytes"] = peak_memory()
                with contextlib.suppress(OSError):
                    record = write_json(self.path(FAILED_RECORD), self.record, inputs=self.inputs)
            self._lock.release()
            self._remove_created()
        return record

    def _files(self) -> dict[str, tuple[int, int]]:
        """The folder's files (relative name: (size, mtime_ns)); the lock and the staging folder not listed."""
        if not self.dir.is_dir():
            return {}
        found = {}
        for p in self.dir.rglob("*"):
            rel = p.relative_to(self.dir)
            if rel.parts[0].startswith(STAGING_PREFIX) or p.name == outputs.FolderLock.NAME:
                continue
            with contextlib.suppress(OSError):
                st = p.stat()
                if p.is_file():
                    found[str(rel)] = (st.st_size, st.st_mtime_ns)
        return found

    def left(self) -> list[str]:
        """The files this run wrote or changed that are in the folder (after `abort`: the checkpoints it
        kept), sorted: what the folder holds now that it did not hold, as it was, when the job started."""
        return sorted(name for name, st in self._files().items() if self._before.get(name) != st)

    def kept(self) -> list[str]:
        """What is in the folder (after `abort` or `finish`): file names, sorted; the lock and staging not listed."""
        return sorted(self._files())


def jsonl_objects(path: str | os.PathLike, error: type[Exception] = ValueError) -> Iterator[tuple[str, dict[str, Any]]]:
    """The JSON objects of a JSONL file, one per non-blank line not starting with '#', each with its
    "file:line" (for messages); `error` (naming the file and line) for a line that is not a JSON object."""
    path = pathlib.Path(path)
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}: not a JSON object ({e.msg})") from None
        if not isinstance(obj, dict):
            raise error(f"{where}: not a JSON object, got {type(obj).__name__}: {line.strip()[:80]}")
        yield where, obj

