"""Word n-gram LM: building with KenLM, the scores the decoder uses, shallow
fusion in offline and streaming search, incremental partials, errors, and
the tune/report commands end to end. Tiny ARPA files are built here with the
real lmplz; a machine without it fails (run `make setup`), it does not skip."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from streamkd.decode import (CTCGreedySearch, CTCPrefixBeamSearch, PrefixText, SearchOptions, make_search,
                             token_texts)
from streamkd.errors import LMError
from streamkd.lm.build import LMText, build_lm, gather_text
from streamkd.lm.fusion import LMFusion, WordLM, load_lm
from streamkd.manifest import Utterance, write_manifest
from streamkd.tokenizer import CharTokenizer, SentencePieceTokenizer

from test_recognizer import SYMBOLS, feed, tiny_model, varied_audio

# Words spelled with the tiny model's letters a-f (test_recognizer.SYMBOLS).
LM_SENTENCES = ["bad cab", "a bad cab", "dad fed a cab", "a cab fed dad", "bead fad", "bad bead",
                "dad bade a cab", "a fad", "fed a bad cab", "cab dad"]


def _build(tmp_path, sentences, order=3):
    try:
        build_lm(tmp_path, LMText(sentences=list(sentences), sources=[{"kind": "test"}]), order=order)
    except LMError as err:
        if "make setup" in str(err):
            pytest.fail(f"KenLM is not installed: {err}")
        raise
    return tmp_path


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("lm"), LM_SENTENCES)


@pytest.fixture(scope="module")
def lm(lm_dir):
    return WordLM(lm_dir)


def _char_tok():
    return CharTokenizer(SYMBOLS)


def _peaky(ids: list[int], vocab: int, seed: int = 0, frames_per: int = 3, confidence: float = 4.0):
    """(T, V) log-probs that spell ``ids`` (blanks between), with noise so
    that other tokens keep some mass."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for tok in ids:
        for k in range(frames_per):
            logits = torch.randn(vocab, generator=g)
            logits[tok if k == 1 else 0] += confidence
            rows.append(logits)
    return torch.stack(rows).log_softmax(-1)


# -- building ---------------------------------------------------------------

def test_build_writes_arpa_binary_vocab_meta_and_holds_out_dev_test(tmp_path):
    train = [Utterance(f"tr{i}", "x.wav", 1.0, text, "s") for i, text in enumerate(LM_SENTENCES)]
    dev = [Utterance("dv0", "x.wav", 1.0, "bad cab", "s"), Utterance("dv1", "x.wav", 1.0, "dead face", "s")]
    write_manifest(tmp_path / "train.jsonl", train)
    write_manifest(tmp_path / "dev.jsonl", dev)
    text = gather_text([tmp_path / "train.jsonl"], [tmp_path / "dev.jsonl"])
    assert "bad cab" not in text.sentences and len(text.sentences) == len(LM_SENTENCES) - 1
    assert text.sources[0]["dropped_held_out"] == 1
    meta = build_lm(tmp_path / "lm", text, order=3)
    out = tmp_path / "lm"
    assert {p.name for p in out.iterdir()} == {"lm.arpa", "lm.bin", "vocab.txt", "meta.json"}
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["order"] == 3 and meta["excluded"]["distinct_sentences"] == 2
    assert meta["ngram_counts"]["1"] == meta["vocab_size"] + 3  # <s>, </s>, <unk>
    assert set((out / "vocab.txt").read_text().split()) == {w for s in text.sentences for w in s.split()}
    assert WordLM(out).order == 3
    # A dev manifest as text, or one sharing utterances with it, is refused.
    with pytest.raises(LMError, match="dev.jsonl.*must not be built from dev or test"):
        gather_text([tmp_path / "dev.jsonl"], [tmp_path / "dev.jsonl"])
    write_manifest(tmp_path / "copy.jsonl", dev[:1] + train[:2])
    with pytest.raises(LMError, match="copy.jsonl: 1 of its utterances"):
        gather_text([tmp_path / "copy.jsonl"], [tmp_path / "dev.jsonl"])
    with pytest.raises(LMError, match="--exclude"):
        gather_text([tmp_path / "train.jsonl"], [])


