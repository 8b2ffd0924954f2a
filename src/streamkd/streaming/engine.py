"""Many concurrent streams over one model, for a server.

A server's event loop hands each stream's audio to ``accept`` as it
arrives (cheap: the samples are queued); one worker thread calls
``step()``, which feeds every stream's queued audio to its front end, runs
the encoder and returns each stream's messages (partials, finals at
endpoints, the end of stream). Audio that arrives while a step computes is
taken by the next one, so under load each step carries many streams.

- ``BatchedTorchEngine``: all streams' ready chunks go through ONE encoder
  call per round (the way sherpa-onnx serves many streams): the caches are
  fixed-size with a validity mask (``ConformerEncoder.step``), stacked on
  the batch axis, one ``CTCModel.stream_chunk`` call. Results equal
  ``StreamingRecognizer``'s (docs/streaming.md).
- ``RecognizerEngine``: one ``OrtStreamingRecognizer`` per stream, run one
  after another (the sherpa-onnx export has no batch axis); they share one
  onnxruntime session.

Text comes from a ``SegmentDecoder`` per stream (greedy CTC with
endpointing), fed the log-probs the encoder produced.
"""
from __future__ import annotations

import copy
import itertools
import threading
from collections import deque

import numpy as np
import torch

from streamkd.errors import AudioError
from streamkd.features import OnlineFeatures
from streamkd.model.subsampling import Conv2dSubsampling4
from streamkd.streaming.endpoint import NO_ENDPOINT, EndpointConfig, SegmentDecoder
from streamkd.streaming.latency import ChunkTimer
from streamkd.streaming.recognizer import AudioResampler, check_samples
from streamkd.types import StreamState

__all__ = ["EngineStream", "BatchedTorchEngine", "RecognizerEngine"]


class EngineStream:
    """One client's stream: its queued audio and its text side. The backend
    keeps its own state in ``backend``."""

    def __init__(self, stream_id: int, sample_rate: float, decoder: SegmentDecoder, model_rate: int) -> None:
        self.id = stream_id
        self.sample_rate = float(sample_rate)
        self.decoder = decoder
        self.resampler = AudioResampler(model_rate)
        self.pending: deque[np.ndarray] = deque()
        self.pending_samples = 0  # queued, at the client's rate
        self.finishing = False  # the client said done
        self.finished = False  # the last message went out
        self.backend = None

    @property
    def pending_sec(self) -> float:
        return self.pending_samples / self.sample_rate


