"""The websocket server behind ``streamkd serve`` (protocol: docs/serve.md).

Built on ``websockets`` (asyncio): one coroutine per connection reads the
client's messages, one scheduler task runs ``engine.step()`` in a worker
thread whenever audio is queued and routes each stream's messages to its
connection's outbox. The same port serves the browser page over plain HTTP
(``process_request`` answers GET requests that are not websocket
upgrades), so one process and one port give the page and the stream.

Limits (``ServeLimits``): concurrent streams, message size (the library
closes with 1009 above it), audio queued per stream and not yet processed,
and an idle timeout. A bad message gets a JSON error and a close; it never
reaches the other streams.
"""
from __future__ import annotations

import asyncio
import json
import mimetypes
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Optional

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response

from streamkd.errors import StreamkdError

__all__ = ["ServeLimits", "StreamServer", "ServerThread", "SAMPLE_FORMATS"]

SAMPLE_FORMATS = {"float32": np.dtype("<f4"), "int16": np.dtype("<i2")}
_MIN_RATE, _MAX_RATE = 8000, 192000
_STATIC = {"/": "index.html", "/index.html": "index.html", "/app.js": "app.js",
           "/capture-worklet.js": "capture-worklet.js"}


@dataclass(frozen=True)
class ServeLimits:
    max_streams: int = 32  # concurrent connections; more are refused with "busy"
    max_message_bytes: int = 1 << 20  # one websocket message
    max_queued_sec: float = 10.0  # audio received and not processed yet, per stream
    idle_timeout_sec: float = 30.0  # no message for this long ends the stream


class _ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def parse_start(message) -> tuple[float, str]:
    """The client's first message -> (sample_rate, format), or _ProtocolError."""
    if not isinstance(message, str):
        raise _ProtocolError("bad_start", "the first message must be JSON text "
                             '{"sample_rate": 16000, "format": "float32"|"int16"}, got binary data')
    try:
        start = json.loads(message)
    except ValueError:
        raise _ProtocolError("bad_start", f"the first message is not JSON: {message[:80]!r}") from None
    if not isinstance(start, dict) or "sample_rate" not in start or "format" not in start:
        raise _ProtocolError("bad_start", 'the first message must be an object with "sample_rate" and "format"')
    rate, fmt = start["sample_rate"], start["format"]
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not _MIN_RATE <= rate <= _MAX_RATE:
        raise _ProtocolError("bad_start", f"sample_rate must be a number of Hz in [{_MIN_RATE}, {_MAX_RATE}], "
                             f"got {rate!r}")
    if fmt not in SAMPLE_FORMATS:
        raise _ProtocolError("bad_format", f"format must be one of {sorted(SAMPLE_FORMATS)}, got {fmt!r}")
    return float(rate), fmt


def decode_frame(data: bytes, fmt: str) -> np.ndarray:
    """A binary audio frame -> (N,) float32 in [-1, 1], or _ProtocolError."""
    dtype = SAMPLE_FORMATS[fmt]
    if len(data) % dtype.itemsize:
        raise _ProtocolError("bad_audio", f"a {fmt} frame must hold a whole number of {dtype.itemsize}-byte "
                             f"samples, got {len(data)} bytes")
    x = np.frombuffer(data, dtype=dtype)
    return x.astype(np.float32) / 32768.0 if fmt == "int16" else x.astype(np.float32)


