import pickle

import pytest
import sentencepiece as spm

from streamkd.config import TokenizerConfig
from streamkd.errors import TokenizerError
from streamkd.tokenizer import (BLANK, SPACE, CharTokenizer, SentencePieceTokenizer, load_tokenizer,
                                tokenizer_from_state, train_tokenizer)

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a streaming student learns from a full context teacher",
    "chunks of audio arrive one after another",
    "hello world",
] * 5


def _read_tokens_txt(path):
    rows = [line.rsplit(" ", 1) for line in path.read_text(encoding="utf-8").splitlines()]
    return [(sym, int(i)) for sym, i in rows]


def test_char_round_trip_and_symbols(tmp_path):
    tok = train_tokenizer(TokenizerConfig(kind="char"), TEXTS)
    assert tok.blank_id == 0 and tok.symbols[0] == BLANK and SPACE in tok.symbols
    chars = set("".join(TEXTS).replace(" ", ""))
    assert tok.vocab_size == len(chars) + 2  # blank and the space symbol
    ids = tok.encode("hello  world ")
    assert 0 not in ids and len(ids) == len("hello world")
    assert ids[5] == tok.symbols.index(SPACE)
    assert tok.decode(ids) == "hello world"
    assert tok.decode([0] + ids + [0]) == "hello world"  # blanks ignored


def test_char_unknown_character_names_char_and_text():
    tok = CharTokenizer.train(["abc"])
    with pytest.raises(TokenizerError, match=r"'z'.*'abz'"):
        tok.encode("abz")
    with pytest.raises(TokenizerError, match="reserved"):
        tok.encode(f"a{SPACE}b")
    with pytest.raises(TokenizerError, match="empty"):
        CharTokenizer.train(["", "  "])


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_sentencepiece_round_trip(kind):
    tok = train_tokenizer(TokenizerConfig(kind=kind, vocab_size=40), TEXTS)
    assert tok.vocab_size == 40 and tok.blank_id == 0 and tok.symbols[:2] == [BLANK, "<unk>"]
    for text in ("the lazy fox", "hello world", "a teacher"):
        ids = tok.encode(text)
        assert ids and 0 not in ids and 1 not in ids
        assert tok.decode(ids) == text
    with pytest.raises(TokenizerError, match=r"\['Z'\].*'Zebra'"):
        tok.encode("Zebra")


def test_sentencepiece_vocab_too_large_is_a_clear_error():
    with pytest.raises(TokenizerError, match="vocab_size=5000.*lower"):
        train_tokenizer(TokenizerConfig(kind="unigram", vocab_size=5000), TEXTS[:2])


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_state_dict_round_trip(kind):
    tok = train_tokenizer(TokenizerConfig(kind=kind, vocab_size=36), TEXTS)
    state = pickle.loads(pickle.dumps(tok.state_dict()))  # as a checkpoint would store it
    if kind == "bpe":
        assert isinstance(state["model_proto"], bytes)
    again = tokenizer_from_state(state)
    assert again.symbols == tok.symbols and type(again) is type(tok)
    assert again.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    with pytest.raises(TokenizerError, match="not a tokenizer state"):
        tokenizer_from_state({"kind": "word"})


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_and_tokens_txt(tmp_path, kind):
    tok = train_tokenizer(TokenizerConfig(kind=kind, vocab_size=36), TEXTS)
    tok.save(tmp_path / "lang")
    loaded = load_tokenizer(tmp_path / "lang")
    assert loaded.symbols == tok.symbols and loaded.encode("hello world") == tok.encode("hello world")
    rows = _read_tokens_txt(tmp_path / "lang" / "tokens.txt")
    assert rows[0] == (BLANK, 0)
    assert [i for _, i in rows] == list(range(tok.vocab_size))
    assert all(" " not in sym for sym, _ in rows)
    if kind == "bpe":
        sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "lang" / "tokenizer.model"))
        assert [sym for sym, _ in rows] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        assert any(sym.startswith(SPACE) for sym, _ in rows)
    else:
        assert (SPACE, tok.symbols.index(SPACE)) in rows


def test_load_tokenizer_missing_dir_says_what_to_do(tmp_path):
    with pytest.raises(TokenizerError, match="streamkd prepare"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "tokenizer.json").write_text('{"kind": "bpe", "model": "gone.model"}')
    with pytest.raises(TokenizerError, match="gone.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="model"):
        SentencePieceTokenizer(b"not a model", "bpe")


def test_char_tokenizer_of_english_text_covers_the_alphabet():
    from streamkd.tokenizer import CharTokenizer

    tok = CharTokenizer.train(["AB BA", "ABBA'S"])
    assert tok.decode(tok.encode("ZEBRA QUIZ")) == "ZEBRA QUIZ"
    lower = CharTokenizer.train(["ab ba"])  # not upper-case English: only what was seen
    assert "z" not in lower.symbols and "Z" not in lower.symbols
