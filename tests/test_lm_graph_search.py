"""Offline decoding over the HLG graph (kaldi-decoder's FasterDecoder):
words spelled by log-probs, the exact best path of the graph as oracle,
``decode --graph`` against greedy decoding, and a missing graph."""
from __future__ import annotations

import json
import math

import kaldifst
import pytest
import torch

from streamkd.lm.graph import GRAPH_FILE, GraphWeights, build_graph
from streamkd.lm.graph_search import GraphDecoder, HLGraph
from streamkd.tokenizer import CharTokenizer
from streamkd.types import ChunkConfig

from test_lm import LM_SENTENCES, _build, _write_checkpoint
from test_lm_graph import _frames, export_dir  # noqa: F401 (a fixture)
from test_recognizer import SYMBOLS, tiny_model


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory):
    lm = _build(tmp_path_factory.mktemp("lm"), LM_SENTENCES)
    out = tmp_path_factory.mktemp("graph")
    build_graph(lm, CharTokenizer(SYMBOLS), out, weights=GraphWeights(0.8, 0.5))
    return out


def _log_probs(labels: list[int], p_best: float = 0.6) -> torch.Tensor:
    """(T, V) log-probs whose per-frame best token is label - 1."""
    lp = torch.full((len(labels), len(SYMBOLS)), math.log((1 - p_best) / (len(SYMBOLS) - 1)))
    lp[torch.arange(len(labels)), torch.tensor(labels) - 1] = math.log(p_best)
    return lp


def _decode(decoder: GraphDecoder, log_probs: torch.Tensor, pieces=(None,)):
    search = decoder.new_search()
    start = 0
    for size in pieces:  # the decoder advances frame by frame: any split gives the same path
        end = log_probs.size(0) if size is None else start + size
        search.step(log_probs[start:end])
        start = end
    search.finish()
    return search


def test_log_probs_spelling_lm_words_decode_to_those_words(graph_dir):
    decoder = GraphDecoder(HLGraph(graph_dir, SYMBOLS))
    tok = CharTokenizer(SYMBOLS)
    for sentence in ["bad cab", "dad fed a cab", "a fad"]:
        labels = _frames(sentence)
        search = _decode(decoder, _log_probs(labels), pieces=(3, 5, None))
        assert search.words() == sentence.split() and search.reached_final
        assert tok.decode(search.best()) == sentence  # the tokens of the path spell the same words
        assert search.frames == [t for t in range(1, len(labels), 3)][: len(search.best())]
    # A misspelt word is decoded as the LM word nearest in the acoustics, never as letters.
    search = _decode(decoder, _log_probs(_frames("bad cae"), p_best=0.4))
    assert search.words() == ["bad", "cab"]


def _exact_best_words(graph_dir, log_probs: torch.Tensor) -> list[str]:
    """The graph's best path over the log-probs without pruning: the
    composition of a per-frame acceptor (every label, cost -log p) with HLG."""
    frames = kaldifst.StdVectorFst()
    for _ in range(log_probs.size(0) + 1):
        frames.add_state()
    frames.start = 0
    frames.set_final(state=log_probs.size(0), weight=0)
    for t, row in enumerate(log_probs.tolist()):
        for token, lp in enumerate(row):
            frames.add_arc(state=t, arc=kaldifst.StdArc(token + 1, token + 1, -lp, t + 1))
    hlg = kaldifst.StdVectorFst.read(str(graph_dir / GRAPH_FILE))
    best = kaldifst.shortest_path(kaldifst.compose(frames, hlg))
    ok, _, word_ids, _ = kaldifst.get_linear_symbol_sequence(best)
    assert ok
    graph = HLGraph(graph_dir, SYMBOLS)
    return [graph.words[i] for i in word_ids]


def test_wide_beam_finds_the_exact_best_path_of_the_graph(graph_dir):
    decoder = GraphDecoder(HLGraph(graph_dir, SYMBOLS), beam=1e4, max_active=1_000_000)
    gen = torch.Generator().manual_seed(0)
    differs = 0
    for trial in range(6):  # noisy spellings of LM sentences: the LM has to choose
        labels = _frames(LM_SENTENCES[trial])
        lp = torch.log_softmax(_log_probs(labels) + 1.5 * torch.randn(len(labels), len(SYMBOLS), generator=gen), -1)
        words = _decode(decoder, lp, pieces=(7, None)).words()
        assert words == _exact_best_words(graph_dir, lp)
        differs += words != LM_SENTENCES[trial].split()
    assert differs > 0  # the noise did make the search choose


def test_search_shared_out_to_processes_gives_the_rows_of_one_process(graph_dir):
    from streamkd.decode import AcousticScores, search_scores

    decoder = GraphDecoder(HLGraph(graph_dir, SYMBOLS))
    gen = torch.Generator().manual_seed(1)
    ids, refs, lps = [], [], []
    for k in range(14):  # noisy spellings, of different lengths, in no particular order
        sentence = LM_SENTENCES[(5 * k) % len(LM_SENTENCES)]
        labels = _frames(sentence)
        lps.append(torch.log_softmax(_log_probs(labels) + 1.2 * torch.randn(len(labels), len(SYMBOLS),
                                                                              generator=gen), -1))
        ids.append(f"utt{(5 * k) % 14:02d}")
        refs.append(sentence)
    scores = AcousticScores(ids, refs, lps, [1.0] * 14, 0.0, [])
    made = []  # searches created in this process

    def new_search():
        made.append(1)
        return decoder.new_search()

    tok = CharTokenizer(SYMBOLS)
    one, _ = search_scores(scores, tok, new_search, workers=1)
    assert len(made) == 14 and [r["id"] for r in one] == sorted(ids)
    assert any(r["hyp"] != r["ref"] for r in one) and any(r["hyp"] == r["ref"] for r in one)
    shared, _ = search_scores(scores, tok, new_search, workers=3)
    assert shared == one
    assert len(made) == 14  # every search of the second call ran in a forked process


