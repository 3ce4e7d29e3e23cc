"""What every command-line job writes: one output folder per run with the result video,
a PNG frame grid, a source|result side-by-side video, pictures the method offers and
`record.json` (every setting, seed, versions, timings, peak memory).

The output folder is the job's own: by default a file the job writes replaces the one of an
earlier run in the same folder (a resumed tuning run writes its source grid again). What the
job reads is never replaced: a write onto an input (the --video/--image/--weights path, or into
it when it is a folder) is refused with FileExistsError.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import platform
import resource
import sys
import time
from typing import Any, Iterable, Iterator

import torch

from minivid import __version__


# settings whose values are paths the job reads: never written onto
INPUT_SETTINGS = ("video", "image", "weights")


def default_out_dir(job: str) -> pathlib.Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return pathlib.Path("outputs") / f"{job}-{stamp}"


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def versions() -> dict[str, str]:
    return {"minivid": __version__, "torch": torch.__version__, "python": platform.python_version()}


class Job:
    """An output folder and the record of one run.

        job = Job("edit", out_dir, settings=vars(args))
        with job.timed("sampling"):
            ...
        job.write_video("result.mp4", frames)
        job.finish()          # writes record.json

    `overwrite`: whether a write replaces a file already in the folder (True: the folder is the
    job's own; False: FileExistsError). `inputs`: paths the job reads, never written onto
    (default: the settings named in INPUT_SETTINGS).
    """

    def __init__(self, name: str, out_dir: str | os.PathLike | None, settings: dict[str, Any],
                 overwrite: bool = True, inputs: Iterable[str | os.PathLike] | None = None):
        self.name = name
        self.dir = pathlib.Path(out_dir) if out_dir else default_out_dir(name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.overwrite = overwrite
        if inputs is None:
            inputs = [settings[k] for k in INPUT_SETTINGS if settings.get(k)]
        self.inputs = [pathlib.Path(p).resolve() for p in inputs]
        self.record: dict[str, Any] = {
            "job": name,
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "settings": {k: v for k, v in settings.items() if not k.startswith("_")},
            "versions": versions(),
            "timings_s": {},
            "outputs": [],
            "results": {},
        }
        self._t0 = time.perf_counter()

    def path(self, name: str) -> pathlib.Path:
        return self.dir / name

    def output_path(self, name: str) -> pathlib.Path:
        """The path to write the output `name` to. FileExistsError if it is (or lies inside) an input,
        or if it exists and the job does not overwrite."""
        path = self.path(name)
        target = path.resolve()
        for source in self.inputs:
            if target == source or source in target.parents:
                raise FileExistsError(f"{path}: is (or lies inside) the input {source}; the job never writes "
                                      f"onto what it reads; choose another --out")
        if not self.overwrite and path.exists():
            raise FileExistsError(f"{path}: already exists and this job does not overwrite")
        return path

    @contextlib.contextmanager
    def timed(self, label: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record["timings_s"][label] = round(self.record["timings_s"].get(label, 0.0) + time.perf_counter() - t0, 4)

    def add_output(self, path: pathlib.Path) -> pathlib.Path:
        """List a file of the folder in the record's outputs (once)."""
        if path.name not in self.record["outputs"]:
            self.record["outputs"].append(path.name)
        return path

    def write_video(self, name: str, frames: torch.Tensor, fps: float = 8) -> pathlib.Path:
        from minivid.video import write_video

        return self.add_output(write_video(self.output_path(name), frames, fps=fps, overwrite=self.overwrite))

    def write_grid(self, name: str, frames: torch.Tensor, cols: int | None = None, *, rows: list[str] | None = None,
                   legend: list | None = None, title: str | None = None,
                   numbers: list[str] | None = None) -> pathlib.Path:
        """A labelled frame grid (minivid.pictures): `rows` names each row (frames split evenly), the
        columns carry frame numbers; without rows the cells are tiled and numbered; `legend`:
        [(RGB uint8 colour, text)]."""
        from minivid.pictures import save_labelled_grid

        return self.add_output(save_labelled_grid(self.output_path(name), frames, rows=rows, cols=cols, legend=legend,
                                                  title=title, numbers=numbers, overwrite=self.overwrite))

    def write_image(self, name: str, image: torch.Tensor) -> pathlib.Path:
        """One picture [3, H, W] in [-1, 1] as a PNG, pixel for pixel (no labels)."""
        from minivid.video import save_grid

        return self.add_output(save_grid(self.output_path(name), image[None], overwrite=self.overwrite))

    def write_side_by_side(self, name: str, source: torch.Tensor, result: torch.Tensor, fps: float = 8) -> pathlib.Path:
        from minivid.video import side_by_side

        return self.write_video(name, side_by_side(source, result), fps=fps)

    def finish(self, **results: Any) -> pathlib.Path:
        self.record["results"].update(results)
        self.record["timings_s"]["total"] = round(time.perf_counter() - self._t0, 4)
        self.record["peak_memory_bytes"] = {"cpu_rss": peak_rss_bytes()}
        if torch.cuda.is_available():
            self.record["peak_memory_bytes"]["cuda"] = torch.cuda.max_memory_allocated()
        path = self.path("record.json")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.record, indent=2, default=str))
        os.replace(tmp, path)
        return path
