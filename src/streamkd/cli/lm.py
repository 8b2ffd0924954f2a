"""``streamkd lm build | tune | report``: a word n-gram LM for CTC decoding."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from streamkd.errors import UsageError

__all__ = ["configure", "add_lm_args", "fusion_from_args"]


def add_lm_args(p) -> None:
    """--lm DIR and its weights, for the commands that decode."""
    p.add_argument("--lm", metavar="DIR", help="word LM folder (`streamkd lm build`): beam search with shallow fusion; "
                   "with sherpa-onnx, the folder holding HLG.fst (`streamkd lm graph`)")
    p.add_argument("--lm-alpha", type=float, default=None, help="LM weight (default: the LM's tune.json, else 0.5)")
    p.add_argument("--lm-beta", type=float, default=None, help="word insertion bonus (default: tune.json, else 1.0)")


def fusion_from_args(args, tokenizer, source: str):
    """The LMFusion --lm asks for, or None."""
    if not args.lm:
        return None
    from streamkd.lm.fusion import LMFusion, load_lm

    return LMFusion.for_tokenizer(load_lm(args.lm, tokenizer, source), tokenizer, args.lm_alpha, args.lm_beta)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_search_args(p) -> None:
    p.add_argument("--beam", type=int, default=16, help="beam size for beam search with and without the LM")
    p.add_argument("--token-min-logp", type=float, default=-10.0, help="tokens below this log-prob are not expanded")
    p.add_argument("--prune-logp", type=float, default=20.0, help="drop hypotheses this far below the best")
    p.add_argument("--max-utts", type=int, default=0, help="use only the first N utterances of each set (0: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the RTF is per core)")


def configure(sub) -> None:
    lm = sub.add_parser("lm", help="word n-gram LM: build, tune, report, graph, runtimes")
    lm = lm.add_subparsers(dest="lm_command", metavar="ACTION")
    b = lm.add_parser("build", help="build a word n-gram LM with KenLM from training text only")
    b.add_argument("--out", required=True, metavar="DIR", help="LM folder to write")
    b.add_argument("--corpus", metavar="DIR", help="corpus folder: text from train.jsonl, dev.jsonl and "
                   "test.jsonl held out (same as --text DIR/train.jsonl --exclude DIR/dev.jsonl --exclude ...)")
    b.add_argument("--text", action="append", default=[], metavar="MANIFEST", help="training manifest(s) for text")
    b.add_argument("--exclude", action="append", default=[], metavar="MANIFEST",
                   help="dev/test manifest(s): their sentences are removed; a text manifest sharing ids is refused")
    b.add_argument("--fortunes", action="store_true", help="add the embedded corpus's fortunes sentences")
    b.add_argument("--order", type=int, default=4, help="n-gram order (default 4)")
    b.set_defaults(func=_run_build)

    t = lm.add_parser("tune", help="choose LM weight and word bonus on DEV; writes DIR/tune.json")
    t.add_argument("--lm", required=True, metavar="DIR", help="LM folder")
    t.add_argument("--checkpoint", required=True, help="model checkpoint whose log-probs are decoded")
    t.add_argument("--manifest", default=None, help="dev manifest (default: the checkpoint config's dev set)")
    t.add_argument("--alphas", type=_floats, default=None, help="LM weights to try, e.g. 0.3,0.5,0.7,0.9")
    t.add_argument("--betas", type=_floats, default=None, help="word bonuses to try, e.g. 0,1,2")
    _add_search_args(t)
    t.set_defaults(func=_run_tune)

    r = lm.add_parser("report", help="WER/CER, RTF and partial stability with and without the LM")
    r.add_argument("--lm", required=True, metavar="DIR", help="LM folder")
    r.add_argument("--teacher", required=True, help="teacher checkpoint")
    r.add_argument("--student", required=True, help="student checkpoint")
    r.add_argument("--dev", default=None, help="dev manifest (default: each checkpoint config's)")
    r.add_argument("--test", default=None, help="test manifest (default: each checkpoint config's)")
    r.add_argument("--out", required=True, metavar="DIR", help="folder for table.md and results.json")
    r.add_argument("--lm-alpha", type=float, default=None, help="LM weight (default: the LM's tune.json)")
    r.add_argument("--lm-beta", type=float, default=None, help="word bonus (default: the LM's tune.json)")
    _add_search_args(r)
    r.set_defaults(func=_run_report)

    g = lm.add_parser("graph", help="an HLG decoding graph of the LM for sherpa-onnx (kaldilm + kaldifst)")
    g.add_argument("--lm", required=True, metavar="DIR", help="LM folder (its lm.arpa)")
    g.add_argument("--lang", required=True, metavar="DIR",
                   help="the model's lang folder (its tokenizer spells the words)")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="folder for HLG.fst, words.txt, graph.json (default: --lm)")
    g.add_argument("--lm-alpha", type=float, default=None, help="LM weight baked in (default: the LM's tune.json)")
    g.add_argument("--lm-beta", type=float, default=None, help="word bonus baked in (default: the LM's tune.json)")
    g.add_argument("--max-order", type=int, default=-1, help="use n-grams up to this order (default: all)")
    g.set_defaults(func=_run_graph)

    c = lm.add_parser("runtimes", help="WER with the LM through PyTorch, onnxruntime and sherpa-onnx (same files)")
    c.add_argument("--checkpoint", required=True, help="the streaming model (PyTorch rows)")
    c.add_argument("--onnx", required=True, metavar="DIR", help="its export (`streamkd export`)")
    c.add_argument("--lm", required=True, metavar="DIR", help="LM folder (beam + LM rows)")
    c.add_argument("--graph", required=True, metavar="DIR", help="graph folder (`streamkd lm graph`)")
    c.add_argument("--manifest", required=True, help="manifest to decode")
    c.add_argument("--only", default=None, help="comma-separated runtime names to run (default: all)")
    c.add_argument("--out", required=True, metavar="JSON", help="results file (a .md table is written beside it)")
    c.add_argument("--beam", type=int, default=16, help="beam of the beam + LM rows")
    c.add_argument("--max-utts", type=int, default=0, help="only the first N utterances (0: all)")
    c.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads")
    c.set_defaults(func=_run_runtimes)


def _run_build(args) -> int:
    from streamkd.lm.build import build_lm, gather_text

    texts, excludes = list(args.text), list(args.exclude)
    if args.corpus:
        corpus = Path(args.corpus)
        texts.append(str(corpus / "train.jsonl"))
        excludes += [str(corpus / "dev.jsonl"), str(corpus / "test.jsonl")]
    if not texts and not args.fortunes:
        raise UsageError("give the LM text: --corpus DIR, --text MANIFEST or --fortunes")
    text = gather_text(texts, excludes, fortunes=args.fortunes)
    meta = build_lm(args.out, text, order=args.order)
    counts = ", ".join(f"{k}-grams {v}" for k, v in meta["ngram_counts"].items())
    print(f"wrote {args.out}: order {meta['order']}, {meta['sentences']} sentences, {meta['words']} words, "
          f"vocabulary {meta['vocab_size']}; {counts}")
    for src in meta["sources"]:
        print(f"  {src['kind']} {src['path']}: kept {src['kept']} of {src['sentences']} "
              f"({src['dropped_held_out']} held out as dev/test sentences)")
    return 0


def _options(args):
    from streamkd.decode import SearchOptions

    return SearchOptions(args.beam, args.token_min_logp, args.prune_logp)


def _run_tune(args) -> int:
    import torch

    from streamkd import load_model
    from streamkd.decode import manifest_log_probs
    from streamkd.lm.fusion import load_lm
    from streamkd.lm.tune import DEFAULT_ALPHAS, DEFAULT_BETAS, check_not_test, tune_weights, write_tune

    torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint)
    manifest = args.manifest or model.config.data.dev_manifest
    check_not_test(manifest, [model.config.data.test_manifest])
    lm = load_lm(args.lm, model.tokenizer, args.checkpoint)
    scores = manifest_log_probs(model, model.config.data, manifest, max_utts=args.max_utts, progress=True)
    result = tune_weights(scores, model.tokenizer, lm, alphas=args.alphas or DEFAULT_ALPHAS,
                          betas=args.betas or DEFAULT_BETAS, options=_options(args))
    result.update({"manifest": str(manifest), "checkpoint": str(args.checkpoint)})
    path = write_tune(args.lm, result)
    print(f"best on dev: alpha {result['alpha']:g}, beta {result['beta']:g} (WER {100 * result['dev_wer']:.2f}%); "
          f"wrote {path}")
    return 0


def _run_report(args) -> int:
    import torch

    from streamkd.lm.report import lm_report

    torch.set_num_threads(args.threads)
    manifests = None
    if args.dev or args.test:
        if not (args.dev and args.test):
            raise UsageError("give both --dev and --test, or neither (then each checkpoint's config names them)")
        manifests = {"dev": args.dev, "test": args.test}
    result = lm_report({"teacher": args.teacher, "student": args.student}, args.lm, args.out,
                       manifests=manifests, options=_options(args), max_utts=args.max_utts,
                       alpha=args.lm_alpha, beta=args.lm_beta)
    print(json.dumps({"out": args.out, "alpha": result["alpha"], "beta": result["beta"]}))
    return 0


def _run_graph(args) -> int:
    from streamkd.lm.fusion import WordLM
    from streamkd.lm.graph import GraphWeights, build_graph
    from streamkd.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.lang)
    tuned = WordLM(args.lm)
    weights = GraphWeights(tuned.alpha if args.lm_alpha is None else args.lm_alpha,
                           tuned.beta if args.lm_beta is None else args.lm_beta)
    meta = build_graph(args.lm, tokenizer, args.out or args.lm, weights=weights, max_order=args.max_order,
                       source=args.lang)
    print(f"wrote {Path(args.out or args.lm) / 'HLG.fst'}: order {meta['order']}, alpha {meta['alpha']:g}, "
          f"beta {meta['beta']:g}, {meta['states']} states, {meta['arcs']} arcs ({meta['build_sec']} s)")
    return 0


def _run_runtimes(args) -> int:
    from streamkd.atomic import write_atomic
    from streamkd.lm.runtimes import compare_runtimes, runtimes_table

    only = [x.strip() for x in args.only.split(",")] if args.only else None
    result = compare_runtimes(args.checkpoint, args.onnx, args.lm, args.graph, args.manifest,
                              max_utts=args.max_utts, beam=args.beam, threads=args.threads, only=only)
    write_atomic(args.out, json.dumps(result, indent=2) + "\n")
    table = runtimes_table(result)
    write_atomic(Path(args.out).with_suffix(".md"), table)
    print(table)
    return 0
