"""``streamkd stream``: streaming recognition of audio files read in pieces,
with partial results and a latency report; ``streamkd export``: the ONNX
export that sherpa-onnx runs."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from streamkd.cli.serve import add_endpoint_args, endpoint_config
from streamkd.errors import AudioError, UsageError

__all__ = ["configure"]


def configure(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "stream", help="recognise audio files in true streaming (partials, final text, latency)",
        description="Reads each file in pieces of --piece-ms at its own sample rate (resampled on the fly), "
        "prints the partial result whenever it changes (with the audio time), then the final text "
        "and a latency report: RTF, compute per chunk (p50/p95/max), algorithmic latency.")
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav/flac)")
    p.add_argument("--checkpoint", help="model checkpoint (needed for --backend torch and for --teacher delays)")
    p.add_argument("--onnx", metavar="DIR", help="export folder (model.onnx, tokens.txt) for ort/sherpa")
    p.add_argument("--backend", choices=["torch", "ort", "sherpa"], default="torch",
                   help="torch: PyTorch model; ort: our ONNX Runtime recognizer; sherpa: sherpa-onnx")
    p.add_argument("--piece-ms", type=float, default=100.0, help="audio per piece fed (default 100 ms)")
    p.add_argument("--realtime", action="store_true", help="feed pieces no faster than real time")
    p.add_argument("--beam", type=int, default=1, help="1: greedy; >1: CTC prefix beam search (not sherpa)")
    p.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads (default 1)")
    from streamkd.cli.lm import add_lm_args

    add_lm_args(p)
    p.add_argument("--teacher", help="full-context teacher checkpoint: adds the per-word emission delay")
    p.add_argument("--quiet", action="store_true", help="do not print partial results")
    p.add_argument("--json", metavar="OUT", help="write the per-file results and reports as JSON")
    p.add_argument("--endpoint", action="store_true",
                   help="split the text into segments at endpoints (CTC blanks; the rules below, as in serve)")
    add_endpoint_args(p)
    p.set_defaults(func=_run_stream)

    e = subparsers.add_parser("export", help="export a streaming student for deployment")
    e.add_argument("--checkpoint", required=True, help="model checkpoint (.pt)")
    e.add_argument("--format", choices=["wenet-ctc-onnx"], default="wenet-ctc-onnx",
                   help="wenet-ctc-onnx: sherpa-onnx OnlineRecognizer.from_wenet_ctc layout")
    e.add_argument("--out", required=True, metavar="DIR", help="folder for model.onnx and tokens.txt")
    e.add_argument("--chunk-frames", type=int, default=None, help="encoder frames per chunk (default: the model's)")
    e.add_argument("--left-chunks", type=int, default=None, help="left chunks cached (default: the model's)")
    e.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    e.add_argument("--int8", action="store_true",
                   help="write model.onnx dynamically quantised to int8 (onnxruntime.quantization); "
                        "export fp32 to another folder to compare (`streamkd bench --int8`)")
    e.set_defaults(func=_run_export)


def _make_recognizer(args):
    weights = None
    if args.lm and args.backend != "sherpa" and (args.lm_alpha is not None or args.lm_beta is not None):
        from streamkd.lm.fusion import WordLM

        tuned = WordLM(args.lm)
        weights = (tuned.alpha if args.lm_alpha is None else args.lm_alpha,
                   tuned.beta if args.lm_beta is None else args.lm_beta)
    if args.backend == "torch":
        if not args.checkpoint:
            raise UsageError("--backend torch needs --checkpoint")
        import torch

        from streamkd import load_model
        from streamkd.streaming.recognizer import StreamingRecognizer

        torch.set_num_threads(args.threads)
        return StreamingRecognizer(load_model(args.checkpoint), beam=args.beam, lm=args.lm, lm_weights=weights)
    if not args.onnx:
        raise UsageError(f"--backend {args.backend} needs --onnx DIR (make it with `streamkd export`)")
    from streamkd.streaming.ort import OrtStreamingRecognizer, SherpaStreamingRecognizer

    if args.backend == "ort":
        return OrtStreamingRecognizer(args.onnx, beam=args.beam, num_threads=args.threads, lm=args.lm,
                                      lm_weights=weights)
    if args.beam != 1:
        raise UsageError("--backend sherpa: sherpa-onnx decodes greedily, or with --lm over an HLG graph; "
                         "use --beam 1")
    if args.lm and (args.lm_alpha is not None or args.lm_beta is not None):
        raise UsageError("--backend sherpa: the LM weights are baked into HLG.fst; rebuild it with "
                         "`streamkd lm graph --lm-alpha A --lm-beta B` instead of --lm-alpha/--lm-beta")
    # With --lm, DIR is the folder `streamkd lm graph` wrote HLG.fst into (the LM folder by default).
    return SherpaStreamingRecognizer(args.onnx, num_threads=args.threads, graph=args.lm)


def _pieces(path: Path, piece_ms: float):
    """Yield (mono float32 samples, sample_rate) pieces of a file."""
    import soundfile as sf

    try:
        f = sf.SoundFile(str(path))
    except (sf.SoundFileError, RuntimeError) as err:
        raise AudioError(f"{path}: cannot read audio ({err})") from err
    with f:
        if f.frames == 0:
            raise AudioError(f"{path}: the file holds no audio samples; nothing to recognise")
        n = max(1, int(round(f.samplerate * piece_ms / 1000.0)))
        for block in f.blocks(blocksize=n, dtype="float32", always_2d=True):
            yield block.mean(axis=1), f.samplerate


def _segmenter(rec, args):
    """With --endpoint: a SegmentDecoder fed the recognizer's log-probs,
    printing each segment as it closes; its list of closed segments."""
    from streamkd.streaming.endpoint import SegmentDecoder

    new_search = None
    if rec.fusion is not None:  # segments decoded as the recognizer decodes: beam search with the LM
        from streamkd.decode import SearchOptions

        new_search = SearchOptions(rec.beam).factory(rec.fusion)
    decoder = SegmentDecoder(rec.tokenizer.decode, rec.frame_ms / 1000.0, endpoint_config(args), new_search=new_search)
    closed = []

    def on_chunk(log_probs, enc_out) -> None:
        for seg in decoder.push(log_probs):
            closed.append(seg)
            if not args.quiet:
                print(f"  [final {seg.start_sec:7.2f} - {seg.end_sec:7.2f} s] {seg.text}")

    rec.on_chunk = on_chunk
    return decoder, closed


def _stream_file(rec, path: Path, args) -> dict:
    rec.reset()
    segmenter = _segmenter(rec, args) if args.endpoint else None
    partials, last, fed_sec = [], "", 0.0
    wall0 = time.perf_counter()
    for samples, rate in _pieces(path, args.piece_ms):
        try:
            rec.accept_waveform(samples, rate)
        except AudioError as err:
            raise AudioError(f"{path} at {fed_sec:.2f} s: {err}") from err
        fed_sec += samples.size / rate
        if args.realtime:
            time.sleep(max(0.0, fed_sec - (time.perf_counter() - wall0)))
        text = rec.partial()
        if text != last:
            partials.append({"audio_sec": round(fed_sec, 3), "text": text})
            if not args.quiet:
                print(f"  [{fed_sec:7.2f} s] {text}")
            last = text
    final = rec.finalize()
    result = {"file": str(path), "text": final, "partials": partials, "latency": rec.latency_report()}
    if segmenter is not None:
        decoder, closed = segmenter
        last_segment = decoder.flush()
        result["segments"] = [seg.as_dict() for seg in closed + ([last_segment] if last_segment else [])]
    return result


def _teacher_delay(teacher, path: Path, rec) -> dict:
    from streamkd.audio import load_audio
    from streamkd.features import Fbank
    from streamkd.streaming.latency import emission_delay, teacher_alignment

    cfg = teacher.feature_config
    feats = Fbank(cfg).compute(load_audio(path, cfg.sample_rate))
    t_tokens, t_frames = teacher_alignment(teacher, feats)
    decode = teacher.tokenizer.decode
    return emission_delay(rec.tokens(), rec.token_frames(), t_tokens, t_frames, decode,
                          frame_ms=rec.frame_ms).as_dict()


def _print_report(result: dict) -> None:
    lat = result["latency"]
    algo = lat["algorithmic_latency_ms"]
    print(f"{result['file']}: {result['text']}")
    for seg in result.get("segments", []):
        print(f"  segment {seg['segment']}: {seg['start']:.2f} - {seg['end']:.2f} s: {seg['text']}")
    print(f"  audio {lat['audio_sec']:.2f} s, RTF {lat['rtf']:.4f}, {lat['chunks']} chunks, compute per chunk "
          f"p50 {lat['chunk_ms_p50']:.2f} / p95 {lat['chunk_ms_p95']:.2f} / max {lat['chunk_ms_max']:.2f} ms")
    print(f"  algorithmic latency {algo['total_ms']:.0f} ms (chunk {algo['chunk_ms']:.0f} + right context "
          f"{algo['right_context_ms']:.0f} + window {algo['window_ms']:.0f})")
    if "emission_delay" in result:
        d = result["emission_delay"]
        print(f"  emission delay vs teacher: mean {d['mean_ms']:.0f} ms, p90 {d['p90_ms']:.0f} ms "
              f"({d['matched']} words matched, {d['unmatched']} unmatched)")


def _run_stream(args: argparse.Namespace) -> int:
    if args.piece_ms <= 0:
        raise UsageError(f"--piece-ms must be positive, got {args.piece_ms}")
    if args.endpoint and args.backend == "sherpa":
        raise UsageError("--endpoint needs the log-probs of --backend torch or ort "
                         "(sherpa-onnx has its own endpointing)")
    missing = [name for name in args.files if not Path(name).is_file()]
    if missing:
        raise AudioError(f"{missing[0]}: audio file does not exist")
    if args.endpoint:
        endpoint_config(args)  # flag errors before the model loads
    rec = _make_recognizer(args)
    teacher = None
    if args.teacher:
        from streamkd import load_model

        teacher = load_model(args.teacher)
    results = []
    for name in args.files:
        path = Path(name)
        result = _stream_file(rec, path, args)
        if teacher is not None:
            result["emission_delay"] = _teacher_delay(teacher, path, rec)
        _print_report(result)
        results.append(result)
    if args.json:
        from streamkd.atomic import write_atomic

        write_atomic(args.json, json.dumps({"backend": args.backend, "files": results}, indent=2) + "\n")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from streamkd import load_model
    from streamkd.streaming.export import export_wenet_ctc_onnx

    model = load_model(args.checkpoint)
    path = export_wenet_ctc_onnx(model, args.out, chunk_frames=args.chunk_frames,
                                 left_chunks=args.left_chunks, opset=args.opset)
    if args.int8:
        from streamkd.streaming.quantize import quantize_int8

        quantize_int8(args.out)
    chunk = args.chunk_frames or model.chunk.chunk_frames
    left = args.left_chunks or model.chunk.left_chunks
    print(f"wrote {path}{' (int8, dynamic quantisation)' if args.int8 else ''} and {Path(args.out) / 'tokens.txt'}")
    print(f"sherpa-onnx: OnlineRecognizer.from_wenet_ctc(tokens=..., model=..., chunk_size={chunk}, "
          f"num_left_chunks={left})")
    return 0
