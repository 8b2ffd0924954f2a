"""``streamkd experiment GRID``, ``streamkd report GRID`` and ``streamkd demo``."""
from __future__ import annotations

import dataclasses
from pathlib import Path

__all__ = ["configure"]

# The package's own copy (package data), so `streamkd demo` runs from an installed wheel.
DEMO_GRID = Path(__file__).resolve().parents[1] / "configs" / "experiments" / "demo.yaml"


def configure(sub) -> None:
    p = sub.add_parser("experiment", help="train every run of an experiment grid (resumable)")
    p.add_argument("grid", help="grid YAML, e.g. configs/experiments/paper.yaml")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state only")
    p.add_argument("--no-report", action="store_true",
                   help="train only: no run is scored and no report written (by default each run is scored and "
                        "its record written as soon as it is trained, and the report at the end)")
    p.add_argument("--runs", default=None,
                   help="comma-separated run names to train, in this order (default: the whole grid)")
    p.set_defaults(func=_experiment)

    p = sub.add_parser("report", help="evaluate the finished runs of a grid and write its results folder")
    p.add_argument("grid")
    p.set_defaults(func=_report)

    p = sub.add_parser("demo", help="the main job on the embedded corpus: build it, distil the pretrained "
                                    "teacher into none/token/aux students, print the comparison")
    p.add_argument("--out", default="exp/demo", help="folder for the runs and the results")
    p.add_argument("--grid", default=str(DEMO_GRID), help="the reduced grid to run")
    p.set_defaults(func=_demo)


def _experiment(args) -> int:
    from streamkd.experiment import load_grid, run_grid

    grid = load_grid(args.grid)
    score = not args.dry_run and not args.no_report
    run_grid(grid, dry_run=args.dry_run, names=args.runs.split(",") if args.runs else None,
             on_finished=_scorer(grid) if score else None)
    if score:
        _write(grid)
    return 0


def _scorer(grid):
    """run_grid's ``on_finished``: score the run just trained and write its
    record (results/<grid>/runs/), so a grid stopped later keeps it; the
    LM graph and unseen-voice set are loaded at the first run scored."""
    from streamkd.evaluation import GridScorer
    from streamkd.experiment import record_path

    scorer = []

    def on_finished(run) -> None:
        if not scorer:
            scorer.append(GridScorer(grid))
        row = scorer[0].trained(run)
        print(f"{run.name}: scored, test WER {100 * row['test']['wer']:.2f}" if "test" in row else
              f"{run.name}: scored", f"(record {record_path(grid, run.name)})", flush=True)

    return on_finished


def _report(args) -> int:
    from streamkd.experiment import load_grid

    _write(load_grid(args.grid))
    return 0


def _write(grid) -> None:
    from streamkd.evaluation import evaluate_grid
    from streamkd.report import write_report

    rows = evaluate_grid(grid)
    result = write_report(rows, grid.results_dir, title=f"{grid.name}: streaming student error rates",
                          metric=grid.metric)
    print(result["table"])
    if result["examples"]:
        print("The first test utterances (reference, then each model):\n" + result["examples"])
    print(f"results written to {grid.results_dir}/ (table.md, summary.json, runs.json, *.png)")


def _demo(args) -> int:
    from streamkd.experiment import load_grid, run_grid

    grid = load_grid(args.grid)
    out = Path(args.out)
    grid = dataclasses.replace(grid, out_dir=out, results_dir=out / "results")
    if grid.spec.lm is not None:  # the demo's word LM and graph live with its runs
        grid = dataclasses.replace(grid, spec=dataclasses.replace(grid.spec, lm=dataclasses.replace(
            grid.spec.lm, out=str(out / "lm"))))
    run_grid(grid)
    _write(grid)
    return 0
