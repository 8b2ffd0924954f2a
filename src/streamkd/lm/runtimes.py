"""WER with the word LM through each runtime, on the same utterances.

Every runtime streams the same audio in the same pieces through our
recognizer API (``streaming.quantize.decode_all``): the PyTorch student and
our ONNX Runtime recognizer decode by CTC prefix beam search with shallow
fusion of the KenLM model; sherpa-onnx decodes the ONNX export with its CTC
FST decoder over the HLG graph of ``streamkd lm graph`` (the same LM, its
weights baked in). The greedy rows of PyTorch and sherpa-onnx are the
baselines. RTF is compute over audio on the torch/onnxruntime threads given.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from streamkd.audio import load_utterance
from streamkd.checkpoint import load_model
from streamkd.decode import error_rates
from streamkd.errors import UsageError
from streamkd.manifest import read_manifest
from streamkd.streaming.ort import OrtStreamingRecognizer, SherpaStreamingRecognizer
from streamkd.streaming.quantize import decode_all
from streamkd.streaming.recognizer import StreamingRecognizer

__all__ = ["compare_runtimes", "runtimes_table"]


def _recognizers(checkpoint: str, onnx_dir: str, lm_dir: str, graph_dir: str, beam: int, threads: int,
                 weights: Optional[tuple]) -> dict[str, Callable]:
    """name -> a function making that runtime's recognizer (made one at a time)."""


    torch.set_num_threads(threads)
    model = load_model(checkpoint)
    return {
        "pytorch greedy": lambda: StreamingRecognizer(model),
        "pytorch beam + LM": lambda: StreamingRecognizer(model, beam=beam, lm=lm_dir, lm_weights=weights),
        "onnxruntime beam + LM": lambda: OrtStreamingRecognizer(onnx_dir, beam=beam, num_threads=threads,
                                                                lm=lm_dir, lm_weights=weights),
        "sherpa-onnx greedy": lambda: SherpaStreamingRecognizer(onnx_dir, num_threads=threads),
        "sherpa-onnx HLG": lambda: SherpaStreamingRecognizer(onnx_dir, num_threads=threads, graph=graph_dir),
    }


def compare_runtimes(checkpoint: str, onnx_dir: str, lm_dir: str, graph_dir: str, manifest: str, *,
                     max_utts: int = 0, beam: int = 16, threads: int = 1, piece_ms: float = 160.0,
                     weights: Optional[tuple] = None, only: Optional[list[str]] = None) -> dict:
    """WER/CER and RTF of each runtime (``only``: a subset of the names) on
    the first ``max_utts`` utterances of ``manifest`` (0: all)."""


    utts = read_manifest(manifest)
    utts = utts[:max_utts] if max_utts else utts
    if not utts:
        raise UsageError(f"{manifest}: no utterances to decode")
    makers = _recognizers(checkpoint, onnx_dir, lm_dir, graph_dir, beam, threads, weights)
    unknown = sorted(set(only or []) - set(makers))
    if unknown:
        raise UsageError(f"unknown runtime(s) {unknown}; choose from {sorted(makers)}")
    refs = [u.text for u in utts]
    rows = {}
    for name, make in makers.items():
        if only and name not in only:
            continue
        rec = make()
        audios = [load_utterance(u, rec.feature_cfg.sample_rate) for u in utts]
        hyps, compute, audio = decode_all(rec, audios, int(rec.feature_cfg.sample_rate * piece_ms / 1000))
        rows[name] = {**error_rates(refs, hyps), "rtf": compute / audio, "audio_sec": audio}
        print(json.dumps({"runtime": name, "wer": rows[name]["wer"], "rtf": rows[name]["rtf"]}), flush=True)
    graph = json.loads((Path(graph_dir) / "graph.json").read_text(encoding="utf-8"))
    return {"manifest": str(manifest), "utterances": len(utts), "piece_ms": piece_ms, "threads": threads,
            "beam": beam, "checkpoint": str(checkpoint), "onnx": str(onnx_dir), "lm": str(lm_dir),
            "graph": {k: v for k, v in graph.items() if k != "tokens"}, "rows": rows}


def runtimes_table(result: dict) -> str:
    """Markdown table of ``compare_runtimes``."""
    g = result["graph"]
    lines = [f"{result['utterances']} utterances of {result['manifest']}; {result['threads']} thread(s), "
             f"{result['piece_ms']:g} ms pieces, beam {result['beam']}; HLG: order {g['order']}, "
             f"alpha {g['alpha']:g}, beta {g['beta']:g}", "",
             "| runtime | WER % | CER % | ins | del | sub | RTF |", "|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {100 * r['wer']:.2f} | {100 * r['cer']:.2f} | {r['insertions']} | "
                     f"{r['deletions']} | {r['substitutions']} | {r['rtf']:.4f} |")
    return "\n".join(lines) + "\n"
