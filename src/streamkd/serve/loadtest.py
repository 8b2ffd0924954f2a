"""``streamkd bench --serve``: how many real-time streams one server keeps up with.

A ``streamkd serve`` process (its own process, on 127.0.0.1 only) is fed by
N websocket clients in this process, each streaming its own concatenation
of corpus utterances at real-time pace (int16 pieces of ``piece_ms``),
starting at staggered times. For N on a ladder it records:

- partial latency: the wall time from the moment the audio a partial
  covers had been sent (its ``time``) to the partial's arrival; the chunk's
  own duration (the algorithmic latency) comes on top and is reported
  apart;
- whether every stream kept up: every partial and the end of the stream
  arrived within ``keep_up_sec`` of the audio they cover;
- whether every stream's finals, joined, equal the offline decode of its
  audio by the same model (nothing lost, nothing mixed between streams).

The ladder stops at the first N that does not keep up (or after
``max_total_sec``). Then 10x overload: a server capped at the largest good
N is sent ten times as many clients at once; the excess must be refused
with a ``busy`` error and the admitted streams must still be right.
The clients share the machine with the server: their own CPU time counts
against it.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from streamkd.model.subsampling import Conv2dSubsampling4

__all__ = ["run_serve_bench", "serve_table"]

_RATE = 16000
_LADDER = (1, 2, 4, 8, 16, 24, 32, 40, 50, 64, 80, 100, 128)


def _percentile(values, q) -> Optional[float]:
    return float(np.percentile(values, q)) if len(values) else None


def _squeeze(text: str) -> str:
    return " ".join(text.split())


class _ServerProcess:
    """``streamkd serve`` on 127.0.0.1 with a free port, stopped on exit."""

    def __init__(self, checkpoint: str, max_streams: int, threads: int, max_batch: int) -> None:
        self.argv = [sys.executable, "-m", "streamkd", "serve", "--checkpoint", str(checkpoint), "--host",
                     "127.0.0.1", "--port", "0", "--max-streams", str(max_streams), "--threads", str(threads),
                     "--max-batch", str(max_batch)]

    def __enter__(self) -> "_ServerProcess":
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "://" not in line:
            self.proc.kill()
            raise RuntimeError(f"streamkd serve did not start: {line}{self.proc.stderr.read()[-2000:]}")
        self.url = "ws://" + line.split("://", 1)[1].split("/", 1)[0] + "/"
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def _client(url: str, audio: np.ndarray, piece_ms: float, delay_sec: float) -> dict:
    """Stream int16 audio at real-time pace; the messages with arrival times."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    loop = asyncio.get_running_loop()
    await asyncio.sleep(delay_sec)
    piece = int(_RATE * piece_ms / 1000)
    pcm = (np.clip(audio, -1.0, 32767 / 32768) * 32768).astype("<i2")
    async with connect(url, max_size=None, open_timeout=60) as ws:
        try:
            await ws.send(json.dumps({"sample_rate": _RATE, "format": "int16"}))
        except ConnectionClosed:
            pass  # a refusal can close before our first message: its error is still queued to read
        try:
            first = json.loads(await ws.recv())
        except ConnectionClosed:
            return {"refused": "closed without a message", "messages": []}
        if first["type"] != "ready":
            return {"refused": first.get("code"), "messages": []}
        received: list[tuple[dict, float]] = []

        async def receive():
            async for raw in ws:
                received.append((json.loads(raw), loop.time()))
                if received[-1][0]["type"] in ("done", "error"):
                    return

        reader = asyncio.create_task(receive())
        sent: list[tuple[float, float]] = []  # (audio sent up to, sec; wall time)
        t0 = loop.time()
        try:
            for k in range(0, pcm.size, piece):
                end = min(k + piece, pcm.size) / _RATE
                await asyncio.sleep(max(0.0, t0 + end - loop.time()))  # the piece has been "spoken"
                await ws.send(pcm[k:k + piece].tobytes())
                sent.append((end, loop.time()))
            await ws.send(json.dumps({"type": "done"}))
        except ConnectionClosed:
            pass  # the server ended the stream: its error is among the messages
        await asyncio.wait_for(reader, timeout=60)
    return {"refused": None, "messages": received, "sent": sent}