def test_cli_decode_graph_with_weight_zero_is_greedy_and_missing_graph_is_an_error(make_wav, tmp_path, capsys):
    from streamkd.cli import main
    from streamkd.manifest import Utterance, write_manifest

    ckpt = tmp_path / "student.pt"
    _write_checkpoint(tiny_model(ChunkConfig(4, 2)), ckpt)
    manifest = tmp_path / "dev.jsonl"  # transcripts in the tiny model's letters
    write_manifest(manifest, [Utterance(f"u{k}", str(make_wav(f"u{k}.wav", 1.5 + k / 4, seed=k)), 1.5 + k / 4,
                                        LM_SENTENCES[k], "spk") for k in range(3)])
    base = ["decode", "--checkpoint", str(ckpt), "--manifest", str(manifest)]
    assert main(base + ["--out", str(tmp_path / "greedy")]) == 0
    greedy = [" ".join(line.split("HYP: ", 1)[1].split()) for line in
              (tmp_path / "greedy" / "hyps.txt").read_text().splitlines() if "\tHYP: " in line]
    assert len(greedy) == 3 and any(greedy), greedy
    # An LM of the greedy texts and weights 0: the per-frame best path is in
    # the graph and has the lowest cost, so the graph decode is the greedy text.
    lm = _build(tmp_path / "lm", [t for t in greedy if t] + LM_SENTENCES)
    build_graph(lm, CharTokenizer(SYMBOLS), tmp_path / "g0", weights=GraphWeights(0.0, 0.0))
    assert main(base + ["--graph", str(tmp_path / "g0"), "--out", str(tmp_path / "hlg"), "--jobs", "2"]) == 0
    summary = json.loads((tmp_path / "hlg" / "summary.json").read_text())
    assert summary["graph"]["alpha"] == 0.0 and summary["graph"]["max_active"] == 3000
    hyps = [line.split("HYP: ", 1)[1] for line in (tmp_path / "hlg" / "hyps.txt").read_text().splitlines()
            if "\tHYP: " in line]
    assert hyps == greedy
    capsys.readouterr()
    assert main(base + ["--graph", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'none' / GRAPH_FILE}: missing" in err and "Traceback" not in err
    assert main(base + ["--graph", str(tmp_path / "g0"), "--lm", str(lm)]) == 1
    assert "drop --lm" in capsys.readouterr().err
    assert main(base + ["--graph", str(tmp_path / "g0"), "--jobs", "0"]) == 1
    err = capsys.readouterr().err
    assert "--jobs 0: give 1 or more processes" in err and "Traceback" not in err


def test_same_words_as_sherpa_onnx_fst_decoder_on_the_export(export_dir, tmp_path):
    """The exported model streamed through sherpa-onnx with the graph, and
    the PyTorch model's log-probs of the same audio decoded offline over the
    same graph. sherpa-onnx appends ``tail_sec`` of silence at the end, so
    the offline side gets it too; sherpa's text is built from tokens (a
    double space where the path has two ``▁``), ours from words."""
    import numpy as np

    from streamkd.features import FeatureConfig, Fbank
    from streamkd.streaming.ort import SherpaStreamingRecognizer
    from test_lm_graph import _decode as sherpa_decode
    from test_recognizer import SR, varied_audio

    model, tok = tiny_model(ChunkConfig(4, 2)), CharTokenizer(SYMBOLS)
    samples = varied_audio(3.0, seed=3)
    rec = SherpaStreamingRecognizer(export_dir)
    greedy = sherpa_decode(rec, samples)
    padded = np.concatenate([samples, np.zeros(int(round(rec.tail_sec * SR)), np.float32)])
    feats = Fbank(FeatureConfig()).compute(padded)
    with torch.inference_mode():
        enc = model(feats[None], torch.tensor([feats.size(0)]))
        log_probs = model.ctc_log_probs(enc.out)[0, : int(enc.out_lens[0])]
    # The LM lacks the greedy text's first word: the graph must choose other words.
    words = greedy.split()
    lm = _build(tmp_path / "lm", [" ".join(w for w in words if w != words[0]), *LM_SENTENCES])
    build_graph(lm, tok, tmp_path / "g", weights=GraphWeights(0.5, 0.0))
    sherpa = " ".join(sherpa_decode(SherpaStreamingRecognizer(export_dir, graph=tmp_path / "g"), samples).split())
    ours = " ".join(_decode(GraphDecoder(HLGraph(tmp_path / "g", SYMBOLS)), log_probs).words())
    assert sherpa != " ".join(words) and ours == sherpa
