"""CTC searches against brute-force oracles; WER scoring."""
import itertools
import math

import pytest
import torch

from streamkd.decode import CTCGreedySearch, CTCPrefixBeamSearch, error_rates, make_search


def _collapse(path, blank=0):
    out, prev = [], blank
    for p in path:
        if p != blank and p != prev:
            out.append(p)
        prev = p
    return tuple(out)


def _brute_force_best(log_probs):
    """Most probable label sequence, summing over all alignments."""
    T, V = log_probs.shape
    scores = {}
    for path in itertools.product(range(V), repeat=T):
        lp = sum(float(log_probs[t, v]) for t, v in enumerate(path))
        key = _collapse(path)
        scores[key] = float(torch.logaddexp(torch.tensor(scores.get(key, -math.inf)), torch.tensor(lp)))
    return max(scores.items(), key=lambda kv: kv[1])[0]


def test_greedy_collapses_repeats_and_blanks():
    ids = [0, 1, 1, 0, 1, 2, 2, 0, 0, 3]
    lp = torch.full((len(ids), 4), -10.0)
    lp[torch.arange(len(ids)), torch.tensor(ids)] = 0.0
    s = CTCGreedySearch()
    s.step(lp)
    assert s.best() == [1, 1, 2, 3]
    assert s.frames == [1, 4, 5, 9]


def test_greedy_chunked_equals_whole():
    torch.manual_seed(0)
    lp = torch.randn(50, 6).log_softmax(-1)
    whole = CTCGreedySearch()
    whole.step(lp)
    pieces = CTCGreedySearch()
    for a, b in [(0, 1), (1, 7), (7, 7), (7, 30), (30, 50)]:
        pieces.step(lp[a:b])
    assert pieces.best() == whole.best() and pieces.frames == whole.frames


@pytest.mark.parametrize("seed", range(6))
def test_prefix_beam_search_finds_the_most_probable_labelling(seed):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(5, 3, generator=g) * 2).log_softmax(-1)
    search = CTCPrefixBeamSearch(beam=50, blank_skip=1.0)
    search.step(lp)
    assert tuple(search.best()) == _brute_force_best(lp)


def test_prefix_beam_chunked_equals_whole_and_beam1_close_to_greedy():
    torch.manual_seed(1)
    lp = (torch.randn(40, 5) * 3).log_softmax(-1)
    whole = CTCPrefixBeamSearch(beam=4)
    whole.step(lp)
    pieces = CTCPrefixBeamSearch(beam=4)
    for a in range(0, 40, 7):
        pieces.step(lp[a:a + 7])
    assert pieces.best() == whole.best()
    assert len(pieces.frames) == len(pieces.best())
    assert isinstance(make_search(1), CTCGreedySearch)
    assert isinstance(make_search(3), CTCPrefixBeamSearch)


def test_reset_starts_over():
    lp = torch.tensor([[-5.0, 0.0, -5.0]]).log_softmax(-1)
    for s in (CTCGreedySearch(), CTCPrefixBeamSearch(3)):
        s.step(lp)
        s.reset()
        assert s.best() == []
        s.step(lp)
        assert s.best() == [1]


def test_error_rates_counts_edits():
    r = error_rates(["A B C D", "E F"], ["A X C", "E F G"])
    # one substitution, one deletion, one insertion over 6 reference words
    assert (r["substitutions"], r["deletions"], r["insertions"], r["words"]) == (1, 1, 1, 6)
    assert r["wer"] == pytest.approx(3 / 6)
    with pytest.raises(ValueError):
        error_rates(["A"], [])


def test_by_speaker_scores_each_voice_on_its_own_utterances(tmp_path):
    from streamkd.decode import by_speaker
    from streamkd.manifest import Utterance, write_manifest

    utts = [Utterance(f"u{i}", f"{i}.wav", 1.0, "A B", spk) for i, spk in enumerate(["x", "x", "y"])]
    write_manifest(tmp_path / "m.jsonl", utts)
    rows = [{"id": "u0", "ref": "A B", "hyp": "A B"}, {"id": "u1", "ref": "A B", "hyp": "A C"},
            {"id": "u2", "ref": "A B", "hyp": ""}]
    got = by_speaker(rows, tmp_path / "m.jsonl")
    assert list(got) == ["x", "y"]
    assert (got["x"]["wer"], got["x"]["utterances"], got["x"]["words"]) == (0.25, 2, 4)
    assert (got["y"]["wer"], got["y"]["cer"]) == (1.0, 1.0)
