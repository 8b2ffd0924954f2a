"""Endpointing from CTC blank frames: the three rules on hand-made frame
sequences, segments that partition the stream's tokens exactly, and
``streamkd stream --endpoint`` on two utterances with a pause."""
from __future__ import annotations

import json

import pytest
import soundfile as sf
import torch

from serve_model import SR, offline_text, talking_model, two_utterances
from streamkd.streaming.endpoint import NO_ENDPOINT, EndpointConfig, Endpointer, SegmentDecoder
from test_export import _write_checkpoint

FRAME_SEC = 0.04


def cuts(cfg: EndpointConfig, blank: list[bool], piece: int = 7) -> list[int]:
    """Absolute frame indices where ``Endpointer`` ends segments, fed in pieces."""
    ep, out, done = Endpointer(cfg, FRAME_SEC), [], 0
    for k in range(0, len(blank), piece):
        rest = blank[k:k + piece]
        while rest:
            i = ep.scan(rest)
            if i is None:
                break
            out.append(done + i)
            done, rest = done + i + 1, rest[i + 1:]
        done += len(rest)
    return out


def test_silence_after_speech_rule():
    cfg = EndpointConfig(silence_after_speech_sec=0.2, silence_no_speech_sec=None, max_segment_sec=None)
    speech, gap = [False] * 3, [True] * 5  # 5 blank frames = 0.2 s
    assert cuts(cfg, speech + gap + speech + gap[:4]) == [7]  # the second pause is one frame short
    assert cuts(cfg, [True] * 50) == []  # no speech: this rule never fires


def test_silence_without_speech_rule():
    cfg = EndpointConfig(silence_after_speech_sec=None, silence_no_speech_sec=0.4, max_segment_sec=None)
    assert cuts(cfg, [True] * 25) == [9, 19]  # every 10 blank frames a fresh segment
    assert cuts(cfg, [True] * 5 + [False] + [True] * 30) == []  # speech: only the other rule could fire


def test_max_segment_rule_cuts_on_a_blank_frame_only():
    cfg = EndpointConfig(silence_after_speech_sec=None, silence_no_speech_sec=None, max_segment_sec=0.2)
    assert cuts(cfg, [True] * 12) == [4, 9]  # 5 frames of 40 ms
    assert cuts(cfg, [False] * 12) == []  # no blank: the greedy collapse would split a token
    assert cuts(cfg, [False] * 6 + [True] + [False] * 6) == [6]
    assert cuts(NO_ENDPOINT, [False] * 100 + [True] * 1000) == []
    with pytest.raises(ValueError, match="max_segment_sec"):
        EndpointConfig(max_segment_sec=0)


def log_probs_for(ids: list[int], vocab: int = 4) -> torch.Tensor:
    """(T, V) log-probs whose best symbol per frame is ids[t]."""
    lp = torch.full((len(ids), vocab), -5.0)
    lp[torch.arange(len(ids)), torch.tensor(ids)] = -0.01
    return lp


def test_segments_partition_the_tokens_with_times_and_words():
    # tokens: 1 = 'a', 2 = 'b', 3 = ' '; blank 0
    symbols = {1: "a", 2: "b", 3: " "}
    decode = lambda ids: "".join(symbols[i] for i in ids).strip()  # noqa: E731
    ids = [1, 1, 0, 2, 3, 1, 0, 0, 0, 0, 0, 0, 2, 2, 0, 1, 0, 0, 0, 0, 0]
    cfg = EndpointConfig(silence_after_speech_sec=0.2, silence_no_speech_sec=None, max_segment_sec=None)
    dec = SegmentDecoder(decode, FRAME_SEC, cfg)
    closed = []
    for k in range(0, len(ids), 4):  # chunks of 4 frames
        closed += dec.push(log_probs_for(ids[k:k + 4]))
    assert [s.text for s in closed] == ["ab a", "ba"]
    assert dec.flush() is None  # the trailing blanks hold no token
    first, second = closed
    assert (first.start_sec, first.end_sec) == (0.0, pytest.approx(11 * FRAME_SEC))
    assert second.start_sec == first.end_sec and second.end_sec == pytest.approx(21 * FRAME_SEC)
    assert [w["word"] for w in first.words] == ["ab", "a"]
    assert first.words[0] == {"word": "ab", "start": 0.0, "end": pytest.approx(4 * FRAME_SEC)}
    assert second.words == [{"word": "ba", "start": pytest.approx(12 * FRAME_SEC),
                             "end": pytest.approx(16 * FRAME_SEC)}]
    assert dec.partial().index == 2 and dec.partial().text == ""


