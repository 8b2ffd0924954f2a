"""int8 export and its measurement.

``quantize_int8`` turns an export folder's ``model.onnx`` into a dynamically
quantised one (onnxruntime.quantization: int8 weights, activations
quantised per call), keeping the metadata sherpa-onnx and our runtime
read, so every runtime loads it unchanged.

``compare_exports`` decodes the same files with two export folders (fp32
and int8) through ONNX Runtime and sherpa-onnx and reports WER, CER and
RTF for each: the WER delta and the speed of int8 on this CPU, whichever
way they go.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from streamkd.atomic import atomic_open
from streamkd.audio import load_utterance
from streamkd.decode import error_rates
from streamkd.manifest import read_manifest
from streamkd.streaming.export import MODEL_FILE
from streamkd.streaming.ort import OrtStreamingRecognizer, SherpaStreamingRecognizer

__all__ = ["quantize_int8", "compare_exports", "comparison_table", "decode_all"]


def quantize_int8(model_dir: str | Path) -> Path:
    """Replace ``model_dir/model.onnx`` with its dynamic int8 quantisation
    (atomically); return its path."""

    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; export the fp32 model first")
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if meta.get("quantization"):
        raise ValueError(f"{path} is already quantised ({meta['quantization']})")
    tmp = path.with_name("model.int8.tmp.onnx")
    try:
        quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8)
        proto = onnx.load(str(tmp))
        meta["quantization"] = "int8-dynamic"  # weights int8, activations quantised at run time
        del proto.metadata_props[:]
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        with atomic_open(path, "wb") as f:
            f.write(proto.SerializeToString())
    finally:
        tmp.unlink(missing_ok=True)
    return path


def decode_all(rec, audios: Sequence, piece_samples: int) -> tuple[list[str], float, float]:
    """Stream each (N,) 16 kHz array in pieces; (texts, compute sec, audio sec)."""
    texts, compute, audio = [], 0.0, 0.0
    for x in audios:
        rec.reset()
        start = time.perf_counter()
        for i in range(0, x.size, piece_samples):
            rec.accept_waveform(x[i:i + piece_samples], rec.feature_cfg.sample_rate)
        texts.append(rec.finalize())
        compute += time.perf_counter() - start
        audio += x.size / rec.feature_cfg.sample_rate
    return texts, compute, audio


def compare_exports(fp32_dir: str | Path, int8_dir: str | Path, manifest: str | Path, *, max_utts: int = 0,
                    piece_ms: float = 160.0, threads: int = 1) -> dict:
    """WER/CER and RTF of fp32 and int8 through ORT and sherpa-onnx on the
    same utterances (one thread each, audio fed in ``piece_ms`` pieces)."""

    utts = read_manifest(manifest)
    utts = utts[:max_utts] if max_utts else utts
    if not utts:
        raise ValueError(f"{manifest}: no utterances to decode")
    refs = [u.text for u in utts]
    rows = {}
    for precision, folder in (("fp32", fp32_dir), ("int8", int8_dir)):
        for runtime, make in (("ort", lambda d: OrtStreamingRecognizer(d, num_threads=threads)),
                              ("sherpa-onnx", lambda d: SherpaStreamingRecognizer(d, num_threads=threads))):
            rec = make(folder)
            audios = [load_utterance(u, rec.feature_cfg.sample_rate) for u in utts]
            hyps, compute, audio = decode_all(rec, audios, int(rec.feature_cfg.sample_rate * piece_ms / 1000))
            rows[f"{runtime} {precision}"] = {**error_rates(refs, hyps), "rtf": compute / audio,
                                              "compute_sec": compute, "audio_sec": audio,
                                              "model_mb": (Path(folder) / MODEL_FILE).stat().st_size / 2**20}
    for runtime in ("ort", "sherpa-onnx"):
        fp32, int8 = rows[f"{runtime} fp32"], rows[f"{runtime} int8"]
        rows[f"{runtime} int8"]["wer_delta"] = int8["wer"] - fp32["wer"]
        rows[f"{runtime} int8"]["speedup"] = fp32["rtf"] / int8["rtf"]
    return {"manifest": str(manifest), "utterances": len(utts), "piece_ms": piece_ms, "threads": threads,
            "fp32_dir": str(fp32_dir), "int8_dir": str(int8_dir), "rows": rows}


def comparison_table(result: dict) -> str:
    """Markdown table of ``compare_exports``."""
    lines = [f"{result['utterances']} utterances of {result['manifest']}, {result['threads']} thread(s), "
             f"{result['piece_ms']:g} ms pieces", "",
             "| runtime | WER % | CER % | RTF | model MB | WER delta vs fp32 | speed-up vs fp32 |",
             "|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        delta = f"{100 * r['wer_delta']:+.2f}" if "wer_delta" in r else ""
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        lines.append(f"| {name} | {100 * r['wer']:.2f} | {100 * r['cer']:.2f} | {r['rtf']:.4f} | "
                     f"{r['model_mb']:.2f} | {delta} | {speed} |")
    return "\n".join(lines) + "\n"
