"""``streamkd bench``: training and streaming speed, written to results/bench/."""
from __future__ import annotations

from pathlib import Path

__all__ = ["configure"]


def configure(sub) -> None:
    p = sub.add_parser("bench", help="measure training and streaming speed (results/bench/*.json, README.md)")
    p.add_argument("--out", default="results/bench", help="folder for the JSON files and the summary")
    p.add_argument("--quick", action="store_true", help="shorter audio (a smoke run, not for the record)")
    p.add_argument("--checkpoint", default=None,
                   help="stream a trained student instead of random weights (same cost)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from streamkd.bench import run_bench

    result = run_bench(args.out, quick=args.quick, checkpoint=args.checkpoint)
    print((Path(args.out) / "README.md").read_text())
    return 0 if result else 1
