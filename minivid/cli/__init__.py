"""`minivid` command line: one subcommand per job, each in its own module of this package.

A subcommand module defines `help: str`, `add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = ["inspect", "generate", "invert", "animate", "tune", "edit", "bench", "demo", "parity"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minivid", description="Diffusion video editing from scratch (COVE, EI², TCVE, I2VEdit).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from minivid.cli.common import show_progress

    args.progress = show_progress(args)        # what every job passes as progress= to the long loops
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return int(args._run(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"minivid {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
