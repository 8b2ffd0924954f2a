"""Latency figures of a streaming recognizer.

Three kinds, kept apart because they answer different questions:

- compute: real-time factor (compute seconds / audio seconds) and the time
  one chunk takes (p50, p95, max); a chunk slower than its own duration
  makes the recognizer fall behind.
- algorithmic: what the model must wait for before it can emit the first
  frame of a chunk, whatever the hardware: the chunk's own audio, the
  subsampling's right context and one fbank window.
- emission delay: how much later the streaming student emits a word than
  the full-context teacher, from the CTC alignments (frames where each
  word's first token is first emitted), for words both recognised at the
  same position.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import jiwer
import numpy as np
import torch

from streamkd.config import FeatureConfig
from streamkd.decode import CTCGreedySearch
from streamkd.model.asr import MODEL_CHUNK
from streamkd.model.subsampling import Conv2dSubsampling4

__all__ = [
    "ChunkTimer",
    "algorithmic_latency_ms",
    "compute_stats",
    "word_start_tokens",
    "EmissionDelay",
    "emission_delay",
    "equal_pairs",
    "greedy_alignment",
    "teacher_alignment",
]


class ChunkTimer:
    """Collects the compute time of every model call, per chunk emitted.

    ``add(seconds, chunks)`` records one call that produced ``chunks``
    chunks (a call that emits several chunks is split evenly); calls that
    emit nothing are added to the total only. At most ``max_chunks`` times
    are kept (the newest), so a long stream cannot grow this without bound.
    """

    def __init__(self, max_chunks: int = 100_000) -> None:
        self.max_chunks = max_chunks
        self.reset()

    def reset(self) -> None:
        self.total_sec = 0.0
        self.per_chunk_sec: list[float] = []

    def add(self, seconds: float, chunks: float) -> None:
        self.total_sec += seconds
        if chunks <= 0:
            return
        n = max(1, int(math.ceil(chunks)))
        self.per_chunk_sec.extend([seconds / n] * n)
        if len(self.per_chunk_sec) > self.max_chunks:
            del self.per_chunk_sec[: len(self.per_chunk_sec) - self.max_chunks]


def algorithmic_latency_ms(chunk_frames: int, features: FeatureConfig) -> dict:
    """The latency the model design imposes, in milliseconds.

    chunk_ms = chunk_frames encoder frames (the audio one chunk covers),
    right_context_ms = the feature frames the front end reads past the
    chunk, window_ms = frame_length_ms (the last fbank frame's window);
    total is their sum. The geometry is the front end's.
    """
    chunk_ms = chunk_frames * Conv2dSubsampling4.frame_ms(features.frame_shift_ms)
    right_ms = Conv2dSubsampling4.right_context * features.frame_shift_ms
    frame_length_ms = features.frame_length_ms
    return {
        "chunk_ms": chunk_ms,
        "right_context_ms": right_ms,
        "window_ms": frame_length_ms,
        "total_ms": chunk_ms + right_ms + frame_length_ms,
    }


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def compute_stats(timer: ChunkTimer, audio_sec: float, chunk_ms: Optional[float] = None) -> dict:
    """RTF and per-chunk compute time (ms) from a ChunkTimer.

    ``chunk_ms`` (the audio duration of one chunk), when given, adds the
    share of chunks whose compute took longer than their audio.
    """
    per = [1000.0 * s for s in timer.per_chunk_sec]
    stats = {
        "audio_sec": audio_sec,
        "compute_sec": timer.total_sec,
        "rtf": timer.total_sec / audio_sec if audio_sec > 0 else float("nan"),
        "chunks": len(per),
        "chunk_ms_p50": _percentile(per, 50),
        "chunk_ms_p95": _percentile(per, 95),
        "chunk_ms_max": max(per) if per else float("nan"),
    }
    if chunk_ms is not None:
        stats["chunks_slower_than_realtime"] = sum(p > chunk_ms for p in per)
    return stats


def word_start_tokens(tokens: Sequence[int], decode: Callable[[list[int]], str]) -> list[int]:
    """Index in ``tokens`` of the first token of each word of ``decode(tokens)``.

    Works for any tokenizer whose text of a token prefix has the words of
    the whole text as a prefix (characters with a space token, SentencePiece
    with its word-start marker): the word w starts at the first token whose
    prefix text holds more than w words. O(U^2) decodes, U is small.
    """
    starts: list[int] = []
    for i in range(len(tokens)):
        n_words = len(decode(list(tokens[: i + 1])).split())
        while len(starts) < n_words:
            starts.append(i)
    return starts


@dataclass
class EmissionDelay:
    """Student-minus-teacher emission time of the words matched by alignment."""

    mean_ms: float
    p90_ms: float
    matched: int  # words at the same position in both hypotheses
    unmatched: int  # words of either hypothesis left unpaired (substituted, inserted, deleted)
    delays_ms: list[float]

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("delays_ms")
        return out


def _word_frames(tokens: Sequence[int], frames: Sequence[int], decode) -> tuple[list[str], list[int]]:
    if len(tokens) != len(frames):
        raise ValueError(f"{len(tokens)} tokens but {len(frames)} emission frames")
    words = decode(list(tokens)).split()
    starts = word_start_tokens(tokens, decode)
    if len(starts) != len(words):
        raise ValueError(
            "the tokenizer's text of a token prefix is not a prefix of the whole text; "
            "word emission times cannot be aligned"
        )
    return words, [int(frames[i]) for i in starts]


def emission_delay(
    student_tokens: Sequence[int],
    student_frames: Sequence[int],
    teacher_tokens: Sequence[int],
    teacher_frames: Sequence[int],
    decode: Callable[[list[int]], str],
    *,
    frame_ms: float,
) -> EmissionDelay:
    """Per word: (student frame - teacher frame) * frame_ms.

    *_tokens: the final hypotheses (U,); *_frames: the encoder frame at
    which each token was first emitted (U,), as the CTC searches record
    them; decode: token ids -> text; frame_ms: one encoder frame
    (``Conv2dSubsampling4.frame_ms``). Words are paired by a word-level edit-distance alignment
    (jiwer) of the two texts; only words in equal stretches count.
    """
    s_words, s_frames = _word_frames(student_tokens, student_frames, decode)
    t_words, t_frames = _word_frames(teacher_tokens, teacher_frames, decode)
    delays = [(s_frames[si] - t_frames[ti]) * frame_ms for si, ti in equal_pairs(s_words, t_words)]
    unmatched = len(s_words) - len(delays) + (len(t_words) - len(delays))
    return EmissionDelay(
        mean_ms=float(np.mean(delays)) if delays else float("nan"),
        p90_ms=_percentile(delays, 90),
        matched=len(delays),
        unmatched=unmatched,
        delays_ms=delays,
    )


def equal_pairs(hyp: Sequence[str], ref: Sequence[str]) -> list[tuple[int, int]]:
    """(hyp index, ref index) of the words a minimum-edit-distance alignment
    (jiwer) pairs as equal; words are whitespace-free strings."""
    if not hyp or not ref:
        return []
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return [(chunk.hyp_start_idx + k, chunk.ref_start_idx + k) for chunk in out.alignments[0]
            if chunk.type == "equal" for k in range(chunk.ref_end_idx - chunk.ref_start_idx)]


def greedy_alignment(model, feats, chunk=MODEL_CHUNK) -> tuple[list[int], list[int]]:
    """Greedy CTC tokens of ``model`` over a whole utterance (in its own
    streaming mode, or ``chunk``: None for full context) and the encoder
    frame where each was emitted. feats: (F, C) raw fbank.
    Returns (tokens (U,), frames (U,))."""
    with torch.inference_mode():
        p = next(model.parameters())
        enc = model(feats.to(p.device, p.dtype)[None], torch.tensor([feats.size(0)], device=p.device), chunk=chunk)
        log_probs = model.ctc_log_probs(enc.out)[0, : int(enc.out_lens[0])].float().cpu()  # (T, V)
    search = CTCGreedySearch()
    search.step(log_probs)
    return search.best(), list(search.frames)


def teacher_alignment(teacher, feats) -> tuple[list[int], list[int]]:
    """``greedy_alignment`` with full context."""
    return greedy_alignment(teacher, feats, chunk=None)
