"""A word n-gram LM for CTC prefix beam search (shallow fusion).

``WordLM`` loads a folder that ``streamkd lm build`` wrote and answers
word-by-word queries with KenLM. ``LMFusion`` ties it to a tokenizer and
the fusion weights: a prefix's score is

    log P_ctc(prefix) + alpha * ln P_lm(complete words) + beta * (number of words)

where ``P_lm`` is the product of the LM's conditional word probabilities
(KenLM gives log10; converted to natural log so alpha weighs like for like).
A word counts as complete when the next word starts (a ``▁`` token) and,
at the end of the utterance, with the sentence end ``</s>``. Words the LM
does not know are not forbidden: KenLM scores them with its ``<unk>``
probability (lmplz gives ``<unk>`` the interpolated unigram mass it left
over), so an out-of-vocabulary word can still be spelled out by tokens.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import kenlm

from streamkd.errors import LMError
from streamkd.lm.build import ARPA_FILE, BINARY_FILE, META_FILE, TUNE_FILE, VOCAB_FILE
from streamkd.tokenizer import SPACE

__all__ = ["WordLM", "LMFusion", "LMContext", "DEFAULT_ALPHA", "DEFAULT_BETA", "load_lm"]

LN10 = math.log(10.0)
# Used until `streamkd lm tune` writes tune.json: mid-range values that
# helped in a first trial (docs/lm.md); tuning on dev replaces them.
DEFAULT_ALPHA = 0.5
DEFAULT_BETA = 1.0
_CACHE_ENTRIES = 200_000  # memoised word queries kept (a few tens of MB)


class WordLM:
    """A KenLM model from an LM folder (``lm.bin``, else ``lm.arpa``), its
    vocabulary and its tuned weights (``tune.json``, when present)."""

    def __init__(self, lm_dir: str | Path) -> None:
        self.dir = Path(lm_dir)
        if not self.dir.is_dir():
            raise LMError(f"{self.dir}: no LM folder here; build one with `streamkd lm build --out {self.dir}`")
        self.meta = _read_json(self.dir / META_FILE, required=True)
        path = self.dir / BINARY_FILE
        if not path.is_file():
            path = self.dir / ARPA_FILE
        if not path.is_file():
            raise LMError(f"{path}: missing (neither {BINARY_FILE} nor {ARPA_FILE} is in {self.dir}); "
                          "rebuild with `streamkd lm build`")
        try:
            self.model = kenlm.Model(str(path))
        except (OSError, RuntimeError, ValueError) as err:
            raise LMError(f"{path}: not a readable KenLM model ({_first_line(err)}); rebuild with `streamkd lm build`") from None
        self.path = path
        self.order = self.model.order
        self.vocab = self._read_vocab()
        tune = _read_json(self.dir / TUNE_FILE, required=False)
        self.alpha = float(tune.get("alpha", DEFAULT_ALPHA)) if tune else DEFAULT_ALPHA
        self.beta = float(tune.get("beta", DEFAULT_BETA)) if tune else DEFAULT_BETA
        self.tuned = bool(tune)
        self._cache: dict = {}

    def _read_vocab(self) -> list[str]:
        path = self.dir / VOCAB_FILE
        if not path.is_file():
            raise LMError(f"{path}: missing; rebuild the LM with `streamkd lm build`")
        try:
            return path.read_text(encoding="utf-8").split()
        except UnicodeDecodeError as err:
            raise LMError(f"{path}: not UTF-8 text ({err}); rebuild the LM") from None

    def begin(self):
        """The state at the start of a sentence (after ``<s>``)."""
        state = kenlm.State()
        self.model.BeginSentenceWrite(state)
        return state

    def word(self, state, word: str):
        """(log10 P(word | state), next state); memoised (searches ask often)."""
        key = (state, word)
        hit = self._cache.get(key)
        if hit is None:
            out = kenlm.State()
            hit = (self.model.BaseScore(state, word, out), out)
            if len(self._cache) >= _CACHE_ENTRIES:  # bounded memory on endless streams
                self._cache.clear()
            self._cache[key] = hit
        return hit

    def check_spellable(self, symbols: list[str], source: str = "the model") -> None:
        """LMError naming vocab.txt when some LM words cannot be written with
        the token ``symbols`` (such words could never be decoded)."""
        bad = [w for w in self.vocab if not _spellable(SPACE + w, set(symbols[1:]))]
        if bad:
            raise LMError(f"{self.dir / VOCAB_FILE}: {len(bad)} of {len(self.vocab)} LM words cannot be spelled with "
                          f"the tokens of {source} (e.g. {bad[:3]!r}); build the LM from text normalised like the "
                          "model's transcripts")


def _spellable(word: str, symbols: set[str]) -> bool:
    """Whether ``word`` splits into symbols, with or without its leading ``▁``
    (a char tokenizer writes the boundary as its own symbol)."""
    longest = max(map(len, symbols), default=0)
    reach = [True] + [False] * len(word)  # reach[i]: word[:i] can be spelled
    for i in range(len(word)):
        if reach[i] or (i == 1 and word[0] == SPACE):
            for j in range(i + 1, min(len(word), i + longest) + 1):
                if word[i:j] in symbols:
                    reach[j] = True
    return reach[-1]


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _read_json(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise LMError(f"{path}: missing; this folder was not written by `streamkd lm build`")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LMError(f"{path}: not valid JSON ({err}); rebuild or delete it") from None
    if not isinstance(data, dict):
        raise LMError(f"{path}: expected a JSON object")
    return data


def load_lm(lm_dir: str | Path, tokenizer, source: str = "the model") -> WordLM:
    """A WordLM whose vocabulary the tokenizer's symbols can spell (else LMError)."""
    lm = WordLM(lm_dir)
    lm.check_spellable(list(tokenizer.symbols), source)
    return lm


