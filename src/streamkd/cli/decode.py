"""``streamkd decode --checkpoint C --manifest M``: batched CTC decoding and WER."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

__all__ = ["configure", "chunk_from_args", "add_chunk_args"]

_SPEAKERS_SHOWN = 12  # more speakers than this: per-speaker figures only in summary.json


def add_chunk_args(p) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--chunk-frames", type=int, default=None,
                   help="decode at this chunk size (encoder frames, 40 ms each) instead of the model's")
    g.add_argument("--full-context", action="store_true", help="decode with full context (no chunk mask)")
    p.add_argument("--left-chunks", type=int, default=-1,
                   help="with --chunk-frames: left chunks seen (default: the model's; -1 keeps it)")


def chunk_from_args(model, args):
    """The ChunkConfig the arguments ask for; the model's own when none."""
    from streamkd.types import ChunkConfig

    if args.full_context:
        return None
    if args.chunk_frames is None:
        return model.chunk
    left = args.left_chunks
    if left == -1:
        left = model.chunk.left_chunks if model.chunk is not None else None
    return ChunkConfig(args.chunk_frames, left)


def configure(sub) -> None:
    p = sub.add_parser("decode", help="decode a manifest with a checkpoint and score WER/CER")
    p.add_argument("--checkpoint", required=True, help="training or inference checkpoint (.pt)")
    p.add_argument("--manifest", required=True, help="JSONL manifest to decode")
    p.add_argument("--beam", type=int, default=1, help="1: greedy; >1: CTC prefix beam search (16 with --lm)")
    add_chunk_args(p)
    from streamkd.cli.lm import add_lm_args

    add_lm_args(p)
    p.add_argument("--graph", metavar="DIR", default=None,
                   help="decode over the HLG.fst in DIR (`streamkd lm graph`; vocabulary-closed) instead of --lm")
    p.add_argument("--graph-beam", type=float, default=16.0, help="with --graph: decoder beam (cost units)")
    p.add_argument("--max-active", type=int, default=3000, help="with --graph: graph states kept per frame")
    p.add_argument("--out", default=None, help="folder for hyps.txt and summary.json")
    p.add_argument("--max-utts", type=int, default=0, help="decode only the first N (0: all)")
    p.add_argument("--batch-sec", type=float, default=None, help="audio seconds per batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="processes for an LM search (--graph or --lm); default: the CPUs this process may use")
    p.set_defaults(func=_run)
    c = sub.add_parser("compare", help="paired bootstrap of two decodes of one manifest: is A's WER lower than B's?",
                       description="Prints JSON: the utterances both decoded, and for WER and CER each "
                       "decode's rate, A - B and p, the share of bootstrap resamples in which A is not "
                       "better (small p: A is reliably better). A or B may be a grid's run record "
                       "(results/GRID/runs/RUN.json.gz), which keeps each utterance's errors when the run's "
                       "decode folders are gone.")
    c.add_argument("a", help="a `streamkd decode --out` folder (or its hyps.txt), or a run record (RUN.json.gz)")
    c.add_argument("b", help="another decode of the same manifest, or a run record")
    c.add_argument("--set", dest="split", default="test",
                   help="for a run record: which of its scored sets, dev, test or unseen, greedy, or dev_lm, "
                   "test_lm or unseen_lm, through the word LM (default test)")
    c.add_argument("--given", metavar="DECODE", default=None,
                   help="a third decode of the manifest (e.g. the teacher's): also each one's share of words "
                   "wrong, apart for the words GIVEN gets right and those it gets wrong")
    c.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=_compare)
    e = sub.add_parser("errors", help="where a decode's word errors are: by how often each word occurs in "
                                      "the training transcripts, and outside an LM's vocabulary",
                       description="Prints JSON: for reference words seen never, 1-2, 3-9, 10-99 and 100+ "
                       "times in the training transcripts, their share of the words and the share got wrong "
                       "(substituted or deleted); inserted words apart; with --vocab, the words outside it.")
    e.add_argument("decode", help="a `streamkd decode --out` folder (or its hyps.txt)")
    e.add_argument("--train", nargs="+", required=True, metavar="MANIFEST",
                   help="the training manifest(s) whose transcripts the model learnt from")
    e.add_argument("--vocab", default=None, help="a word list (e.g. an LM's vocab.txt): count the words outside it")
    e.set_defaults(func=_errors)


def _compare(args) -> int:
    from streamkd.errors import UsageError
    from streamkd.report import RECORD_SETS, compare_decodes

    if args.resamples < 1:
        raise UsageError(f"--resamples must be at least 1, got {args.resamples}")
    if args.split not in RECORD_SETS:
        raise UsageError(f"--set must be one of {', '.join(RECORD_SETS)}, got {args.split!r}")
    print(json.dumps(compare_decodes(args.a, args.b, n=args.resamples, seed=args.seed, given=args.given,
                                     split=args.split), indent=2))
    return 0


def _errors(args) -> int:
    from streamkd.report import word_errors_by_frequency

    print(json.dumps(word_errors_by_frequency(args.decode, args.train, args.vocab), indent=2))
    return 0


def _run(args) -> int:
    from streamkd import load_model
    from streamkd.cli.lm import fusion_from_args
    from streamkd.decode import decode_manifest
    from streamkd.errors import UsageError

    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: give 1 or more processes")
    if args.graph and (args.lm or args.beam > 1 or args.lm_alpha is not None or args.lm_beta is not None):
        raise UsageError("--graph decodes over the graph, whose LM weights are baked in "
                         "(`streamkd lm graph --lm-alpha A --lm-beta B`): drop --lm, --lm-alpha, --lm-beta and --beam")
    model = load_model(args.checkpoint, device=args.device)
    graph = None
    if args.graph:
        from streamkd.lm.graph_search import GraphDecoder, HLGraph

        graph = GraphDecoder(HLGraph(args.graph, model.tokenizer.symbols), args.graph_beam, args.max_active)
    fusion = fusion_from_args(args, model.tokenizer, args.checkpoint)
    if fusion is not None and args.beam < 2:
        from streamkd.decode import LM_BEAM

        args.beam = LM_BEAM  # an LM re-ranks prefixes: it needs a beam
    data_cfg = model.config.data
    if args.batch_sec:
        data_cfg = replace(data_cfg, max_batch_sec=args.batch_sec)
    result = decode_manifest(model, data_cfg, args.manifest, chunk=chunk_from_args(model, args),
                             beam=args.beam, device=args.device, max_utts=args.max_utts,
                             out_dir=args.out, progress=True, fusion=fusion, graph=graph, workers=args.jobs)
    shown = dict(result.summary)
    if len(shown["by_speaker"]) > _SPEAKERS_SHOWN:
        where = f"in {Path(args.out) / 'summary.json'}" if args.out else "written with --out"
        shown["by_speaker"] = f"{len(shown['by_speaker'])} speakers: each one's WER and CER {where}"
    print(json.dumps(shown, indent=2))
    return 0

