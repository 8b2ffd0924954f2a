"""Offline decoding of CTC log-probs over an HLG graph (``streamkd lm graph``).

sherpa-onnx decodes over the graph only inside its streaming wenet-ctc
recognizer, so a full-context model (the teacher) never reaches it. This
module runs the same kind of search on log-probs from any model: Kaldi's
FasterDecoder through k2-fsa's ``kaldi-decoder`` binding, a Viterbi beam
search over the graph's states (icefall's ``onnx_pretrained_ctc_HLG.py``
decodes the same way). It is a strategy object like the searches of
``streamkd.decode``: ``step(log_probs)`` advances the decoder frame by
frame, ``finish()`` takes the best path, ``best()`` returns its tokens.

Labels (as ``graph.py`` writes them): the input label of an arc is the
token id + 1, so kaldi-decoder's ``DecodableCtc``, which scores label ``i``
with column ``i - 1`` of the log-probs, reads the model's CTC output as it
is; the blank is label 1. Output labels are word ids of ``words.txt``: the
text is those words, so every word of the result is an LM word.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import kaldifst
import torch
from kaldi_decoder import DecodableCtc, FasterDecoder, FasterDecoderOptions

from streamkd.errors import LMError
from streamkd.lm.graph import GRAPH_META_FILE, WORDS_FILE, check_graph

__all__ = ["HLGraph", "GraphDecoder", "GraphSearch"]


class HLGraph:
    """A graph folder loaded once: the HLG FST, its words and graph.json.
    LMError naming the file when one is missing or unreadable
    (``check_graph``), or when words.txt is malformed."""

    def __init__(self, graph_dir: str | Path, symbols: Sequence[str]) -> None:

        self.dir = Path(graph_dir)
        fst_path = check_graph(self.dir, symbols)
        self.meta = json.loads((self.dir / GRAPH_META_FILE).read_text(encoding="utf-8"))
        self.words = _read_words(self.dir / WORDS_FILE)
        self.fst = kaldifst.StdVectorFst.read(str(fst_path))


def _read_words(path: Path) -> dict[int, str]:
    """words.txt (``word id`` per line) as id -> word."""
    if not path.is_file():
        raise LMError(f"{path}: missing; rebuild the graph with `streamkd lm graph`")
    words = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            raise LMError(f"{path}:{n}: expected 'WORD ID', got {line!r}; rebuild the graph with `streamkd lm graph`")
        words[int(fields[1])] = fields[0]
    return words


@dataclass(frozen=True)
class GraphDecoder:
    """A loaded graph and the decoder's pruning: what ``decode_manifest``
    takes to decode over the graph instead of searching prefixes."""
    graph: HLGraph
    beam: float = 16.0  # paths this much costlier (-log prob) than the best are dropped per frame
    max_active: int = 3000  # at most this many graph states kept per frame (sherpa-onnx's default)

    def new_search(self) -> "GraphSearch":
        return GraphSearch(self)

    def describe(self) -> dict:
        """The graph and the settings, for summary.json."""
        meta = self.graph.meta
        return {"dir": str(self.graph.dir), "lm": meta.get("lm"), "order": meta.get("order"),
                "alpha": meta.get("alpha"), "beta": meta.get("beta"), "beam": self.beam,
                "max_active": self.max_active}


class GraphSearch:
    """Viterbi beam search of CTC log-probs over an HLG graph (FasterDecoder).

    ``frames``: where each token of the best path was first emitted. The best
    path exists only after ``finish()``: a Viterbi decoder has no cheap
    best-so-far prefix, so this search is for offline decoding. When no path
    reaches a final state of the graph (the input ends inside a word, or
    pruning lost every final one), Kaldi's best path falls back to the best
    state without its final cost; ``reached_final`` says which happened.
    """

    def __init__(self, decoder: GraphDecoder) -> None:

        self.graph = decoder.graph
        opts = FasterDecoderOptions(beam=decoder.beam, max_active=decoder.max_active)
        self._decoder = FasterDecoder(self.graph.fst, opts)  # keeps a reference to graph.fst (alive in self)
        self.reset()

    def reset(self) -> None:
        self._decoder.init_decoding()
        self._t = 0
        self._labels: Optional[list[int]] = None  # per frame input label of the best path, after finish()
        self._word_ids: list[int] = []
        self.reached_final = False

    def step(self, log_probs: torch.Tensor) -> None:
        """log_probs: (T, V) for the next T frames."""

        if self._labels is not None:
            raise RuntimeError("finish() was called; reset() before stepping again")
        if log_probs.size(0) == 0:
            return
        lp = log_probs.detach().to(torch.float32).cpu().contiguous().numpy()
        self._decoder.advance_decoding(DecodableCtc(lp, offset=self._t))
        self._t += lp.shape[0]

    def finish(self) -> None:
        """End of input: the best path's frame labels and words."""

        if self._labels is not None:
            return
        self.reached_final = self._decoder.reached_final()
        self._labels, self._word_ids = [], []
        if self._t == 0:
            return
        ok, lattice = self._decoder.get_best_path()
        if ok:
            ok, labels, word_ids, _ = kaldifst.get_linear_symbol_sequence(lattice)
        if not ok:
            raise LMError(f"{self.graph.dir}: the decoder found no path through the graph over {self._t} frames")
        self._labels, self._word_ids = list(labels), list(word_ids)

    def words(self) -> list[str]:
        """The words of the best path (its output labels through words.txt)."""
        if self._labels is None:
            raise RuntimeError("call finish() first: the best path of the graph is known only at the end")
        return [self.graph.words[i] for i in self._word_ids]

    def text(self, tokenizer) -> str:
        """The transcript: the best path's words (its tokens may spell no word
        of the graph, so they are not decoded)."""
        return " ".join(self.words())

    def _tokens(self) -> tuple[list[int], list[int]]:
        """(token ids, first frames) of the best path: its per-frame labels
        less one, collapsed the CTC way (repeats merged, blanks removed)."""
        if self._labels is None:
            raise RuntimeError("call finish() first: the best path of the graph is known only at the end")
        tokens, frames, prev = [], [], 1
        for t, label in enumerate(self._labels):
            if label != 1 and label != prev:
                tokens.append(label - 1)
                frames.append(t)
            prev = label
        return tokens, frames

    def best(self) -> list[int]:
        return self._tokens()[0]

    @property
    def frames(self) -> list[int]:
        return self._tokens()[1]
