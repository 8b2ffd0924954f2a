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
    p.add_argument("--profile", metavar="METHOD", default=None,
                   help="instead: print a torch.profiler table of training steps of the demo student with this "
                        "kd.method (none, token, layer, aux, aux+token) and write it to OUT/profile_METHOD.txt")
    p.add_argument("--amp", action="store_true", help="with --profile: under bf16 autocast")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from streamkd.atomic import write_atomic
    from streamkd.bench import KD_METHODS, profile_step, run_bench

    if args.profile:
        if args.profile not in KD_METHODS:
            raise SystemExit(f"--profile: unknown method {args.profile!r}; choose one of {', '.join(KD_METHODS)}")
        text = profile_step(args.profile, amp=args.amp)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        suffix = "_bf16" if args.amp else ""
        write_atomic(out / f"profile_{args.profile.replace('+', '_')}{suffix}.txt", text + "\n")
        print(text)
        return 0
    result = run_bench(args.out, quick=args.quick, checkpoint=args.checkpoint)
    print((Path(args.out) / "README.md").read_text())
    return 0 if result else 1
