"""``streamkd train CONFIG.yaml [key=value ...] [--resume]``."""
from __future__ import annotations

import json

__all__ = ["configure"]


def configure(sub) -> None:
    p = sub.add_parser("train", help="train a teacher or a (distilled) streaming student from a YAML config",
                       description="Train from a YAML config. Extra key=value arguments override config "
                                   "entries (e.g. train.max_steps=100 model.chunk.chunk_frames=4). "
                                   "Launch under torchrun for several processes (DDP).")
    p.add_argument("config", help="YAML config file (may name a 'base:' config it extends)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in train.out_dir (model, optimizer, "
                        "scheduler, sampler position, RNG)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from streamkd.config import load_config
    from streamkd.train import train

    cfg = load_config(args.config, args.overrides)
    report = train(cfg, resume=args.resume, progress=not args.no_progress)
    if report:
        print(json.dumps(report, indent=2))
    return 0