class StreamServer:
    """Websocket streams over an engine (``streaming.engine``)."""

    def __init__(self, engine, limits: ServeLimits = ServeLimits()) -> None:
        self.engine = engine
        self.limits = limits
        self.connections = 0  # open streams, counted from the first message on
        self.refused = 0
        self._outboxes: dict[int, asyncio.Queue] = {}
        self._wake: Optional[asyncio.Event] = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamkd-engine")

    # HTTP ---------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request):
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None  # go on with the websocket handshake
        name = _STATIC.get(request.path.split("?")[0])
        if name is None:
            return connection.respond(404, f"not found: {request.path}\n")
        body = resources.files("streamkd.serve").joinpath("static", name).read_bytes()
        headers = Headers([("Content-Type", mimetypes.guess_type(name)[0] + "; charset=utf-8"),
                           ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
                           ("Connection", "close")])
        return Response(200, "OK", headers, body)

    # Websocket ----------------------------------------------------------

    async def _error(self, ws: ServerConnection, code: str, message: str, close_code: int = 1008) -> None:
        try:
            await ws.send(json.dumps({"type": "error", "code": code, "message": message}))
            await ws.close(close_code, code)
        except ConnectionClosed:
            pass

    async def _recv(self, ws: ServerConnection):
        try:
            return await asyncio.wait_for(ws.recv(), self.limits.idle_timeout_sec)
        except asyncio.TimeoutError:
            raise _ProtocolError("idle", f"no message for {self.limits.idle_timeout_sec:g} s; "
                                 "the stream was dropped") from None

    async def _handler(self, ws: ServerConnection) -> None:
        if self.connections >= self.limits.max_streams:
            self.refused += 1
            await self._error(ws, "busy", f"the server is at its limit of {self.limits.max_streams} streams; "
                              "try again later", close_code=1013)
            return
        self.connections += 1
        stream = sender = None
        try:
            rate, fmt = parse_start(await self._recv(ws))
            stream = self.engine.open(rate)
            outbox: asyncio.Queue = asyncio.Queue()
            self._outboxes[stream.id] = outbox
            sender = asyncio.create_task(self._send_loop(ws, outbox))
            await ws.send(json.dumps({"type": "ready", "stream": stream.id, "sample_rate": rate, "format": fmt,
                                      "frame_sec": self.engine.frame_sec}))
            await self._read_audio(ws, stream, fmt)
            await sender  # until the last message went out
        except _ProtocolError as err:
            await self._error(ws, err.code, str(err))
        except StreamkdError as err:
            await self._error(ws, "bad_audio", str(err))
        except ConnectionClosed:
            pass  # the client left: everything is freed below
        finally:
            self.connections -= 1
            if stream is not None:
                self._outboxes.pop(stream.id, None)
                self.engine.close(stream)
            if sender is not None and not sender.done():
                sender.cancel()

    async def _read_audio(self, ws: ServerConnection, stream, fmt: str) -> None:
        while True:
            message = await self._recv(ws)
            if isinstance(message, bytes):
                self.engine.accept(stream, decode_frame(message, fmt))
                if stream.pending_sec > self.limits.max_queued_sec:
                    raise _ProtocolError("overflow", f"more than {self.limits.max_queued_sec:g} s of audio is "
                                         "queued for this stream: send at most real-time audio")
                self._wake.set()
                continue
            try:
                request = json.loads(message)
            except ValueError:
                request = None
            if not isinstance(request, dict) or request.get("type") != "done":
                raise _ProtocolError("bad_message", 'text messages after the first must be {"type": "done"}, '
                                     f"got {message[:80]!r}")
            self.engine.finish(stream)
            self._wake.set()
            return

    async def _send_loop(self, ws: ServerConnection, outbox: asyncio.Queue) -> None:
        """Send the stream's messages until its last: "done", or an
        "internal" error, after which the connection is closed (the reader
        then stops and the stream is freed)."""
        while True:
            message = await outbox.get()
            await ws.send(json.dumps(message))
            if message["type"] == "done":
                return
            if message["type"] == "error":
                await ws.close(1011, message["code"])
                return

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.engine.busy:
                try:
                    results = await loop.run_in_executor(self._pool, self.engine.step)
                except Exception:  # a bug, not bad input (checked on arrival): end the streams, keep serving
                    traceback.print_exc()
                    results = [(stream, [{"type": "error", "code": "internal", "message": "the recogniser failed; "
                                          "see the server's log"}]) for stream in list(self.engine.streams.values())]
                    for stream, _ in results:
                        self.engine.close(stream)
                for stream, messages in results:
                    outbox = self._outboxes.get(stream.id)
                    for message in messages if outbox is not None else []:
                        outbox.put_nowait(message)

    async def serve(self, host: str, port: int, *, ssl=None, started: Optional[Callable[[int], None]] = None,
                    stop: Optional[asyncio.Event] = None) -> None:
        """Serve until ``stop`` is set (forever without one); ``started(port)``
        is called once listening (port 0 picks a free one)."""
        self._wake = asyncio.Event()
        scheduler = asyncio.create_task(self._schedule())
        async with serve(self._handler, host, port, process_request=self._process_request, ssl=ssl,
                         max_size=self.limits.max_message_bytes) as server:
            if started is not None:
                started(server.sockets[0].getsockname()[1])
            await (stop.wait() if stop is not None else asyncio.Future())
        scheduler.cancel()
        self._pool.shutdown(wait=True)


class ServerThread:
    """A StreamServer on 127.0.0.1 in a background thread (tests, bench):
    ``with ServerThread(engine) as srv: ... srv.url``."""

    def __init__(self, engine, limits: ServeLimits = ServeLimits(), **kwargs) -> None:
        self.server = StreamServer(engine, limits, **kwargs)
        self.port: Optional[int] = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True, name="streamkd-serve")
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._stop: Optional[asyncio.Event] = None

    def _main(self) -> None:
        async def main():
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await self.server.serve("127.0.0.1", 0, started=self._started, stop=self._stop)

        asyncio.run(main())

    def _started(self, port: int) -> None:
        self.port = port
        self._ready.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the server did not start within 30 s")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
