"""Endpointing: where one spoken segment ends and the next begins.

Silence is decided from the CTC output, the signal sherpa-onnx and WeNet
use: an encoder frame is silent when its best symbol is blank. Three rules
close a segment (sherpa-onnx's rule1/2/3, as times):

- trailing silence after speech: ``silence_after_speech_sec`` of blank
  frames once the segment holds a token;
- trailing silence with no speech: ``silence_no_speech_sec`` of blank
  frames in a segment that holds no token yet (the segment is empty and
  is not reported; the next one starts after it);
- maximum segment length: ``max_segment_sec`` of frames; the segment then
  closes at the first word boundary (a space frame, or a blank frame after
  a space token or before any token), so no word is split between two
  segments, or, for tokenizers without space tokens (SentencePiece marks
  word starts), at the first blank frame once the segment is a quarter
  longer.

``SegmentDecoder`` runs the greedy CTC search over log-probs chunk by
chunk and cuts its tokens at the exact endpoint frames, so the segments'
tokens, concatenated, are exactly the tokens of the whole stream: a
segment ends on a blank frame, or on a space frame whose repeat the next
segment's search collapses (``CTCGreedySearch.continue_after``).
It is shared by ``streamkd serve`` and ``streamkd stream --endpoint``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from streamkd.decode import CTCGreedySearch
from streamkd.streaming.latency import word_start_tokens

__all__ = ["EndpointConfig", "Endpointer", "Segment", "SegmentDecoder", "NO_ENDPOINT"]


@dataclass(frozen=True)
class EndpointConfig:
    """When a segment ends; a rule set to None never fires."""

    silence_after_speech_sec: Optional[float] = 1.2  # trailing blanks once a token was seen
    silence_no_speech_sec: Optional[float] = 2.4  # trailing blanks with no token in the segment
    max_segment_sec: Optional[float] = 20.0  # frames in one segment

    def __post_init__(self) -> None:
        for name in ("silence_after_speech_sec", "silence_no_speech_sec", "max_segment_sec"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"endpoint {name} must be positive seconds (or None: rule off), got {value!r}")


NO_ENDPOINT = EndpointConfig(None, None, None)  # one segment per stream


def _frames(sec: Optional[float], frame_sec: float) -> Optional[int]:
    return None if sec is None else max(1, round(sec / frame_sec))


class Endpointer:
    """The three rules over a sequence of per-frame blank flags.

    ``scan(blank)`` takes the next frames' flags (list of bool) and returns
    the index within them of the first frame that ends the segment (the
    state is then that of a fresh segment starting at the next frame), or
    None.
    """

    def __init__(self, cfg: EndpointConfig, frame_sec: float) -> None:
        self.after_speech = _frames(cfg.silence_after_speech_sec, frame_sec)
        self.no_speech = _frames(cfg.silence_no_speech_sec, frame_sec)
        self.max_frames = _frames(cfg.max_segment_sec, frame_sec)
        self.start_segment()

    def start_segment(self) -> None:
        self.frames = 0  # frames in the segment
        self.trailing_blank = 0  # blank frames at its end
        self.has_speech = False

    def _ends_here(self) -> bool:
        if self.has_speech:
            if self.after_speech is not None and self.trailing_blank >= self.after_speech:
                return True
        elif self.no_speech is not None and self.trailing_blank >= self.no_speech:
            return True
        return False

    def scan(self, blank: list[bool], boundary: Optional[list[bool]] = None) -> Optional[int]:
        """blank: per frame, its best symbol is blank; boundary: per frame,
        a word may end there (default: every blank frame)."""
        boundary = blank if boundary is None else boundary
        for i, is_blank in enumerate(blank):
            self.frames += 1
            if is_blank:
                self.trailing_blank += 1
            else:
                self.trailing_blank, self.has_speech = 0, True
            too_long = self.max_frames is not None and self.frames >= self.max_frames and (
                boundary[i] or (is_blank and 4 * self.frames >= 5 * self.max_frames))
            if self._ends_here() or too_long:
                self.start_segment()
                return i
        return None


@dataclass
class Segment:
    """One closed (or, for partials, open) segment; times in seconds of
    stream audio."""

    index: int
    start_sec: float
    end_sec: float
    text: str
    words: list[dict] = field(default_factory=list)  # {"word", "start", "end"} in seconds

    def as_dict(self) -> dict:
        return {"segment": self.index, "start": round(self.start_sec, 3), "end": round(self.end_sec, 3),
                "text": self.text, "words": self.words}


class SegmentDecoder:
    """Greedy CTC search with endpointing, fed log-probs as they come.

    decode: token ids -> text. frame_sec: one encoder frame in seconds.
    ``push(log_probs)`` returns the segments its frames closed (empty ones,
    with no token, are not returned); ``partial()`` is the open segment;
    ``flush()`` closes it at the end of the stream (None when empty).
    """

    def __init__(self, decode: Callable[[list[int]], str], frame_sec: float,
                 endpoint: EndpointConfig = NO_ENDPOINT, blank_id: int = 0,
                 new_search: Optional[Callable[[], object]] = None) -> None:
        """new_search: a fresh search per segment (default greedy; e.g.
        ``SearchOptions(16).factory(fusion)`` for beam search with a word LM,
        whose ``finish()`` scores a segment's last word when it closes)."""
        self.decode, self.frame_sec, self.blank_id = decode, float(frame_sec), blank_id
        self.new_search = new_search or (lambda: CTCGreedySearch(blank_id))
        self.endpointer = Endpointer(endpoint, self.frame_sec)
        self.frames_done = 0  # encoder frames pushed (absolute)
        self.segments_closed = 0  # segments reported, the empty ones not counted
        self._after_word = True  # the last token emitted was a space (or none was)
        self._open(0)

    def _open(self, start_frame: int) -> None:
        self.search = self.new_search()
        self.start_frame = start_frame

    def push(self, log_probs: torch.Tensor) -> list[Segment]:
        """log_probs: (T, V) of the next T encoder frames."""
        closed: list[Segment] = []
        best = log_probs.argmax(dim=-1).tolist()
        blank = [b == self.blank_id for b in best]
        boundary = self._word_boundaries(best)
        i = 0
        while i < log_probs.size(0):
            cut = self.endpointer.scan(blank[i:], boundary[i:])
            stop = log_probs.size(0) if cut is None else i + cut + 1
            self.search.step(log_probs[i:stop])
            self.frames_done += stop - i
            if cut is not None:
                seg = self._close(self.frames_done)
                if seg is not None:
                    closed.append(seg)
                if isinstance(self.search, CTCGreedySearch):  # a beam search starts afresh
                    self.search.continue_after(best[stop - 1])
            i = stop
        return closed

    def _word_boundaries(self, best: list[int]) -> list[bool]:
        """Per frame: the last token up to it (in this push or earlier) is a
        space, or there is none, and the frame is blank or that space: a
        segment may end there without splitting a word."""
        out = []
        for b in best:
            if b != self.blank_id:
                self._after_word = not self.decode([b]).strip()
            out.append(self._after_word)
        return out

    def _segment(self, end_frame: int) -> Segment:
        tokens, frames = self.search.best(), [self.start_frame + f for f in self.search.frames]
        words = []
        starts = word_start_tokens(tokens, self.decode)
        for a, b in zip(starts, starts[1:] + [len(tokens)]):
            text = self.decode(tokens[a:b]).strip()
            while b - 1 > a and not self.decode(tokens[b - 1:b]).strip():
                b -= 1  # a word's end is its last letter, not the space token after it
            words.append({"word": text, "start": round(frames[a] * self.frame_sec, 3),
                          "end": round((frames[b - 1] + 1) * self.frame_sec, 3)})
        return Segment(self.segments_closed, self.start_frame * self.frame_sec, end_frame * self.frame_sec,
                       self.decode(tokens), words)

    def _close(self, end_frame: int) -> Optional[Segment]:
        seg = None
        self.search.finish()
        if self.search.best():
            seg = self._segment(end_frame)
            self.segments_closed += 1
        self._open(end_frame)
        return seg

    def partial(self) -> Segment:
        """The open segment so far (its words are not computed: cheap)."""
        return Segment(self.segments_closed, self.start_frame * self.frame_sec,
                       self.frames_done * self.frame_sec, self.decode(self.search.best()))

    def flush(self) -> Optional[Segment]:
        """End of stream: close the open segment (None if it holds no token)."""
        return self._close(self.frames_done)
