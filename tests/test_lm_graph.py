"""The HLG decoding graph (kaldilm + kaldifst) and sherpa-onnx decoding the
tiny exported model with it: the graph's paths and costs against KenLM,
sherpa-onnx's FST decode against its greedy decode, and the errors for a
missing, corrupt or mismatched graph."""
from __future__ import annotations

import json
import math

import kaldifst
import pytest
import soundfile as sf

from streamkd.errors import LMError
from streamkd.lm.graph import GRAPH_FILE, GRAPH_META_FILE, GraphWeights, build_graph, check_graph
from streamkd.streaming.export import export_wenet_ctc_onnx
from streamkd.streaming.ort import SherpaStreamingRecognizer
from streamkd.tokenizer import SPACE, CharTokenizer
from streamkd.types import ChunkConfig

from test_lm import LM_SENTENCES, _build
from test_recognizer import SR, SYMBOLS, tiny_model, varied_audio


@pytest.fixture(scope="module")
def graph_lm(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("lm"), LM_SENTENCES)


def _frames(text: str) -> list[int]:
    """Graph input labels (token id + 1) of a CTC path spelling ``text``:
    each token for two frames, a blank between tokens."""
    tok = CharTokenizer(SYMBOLS)
    labels = [1]
    for i in tok.encode(text):
        labels += [i + 1, i + 1, 1]
    return labels


def _best(graph_dir, labels):
    """(word ids, cost) of the best path of HLG over the frame labels, or None."""
    hlg = kaldifst.StdVectorFst.read(str(graph_dir / GRAPH_FILE))
    path = kaldifst.compose(kaldifst.make_linear_acceptor(labels), hlg)
    best = kaldifst.shortest_path(path)
    if best.num_states == 0:
        return None
    ok, _, words, weight = kaldifst.get_linear_symbol_sequence(best)
    assert ok
    return words, weight.value


def test_graph_spells_lm_words_only_and_costs_are_the_weighted_kenlm_score(graph_lm, tmp_path):
    import kenlm

    weights = GraphWeights(alpha=0.7, beta=0.4)
    meta = build_graph(graph_lm, CharTokenizer(SYMBOLS), tmp_path, weights=weights)
    assert meta["tokens"] == SYMBOLS and meta["arcs"] > 0
    ids = {w: int(i) for w, i in (line.split() for line in (tmp_path / "words.txt").read_text().splitlines())}
    model = kenlm.Model(str(graph_lm / "lm.arpa"))
    for sentence in ["bad cab", "dad fed a cab", "a fad"]:
        words, cost = _best(tmp_path, _frames(sentence))
        assert words == [ids[w] for w in sentence.split()]
        # -ln P(sentence, with </s>) times alpha, less beta per word; the
        # graph may take a cheaper back-off path, never a dearer one.
        want = -weights.alpha * math.log(10) * model.score(sentence) - weights.beta * len(sentence.split())
        assert cost <= want + 1e-3 and cost == pytest.approx(want, abs=0.05)
    # Two words need a space between them; unknown words have no path.
    assert _best(tmp_path, _frames("badcab")) is None
    assert _best(tmp_path, _frames("bad ace")) is None


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    export_wenet_ctc_onnx(tiny_model(ChunkConfig(4, 2)), out)
    return out


def _decode(rec, samples) -> str:
    rec.reset()
    for i in range(0, samples.size, 1600):
        rec.accept_waveform(samples[i:i + 1600], SR)
    return rec.finalize()


def test_sherpa_onnx_with_graph_decodes_the_export(export_dir, tmp_path):
    samples = varied_audio(3.0, seed=21)
    greedy = _decode(SherpaStreamingRecognizer(export_dir), samples)
    words = greedy.split()
    assert len(words) >= 2, greedy
    tok = CharTokenizer(SYMBOLS)
    # An LM of the greedy words, weights 0: the graph allows the per-frame
    # best path, so the FST decode must give the greedy text exactly.
    lm_dir = _build(tmp_path / "lm", [" ".join(words), *LM_SENTENCES])
    build_graph(lm_dir, tok, tmp_path / "g0", weights=GraphWeights(0.0, 0.0))
    assert _decode(SherpaStreamingRecognizer(export_dir, graph=tmp_path / "g0"), samples) == greedy
    # Without the greedy text's first word the graph must spell something else, from the LM's words only.
    lm_dir = _build(tmp_path / "lm2", [" ".join(w for w in words if w != words[0]) or "a", *LM_SENTENCES])
    build_graph(lm_dir, tok, tmp_path / "g1", weights=GraphWeights(0.0, 0.0))
    text = _decode(SherpaStreamingRecognizer(export_dir, graph=tmp_path / "g1"), samples)
    vocab = set((lm_dir / "vocab.txt").read_text().split())
    assert text != greedy and text and set(text.split()) <= vocab


