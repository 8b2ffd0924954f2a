"""``streamkd bench``: training and streaming speed, written to results/bench/."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["configure"]


def configure(sub) -> None:
    p = sub.add_parser("bench", help="measure training and streaming speed (results/bench/*.json, README.md)")
    p.add_argument("--out", default=None,
                   help="folder for the JSON files and the summary (default results/bench; results/serve for "
                        "--serve and --int8)")
    p.add_argument("--quick", action="store_true", help="shorter audio (a smoke run, not for the record)")
    p.add_argument("--checkpoint", default=None,
                   help="stream a trained student instead of random weights (same cost)")
    p.add_argument("--profile", metavar="METHOD", default=None,
                   help="instead: print a torch.profiler table of training steps of the demo student with this "
                        "kd.method (none, token, layer, aux, aux+token) and write it to OUT/profile_METHOD.txt")
    p.add_argument("--amp", action="store_true", help="with --profile: under bf16 autocast")
    p.add_argument("--serve", action="store_true",
                   help="instead: load test of `streamkd serve --checkpoint` on 127.0.0.1 with N real-time clients "
                        "streaming --manifest audio; then 10x overload (OUT/serve.json, serve.md)")
    p.add_argument("--int8", nargs=2, metavar=("FP32_DIR", "INT8_DIR"),
                   help="instead: WER and RTF of two exports (fp32, `export --int8`) through ONNX Runtime and "
                        "sherpa-onnx on --manifest (OUT/int8.json, int8.md)")
    p.add_argument("--manifest", help="--serve / --int8: utterances to stream (e.g. the corpus test.jsonl)")
    p.add_argument("--max-clients", type=int, default=128, help="--serve: top of the N ladder (default 128)")
    p.add_argument("--stream-sec", type=float, default=20.0, help="--serve: audio per client (default 20)")
    p.add_argument("--max-total-sec", type=float, default=900.0, help="--serve: stop the ladder after this long")
    p.add_argument("--max-batch", type=int, default=64, help="--serve: the server's --max-batch (1: no batching)")
    p.add_argument("--threads", type=int, default=2, help="--serve / --int8: the model's threads (default 2)")
    p.add_argument("--max-utts", type=int, default=0, help="--int8: first N utterances only (0: all)")
    p.set_defaults(func=_run)


def _write(out: Path, name: str, result: dict, table: str) -> None:
    from streamkd.atomic import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{name}.json", json.dumps(result, indent=2) + "\n")
    write_atomic(out / f"{name}.md", table)
    print(table)


def _run_serving(args) -> int:
    if not args.manifest or not Path(args.manifest).is_file():
        raise SystemExit(f"--manifest: a manifest of utterances is needed (got {args.manifest!r})")
    out = Path(args.out or "results/serve")
    if args.int8:
        from streamkd.streaming.quantize import compare_exports, comparison_table

        result = compare_exports(*args.int8, args.manifest, max_utts=args.max_utts, threads=args.threads)
        _write(out, "int8", result, comparison_table(result))
        return 0
    if not args.checkpoint:
        raise SystemExit("--serve needs --checkpoint (a streaming student)")
    from streamkd.serve.loadtest import run_serve_bench, serve_table

    result = run_serve_bench(args.checkpoint, args.manifest, max_clients=args.max_clients,
                             stream_sec=args.stream_sec, threads=args.threads, max_batch=args.max_batch,
                             max_total_sec=args.max_total_sec)
    _write(out, "serve", result, serve_table(result))
    return 0 if result["largest_realtime_streams"] else 1


def _run(args) -> int:
    from streamkd.atomic import write_atomic
    from streamkd.bench import KD_METHODS, profile_step, run_bench

    if args.serve or args.int8:
        try:
            return _run_serving(args)
        except (ValueError, FileNotFoundError, RuntimeError) as err:
            raise SystemExit(f"error: {err}") from None
    args.out = args.out or "results/bench"
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
