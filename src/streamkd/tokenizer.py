"""Tokenizers: characters, or SentencePiece (BPE / unigram).

Both reserve id 0 for the CTC blank, written ``<blk>`` in tokens.txt, and
count it in ``vocab_size``. The word boundary is the symbol ``▁`` (U+2581)
in both: SentencePiece marks word starts with it, and the char tokenizer
uses it as its space symbol, so tokens.txt reads the same way for either and
sherpa-onnx turns ``▁`` back into spaces.

Text is not normalised here beyond collapsing runs of whitespace: casing and
punctuation are the corpus's business. A transcript the tokenizer cannot
encode raises TokenizerError naming the character and the text.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterable, Union

import sentencepiece as spm

from streamkd.atomic import write_atomic
from streamkd.config import TokenizerConfig
from streamkd.errors import TokenizerError

__all__ = [
    "BLANK",
    "SPACE",
    "CharTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "train_tokenizer",
    "tokenizer_from_state",
    "load_tokenizer",
]

BLANK = "<blk>"
SPACE = "\u2581"  # "▁", the word-boundary symbol
_UNK = "<unk>"
_META_FILE = "tokenizer.json"
_SP_MODEL_FILE = "tokenizer.model"


def _clean_text(text: str) -> str:
    """Check a transcript and collapse its whitespace."""
    if not isinstance(text, str):
        raise TokenizerError(f"expected a str transcript, got {type(text).__name__} {text!r}")
    if SPACE in text or BLANK in text:
        bad = SPACE if SPACE in text else BLANK
        raise TokenizerError(f"transcript {text!r} contains the reserved symbol {bad!r}; remove it")
    return " ".join(text.split())


class _TokenizerBase:
    """What both tokenizers share: blank at 0, tokens.txt, saving."""

    kind: str
    symbols: list[str]
    blank_id = 0

    @property
    def vocab_size(self) -> int:
        """Number of output symbols, blank included."""
        return len(self.symbols)

    def write_tokens_txt(self, path: str | Path) -> None:
        """``symbol id`` per line, id order; the format sherpa-onnx reads."""
        lines = [f"{sym} {i}\n" for i, sym in enumerate(self.symbols)]
        write_atomic(path, "".join(lines))



_ENGLISH = set("ABCDEFGHIJKLMNOPQRSTUVWXYZ'")


class CharTokenizer(_TokenizerBase):
    """One symbol per character; ``▁`` stands for the space between words.

    symbols: ["<blk>", then the characters]; symbols[i] has id i.
    """

    kind = "char"

    def __init__(self, symbols: list[str]) -> None:
        if not symbols or symbols[0] != BLANK:
            raise TokenizerError(f"char tokenizer symbols must start with {BLANK!r}, got {symbols[:3]!r}")
        bad = [s for s in symbols[1:] if len(s) != 1 or s.isspace()]
        if bad or len(set(symbols)) != len(symbols):
            raise TokenizerError(f"char tokenizer symbols must be distinct single non-space characters; bad: {bad[:5]!r}")
        self.symbols = list(symbols)
        self._ids = {s: i for i, s in enumerate(self.symbols)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        """The characters of ``texts`` (sorted, so training is deterministic).

        Upper-case English text (the embedded corpus, LibriSpeech) gets the
        whole alphabet, so that a held-out sentence with a letter the
        training text happens to lack can still be scored."""
        chars: set[str] = set()
        for text in texts:
            chars.update(cls._to_chars(_clean_text(text)))
        if not chars:
            raise TokenizerError("cannot train a char tokenizer: the training texts are empty")
        if chars <= _ENGLISH | {SPACE}:
            chars |= _ENGLISH
        return cls([BLANK] + sorted(chars))

    @staticmethod
    def _to_chars(text: str) -> str:
        return text.replace(" ", SPACE)

    def encode(self, text: str) -> list[int]:
        chars = self._to_chars(_clean_text(text))
        try:
            return [self._ids[c] for c in chars]
        except KeyError as err:
            raise TokenizerError(
                f"character {err.args[0]!r} (U+{ord(err.args[0]):04X}) in transcript {text!r} "
                "is not in the tokenizer's symbols; normalise the text or retrain the tokenizer"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        chars = [self.symbols[i] for i in ids if i != self.blank_id]
        return "".join(chars).replace(SPACE, " ").strip()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "symbols": list(self.symbols)}

    def save(self, lang_dir: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokens.txt`` into ``lang_dir``."""
        lang_dir = Path(lang_dir)
        write_atomic(lang_dir / _META_FILE, json.dumps(self.state_dict(), ensure_ascii=False))
        self.write_tokens_txt(lang_dir / "tokens.txt")


