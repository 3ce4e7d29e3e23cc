"""How minivid writes what it writes: one writer, one lock per output folder, one signal path.

- **The writer** (`write_file`, and `write_bytes`, `write_json` on it): the content goes to a temporary
  file beside the target with an unpredictable name, created exclusively (`tempfile.mkstemp`:
  O_CREAT|O_EXCL|O_NOFOLLOW, so never through an existing path or a symlink planted under a
  guessed name); what was written is checked (not empty; a caller's `verify`, e.g. that a video
  decodes to the frames sent) before the temporary file gets the umask's mode (0666 & ~umask, what
  `open()` would give, not mkstemp's 0600) and is renamed onto the target. The target is refused
  when it is, or resolves to, an input (`inputs`), or is not a regular file. A failure (a full disk,
  an encoder that wrote nothing) removes the temporary file and raises `WriteError` naming the path:
  the file that was there is as it was.
- **The lock** (`FolderLock`): a job holds an exclusive `flock` on `<folder>/.minivid.lock` while it
  writes into the folder; a second run into the same folder is refused at once (`FolderBusyError`,
  naming the folder and the other run's process id). The lock file is removed on release.
- **The signals** (`handle_signals`, `deferred_signals`): SIGTERM gets what Ctrl-C gets (both raise
  `Interrupted`, a KeyboardInterrupt, so one `except` handles both); inside `deferred_signals()` (the
  few renames that put a finished job's files in place) a signal waits until the block is done, so a
  job is either entirely in place or not at all. `received()` is the signal that arrived, if any.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import shutil
import signal
import stat
import tempfile
import threading
from typing import Callable, Iterable, Iterator

PathLike = str | os.PathLike


class _Message(OSError):
    """An OSError whose str() is its message (no "[Errno N]" in front); `errno` is still set."""

    def __init__(self, code: int | None, message: str):
        super().__init__(message)
        self.errno = code

    def __str__(self) -> str:
        return self.args[0]


class WriteError(_Message):
    """A file could not be written (full disk, no permission, an encoder that failed); names the path.
    Whatever was at the path before is left as it was."""


class FolderBusyError(_Message):
    """Another minivid run holds the lock of the output folder."""


class PathError(_Message):
    """A path that cannot be used (a symlink loop, a folder where a file is needed, ...)."""


# ---------------------------------------------------------------- modes

def umask() -> int:
    """The process's umask (from /proc/self/status on Linux; else set and restored at once)."""
    with contextlib.suppress(OSError, ValueError):
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def final_mode(folder: bool = False) -> int:
    """The mode a file (or folder) made with open()/mkdir() would get: 0666 (0777) & ~umask."""
    return (0o777 if folder else 0o666) & ~umask()


# ---------------------------------------------------------------- paths

def resolve(path: PathLike, option: str = "") -> pathlib.Path:
    """`path` made absolute with its symlinks resolved; a symlink loop is an OSError naming the option
    and the path (pathlib raises RuntimeError before Python 3.13)."""
    loop = f"{option + ' ' if option else ''}{path}: a symlink loop (a link that leads back to itself)"
    try:
        return pathlib.Path(path).resolve()
    except RuntimeError:
        raise PathError(errno.ELOOP, loop) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PathError(errno.ELOOP, loop) from None
        raise


def _is_input(path: pathlib.Path, inputs: Iterable[PathLike]) -> PathLike | None:
    target = resolve(path)
    for source in inputs:
        src = resolve(source)
        if target == src or src in target.parents or path.absolute() == pathlib.Path(source).absolute():
            return source
    return None


def check_target(path: PathLike, inputs: Iterable[PathLike] = (), overwrite: bool = True) -> pathlib.Path:
    """Refuse to write `path` when it is (or resolves to, or lies inside) an input, when it exists and
    `overwrite` is False, or when it exists and is not a regular file (a folder, a FIFO, a device)."""
    path = pathlib.Path(path)
    source = _is_input(path, inputs)
    if source is not None:
        raise FileExistsError(f"{path}: is (or lies inside) the input {source}; minivid never writes onto what "
                              f"it reads; choose another --out")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if stat.S_ISLNK(st.st_mode) or stat.S_ISREG(st.st_mode):
        if not overwrite:
            raise FileExistsError(f"{path}: already exists and this job does not overwrite")
        return path
    raise IsADirectoryError(f"{path}: exists and is not a regular file (a folder, FIFO or device); "
                            f"minivid writes only regular files; move it away or choose another --out")


# ---------------------------------------------------------------- the writer

def _reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return e.strerror or str(e)


