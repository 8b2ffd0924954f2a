"""The ``streamkd`` command. It only parses and calls: each command group
lives in a module of this package that offers ``configure(subparsers)``,
which adds its sub-commands and sets ``func`` on each of them.

Errors: every ``StreamkdError`` (and an ``OSError``, which names its file)
is caught here, once, and printed as ``error: <message>`` with exit status
1; ``--debug`` or ``STREAMKD_DEBUG=1`` shows the traceback instead."""
from __future__ import annotations

import argparse
import importlib
import os
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
    "streamkd.cli.serve",  # serve
    "streamkd.cli.experiment",  # experiment, report, demo
    "streamkd.cli.pretrained",  # pretrained
    "streamkd.cli.bench",  # bench
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamkd",
        description="Distil a full-context ASR teacher into a streaming student.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (also: STREAMKD_DEBUG=1)")
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
    from streamkd.errors import StreamkdError

    debug = args.debug or os.environ.get("STREAMKD_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (StreamkdError, OSError) as err:
        if debug:
            raise
        print(f"error: {_message(err)}", file=sys.stderr)
        print("(run with --debug or STREAMKD_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


def _message(err: BaseException) -> str:
    """The error's text; an OSError as "file: what" (its str() is "[Errno n] what: 'file'")."""
    if isinstance(err, OSError) and err.filename:
        return f"{err.filename}: {err.strerror or err}"
    return str(err)


if __name__ == "__main__":
    sys.exit(main())
