"""True streaming recognition from raw audio with a PyTorch CTCModel.

Audio arrives in pieces of any size (one sample to minutes); each piece is
resampled (a soxr stream, so piece boundaries leave no trace), turned into
fbank frames incrementally (``OnlineFeatures``), and the model's
``stream_step`` runs as soon as whole chunks are available. The CTC search
is carried across chunks, so ``partial()`` is the hypothesis so far and
``finalize()`` gives exactly the transcript of the offline simulated
streaming decode of the same audio.

Memory stays bounded on long input: the model's caches have a fixed size
(bounded left context), fbank frames are handed over and freed as they are
produced, and log-probs are consumed by the search immediately. Only the
hypothesis (and one compute time per chunk, capped) grows.

Several streams share one model: make one ``StreamingRecognizer`` per
stream; they hold no state in the model.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import numpy as np
import soxr
import torch

from streamkd import features as _features
from streamkd.config import FeatureConfig
from streamkd.decode import LM_BEAM, PrefixText, SearchOptions, make_search, token_texts
from streamkd.errors import AudioError, UsageError
from streamkd.features import OnlineFeatures
from streamkd.lm.fusion import LMFusion, WordLM, load_lm
from streamkd.model.subsampling import Conv2dSubsampling4
from streamkd.streaming.latency import ChunkTimer, algorithmic_latency_ms, compute_stats

__all__ = [
    "AudioResampler",
    "check_samples",
    "RecognizerBase",
    "StreamingRecognizer",
    "decode_streams",
]


def check_samples(samples, sample_rate) -> np.ndarray:
    """(N,) float samples in [-1, 1] -> contiguous float32, or AudioError
    saying what is wrong (shape, dtype, NaN/inf, int16 scale, rate)."""
    if not isinstance(sample_rate, (int, float)) or isinstance(sample_rate, bool) or sample_rate <= 0:
        raise AudioError(f"sample_rate must be a positive number of Hz, got {sample_rate!r}")
    return _features.check_samples(samples, "accept_waveform")


class AudioResampler:
    """Seamless chunked resampling to ``out_rate`` with a soxr stream.

    Chunked output equals ``soxr.resample`` of the whole signal (the same
    filter as ``streamkd.audio.load_audio``), clipped to [-1, 1] like it.
    The input rate is fixed by the first piece; a change raises AudioError.
    """

    def __init__(self, out_rate: int) -> None:
        self.out_rate = int(out_rate)
        self.in_rate: Optional[float] = None
        self._stream: Optional[soxr.ResampleStream] = None

    def __call__(self, x: np.ndarray, in_rate: float, last: bool = False) -> np.ndarray:
        if self.in_rate is None:
            self.in_rate = float(in_rate)
            if self.in_rate != self.out_rate:
                self._stream = soxr.ResampleStream(self.in_rate, self.out_rate, 1, dtype="float32")
        elif float(in_rate) != self.in_rate:
            raise AudioError(f"the sample rate changed within a stream ({self.in_rate:g} Hz, then "
                             f"{float(in_rate):g} Hz); reset() before feeding audio at another rate")
        if self._stream is None:
            return x
        y = self._stream.resample_chunk(x, last=last)
        return np.clip(y, -1.0, 1.0).astype(np.float32, copy=False)

    def flush(self) -> np.ndarray:
        """The resampler's tail (call once, at the end of the input)."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        return self(np.zeros(0, dtype=np.float32), self.in_rate, last=True)


def _make_fusion(lm, tokenizer, lm_weights: Optional[tuple]):

    if getattr(tokenizer, "symbols", None) is None:
        raise UsageError("decoding with an LM needs a tokenizer with symbols")
    if not isinstance(lm, WordLM):
        lm = load_lm(lm, tokenizer)
    alpha, beta = lm_weights if lm_weights is not None else (None, None)
    return LMFusion.for_tokenizer(lm, tokenizer, alpha, beta)