class SentencePieceTokenizer(_TokenizerBase):
    """A SentencePiece model whose id 0 is ``<blk>`` (a user-defined symbol)
    and id 1 ``<unk>``; no bos/eos. Ids are SentencePiece's own, so tokens.txt
    is its piece table as is."""

    def __init__(self, model_proto: bytes, kind: str) -> None:
        if kind not in ("bpe", "unigram"):
            raise TokenizerError(f"SentencePiece kind must be 'bpe' or 'unigram', got {kind!r}")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"not a valid SentencePiece model ({err})") from err
        self.kind = kind
        self._proto = bytes(model_proto)
        self.symbols = [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]
        if self.symbols[0] != BLANK or self._sp.unk_id() != 1:
            raise TokenizerError(f"SentencePiece model must have {BLANK!r} at id 0 and <unk> at 1; "
                                 "train it with streamkd")

    @classmethod
    def train(cls, texts: Iterable[str], kind: str, vocab_size: int) -> "SentencePieceTokenizer":
        """Train on ``texts``; ``vocab_size`` counts blank and <unk>."""
        sentences = [_clean_text(t) for t in texts]
        sentences = [s for s in sentences if s]
        if not sentences:
            raise TokenizerError("cannot train SentencePiece: the training texts are empty")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=model, model_type=kind,
                vocab_size=vocab_size, user_defined_symbols=[BLANK], unk_id=1, bos_id=-1,
                eos_id=-1, pad_id=-1, character_coverage=1.0,
                # identity: the char tokenizer does not normalise either.
                normalization_rule_name="identity", num_threads=1, minloglevel=2,
            )
        except RuntimeError as err:
            raise TokenizerError(
                f"SentencePiece {kind} training with vocab_size={vocab_size} failed: {err}; "
                "set data.tokenizer.vocab_size lower (or use more text)"
            ) from err
        return cls(model.getvalue(), kind)

    def encode(self, text: str) -> list[int]:
        clean = _clean_text(text)
        ids = self._sp.encode(clean)
        if self._sp.unk_id() in ids:
            # <unk> would teach the model to emit garbage; say which characters.
            pieces = self._sp.encode(clean, out_type=str)
            unknown = sorted({c for p, i in zip(pieces, ids) if i == self._sp.unk_id() for c in p})
            raise TokenizerError(
                f"character(s) {unknown!r} in transcript {text!r} are unknown to the "
                f"{self.kind} tokenizer; normalise the text or retrain the tokenizer"
            )
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids if i != self.blank_id])

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "model_proto": self._proto}

    def save(self, lang_dir: str | Path) -> None:
        """Write ``tokenizer.model``, ``tokenizer.json`` and ``tokens.txt``."""
        lang_dir = Path(lang_dir)
        write_atomic(lang_dir / _SP_MODEL_FILE, self._proto)
        meta = {"kind": self.kind, "model": _SP_MODEL_FILE}
        write_atomic(lang_dir / _META_FILE, json.dumps(meta))
        self.write_tokens_txt(lang_dir / "tokens.txt")


Tokenizer = Union[CharTokenizer, SentencePieceTokenizer]


def train_tokenizer(cfg: TokenizerConfig, texts: Iterable[str]) -> Tokenizer:
    """Train the tokenizer ``cfg`` asks for on the transcripts ``texts``."""
    if cfg.kind == "char":
        return CharTokenizer.train(texts)
    return SentencePieceTokenizer.train(texts, cfg.kind, cfg.vocab_size)


def tokenizer_from_state(state: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its ``state_dict()`` (as stored in checkpoints)."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "char" and isinstance(state.get("symbols"), list):
        return CharTokenizer(state["symbols"])
    if kind in ("bpe", "unigram") and isinstance(state.get("model_proto"), (bytes, bytearray)):
        return SentencePieceTokenizer(bytes(state["model_proto"]), kind)
    raise TokenizerError(f"not a tokenizer state (kind {kind!r}); expected the output of state_dict()")


def load_tokenizer(lang_dir: str | Path) -> Tokenizer:
    """Load the tokenizer that ``save(lang_dir)`` (``streamkd prepare``) wrote."""
    lang_dir = Path(lang_dir)
    meta_path = lang_dir / _META_FILE
    if not meta_path.is_file():
        raise TokenizerError(f"{meta_path}: no tokenizer here; run `streamkd prepare` to create {lang_dir}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenizerError(f"{meta_path}: not valid JSON ({err}); re-run `streamkd prepare`") from err
    if isinstance(meta, dict) and meta.get("kind") in ("bpe", "unigram"):
        model_path = lang_dir / str(meta.get("model", _SP_MODEL_FILE))
        if not model_path.is_file():
            raise TokenizerError(f"{model_path}: SentencePiece model missing; re-run `streamkd prepare`")
        return SentencePieceTokenizer(model_path.read_bytes(), meta["kind"])
    try:
        return tokenizer_from_state(meta)
    except TokenizerError as err:
        raise TokenizerError(f"{meta_path}: {err}") from err
