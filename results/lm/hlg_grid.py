"""Greedy against offline HLG decoding (``streamkd decode --graph``), for a
grid of graphs and decoder settings, on one manifest (results/lm/README.md).

The model runs once over the manifest (its own chunk mask, as ``streamkd
decode`` does); every graph and setting then searches the same log-probs
with the library's ``search_scores``. Also counts the reference words that
are not in the LM's vocabulary (the graph can never output them).

    PYTHONPATH=src python results/lm/hlg_grid.py --checkpoint C --manifest M \
        --graphs G1,G2 --settings 16:3000,20:7000 --lm-vocab LM/vocab.txt --out OUT.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from streamkd import load_model
from streamkd.atomic import write_atomic
from streamkd.decode import error_rates, make_search, manifest_log_probs, search_scores
from streamkd.lm.graph_search import GraphDecoder, HLGraph


def _row(rows, search_sec, audio_sec, encoder_sec, **extra) -> dict:
    rates = error_rates([r["ref"] for r in rows], [r["hyp"] for r in rows])
    return {**extra, **rates, "search_sec": round(search_sec, 1),
            "rtf": round((encoder_sec + search_sec) / audio_sec, 4)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--graphs", required=True, help="comma-separated graph folders")
    p.add_argument("--settings", default="16:3000", help="comma-separated BEAM:MAX_ACTIVE")
    p.add_argument("--lm-vocab", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.checkpoint)
    scores = manifest_log_probs(model, model.config.data, args.manifest)
    vocab = set(open(args.lm_vocab, encoding="utf-8").read().split())
    ref_words = [w for ref in scores.refs for w in ref.split()]
    oov = sum(w not in vocab for w in ref_words)
    rows, sec = search_scores(scores, model.tokenizer, lambda: make_search(1))
    out = {"checkpoint": args.checkpoint, "manifest": args.manifest, "utterances": len(scores.ids),
           "skipped": len(scores.skipped), "audio_sec": round(scores.audio_sec, 1),
           "ref_words": len(ref_words), "oov_words": oov, "oov_rate": round(oov / len(ref_words), 4),
           "greedy": _row(rows, sec, scores.audio_sec, scores.encoder_sec), "hlg": []}
    print(json.dumps({k: v for k, v in out.items() if k != "hlg"}), flush=True)
    for graph_dir in args.graphs.split(","):
        started = time.perf_counter()
        graph = HLGraph(graph_dir, model.tokenizer.symbols)
        load_sec = time.perf_counter() - started
        for setting in args.settings.split(","):
            beam, max_active = setting.split(":")
            decoder = GraphDecoder(graph, float(beam), int(max_active))
            rows, sec = search_scores(scores, model.tokenizer, decoder.new_search)
            row = _row(rows, sec, scores.audio_sec, scores.encoder_sec, **decoder.describe(),
                       graph_load_sec=round(load_sec, 1))
            out["hlg"].append(row)
            print(json.dumps(row), flush=True)
            write_atomic(args.out, json.dumps(out, indent=2) + "\n")
    write_atomic(args.out, json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