def test_missing_corrupt_or_foreign_graph_is_an_error_naming_the_file(graph_lm, export_dir, tmp_path, capsys):
    from streamkd.cli import main

    with pytest.raises(LMError, match=GRAPH_FILE):
        SherpaStreamingRecognizer(export_dir, graph=tmp_path)
    build_graph(graph_lm, CharTokenizer(SYMBOLS), tmp_path, weights=GraphWeights(1.0, 0.0))
    good = (tmp_path / GRAPH_FILE).read_bytes()
    (tmp_path / GRAPH_FILE).write_bytes(b"not an fst" + good[:50])
    with pytest.raises(LMError, match=f"{tmp_path / GRAPH_FILE}: not an OpenFst file"):
        check_graph(tmp_path, SYMBOLS)
    for cut in (len(good) // 2, len(good) - 4):  # sherpa-onnx would crash on these
        (tmp_path / GRAPH_FILE).write_bytes(good[:cut])
        with pytest.raises(LMError, match=f"{tmp_path / GRAPH_FILE}: .*truncated"):
            check_graph(tmp_path, SYMBOLS)
    (tmp_path / GRAPH_FILE).write_bytes(good)
    assert check_graph(tmp_path, SYMBOLS) == tmp_path / GRAPH_FILE
    meta = json.loads((tmp_path / GRAPH_META_FILE).read_text())
    (tmp_path / GRAPH_META_FILE).write_text(json.dumps({**meta, "tokens": SYMBOLS[:-1]}))
    with pytest.raises(LMError, match=f"{tmp_path / GRAPH_META_FILE}: .*other tokens"):
        check_graph(tmp_path, SYMBOLS)
    wav = tmp_path / "a.wav"
    sf.write(str(wav), varied_audio(1.0, seed=3), SR)
    argv = ["stream", "--backend", "sherpa", "--onnx", str(export_dir), "--lm", str(tmp_path / "none"), str(wav)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'none' / GRAPH_FILE}: missing" in err and "Traceback" not in err
    assert main(argv[:-1] + ["--lm-alpha", "0.3", str(wav)]) == 1
    assert "baked into HLG.fst" in capsys.readouterr().err


def test_sentencepiece_words_need_no_space_token(graph_lm, tmp_path):
    """A tokenizer without a separate space token: words follow each other."""
    from streamkd.lm.graph import compose_hlg

    class Pieces:  # ▁ + word as one piece, like a SentencePiece vocabulary of whole words
        kind = "bpe"
        symbols = ["<blk>"] + [SPACE + w for w in ("a", "bad", "cab", "dad", "fed")]

        def encode(self, word):
            return [self.symbols.index(SPACE + word)]

    vocab = ["a", "bad", "cab", "dad", "fed"]
    g_text = "0 1 1 1 0.5\n1 2 3 3 0.5\n2 0\n"  # a two-word G: "a cab"
    hlg, table = compose_hlg(Pieces(), vocab, g_text, GraphWeights(1.0, 0.0))
    frames = [1, 2, 2, 1, 4, 1]  # blank a a blank cab blank (labels id + 1)
    best = kaldifst.shortest_path(kaldifst.compose(kaldifst.make_linear_acceptor(frames), hlg))
    ok, _, words, weight = kaldifst.get_linear_symbol_sequence(best)
    assert ok and words == [table["a"], table["cab"]] and weight.value == pytest.approx(1.0)


def test_cli_lm_graph_then_stream_with_sherpa(graph_lm, export_dir, tmp_path, capsys):
    from streamkd.cli import main

    lang = tmp_path / "lang"
    CharTokenizer(SYMBOLS).save(lang)
    assert main(["lm", "graph", "--lm", str(graph_lm), "--lang", str(lang), "--out", str(tmp_path / "g"),
                 "--lm-alpha", "0.6", "--lm-beta", "0.2"]) == 0
    assert "states" in capsys.readouterr().out
    meta = json.loads((tmp_path / "g" / GRAPH_META_FILE).read_text())
    assert (meta["alpha"], meta["beta"], meta["order"]) == (0.6, 0.2, 3)
    wav = tmp_path / "a.wav"
    sf.write(str(wav), varied_audio(2.0, seed=5), SR)
    out = tmp_path / "s.json"
    assert main(["stream", "--backend", "sherpa", "--onnx", str(export_dir), "--lm", str(tmp_path / "g"),
                 "--quiet", "--json", str(out), str(wav)]) == 0
    text = json.loads(out.read_text())["files"][0]["text"]
    assert text and set(text.split()) <= set((graph_lm / "vocab.txt").read_text().split())


def test_cli_lm_runtimes_decodes_the_same_files_through_every_runtime(graph_lm, export_dir, tiny_manifest,
                                                                      tmp_path, capsys):
    from streamkd.cli import main
    from test_lm import _write_checkpoint

    ckpt = tmp_path / "student.pt"
    _write_checkpoint(tiny_model(ChunkConfig(4, 2)), ckpt)  # the exported model (same seed)
    build_graph(graph_lm, CharTokenizer(SYMBOLS), tmp_path / "g", weights=GraphWeights(0.5, 0.0))
    manifest, _ = tiny_manifest(3, name="dev.jsonl")
    out = tmp_path / "runtimes.json"
    assert main(["lm", "runtimes", "--checkpoint", str(ckpt), "--onnx", str(export_dir), "--lm", str(graph_lm),
                 "--graph", str(tmp_path / "g"), "--manifest", str(manifest), "--beam", "4", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["pytorch greedy", "pytorch beam + LM", "onnxruntime beam + LM", "sherpa-onnx greedy",
                          "sherpa-onnx HLG"]
    assert all(r["utterances"] == 3 and r["rtf"] > 0 for r in rows.values())
    # Our two recognizers run the same search on the same log-probs.
    same = ("wer", "cer", "substitutions", "deletions", "insertions")
    assert [rows["pytorch beam + LM"][k] for k in same] == [rows["onnxruntime beam + LM"][k] for k in same]
    assert "| sherpa-onnx HLG |" in out.with_suffix(".md").read_text()
    assert main(["lm", "runtimes", "--checkpoint", str(ckpt), "--onnx", str(export_dir), "--lm", str(graph_lm),
                 "--graph", str(tmp_path / "g"), "--manifest", str(manifest), "--only", "nope",
                 "--out", str(out)]) == 1
    assert "unknown runtime" in capsys.readouterr().err