class LMContext(NamedTuple):
    """What the LM knows about a prefix: the KenLM state after its complete
    words, their summed log10 probability and count, and the word being
    spelled (not scored yet)."""
    state: object
    log10: float
    words: int
    open_word: str


@dataclass
class LMFusion:
    """Shallow fusion of a WordLM into CTC prefix beam search over the
    tokens of ``symbols`` (id -> symbol; id 0 the blank). A symbol starting
    with ``▁`` starts a word (a bare ``▁`` is the char tokenizer's space)."""

    lm: WordLM
    symbols: list[str]
    alpha: float
    beta: float

    def __post_init__(self) -> None:
        # id -> (starts a word, the letters it adds)
        self._pieces = [(s.startswith(SPACE), s[1:] if s.startswith(SPACE) else s) for s in self.symbols]

    @classmethod
    def for_tokenizer(cls, lm: WordLM, tokenizer, alpha: Optional[float] = None,
                      beta: Optional[float] = None) -> "LMFusion":
        """Weights default to the LM folder's tuned ones (tune.json)."""
        return cls(lm, list(tokenizer.symbols), lm.alpha if alpha is None else float(alpha),
                   lm.beta if beta is None else float(beta))

    def start(self) -> LMContext:
        return LMContext(self.lm.begin(), 0.0, 0, "")

    def extend(self, ctx: LMContext, token: int) -> LMContext:
        """The context after appending ``token``; completes a word when the
        token starts the next one."""
        starts, letters = self._pieces[token]
        if not starts:
            return ctx._replace(open_word=ctx.open_word + letters)
        ctx = self._close(ctx)
        return ctx._replace(open_word=letters)

    def _close(self, ctx: LMContext) -> LMContext:
        if not ctx.open_word:
            return ctx
        log10, state = self.lm.word(ctx.state, ctx.open_word)
        return LMContext(state, ctx.log10 + log10, ctx.words + 1, "")

    def finish(self, ctx: LMContext) -> LMContext:
        """The context at the end of the utterance: the last word and ``</s>``
        scored (``</s>`` adds no word bonus)."""
        ctx = self._close(ctx)
        log10, state = self.lm.word(ctx.state, "</s>")
        return LMContext(state, ctx.log10 + log10, ctx.words, "")

    def weight(self, ctx: LMContext) -> float:
        """alpha * ln P_lm + beta * words (natural-log units, added to the CTC score)."""
        return self.alpha * LN10 * ctx.log10 + self.beta * ctx.words
