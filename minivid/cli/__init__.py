"""`minivid` command line: one subcommand per job, each in its own module of this package.

A subcommand module defines `help: str`, `add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = ["inspect", "generate", "invert", "animate", "tune", "edit", "bench", "demo", "eval", "batch", "benchmark", "parity"]


def source_constant(module: str, name: str, default=None):
    """The literal value (str, number, tuple, dict, ...) that module `module` assigns to `name` at top level, read
    from its source without importing it (`--help` must not wait for torch); imported when the source does not
    state it as a literal (`default` when the module has no such name). None: no such module."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return None
    try:
        tree = ast.parse(open(spec.origin, encoding="utf-8").read())
    except (OSError, SyntaxError):
        tree = None
    for node in tree.body if tree else ():
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                break
    return getattr(importlib.import_module(module), name, default)


def _module_help(name: str) -> str | None:
    """The `help` string of subcommand module `name`, read from its source without importing it (the
    modules import torch and the methods: `minivid --help` must not wait for them). None: no such module."""
    return source_constant(f"minivid.cli.{name}", "help", default="")


def command_of(argv: list[str]) -> str | None:
    """The subcommand named in `argv` (its first word that is not an option), if it is one."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in SUBCOMMANDS else None


_ALL = object()


def build_parser(command: str | None | object = _ALL) -> argparse.ArgumentParser:
    """The `minivid` parser. `command`: build only this subcommand's options (the others are listed with
    their help line, read without importing their modules): what `main` does, so that `minivid --help`
    imports nothing heavy and `minivid CMD --help` imports only CMD's module. Default: every subcommand."""
    parser = argparse.ArgumentParser(prog="minivid", description="Diffusion video editing from scratch (COVE, EI², TCVE, I2VEdit).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages (and show info messages)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        if command is not _ALL and name != command:
            text = _module_help(name)
            if text is not None:
                sub.add_parser(name, help=text)
            continue
        try:
            mod = importlib.import_module(f"minivid.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"minivid.cli.{name}":
                continue
            raise
        p = sub.add_parser(name, help=mod.help, description=getattr(mod, "description", mod.help))
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


# errors that are the user's to fix: one line, no traceback (-v shows it)
KNOWN_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
REPORT = "the minivid issue tracker (the repository you installed minivid from)"


def _known() -> tuple[type[BaseException], ...]:
    from minivid.tuning import TuningError

    extra: tuple = (TuningError,)
    oom = getattr(torch_module(), "OutOfMemoryError", None)
    return KNOWN_ERRORS + extra + ((oom,) if oom else ())


def torch_module():
    import torch

    return torch


def _interrupted_at(tb) -> str:
    """Where the run stopped: the tuning step from the tuning loop's frame, else the last sampling step."""
    from minivid import checks

    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "tune" and frame.f_code.co_filename.endswith("tuning.py") and "step" in frame.f_locals:
            cfg = frame.f_locals.get("cfg")
            return f"step {frame.f_locals['step'] + 1}/{getattr(cfg, 'steps', '?')} of tuning"
        tb = tb.tb_next
    last = checks.last_step()
    if last is None:
        return "step 0 (before the first sampling step)"
    return f"step {last.step}/{last.total} of {last.loop}"


def _abort_jobs(error: BaseException | None, keep_record: bool = False):
    """Abort every unfinished job; (jobs, failed-record path or None)."""
    from minivid import jobs

    aborted, record = list(jobs.ACTIVE), None
    for job in aborted:
        record = job.abort(error, keep_record=keep_record) or record
    return aborted, record


SIGNAL_NAMES = {2: "Ctrl-C", 15: "SIGTERM"}


def _interrupt_message(command: str, tb, signum: int = 2) -> str:
    """What an interrupted run says, from what is on disk after the unfinished jobs are aborted: where it
    stopped, this run's files that stay (checkpoints; the jobs that had finished), and how to go on."""
    from minivid import jobs

    aborted, _ = _abort_jobs(KeyboardInterrupt())
    how = "" if signum == 2 else f" by {SIGNAL_NAMES.get(signum, f'signal {signum}')}"
    where = _interrupted_at(tb) if aborted or not jobs.FINISHED else "the end, after the job had finished"
    kept = [(job, f) for job in aborted for f in job.left()]
    finished = [job for job in jobs.FINISHED if job.dir.is_dir()]
    checkpoints = [f for _, f in kept if f.endswith(".safetensors") and not f.endswith(".optim.safetensors")]
    parts = []
    if checkpoints:
        folder = [job for job, _ in kept][-1].dir
        parts.append(f"kept {len(kept)} file(s) in {folder} (newest checkpoint {sorted(checkpoints)[-1]})")
        resume = f"run the same command again (same --out {folder}) to resume from it"
    else:
        resume = f"run `minivid {command} ...` again to start over"
    if finished:
        names = ", ".join(str(job.dir) for job in finished[:3]) + (" ..." if len(finished) > 3 else "")
        parts.append(f"{len(finished)} finished job(s) kept their outputs ({names})")
        if not aborted:
            resume = "nothing to redo"
        elif not checkpoints:
            resume = f"run the same command again to do the rest"
    if aborted and not checkpoints:
        earlier = [job for job in aborted if not job.created and job.kept()]
        removed = "partial outputs of the unfinished job removed"
        if earlier:
            parts.append(f"{removed}; the files already in {earlier[-1].dir} before this run are as they were")
        elif not finished:
            parts.append("nothing was kept (partial outputs removed)")
        else:
            parts.append(removed)
    if not parts:
        parts.append("nothing was written")
    return f"minivid {command}: interrupted{how} at {where}; {'; '.join(parts)}; {resume}"


def _allocation_failure(e: BaseException) -> str | None:
    """A failed allocation as a known error: torch's message with the machine's memory, or None."""
    text = str(e)
    if not isinstance(e, (RuntimeError, MemoryError)) or not (
            isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()):
        return None
    from minivid.cli.common import available_memory, gib

    free, total = available_memory("cpu")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return (f"out of memory: {first} (this machine has {gib(free)} available of {gib(total)}); "
            f"use fewer --frames or a smaller --size")


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; the exit code. The one error path of the command line: a known error prints one
    line (exit 1; -v re-raises it with its traceback), a bad option argparse's message (exit 2), Ctrl-C or
    SIGTERM where it stopped, what was kept and how to resume (exit 130 / 143; also while starting up),
    a closed stdout ends quietly, and an unexpected error a short traceback, the failed record and where
    to report it (exit 70)."""
    from minivid import outputs

    with outputs.handle_signals():
        try:
            return _main(argv)
        except (KeyboardInterrupt, Exception) as e:    # while starting (imports, parsing): nothing written yet
            # a signal inside an import can surface as the importer's own error (an ImportError from a
            # half-initialised extension): what was received decides
            signum = getattr(e, "signum", None) or outputs.received() or (2 if isinstance(e, KeyboardInterrupt) else None)
            if signum is None:
                raise
            print(f"minivid: interrupted{'' if signum == 2 else ' by ' + SIGNAL_NAMES.get(signum, str(signum))} "
                  f"while starting; nothing was written", file=sys.stderr)
            return 128 + signum


def _main(argv: list[str] | None) -> int:
    import traceback

    from minivid import outputs                   # the standard library only: --help stays fast

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(command_of(argv))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:                       # usage errors (exit 2) and --help (exit 0)
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    # warnings and errors by default; -v adds info and debug messages; each message once per run
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _print_each_message_once()
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from minivid import checks                    # torch and the job's modules load only for a job

    checks.reset()
    from minivid import jobs

    jobs.FINISHED.clear()
    from minivid.cli.common import show_progress, torch_threads

    args.progress = show_progress(args)        # what every job passes as progress= to the long loops
    try:
        with torch_threads(args):               # --threads, else 1 for a tiny model on the CPU
            code = int(args._run(args) or 0)
        if outputs.received():                 # a signal some library swallowed: say so, exit non-zero
            raise outputs.Interrupted(outputs.received())
        return code
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", None) or outputs.received() or 2
        with outputs.deferred_signals():
            print(_interrupt_message(args.command, sys.exc_info()[2], signum), file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:
        _abort_jobs(None)
        _quiet_stdout()
        return 0
    except Exception as e:   # noqa: BLE001 - known errors, then the last resort: a bug of minivid's
        if outputs.received():                 # a failure caused by the signal (an encoder killed by it)
            signum = outputs.received()
            with outputs.deferred_signals():
                print(_interrupt_message(args.command, e.__traceback__, signum), file=sys.stderr)
            return 128 + signum
        oom = _allocation_failure(e)
        if isinstance(e, _known()) or oom:
            _abort_jobs(e)
            if args.verbose:
                raise
            print(f"minivid {args.command}: error: {oom or e}", file=sys.stderr)
            return 1
        _, record = _abort_jobs(e, keep_record=True)
        if args.verbose:
            raise
        lines = traceback.format_exception(type(e), e, e.__traceback__)
        short = "".join(lines[:1] + lines[-7:]) if len(lines) > 8 else "".join(lines)
        print(f"minivid {args.command}: internal error (a bug in minivid, not in your input):\n{short.rstrip()}\n"
              f"record: {record or 'none written'}\n"
              f"Please report it to {REPORT} with the command line, this message and the record.",
              file=sys.stderr)
        return 70


class _Once(logging.Filter):
    """Drops a log message already printed in this run: the same warning from a step that is repeated
    (a LoRA checked, then loaded, per clip; a file read twice) says nothing new the second time."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[int, str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _print_each_message_once() -> None:
    """A fresh `_Once` filter on every handler of the root logger (one per handler, reset per run)."""
    for handler in logging.getLogger().handlers:
        for f in [f for f in handler.filters if isinstance(f, _Once)]:
            handler.removeFilter(f)
        handler.addFilter(_Once())


def _quiet_stdout() -> None:
    """stdout was closed by the reader (`minivid inspect --json F | head`): point it at devnull so the
    interpreter's final flush does not raise again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):          # a stdout without a file descriptor (tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