def _stream_stats(result: dict, want: str) -> dict:
    """Latencies, keep-up and correctness of one client's stream."""
    if not result["sent"]:
        return {"latencies": [], "done_lag": None, "error": "closed before any audio", "correct": False}
    sent_end = np.array([s[0] for s in result["sent"]])
    sent_wall = np.array([s[1] for s in result["sent"]])
    latencies, finals, done_lag = [], [], None
    for msg, wall in result["messages"]:
        if msg["type"] == "partial":
            k = min(int(np.searchsorted(sent_end, msg["time"] - 1e-6)), len(sent_end) - 1)
            latencies.append(wall - sent_wall[k])
        elif msg["type"] == "final":
            finals.append(msg["text"])
        elif msg["type"] == "done":
            done_lag = wall - sent_wall[-1]
    last = result["messages"][-1][0] if result["messages"] else {}
    return {"latencies": latencies, "done_lag": done_lag, "error": last.get("code") if last.get("type") == "error"
            else None, "correct": _squeeze(" ".join(finals)) == _squeeze(want)}


async def _run_clients(url: str, audios: list[np.ndarray], piece_ms: float, stagger_sec: float) -> list[dict]:
    rng = np.random.default_rng(len(audios))
    delays = rng.uniform(0, stagger_sec, len(audios))
    return await asyncio.gather(*(_client(url, a, piece_ms, d) for a, d in zip(audios, delays)))


def _level(url: str, audios, wants, piece_ms: float, stagger_sec: float, keep_up_sec: float) -> dict:
    results = asyncio.run(_run_clients(url, audios, piece_ms, stagger_sec))
    admitted = [(r, w) for r, w in zip(results, wants) if r["refused"] is None]
    stats = [_stream_stats(r, w) for r, w in admitted]
    lat = [x for s in stats for x in s["latencies"]]
    lags = [s["done_lag"] for s in stats if s["done_lag"] is not None]
    keeps_up = (len(admitted) == len(results) and all(s["done_lag"] is not None and s["error"] is None
                                                      for s in stats)
                and max(lat + lags, default=0.0) <= keep_up_sec)
    return {"streams": len(audios), "admitted": len(admitted),
            "refused_busy": sum(r["refused"] == "busy" for r in results),
            "refused_other": sum(r["refused"] not in (None, "busy") for r in results),
            "errors": sum(s["error"] is not None for s in stats), "correct": sum(s["correct"] for s in stats),
            "partials": len(lat), "latency_ms_p50": _ms(_percentile(lat, 50)),
            "latency_ms_p95": _ms(_percentile(lat, 95)), "latency_ms_max": _ms(max(lat, default=None)),
            "done_lag_ms_max": _ms(max(lags, default=None)), "keeps_up": bool(keeps_up)}


def _ms(sec: Optional[float]) -> Optional[float]:
    return None if sec is None else round(1000 * float(sec), 1)


def _client_audio(model, manifest: str, n_max: int, stream_sec: float):
    """n_max different streams (corpus utterances concatenated, each client
    starting at another one) and their offline decodes."""
    from streamkd.audio import load_utterance
    from streamkd.decode import decode_utterance
    from streamkd.features import Fbank
    from streamkd.manifest import read_manifest

    utts = read_manifest(manifest)
    if not utts:
        raise ValueError(f"{manifest}: no utterances")
    pool = [load_utterance(u, _RATE) for u in utts[: max(n_max, 64)]]
    fbank = Fbank(model.feature_config)
    audios, wants = [], []
    for i in range(n_max):
        parts, total, k = [], 0.0, i
        while total < stream_sec:
            parts.append(pool[k % len(pool)])
            total += parts[-1].size / _RATE
            k += 1
        x = np.concatenate(parts)
        audios.append(x)
        wants.append(model.tokenizer.decode(decode_utterance(model, fbank.compute(x))))
    return audios, wants


def engine_cpu(model, audios: list[np.ndarray], max_batch: int, piece_ms: float = 100.0) -> dict:
    """The recogniser alone (no network, no pacing): the streams fed one
    piece each per step, as a loaded server steps them. CPU time of this
    process per second of audio, and the mean streams per encoder call."""
    from streamkd.streaming.engine import BatchedTorchEngine

    engine = BatchedTorchEngine(model, max_batch=max_batch)
    streams = [engine.open(_RATE) for _ in audios]
    piece = int(_RATE * piece_ms / 1000)
    cpu = time.process_time()
    for k in range(0, max(a.size for a in audios), piece):
        for s, a in zip(streams, audios):
            if k < a.size:
                engine.accept(s, a[k:k + piece])
        engine.step()
    for s in streams:
        engine.finish(s)
    engine.step()
    cpu = time.process_time() - cpu
    audio_sec = sum(a.size for a in audios) / _RATE
    return {"max_batch": max_batch, "streams": len(audios), "audio_sec": audio_sec,
            "cpu_ms_per_audio_sec": round(1000 * cpu / audio_sec, 2),
            "mean_batch": round(float(np.mean(engine.batch_sizes)), 1)}