class _EngineBase:
    """Stream bookkeeping shared by the engines; a subclass provides
    ``_new_backend(stream)``, ``_feed(stream, samples, final)`` and
    ``_run(streams) -> {stream: [log_probs (T, V), ...]}``."""

    feature_rate: int
    frame_sec: float

    def __init__(self, decode, endpoint: EndpointConfig, new_search=None) -> None:
        self.decode = decode
        self.endpoint = endpoint
        self.new_search = new_search  # per segment; None: greedy (see SegmentDecoder)
        self.streams: dict[int, EngineStream] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def open(self, sample_rate: float) -> EngineStream:
        if not sample_rate > 0:
            raise AudioError(f"sample_rate must be a positive number of Hz, got {sample_rate!r}")
        stream = EngineStream(next(self._ids), sample_rate, SegmentDecoder(
            self.decode, self.frame_sec, self.endpoint, new_search=self.new_search), self.feature_rate)
        stream.backend = self._new_backend(stream)
        with self._lock:
            self.streams[stream.id] = stream
        return stream

    def accept(self, stream: EngineStream, samples: np.ndarray) -> None:
        """Queue (N,) float samples in [-1, 1] at the stream's rate."""
        x = check_samples(samples, stream.sample_rate)
        with self._lock:
            stream.pending.append(x)
            stream.pending_samples += x.size

    def finish(self, stream: EngineStream) -> None:
        """No more audio: the next step decodes the rest and ends the stream."""
        stream.finishing = True

    def close(self, stream: EngineStream) -> None:
        """Forget a stream (disconnect or end): its state is freed once a
        step that is running now (it may hold the stream) returns."""
        with self._lock:
            self.streams.pop(stream.id, None)
            stream.pending.clear()
            stream.pending_samples = 0

    @property
    def busy(self) -> bool:
        """Whether a stream has queued audio or an end to process."""
        return any(s.pending or (s.finishing and not s.finished) for s in list(self.streams.values()))

    def _drain(self, stream: EngineStream) -> np.ndarray:
        with self._lock:
            pieces = list(stream.pending)
            stream.pending.clear()
            stream.pending_samples = 0
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)

    def step(self) -> list[tuple[EngineStream, list[dict]]]:
        """Process all queued audio of all streams; return each stream's
        messages: finals of closed segments, a partial when new frames were
        decoded, and at the end of a stream its last final and ``done``."""
        with self._lock:
            streams = [s for s in self.streams.values() if not s.finished]
        ending = []
        for s in streams:
            final = s.finishing  # read once: a done arriving now waits for the next step
            x = s.resampler(self._drain(s), s.sample_rate)
            if final:
                x = np.concatenate([x, s.resampler.flush()])
                ending.append(s)
            self._feed(s, x, final)
        outputs = self._run(streams)
        messages = []
        for s in streams:
            msgs = []
            for log_probs in outputs.get(s, []):
                msgs += [{"type": "final", **seg.as_dict()} for seg in s.decoder.push(log_probs)]
            if s in ending:
                last = s.decoder.flush()
                msgs += [{"type": "final", **last.as_dict()}] if last is not None else []
                msgs.append({"type": "done", "segments": s.decoder.segments_closed,
                             "audio_sec": round(s.decoder.frames_done * self.frame_sec, 3)})
                s.finished = True
            elif outputs.get(s):
                p = s.decoder.partial()
                msgs.append({"type": "partial", "segment": p.index, "text": p.text,
                             "start": round(p.start_sec, 3), "time": round(p.end_sec, 3)})
            if msgs:
                messages.append((s, msgs))
        return messages


class _TorchState:
    """A stream's front end and its ``StreamState`` (batch axis 1), the
    cache allocated at the left context so that streams stack."""

    def __init__(self, model, cache_frames: int) -> None:
        self.features = OnlineFeatures(model.feature_config)
        self.state = model.init_state(1, cache_frames)
        self.final = False


