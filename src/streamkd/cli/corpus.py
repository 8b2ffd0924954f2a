"""``streamkd corpus build``: synthesise the embedded corpus."""
from __future__ import annotations

import argparse
import sys

__all__ = ["configure"]


def configure(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("corpus", help="build the embedded TTS speech corpus")
    sub = group.add_subparsers(dest="corpus_command", metavar="SUBCOMMAND")
    build = sub.add_parser(
        "build",
        help="synthesise fortunes sentences with espeak-ng, flite and festival voices",
        description="Write DIR/wav/, DIR/{train,dev,test}.jsonl and DIR/summary.json. "
        "A rerun with the same arguments skips the audio already made.",
    )
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--hours", type=float, required=True, help="hours of audio to plan (all splits)")
    build.add_argument("--seed", type=int, default=0, help="seed of the whole corpus (default 0)")
    build.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    build.add_argument("--no-degrade", dest="degrade", action="store_false",
                       help="no added noise or reverberation")
    build.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    build.set_defaults(func=_build)
    group.set_defaults(func=lambda args: group.print_help() or 2)


def _build(args: argparse.Namespace) -> int:
    from streamkd.corpus import build_corpus  # heavy imports only when the command runs

    if args.jobs is not None and args.jobs < 1:
        print(f"error: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return 2
    build_corpus(args.out, args.hours, args.seed, jobs=args.jobs, degrade=args.degrade,
                 progress=args.progress)
    return 0