def test_cli_lm_build_from_corpus_folder(tmp_path, capsys):
    from streamkd.cli import main

    for name, texts in (("train", LM_SENTENCES), ("dev", ["bad cab"]), ("test", ["cab dad"])):
        write_manifest(tmp_path / f"{name}.jsonl",
                       [Utterance(f"{name}{i}", "x.wav", 1.0, t, "s") for i, t in enumerate(texts)])
    assert main(["lm", "build", "--corpus", str(tmp_path), "--out", str(tmp_path / "lm"), "--order", "3"]) == 0
    printed = capsys.readouterr().out
    assert "kept 8 of 10 (2 held out" in printed
    meta = json.loads((tmp_path / "lm" / "meta.json").read_text())
    assert meta["excluded"]["manifests"] == [str(tmp_path / "dev.jsonl"), str(tmp_path / "test.jsonl")]
    assert main(["lm", "build", "--text", str(tmp_path / "dev.jsonl"), "--exclude", str(tmp_path / "dev.jsonl"),
                 "--out", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "dev.jsonl" in err and "Traceback" not in err


# -- the scores the decoder uses ---------------------------------------------

@pytest.mark.parametrize("sentence", ["a bad cab", "dad fed a bad cab", "face bad", "cab"])
def test_decoder_lm_scores_equal_kenlm_query(lm, sentence):
    """Word by word through the tokens, as the search does it, against
    KenLM's own full-sentence query (with <s> and </s>); "face" is OOV."""
    tok = _char_tok()
    fusion = LMFusion.for_tokenizer(lm, tok, alpha=1.0, beta=0.0)
    ctx = fusion.start()
    closed = []
    for t in tok.encode(sentence):
        before = ctx.log10
        ctx = fusion.extend(ctx, t)
        if ctx.log10 != before:
            closed.append(ctx.log10 - before)
    end = fusion.finish(ctx)
    want = [s[0] for s in lm.model.full_scores(sentence, bos=True, eos=True)]
    assert end.words == len(sentence.split()) and len(closed) == end.words - 1
    assert closed == pytest.approx(want[: len(closed)], abs=1e-6)  # each word as KenLM scores it in context
    assert end.log10 == pytest.approx(lm.model.score(sentence, bos=True, eos=True), abs=1e-4)
    assert fusion.weight(end) == pytest.approx(math.log(10) * end.log10)


def test_sentencepiece_word_boundaries_give_the_same_lm_score(lm, tmp_path):
    sp = SentencePieceTokenizer.train(LM_SENTENCES * 20, "bpe", 20)
    fusion = LMFusion.for_tokenizer(lm, sp, alpha=1.0, beta=2.0)
    for sentence in ("dad fed a bad cab", "bead fad"):
        ctx = fusion.start()
        for t in sp.encode(sentence):
            ctx = fusion.extend(ctx, t)
        end = fusion.finish(ctx)
        assert end.words == len(sentence.split())
        assert end.log10 == pytest.approx(lm.model.score(sentence), abs=1e-4)


# -- fusion in the search ----------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
def test_zero_weights_equal_beam_search_without_lm(lm, seed):
    tok = _char_tok()
    g = torch.Generator().manual_seed(seed)
    lp = (2.5 * torch.randn(60, len(SYMBOLS), generator=g)).log_softmax(-1)
    opts = SearchOptions(beam=6, token_min_logp=-8.0, prune_logp=12.0)
    plain, fused = opts.factory(None)(), opts.factory(LMFusion.for_tokenizer(lm, tok, 0.0, 0.0))()
    for s in (plain, fused):
        s.step(lp)
        s.finish()
    assert plain.best() and fused.best() == plain.best() and fused.frames == plain.frames
    assert list(fused.scores().values()) == list(plain.scores().values())
    with_lm = opts.factory(LMFusion.for_tokenizer(lm, tok, 2.0, 1.0))()
    with_lm.step(lp)
    with_lm.finish()
    assert list(with_lm.scores().values()) != list(plain.scores().values())  # the LM is really in the scores


def test_lm_prefers_a_known_word_and_still_spells_an_oov_one(lm):
    tok = _char_tok()
    enc = tok.encode
    # "bad cab" acoustically ambiguous between "bad" and "bed" ("bed" slightly ahead)
    lp = _peaky(enc("bad cab"), len(SYMBOLS), confidence=6.0)
    a, e = SYMBOLS.index("a"), SYMBOLS.index("e")
    lp[4, e], lp[4, a] = math.log(0.55), math.log(0.45)
    lp = lp.log_softmax(-1)
    opts = SearchOptions(beam=8)
    plain = opts.factory(None)()
    plain.step(lp)
    plain.finish()
    assert tok.decode(plain.best()) == "bed cab"
    fused = opts.factory(LMFusion.for_tokenizer(lm, tok, 1.0, 0.0))()
    fused.step(lp)
    fused.finish()
    assert tok.decode(fused.best()) == "bad cab"
    # "face" is not in the LM's vocabulary: clear acoustics still spell it.
    assert "face" not in lm.vocab
    lp = _peaky(enc("a face"), len(SYMBOLS), confidence=8.0)
    fused = opts.factory(LMFusion.for_tokenizer(lm, tok, 0.5, 1.0))()
    fused.step(lp)
    fused.finish()
    assert tok.decode(fused.best()) == "a face"


def test_streaming_lm_decode_in_random_pieces_equals_offline(lm):
    tok = _char_tok()
    rng = np.random.default_rng(0)
    fusion = LMFusion.for_tokenizer(lm, tok, 0.8, 1.0)
    for seed in range(3):
        lp = _peaky(tok.encode("dad fed a bad cab bead"), len(SYMBOLS), seed=seed, confidence=2.5)
        offline = SearchOptions(beam=8).factory(fusion)()
        offline.step(lp)
        offline.finish()
        stream, text = SearchOptions(beam=8).factory(fusion)(), PrefixText(token_texts(SYMBOLS))
        start = 0
        while start < lp.size(0):
            n = int(rng.integers(1, 9))
            stream.step(lp[start:start + n])
            assert text.update(stream.best_node()) == tok.decode(stream.best())
            start += n
        stream.finish()
        assert stream.best() == offline.best() and stream.frames == offline.frames
        assert text.update(stream.best_node()) == tok.decode(offline.best())


def test_streaming_recognizer_with_lm_equals_offline_lm_decode(lm_dir):
    from streamkd.config import FeatureConfig
    from streamkd.features import Fbank
    from streamkd.streaming.recognizer import StreamingRecognizer

    model = tiny_model()
    samples = varied_audio(2.1, seed=5)
    feats = Fbank(FeatureConfig()).compute(samples)
    with torch.inference_mode():
        enc = model(feats[None], torch.tensor([feats.size(0)]))
        lp = model.ctc_log_probs(enc.out)[0, : int(enc.out_lens[0])]
    lm = WordLM(lm_dir)
    offline = SearchOptions().factory(LMFusion.for_tokenizer(lm, model.tokenizer))()
    offline.step(lp)
    offline.finish()
    rng = np.random.default_rng(1)
    rec = StreamingRecognizer(model, lm=lm_dir)
    assert rec.beam == 16 and (rec.fusion.alpha, rec.fusion.beta) == (lm.alpha, lm.beta)
    text = feed(rec, samples, list(rng.integers(1, 3000, size=40)),
                on_piece=lambda r: r.partial())
    assert rec.tokens() == offline.best() and text == model.tokenizer.decode(offline.best())


# -- incremental partials ----------------------------------------------------

@pytest.mark.parametrize("with_lm", [False, True])
def test_partial_costs_the_changed_tokens_not_the_transcript(request, with_lm):
    """Count the prefix-tree nodes PrefixText walks while a partial is shown
    after every frame of a long utterance: about one per emitted token
    (plus the re-ranked ones), not the transcript length per call."""
    tok = _char_tok()
    sentence = " ".join(["dad fed a bad cab"] * 40)
    lp = _peaky(tok.encode(sentence), len(SYMBOLS), confidence=7.0, frames_per=2)
    search = (SearchOptions(beam=4).factory(LMFusion.for_tokenizer(request.getfixturevalue("lm"), tok)) if with_lm
              else lambda: make_search(1))()
    text = PrefixText(token_texts(SYMBOLS))
    lengths = 0
    for t in range(lp.size(0)):
        search.step(lp[t:t + 1])
        shown = text.update(search.best_node())
        lengths += len(search.best())
        assert shown == tok.decode(search.best())
    n_tokens = len(tok.encode(sentence))
    assert len(search.best()) == n_tokens
    assert text.steps <= 3 * n_tokens  # linear in the tokens
    assert lengths > 100 * text.steps  # what re-decoding the whole prefix per call would cost


def test_recognizer_partial_is_incremental():
    from streamkd.streaming.recognizer import StreamingRecognizer

    rec = StreamingRecognizer(tiny_model())
    samples = varied_audio(3.0, seed=3)
    shown = []
    feed(rec, samples, 800, on_piece=lambda r: shown.append(r.partial() == r.tokenizer.decode(r.search.best())))
    assert shown and all(shown)
    assert rec._text.steps <= len(rec.tokens())  # greedy: each token shown is walked once


def test_greedy_and_beam_expose_a_best_node():
    lp = _peaky([1, 2, 3], len(SYMBOLS), confidence=6.0)
    for s in (CTCGreedySearch(), CTCPrefixBeamSearch(3)):
        s.step(lp)
        s.finish()
        assert [n.token for n in s.best_node().path()] == s.best() == [1, 2, 3]


# -- errors ------------------------------------------------------------------

def test_missing_corrupt_and_unspellable_lm_errors_name_the_file(lm_dir, tmp_path):
    tok = _char_tok()
    with pytest.raises(LMError, match="nowhere: no LM folder"):
        WordLM(tmp_path / "nowhere")
    bad = tmp_path / "corrupt"
    bad.mkdir()
    for name in ("meta.json", "vocab.txt"):
        (bad / name).write_bytes((lm_dir / name).read_bytes())
    with pytest.raises(LMError, match="lm.arpa: missing"):
        WordLM(bad)
    (bad / "lm.bin").write_bytes(b"not a language model at all" * 10)
    with pytest.raises(LMError, match=r"corrupt/lm\.bin: not a readable KenLM model"):
        WordLM(bad)
    (bad / "lm.bin").unlink()
    (bad / "lm.arpa").write_text("\\data\\\nngram 1=2\n\n\\1-grams:\n-1.0\t<s>\n")
    with pytest.raises(LMError, match=r"corrupt/lm\.arpa: not a readable KenLM model"):
        WordLM(bad)
    upper = _build(tmp_path / "upper", ["THE CAT SAT", "A CAT"])
    with pytest.raises(LMError, match=r"upper/vocab\.txt: 4 of 4 LM words cannot be spelled"):
        load_lm(upper, tok)
    (tmp_path / "upper" / "meta.json").unlink()
    with pytest.raises(LMError, match="meta.json: missing"):
        WordLM(upper)


def _write_checkpoint(model, path, data=None):
    from streamkd.checkpoint import inference_checkpoint, save_atomic
    from streamkd.config import Config

    cfg = Config(model=model.enc_cfg) if data is None else Config(model=model.enc_cfg, data=data)
    cmvn = {"mean": model.cmvn_mean.tolist(), "istd": model.cmvn_istd.tolist()}
    save_atomic(inference_checkpoint(cfg, model.state_dict(), model.tokenizer.state_dict(), cmvn), path)


def test_cli_bad_lm_is_a_short_error_without_traceback(lm_dir, tmp_path, capsys):
    from streamkd.cli import main

    ckpt = tmp_path / "student.pt"
    _write_checkpoint(tiny_model(), ckpt)
    upper = _build(tmp_path / "upper", ["THE CAT SAT", "A CAT"])
    wav = tmp_path / "a.wav"
    __import__("soundfile").write(str(wav), varied_audio(1.0), 16000)
    for argv, where in ((["decode", "--checkpoint", str(ckpt), "--manifest", str(tmp_path / "m.jsonl"),
                          "--lm", str(tmp_path / "none")], "none: no LM folder"),
                        (["decode", "--checkpoint", str(ckpt), "--manifest", str(tmp_path / "m.jsonl"),
                          "--lm", str(upper)], "upper/vocab.txt"),
                        (["stream", "--checkpoint", str(ckpt), "--lm", str(upper), str(wav)], "upper/vocab.txt")):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and where in err and "Traceback" not in err
    assert main(["stream", "--checkpoint", str(ckpt), "--lm", str(lm_dir), "--quiet", str(wav)]) == 0


# -- tune and report end to end ----------------------------------------------

def test_lm_tune_and_report_end_to_end(tiny_corpus, tiny_lang, tmp_path, capsys):
    """Untrained tiny teacher and student checkpoints of the tiny configs
    (the pipeline, not the numbers, is under test)."""
    from conftest import CONFIGS, data_overrides
    from streamkd.checkpoint import build_model, inference_checkpoint, save_atomic
    from streamkd.cli import main
    from streamkd.config import load_config

    tokenizer, cmvn = tiny_lang
    ckpts = {}
    for role, cfg_name in (("teacher", "tiny.yaml"), ("student", "tiny_student.yaml")):
        cfg = load_config(CONFIGS / cfg_name, data_overrides(tiny_corpus))
        torch.manual_seed(0)
        model = build_model(cfg, tokenizer, cmvn)
        ckpts[role] = tmp_path / f"{role}.pt"
        save_atomic(inference_checkpoint(cfg, model.state_dict(), tokenizer.state_dict(), cmvn), ckpts[role])
    lm_out = tmp_path / "lm"
    assert main(["lm", "build", "--corpus", str(tiny_corpus), "--out", str(lm_out), "--order", "3"]) == 0
    assert main(["lm", "tune", "--lm", str(lm_out), "--checkpoint", str(ckpts["teacher"]),
                 "--manifest", str(tiny_corpus / "test.jsonl")]) == 1
    assert "test manifest" in capsys.readouterr().err
    assert main(["lm", "tune", "--lm", str(lm_out), "--checkpoint", str(ckpts["teacher"]), "--alphas", "0.5,1",
                 "--betas", "0,2", "--beam", "4", "--max-utts", "3"]) == 0
    tune = json.loads((lm_out / "tune.json").read_text())
    assert len(tune["grid"]) == 4 and tune["utterances"] == 3
    assert (tune["alpha"], tune["beta"]) in {(g["alpha"], g["beta"]) for g in tune["grid"]}
    assert WordLM(lm_out).tuned
    out = tmp_path / "report"
    assert main(["lm", "report", "--lm", str(lm_out), "--teacher", str(ckpts["teacher"]),
                 "--student", str(ckpts["student"]), "--out", str(out), "--beam", "4", "--max-utts", "2"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["alpha"] == tune["alpha"] and result["lm_tuned"]
    for role in ("teacher", "student"):
        for split in ("dev", "test"):
            data = result["models"][role]["splits"][split]
            assert data["utterances"] == 2 and set(data["methods"]) == {"greedy", "beam", "beam_lm"}
            for m in data["methods"].values():
                assert m["rtf"] > m["search_rtf"] > 0 and 0 <= m["cer"]
                assert ("partials" in m) == (role == "student")
    table = (out / "table.md").read_text()
    assert table.count("| student |") == 6 and table.count("| teacher |") == 6