class BatchedTorchEngine(_EngineBase):
    """Streams over a PyTorch streaming student, their chunks batched.

    model: a CTCModel (eval, CPU) with a bounded left context; max_batch:
    the most streams in one encoder call; new_search: the search each
    segment is decoded with (default greedy; ``SegmentDecoder``).
    """

    def __init__(self, model, *, endpoint: EndpointConfig = NO_ENDPOINT, max_batch: int = 64,
                 new_search=None) -> None:
        chunk = model.chunk
        if chunk is None or chunk.left_chunks is None:
            raise ValueError("serving needs a streaming student with a bounded left context "
                             f"(model.chunk={chunk}); a full-context teacher or unbounded cache cannot serve")
        if not model.encoder.cfg.causal:
            raise ValueError("serving needs a causal student (EncoderConfig.causal=True)")
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise ValueError("serving needs the model's tokenizer (model.tokenizer is None)")
        self.model = model.eval()
        self.chunk_frames = chunk.chunk_frames
        self.cache_frames = chunk.left_frames
        self.max_batch = int(max_batch)
        cfg = model.feature_config
        self.feature_rate = cfg.sample_rate
        self.frame_sec = Conv2dSubsampling4.frame_ms(cfg.frame_shift_ms) / 1000.0
        self.batch_sizes: list[int] = []  # streams per encoder call (for the bench)
        super().__init__(tokenizer.decode, endpoint, new_search)

    def _new_backend(self, stream: EngineStream) -> _TorchState:
        return _TorchState(self.model, self.cache_frames)

    def _feed(self, stream: EngineStream, x: np.ndarray, final: bool) -> None:
        st: _TorchState = stream.backend
        if x.size:
            st.features.accept_waveform(x)
        if final:
            st.features.input_finished()
            st.final = True
        new = st.features.pop_frames()
        if new.size(0):
            st.state.feat_buffer = torch.cat([st.state.feat_buffer, new[None]], dim=1)

    @torch.inference_mode()
    def _encode(self, group: list[_TorchState], windows: list[torch.Tensor]) -> torch.Tensor:
        """windows[b] (1, F_w, C) of group[b] -> log-probs (B, T, V) through
        one ``stream_chunk`` over the stacked states; their caches advance."""
        states = [g.state for g in group]
        batch = StreamState(
            att_cache=torch.cat([st.att_cache for st in states], dim=1),
            cnn_cache=torch.cat([st.cnn_cache for st in states], dim=1),
            cache_valid_mask=torch.cat([st.cache_valid_mask for st in states], dim=0),
            feat_buffer=states[0].feat_buffer[:, :0],
        )
        out = self.model.stream_chunk(torch.cat(windows), batch, self.model.chunk)
        for b, st in enumerate(states):
            st.att_cache, st.cnn_cache = batch.att_cache[:, b:b + 1], batch.cnn_cache[:, b:b + 1]
            st.cache_valid_mask = batch.cache_valid_mask[b:b + 1]
            st.offset += out.size(1)
        self.batch_sizes.append(len(group))
        return self.model.ctc_log_probs(out).float()

    def _next_window(self, st: _TorchState, final: bool):
        window, st.state.feat_buffer = Conv2dSubsampling4.next_window(st.state.feat_buffer, self.chunk_frames,
                                                                      final)
        return window

    def _run(self, streams: list[EngineStream]) -> dict[EngineStream, list[torch.Tensor]]:
        outputs: dict[EngineStream, list[torch.Tensor]] = {}
        while True:
            ready = [(s, w) for s in streams if (w := self._next_window(s.backend, final=False)) is not None]
            if not ready:
                break
            for k in range(0, len(ready), self.max_batch):
                group = ready[k:k + self.max_batch]
                log_probs = self._encode([s.backend for s, _ in group], [w for _, w in group])
                for b, (s, _) in enumerate(group):
                    outputs.setdefault(s, []).append(log_probs[b])
        for s in streams:
            window = self._next_window(s.backend, final=True) if s.backend.final else None
            if window is not None:
                # Fewer frames than a window remain: one stream at a time, as the offline path pads it.
                outputs.setdefault(s, []).append(self._encode([s.backend], [window])[0])
        return outputs


class RecognizerEngine(_EngineBase):
    """Streams over ``OrtStreamingRecognizer`` copies of ``prototype`` (one
    shared onnxruntime session), run one after another; new_search as for
    ``BatchedTorchEngine``."""

    def __init__(self, prototype, *, endpoint: EndpointConfig = NO_ENDPOINT, new_search=None) -> None:
        self.prototype = prototype
        self.feature_rate = prototype.feature_cfg.sample_rate
        self.frame_sec = prototype.frame_ms / 1000.0
        self._outputs: dict[int, list[torch.Tensor]] = {}
        super().__init__(prototype.tokenizer.decode, endpoint, new_search)

    def _new_backend(self, stream: EngineStream):
        rec = copy.copy(self.prototype)  # shares the session; reset() below gives it its own state
        rec.timer = ChunkTimer()
        out = self._outputs.setdefault(stream.id, [])
        rec.on_chunk = lambda log_probs, enc_out: out.append(log_probs)
        rec.reset()
        return rec

    def _feed(self, stream: EngineStream, x: np.ndarray, final: bool) -> None:
        rec = stream.backend
        # The engine resampled already: feed at the recognizer's own rate.
        if x.size:
            rec.accept_waveform(x, self.feature_rate)
        if final:
            rec.finalize()

    def _run(self, streams: list[EngineStream]) -> dict[EngineStream, list[torch.Tensor]]:
        outputs = {}
        for s in streams:
            got = self._outputs.get(s.id)
            if got:
                outputs[s] = list(got)
                got.clear()
        return outputs

    def close(self, stream: EngineStream) -> None:
        super().close(stream)
        self._outputs.pop(stream.id, None)