class RecognizerBase:
    """What every streaming recognizer shares: input checks, resampling, the
    CTC search across chunks, timing and the text API. A subclass provides
    ``_reset_stream()``, ``_accept(x)`` (resampled samples at
    feature_cfg.sample_rate) and ``_advance(final) -> encoder frames
    emitted``, calling ``_emit(log_probs)`` for each batch of frames."""

    chunk_frames: int
    feature_cfg: FeatureConfig

    def _init_common(self, beam: int, tokenizer, on_chunk: Optional[Callable], lm=None,
                     lm_weights: Optional[tuple] = None) -> None:
        """lm: an LM folder or a loaded ``WordLM`` (checked against the
        tokenizer's symbols); lm_weights: (alpha, beta), default the LM's tuned ones."""
        self.beam = int(beam)
        if tokenizer is None:
            raise UsageError("a recognizer needs a tokenizer to turn ids into text: the model carries none; "
                             "pass tokenizer=")
        self.tokenizer = tokenizer
        self._decode = tokenizer.decode
        symbols = getattr(tokenizer, "symbols", None)
        self._pieces = token_texts(symbols) if symbols is not None else None
        self.fusion = None
        if lm is not None:
            self.fusion = _make_fusion(lm, tokenizer, lm_weights)
            if self.beam < 2:  # fusion re-ranks prefixes: it needs a beam
                self.beam = LM_BEAM
        self.on_chunk = on_chunk
        self.timer = ChunkTimer()

    @property
    def frame_ms(self) -> float:
        """One encoder frame in ms."""
        return Conv2dSubsampling4.frame_ms(self.feature_cfg.frame_shift_ms)

    def reset(self) -> None:
        """Forget the stream: the next sample starts a new utterance."""
        self._resampler = AudioResampler(self.feature_cfg.sample_rate)
        self.search = (SearchOptions(self.beam).factory(self.fusion)() if self.fusion is not None
                       else make_search(self.beam))
        self._text = PrefixText(self._pieces) if self._pieces is not None else None
        self.timer.reset()
        self.samples_in = 0  # at the model's rate
        self.frames_out = 0  # encoder frames decoded
        self.finished = False
        self._final_text: Optional[str] = None
        self._reset_stream()

    def accept_waveform(self, samples, sample_rate: float) -> None:
        """Feed (N,) float samples in [-1, 1] at ``sample_rate`` Hz (any N)."""
        if self.finished:
            raise RuntimeError("finalize() was called on this stream; call reset() to start another")
        x = check_samples(samples, sample_rate)
        start = time.perf_counter()
        self._feed(self._resampler(x, sample_rate), start, final=False)

    def _feed(self, x: np.ndarray, start: float, final: bool) -> None:
        """Resampled samples x into the stream; ``start``: when this call's
        compute began (its resampling included)."""
        if x.size:
            self._accept(x)
            self.samples_in += x.size
        emitted = self._advance(final)
        # The call's whole compute is charged to the chunks it completed.
        self.timer.add(time.perf_counter() - start, emitted / self.chunk_frames)

    def _emit(self, log_probs: torch.Tensor, enc_out: Optional[torch.Tensor] = None) -> None:
        """log_probs: (T_new, V) of the next encoder frames."""
        self.search.step(log_probs)
        self.frames_out += log_probs.size(0)
        if self.on_chunk is not None:
            self.on_chunk(log_probs, enc_out)

    def partial(self) -> str:
        """The best hypothesis so far (greedy: only grows). Incremental: its
        cost is the tokens that changed since the last call (``PrefixText``)."""
        if self._final_text is not None:
            return self._final_text
        if self._text is None:
            return self._decode(self.search.best())
        return self._text.update(self.search.best_node())

    def tokens(self) -> list[int]:
        return self.search.best()

    def token_frames(self) -> list[int]:
        """Encoder frame at which each token of ``tokens()`` was first emitted."""
        return list(self.search.frames)

    def finalize(self) -> str:
        """End of input: flush the resampler, the fbank and the last partial
        chunk exactly as the offline path pads it; return the final text.
        Idempotent; ``reset()`` starts a new utterance."""
        if not self.finished:
            start = time.perf_counter()
            self._feed(self._resampler.flush(), start, final=True)
            self.search.finish()
            self.finished = True
            self._final_text = self._decode(self.search.best())
        return self._final_text

    @property
    def audio_sec(self) -> float:
        return self.samples_in / self.feature_cfg.sample_rate

    def latency_report(self) -> dict:
        """RTF, per-chunk compute time and algorithmic latency of this stream."""
        algo = algorithmic_latency_ms(self.chunk_frames, self.feature_cfg)
        report = compute_stats(self.timer, self.audio_sec, chunk_ms=algo["chunk_ms"])
        report["algorithmic_latency_ms"] = algo
        return report

    # subclass hooks
    def _reset_stream(self) -> None:
        raise NotImplementedError

    def _accept(self, x: np.ndarray) -> None:
        raise NotImplementedError

    def _advance(self, final: bool) -> int:
        raise NotImplementedError