def write_file(path: PathLike, write: Callable[[str], None], *, inputs: Iterable[PathLike] = (),
               overwrite: bool = True, verify: Callable[[str], None] | None = None, min_size: int = 1,
               what: str = "") -> pathlib.Path:
    """Call `write(tmp)` on a fresh temporary file beside `path` (same suffix, so ffmpeg picks the
    format), check it (at least `min_size` bytes; `verify(tmp)` raises if the content is wrong), give
    it the umask's mode and rename it onto `path`. See the module's docstring for the guarantees."""
    path = pathlib.Path(path)
    check_target(path, inputs, overwrite)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: output folder does not exist")
    label = f"{what} {path}" if what else str(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    except OSError as e:
        raise WriteError(e.errno, f"{label}: cannot create a file in {path.parent} ({_reason(e)})") from None
    os.close(fd)
    try:
        try:
            write(tmp)
        except OSError as e:
            raise WriteError(e.errno, f"{label}: writing failed ({_reason(e)}); nothing was replaced") from None
        size = os.stat(tmp).st_size
        if size < min_size:
            raise WriteError(errno.EIO, f"{label}: the writer produced {size} bytes (expected at least {min_size}); "
                                        f"nothing was replaced")
        if verify is not None:
            verify(tmp)
        os.chmod(tmp, final_mode())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return path


def write_bytes(path: PathLike, data: bytes, **kw) -> pathlib.Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())            # a full disk shows here, not after the rename
    return write_file(path, write, min_size=min(1, len(data)), **kw)


def write_json(path: PathLike, data, *, indent: int = 2, default=None, allow_nan: bool = True, **kw) -> pathlib.Path:
    text = json.dumps(data, indent=indent, default=default, allow_nan=allow_nan) + "\n"
    return write_bytes(path, text.encode(), **kw)


def publish_tree(folder: PathLike) -> None:
    """Give a folder minivid wrote (a saved diffusers pipeline) and everything in it the umask's modes:
    mkdtemp makes 0700 and safetensors writes 0600, which colleagues on a shared server cannot read."""
    folder = pathlib.Path(folder)
    os.chmod(folder, final_mode(folder=True))
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), final_mode(folder=True))
        for f in files:
            os.chmod(os.path.join(root, f), final_mode())


def make_folder(folder: PathLike, option: str = "--out") -> list[pathlib.Path]:
    """Create `folder` (and missing parents) with the umask's mode and check it is writable; the folders
    created, deepest first. Errors name the option: a file in the way, a symlink loop, no permission."""
    folder = pathlib.Path(folder)
    resolve(folder, option)
    for p in [folder, *folder.parents]:
        if os.path.lexists(p):
            if not p.is_dir():
                what = "is a file, not a folder" if p.is_file() else "is not a folder"
                raise NotADirectoryError(f"{option} {folder}: {p} {what}")
            break
    missing = [p for p in [folder, *folder.parents] if not os.path.lexists(p)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".minivid-write-test.")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        for p in missing:
            with contextlib.suppress(OSError):
                p.rmdir()
        kind = PermissionError if isinstance(e, PermissionError) else OSError
        error = kind(f"{option} {folder}: cannot create or write a folder there ({_reason(e)}); choose another {option}")
        error.errno = e.errno
        raise error from None
    return missing


# ---------------------------------------------------------------- the lock

class FolderLock:
    """An exclusive lock on an output folder for the life of one job (see the module docstring)."""

    NAME = ".minivid.lock"

    def __init__(self, folder: PathLike, option: str = "--out", name: str | None = None):
        self.folder = pathlib.Path(folder)
        self.option = option
        self.path = self.folder / (name or self.NAME)
        self.fd: int | None = None

    def acquire(self) -> "FolderLock":
        import fcntl

        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        for _ in range(100):
            try:
                fd = os.open(self.path, flags, final_mode())
            except OSError as e:
                raise PathError(e.errno, f"{self.option} {self.folder}: cannot lock the folder ({_reason(e)}: "
                                       f"{self.path})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                with contextlib.suppress(OSError, ValueError):
                    other = os.pread(fd, 64, 0).decode().strip()
                os.close(fd)
                raise FolderBusyError(errno.EBUSY, f"{self.option} {self.folder}: another minivid run "
                                      f"(process {other or '?'}) is writing into this folder; wait for it to "
                                      f"end or choose another {self.option}") from None
            # the file may have been removed by the previous holder between our open and flock: retry
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return self
            os.close(fd)
        raise FolderBusyError(errno.EBUSY, f"{self.option} {self.folder}: cannot take the folder's lock")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------- the signals

class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM; `signum` says which."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_state = {"received": None, "deferring": 0, "pending": None}
_WATCHED = (signal.SIGINT, signal.SIGTERM)


def _handler(signum, frame) -> None:
    _state["received"] = signum
    if _state["deferring"]:
        _state["pending"] = signum
        return
    raise Interrupted(signum)


def received() -> int | None:
    """The signal (SIGINT or SIGTERM) received since `handle_signals` began, or None."""
    return _state["received"]


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` while the block runs (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.getsignal(s) for s in _WATCHED}
    _state.update(received=None, deferring=0, pending=None)
    for s in _WATCHED:
        if before[s] is not signal.SIG_IGN:            # a signal the parent made us ignore stays ignored (nohup, `cmd &`)
            signal.signal(s, _handler)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """A signal arriving inside the block is raised (as `Interrupted`) when the block ends."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
        pending = _state["pending"]
        if not _state["deferring"] and pending is not None:
            _state["pending"] = None
            raise Interrupted(pending)


def remove_tree(folder: PathLike) -> None:
    """Remove a folder minivid made for itself (a staging folder), ignoring what is already gone."""
    shutil.rmtree(folder, ignore_errors=True)
