"""The ``streamkd`` command. It only parses and calls: each command group
lives in a module of this package that offers ``configure(subparsers)``,
which adds its sub-commands and sets ``func`` on each of them."""
from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "build_parser"]

# Command-group modules, in the order --help lists them.
_GROUPS = [
    "streamkd.cli.corpus",  # corpus build
    "streamkd.cli.data",  # import, prepare
    "streamkd.cli.train",  # train
    "streamkd.cli.decode",  # decode
    "streamkd.cli.lm",  # lm build, lm tune, lm report
    "streamkd.cli.stream",  # stream, export
    "streamkd.cli.experiment",  # experiment, report, demo
    "streamkd.cli.bench",  # bench
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamkd",
        description="Distil a full-context ASR teacher into a streaming student.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _GROUPS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # a group not built yet
                continue
            raise
        module.configure(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