def run_serve_bench(checkpoint: str, manifest: str, *, max_clients: int = 128, stream_sec: float = 20.0,
                    piece_ms: float = 100.0, keep_up_sec: float = 1.0, threads: int = 2, max_batch: int = 64,
                    max_total_sec: float = 900.0, log=print) -> dict:
    """The ladder, then the 10x overload; returns everything measured."""
    from streamkd import load_model

    if max_clients > 512:
        raise ValueError(f"--max-clients {max_clients}: at most 512 (a loopback benchmark, bounded)")
    import torch

    torch.set_num_threads(threads)  # as the server's --threads
    model = load_model(checkpoint)
    ladder = [n for n in _LADDER if n <= max_clients]
    audios, wants = _client_audio(model, manifest, max(ladder), stream_sec)
    # batched against one call per stream and chunk, on up to 32 streams of up to 10 s
    sample = [a[: int(10 * _RATE)] for a in audios[:32]]
    engine = [engine_cpu(model, sample, mb) for mb in (max_batch, 1)]
    log(json.dumps(engine))
    levels, best, start = [], 0, time.monotonic()
    with _ServerProcess(checkpoint, max(ladder), threads, max_batch) as server:
        for n in ladder:
            if time.monotonic() - start + stream_sec > max_total_sec:
                log(f"stopping: the next level would pass --max-total-sec {max_total_sec:g}")
                break
            level = _level(server.url, audios[:n], wants[:n], piece_ms, 1.0, keep_up_sec)
            levels.append(level)
            log(json.dumps(level))
            if not (level["keeps_up"] and level["correct"] == n):
                break
            best = n
    overload = None
    if best:
        n = 10 * best
        over_audio = [audios[i % len(audios)] for i in range(n)]
        over_want = [wants[i % len(wants)] for i in range(n)]
        with _ServerProcess(checkpoint, best, threads, max_batch) as server:
            overload = _level(server.url, over_audio, over_want, piece_ms, 0.0, keep_up_sec)
        overload["max_streams"] = best
        overload["refused_cleanly"] = overload["refused_busy"] == n - best and overload["refused_other"] == 0
        overload["admitted_correct"] = overload["correct"] == overload["admitted"] == best
        log(json.dumps(overload))
    chunk_ms = model.chunk.chunk_frames * Conv2dSubsampling4.frame_ms(model.feature_config.frame_shift_ms)
    return {"checkpoint": str(checkpoint), "manifest": str(manifest), "stream_sec": stream_sec,
            "piece_ms": piece_ms, "keep_up_sec": keep_up_sec, "threads": threads, "max_batch": max_batch,
            "chunk_ms": chunk_ms, "engine_cpu": engine, "largest_realtime_streams": best, "levels": levels,
            "overload": overload}


def serve_table(result: dict) -> str:
    """Markdown summary of ``run_serve_bench``."""
    lines = [f"checkpoint {result['checkpoint']}, chunk {result['chunk_ms']:g} ms, {result['threads']} thread(s), "
             f"max batch {result['max_batch']}; each client streams {result['stream_sec']:g} s of "
             f"{result['manifest']} in {result['piece_ms']:g} ms pieces at real-time pace", "",
             f"Largest N with every stream within {result['keep_up_sec']:g} s of real time and right: "
             f"**{result['largest_realtime_streams']}**", "",
             "Recogniser alone, CPU ms per audio second: " + ", ".join(
                 f"max batch {e['max_batch']}: {e['cpu_ms_per_audio_sec']} (mean batch {e['mean_batch']})"
                 for e in result["engine_cpu"]) + f" ({result['engine_cpu'][0]['streams']} streams)", "",
             "| N | admitted | correct | partial latency p50 / p95 / max ms | end lag max ms | keeps up |",
             "|---|---|---|---|---|---|"]
    for lv in result["levels"]:
        lines.append(f"| {lv['streams']} | {lv['admitted']} | {lv['correct']} | {lv['latency_ms_p50']} / "
                     f"{lv['latency_ms_p95']} / {lv['latency_ms_max']} | {lv['done_lag_ms_max']} | "
                     f"{'yes' if lv['keeps_up'] else 'no'} |")
    ov = result["overload"]
    if ov:
        lines += ["", f"10x overload: {ov['streams']} clients against --max-streams {ov['max_streams']}: "
                  f"{ov['refused_busy']} refused with `busy` ({ov['refused_other']} other refusals), "
                  f"{ov['admitted']} admitted, {ov['correct']} of them right; partial latency p95 "
                  f"{ov['latency_ms_p95']} ms."]
    return "\n".join(lines) + "\n"