def test_max_segment_waits_for_a_word_boundary():
    # tokens: 1 = 'a', 2 = 'b', 3 = ' '; blank 0. The segment reaches its
    # 0.8 s (20 frames) inside a 22-frame word: it ends on the space after
    # it (frame 22), before the fallback for tokenizers without spaces (a
    # quarter longer: frame 24). The space's repeat in the next frame is
    # not a new token of the next segment.
    symbols = {1: "a", 2: "b", 3: " "}
    decode = lambda ids: "".join(symbols[i] for i in ids)  # noqa: E731
    ids = [1, 0, 2, 0] * 5 + [1, 0] + [3, 3, 0, 2, 0, 2, 0]
    cfg = EndpointConfig(silence_after_speech_sec=None, silence_no_speech_sec=None, max_segment_sec=0.8)
    dec = SegmentDecoder(decode, FRAME_SEC, cfg)
    closed = []
    for k in range(0, len(ids), 3):
        closed += dec.push(log_probs_for(ids[k:k + 3]))
    closed.append(dec.flush())
    assert [s.text for s in closed] == ["abababababa ", "bb"]
    assert closed[0].end_sec == pytest.approx(23 * FRAME_SEC)


def test_segments_with_a_beam_search_per_segment():
    from streamkd.decode import CTCPrefixBeamSearch, SearchOptions

    symbols = {1: "a", 2: "b", 3: " "}
    decode = lambda ids: "".join(symbols[i] for i in ids).strip()  # noqa: E731
    ids = [1, 1, 0, 2, 3, 1, 0, 0, 0, 0, 0, 0, 2, 2, 0, 1, 0, 0, 0, 0, 0]
    cfg = EndpointConfig(silence_after_speech_sec=0.2, silence_no_speech_sec=None, max_segment_sec=None)
    made = []

    def new_search():
        made.append(SearchOptions(4).factory(None)())
        return made[-1]

    dec = SegmentDecoder(decode, FRAME_SEC, cfg, new_search=new_search)
    closed = []
    for k in range(0, len(ids), 4):
        closed += dec.push(log_probs_for(ids[k:k + 4]))
    assert [s.text for s in closed] == ["ab a", "ba"]  # what the greedy segments hold on these peaks
    assert len(made) == 3 and all(isinstance(s, CTCPrefixBeamSearch) for s in made)


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_cli_stream_endpoint_splits_at_the_pause(tmp_path, capsys, backend):
    from streamkd.cli import main

    model = talking_model()
    ckpt = tmp_path / "student.pt"
    _write_checkpoint(model, ckpt)
    joined, first, _ = two_utterances(silence_sec=2.0)
    wav = tmp_path / "two.wav"
    sf.write(str(wav), joined, SR, subtype="FLOAT")
    argv = ["stream", "--checkpoint", str(ckpt), "--endpoint", "--json", str(tmp_path / "out.json"), str(wav)]
    if backend == "ort":
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "onnx")]) == 0
        argv += ["--backend", "ort", "--onnx", str(tmp_path / "onnx")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out.json").read_text())["files"][0]
    segments = result["segments"]
    assert len(segments) == 2 and first.size / SR + 1.1 <= segments[0]["end"] <= first.size / SR + 2.0
    assert " ".join(s["text"] for s in segments) == result["text"] == offline_text(model, joined)
    assert "[final" in printed and "segment 1:" in printed
    assert main(["stream", "--checkpoint", str(ckpt), "--endpoint", "--max-segment", "-1", str(wav)]) == 1
    assert "--max-segment" in capsys.readouterr().err