class StreamingRecognizer(RecognizerBase):
    """One stream of audio -> text, over a chunked streaming CTCModel.

    model: a CTCModel in eval mode with ``model.chunk`` set (a streaming
    student); shared between recognizers. Memory is bounded when its
    left context is (``chunk.left_chunks`` not None). beam: 1 for greedy
    search, k > 1 for CTC prefix beam search. lm: an LM folder (``streamkd lm
    build``) or a loaded ``WordLM`` for shallow fusion (beam search, at least
    2); lm_weights: (alpha, beta), default the LM's tuned values. feature_cfg:
    the fbank options (default: ``model.feature_config``, its training config;
    a model without one raises). tokenizer: default ``model.tokenizer``.
    on_chunk: called as ``on_chunk(log_probs (T_new, V), enc_out (T_new, D))``
    for every batch of encoder frames emitted (inspection, tests).
    """

    def __init__(self, model, *, beam: int = 1, feature_cfg: Optional[FeatureConfig] = None,
                 tokenizer=None, on_chunk: Optional[Callable] = None, lm=None,
                 lm_weights: Optional[tuple] = None) -> None:
        if model.chunk is None:
            raise UsageError("StreamingRecognizer needs a streaming model (model.chunk is None: a "
                             "full-context teacher cannot stream); pass a chunked student")
        self.model = model
        self.chunk_frames = model.chunk.chunk_frames
        self.feature_cfg = feature_cfg or model.feature_config
        self._init_common(beam, tokenizer if tokenizer is not None else model.tokenizer, on_chunk, lm, lm_weights)
        self.reset()

    def _reset_stream(self) -> None:
        self._features = OnlineFeatures(self.feature_cfg)
        self.state = self.model.init_state(1)

    def _accept(self, x: np.ndarray) -> None:
        self._features.accept_waveform(x)

    @torch.inference_mode()
    def _advance(self, final: bool) -> int:
        if final:
            self._features.input_finished()
        feats = self._features.pop_frames()  # (n, C), freed inside the extractor
        if feats.size(0) == 0 and not final:
            return 0
        p = next(self.model.parameters())
        out, self.state = self.model.stream_step(feats.to(p.device, p.dtype)[None], self.state, final=final)
        if out.size(1):
            self._emit(self.model.ctc_log_probs(out)[0].float().cpu(), out[0])  # (T_new, V), (T_new, D)
        return out.size(1)


def decode_streams(recognizers: Sequence[RecognizerBase], pieces: Sequence[Sequence[np.ndarray]],
                   sample_rate: float) -> list[str]:
    """Run several streams in lockstep, one piece of each per round (as a
    server interleaves its clients), and finalize them. pieces[i] is the
    list of sample arrays of stream i. Returns the final texts."""
    if len(recognizers) != len(pieces):
        raise ValueError(f"{len(recognizers)} recognizers but {len(pieces)} piece lists")
    rounds = max((len(p) for p in pieces), default=0)
    for r in range(rounds):
        for rec, stream_pieces in zip(recognizers, pieces):
            if r < len(stream_pieces):
                rec.accept_waveform(stream_pieces[r], sample_rate)
    return [rec.finalize() for rec in recognizers]
