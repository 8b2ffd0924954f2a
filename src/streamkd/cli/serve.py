"""``streamkd serve``: live streaming recognition over websockets, with the
browser page at ``/``; the endpointing flags it shares with ``stream``."""
from __future__ import annotations

import argparse

from streamkd.cli.lm import add_lm_args, fusion_from_args
from streamkd.errors import UsageError

__all__ = ["configure", "add_endpoint_args", "endpoint_config"]


def add_endpoint_args(p: argparse.ArgumentParser) -> None:
    """The three endpoint rules (0 turns one off)."""
    p.add_argument("--silence-after-speech", type=float, default=1.2, metavar="SEC",
                   help="close a segment after this much trailing silence (CTC blanks) once it holds speech "
                        "(default 1.2)")
    p.add_argument("--silence-no-speech", type=float, default=2.4, metavar="SEC",
                   help="start over after this much silence with no speech (default 2.4)")
    p.add_argument("--max-segment", type=float, default=20.0, metavar="SEC",
                   help="close a segment at this length (default 20)")


def endpoint_config(args: argparse.Namespace):
    from streamkd.streaming.endpoint import EndpointConfig

    for flag in ("silence_after_speech", "silence_no_speech", "max_segment"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0 seconds (0: rule off)")
    off = lambda sec: sec or None  # noqa: E731  (0 turns a rule off)
    return EndpointConfig(off(args.silence_after_speech), off(args.silence_no_speech), off(args.max_segment))


def configure(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a streaming student over websockets, with a microphone page at /",
        description="One process serves the browser page (http://HOST:PORT/) and the websocket streams "
        "(protocol: docs/serve.md). Concurrent streams share the model; with --checkpoint their chunks "
        "are batched into one encoder call. Browsers allow the microphone only on localhost or https: "
        "give --certfile/--keyfile to serve https and wss.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="streaming student checkpoint (PyTorch, batched streams)")
    src.add_argument("--onnx", metavar="DIR", help="`streamkd export` folder (ONNX Runtime, one stream at a time)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=6006, help="port (default 6006; 0 picks a free one)")
    p.add_argument("--max-streams", type=int, default=32, help="concurrent streams; more are refused (default 32)")
    p.add_argument("--max-queued-sec", type=float, default=10.0,
                   help="audio a stream may have queued and unprocessed before it is dropped (default 10)")
    p.add_argument("--idle-timeout", type=float, default=30.0, metavar="SEC",
                   help="drop a stream that sends nothing for this long (default 30)")
    p.add_argument("--max-message-kb", type=int, default=1024, help="largest websocket message (default 1024)")
    p.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads (default 1)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="--checkpoint: most streams in one encoder call (1: no batching; default 64)")
    p.add_argument("--certfile", help="TLS certificate (PEM): serve https/wss")
    p.add_argument("--keyfile", help="TLS private key (PEM) for --certfile")
    add_endpoint_args(p)
    add_lm_args(p)
    p.set_defaults(func=_run)


def _engine(args, endpoint):
    from streamkd.streaming.engine import BatchedTorchEngine, RecognizerEngine

    if args.checkpoint:
        import torch

        from streamkd import load_model

        torch.set_num_threads(args.threads)
        model = load_model(args.checkpoint)
        return BatchedTorchEngine(model, endpoint=endpoint, max_batch=args.max_batch,
                                  new_search=_lm_search(args, model.tokenizer, args.checkpoint))
    from streamkd.streaming.ort import OrtStreamingRecognizer

    rec = OrtStreamingRecognizer(args.onnx, num_threads=args.threads)
    return RecognizerEngine(rec, endpoint=endpoint, new_search=_lm_search(args, rec.tokenizer, args.onnx))


def _lm_search(args, tokenizer, source: str):
    """--lm: each segment decoded by beam search with the word LM; else None (greedy)."""
    fusion = fusion_from_args(args, tokenizer, source)
    if fusion is None:
        return None
    from streamkd.decode import LM_BEAM, SearchOptions

    return SearchOptions(LM_BEAM).factory(fusion)


def _ssl_context(args):
    if not args.certfile and not args.keyfile:
        return None
    if not (args.certfile and args.keyfile):
        raise UsageError("https needs both --certfile and --keyfile")
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(args.certfile, args.keyfile)
    except (OSError, ssl.SSLError) as err:
        raise UsageError(f"cannot load --certfile {args.certfile} / --keyfile {args.keyfile}: {err}") from None
    return ctx


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from streamkd.serve.server import ServeLimits, StreamServer

    for flag in ("max_streams", "max_queued_sec", "idle_timeout", "max_message_kb", "threads", "max_batch"):
        if not getattr(args, flag) > 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    limits = ServeLimits(max_streams=args.max_streams, max_message_bytes=args.max_message_kb * 1024,
                         max_queued_sec=args.max_queued_sec, idle_timeout_sec=args.idle_timeout)
    ssl_ctx = _ssl_context(args)
    server = StreamServer(_engine(args, endpoint_config(args)), limits)
    scheme = "https" if ssl_ctx else "http"

    def started(port: int) -> None:
        print(f"streamkd serve: {scheme}://{args.host}:{port}/ (page and websocket; Ctrl-C stops)", flush=True)

    try:
        asyncio.run(server.serve(args.host, args.port, ssl=ssl_ctx, started=started))
    except OSError as err:
        raise UsageError(f"--host/--port: cannot listen on {args.host}:{args.port}: {err}") from None
    return 0
