"""Tests of the embedded corpus: text cleaning, TTS engines, degradation and
a tiny end-to-end build (deterministic and resumable)."""
from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings, strategies as st

from streamkd.cli import main as cli_main
from streamkd.corpus import voices as voices_mod
from streamkd.corpus.build import build_corpus, plan_corpus
from streamkd.corpus.degrade import (
    DegradeConfig, DegradeParams, apply_degradation, clip_safe, colored_noise,
    draw_degradation, reverb_ir, reverberate, trim_silence,
)
from streamkd.corpus.text import (
    FORTUNES_DIR, MAX_WORDS, MIN_WORDS, TextStats, entry_drop_reason, load_sentences,
    normalize_sentence, number_to_words, sentences_from_entries, split_sentences, strip_attributions,
)
from streamkd.corpus.voices import (
    ALL_VOICES, DEFAULT_TEST_VOICES, ENGINE_BINARIES, SAMPLE_RATE, SynthRequest, TTSError, Voice,
    check_engines, probe_voices, synthesize,
)
from streamkd.errors import DataError
from streamkd.manifest import read_manifest

SR = SAMPLE_RATE
_VALID = re.compile(r"^[A-Z]+('[A-Z]+)*( [A-Z]+('[A-Z]+)*)*$")


# ---------------------------------------------------------------- text
@pytest.mark.parametrize("n, words", [
    (0, "ZERO"), (7, "SEVEN"), (13, "THIRTEEN"), (40, "FORTY"), (42, "FORTY TWO"),
    (100, "ONE HUNDRED"), (105, "ONE HUNDRED FIVE"), (999, "NINE HUNDRED NINETY NINE"),
    (1000, "ONE THOUSAND"), (2023, "TWO THOUSAND TWENTY THREE"),
    (9999, "NINE THOUSAND NINE HUNDRED NINETY NINE"),
])
def test_number_to_words(n, words):
    assert number_to_words(n) == words


@pytest.mark.parametrize("bad", [-1, 10000, 3.5])
def test_number_to_words_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="0..9999"):
        number_to_words(bad)


@pytest.mark.parametrize("raw, expected", [
    ("It's 5 o'clock, isn't it?", "IT'S FIVE O'CLOCK ISN'T IT"),
    ("'Quoted' words, \"here\" -- and there!", "QUOTED WORDS HERE AND THERE"),
    ("A son-of-a-bitch and/or a friend.", "A SON OF A BITCH AND OR A FRIEND"),
    ("Caf\u00e9 society loves 1977 & 12 cats.", "CAFE SOCIETY LOVES ONE THOUSAND NINE HUNDRED SEVENTY SEVEN AND TWELVE CATS"),
    ("(2) Never trust a computer.", "NEVER TRUST A COMPUTER"),
    ("We give 110% every day.", "WE GIVE ONE HUNDRED TEN PERCENT EVERY DAY"),
])
def test_normalize_kept(raw, expected):
    assert normalize_sentence(raw) == (expected, "ok")


@pytest.mark.parametrize("raw, reason", [
    ("Hello there.", "too_short"),
    ("It sold 186282 copies last year.", "number_too_large"),
    ("Pi is about 3.14 or so.", "not_speech"),
    ("In the 20th century it was fine.", "not_speech"),
    ("Mail me at joe@example.com today.", "not_speech"),
    ("x = y + 1 in all cases", "not_speech"),
    (" ".join(["word"] * (MAX_WORDS + 1)), "too_long"),
])
def test_normalize_dropped(raw, reason):
    assert normalize_sentence(raw) == (None, reason)


def test_normalize_length_bounds_are_inclusive():
    assert normalize_sentence(" ".join(["go"] * MIN_WORDS))[1] == "ok"
    assert normalize_sentence(" ".join(["go"] * MAX_WORDS))[1] == "ok"
    assert normalize_sentence(" ".join(["go"] * (MIN_WORDS - 1)))[1] == "too_short"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_normalize_output_alphabet(raw):
    text, reason = normalize_sentence(raw)
    if text is None:
        assert reason in {"too_short", "too_long", "not_speech", "number_too_large"}
    else:
        assert _VALID.match(text), text
        assert MIN_WORDS <= len(text.split()) <= MAX_WORDS


@pytest.mark.parametrize("entry, reason", [
    ("This is b\bbo\bol\bld text, you see.", "overstrike"),
    ("<joshk> the plot thickens\n<asuffield> those aren't shell scripts", "irc_log"),
    ("Absent, adj.:\n\tExposed to the attacks of friends and acquaintances.", "dictionary"),
    ("interlard - vt., to intersperse; diversify", "dictionary"),
    ("   /\\_/\\\n  ( o.o )\n   > ^ <", "ascii_art"),
    ("A plain fortune about life. It is good.", None),
])
def test_entry_drop_reason(entry, reason):
    assert entry_drop_reason(entry) == reason


def test_strip_attributions_removes_continuations():
    entry = "Quoting is fun.\n\tReally it is.\n\t\t-- Mark Twain,\n\t\t   \"A Book\""
    body, removed = strip_attributions(entry)
    assert body == "Quoting is fun.\n\tReally it is."
    assert removed == 2


def test_split_sentences():
    text = "Mr. Smith went home. He slept!  Did he?\nYes, J. R. Bob did. Heading:\n\tBody text here."
    assert split_sentences(text) == [
        "Mr. Smith went home.", "He slept!", "Did he?", "Yes, J. R. Bob did.", "Heading", "Body text here.",
    ]


def test_drop_counts_add_up_and_dedup():
    entries = [
        ("a", "The cat sat on the mat. The cat sat on the mat!\n\t-- Someone"),
        ("a", "<nick> hello there folks"),
        ("b", "Tiny. A sentence with 99999 in it. A fine sentence for us."),
        ("b", "x\bx overstruck line here"),
    ]
    stats = TextStats()
    kept = sentences_from_entries(entries, stats)
    assert kept == ["THE CAT SAT ON THE MAT", "A FINE SENTENCE FOR US"]
    assert stats.entries_total == 4 == stats.entries_kept + sum(stats.entry_drops.values())
    assert stats.entry_drops == Counter({"irc_log": 1, "overstrike": 1})
    assert stats.sentence_candidates == 5 == stats.sentences_kept + sum(stats.sentence_drops.values())
    assert stats.sentence_drops == Counter({"duplicate": 1, "too_short": 1, "number_too_large": 1})
    assert stats.attribution_lines == 1


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="fortunes package not installed (make setup)")
def test_real_fortunes():
    sentences, stats = load_sentences()
    assert "ethnic" not in stats.files and "men-women" not in stats.files
    assert not any(f.endswith((".dat", ".u8")) for f in stats.files)
    assert stats.entries_total == stats.entries_kept + sum(stats.entry_drops.values())
    assert stats.sentence_candidates == stats.sentences_kept + sum(stats.sentence_drops.values())
    assert len(sentences) == len(set(sentences)) == stats.sentences_kept > 5000
    assert all(_VALID.match(s) and MIN_WORDS <= len(s.split()) <= MAX_WORDS for s in sentences)


def test_missing_fortunes_dir(tmp_path):
    with pytest.raises(DataError, match="make setup"):
        load_sentences(tmp_path / "nope")


# ---------------------------------------------------------------- voices
def _engine_voice(engine):
    if shutil.which(ENGINE_BINARIES[engine][0]) is None:
        pytest.skip(f"{ENGINE_BINARIES[engine][0]} not installed (make setup)")
    return [v for v in ALL_VOICES if v.engine == engine]


@pytest.mark.parametrize("engine", ["espeak", "flite", "festival"])
def test_engine_synthesises(engine, tmp_path):
    voices = _engine_voice(engine)
    for voice in voices[:1] + voices[-1:]:
        slow, fast = synthesize(voice, [SynthRequest("THE WEATHER IS NICE TODAY", 0.8, -2.0),
                                        SynthRequest("THE WEATHER IS NICE TODAY", 1.25, 2.0)])
        assert not isinstance(slow, Exception), slow
        path = tmp_path / f"{voice.name}.wav"
        sf.write(str(path), slow, SR, subtype="PCM_16")
        info = sf.info(str(path))
        assert (info.samplerate, info.channels) == (SR, 1)
        assert info.frames > 0.5 * SR
        assert np.sqrt(np.mean(slow ** 2)) > 0.01 and np.abs(slow).max() <= 1.0
        assert len(fast) < 0.9 * len(slow), f"{voice.name}: rate has no effect"


def test_all_voices_distinct_and_working():
    for engine in {v.engine for v in ALL_VOICES}:
        _engine_voice(engine)
    assert len({v.name for v in ALL_VOICES}) == len(ALL_VOICES) >= 12
    assert len({v.engine for v in ALL_VOICES if v.name in DEFAULT_TEST_VOICES}) == 3
    bogus = [Voice("espeak_bogus", "espeak", "en-zz+m1"), Voice("flite_bogus", "flite", "nosuch"),
             Voice("festival_bogus", "festival", "nosuch")]
    working, broken = probe_voices(list(ALL_VOICES) + bogus)
    assert [v.name for v in working] == [v.name for v in ALL_VOICES]
    assert set(broken) == {v.name for v in bogus}
    assert "espeak-ng --voices" in broken["espeak_bogus"] and "flite -lv" in broken["flite_bogus"]


def test_missing_engine_binary(monkeypatch):
    monkeypatch.setattr(voices_mod.shutil, "which", lambda name: None)
    with pytest.raises(TTSError, match=r"make setup.*apt-get install flite"):
        check_engines([v for v in ALL_VOICES if v.engine == "flite"])


# ---------------------------------------------------------------- degradation
def _tone(sec=1.0, amp=0.1):
    t = np.arange(int(sec * SR)) / SR
    return (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


@pytest.mark.parametrize("kind", ["white", "pink", "brown"])
@pytest.mark.parametrize("snr", [5.0, 17.5])
def test_noise_snr(kind, snr):
    x = _tone()
    params = DegradeParams(snr_db=snr, noise=kind)
    y = apply_degradation(x, params, SR, np.random.default_rng(0)).astype(np.float64)
    measured = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((y - x) ** 2))
    assert abs(measured - snr) < 0.1


def test_noise_colours():
    rng = np.random.default_rng(1)
    def low_high_ratio(kind):
        power = np.abs(np.fft.rfft(colored_noise(1 << 16, kind, rng))) ** 2
        k = power.size
        return power[k // 100:k // 10].mean() / power[k // 2:].mean()
    white, pink, brown = (low_high_ratio(k) for k in ("white", "pink", "brown"))
    assert 0.8 < white < 1.25 and pink > 4 and brown > 10 * pink


def test_reverb_decay_and_effect():
    rt60 = 0.4
    ir = reverb_ir(rt60, SR, np.random.default_rng(2))
    assert np.isclose(np.sum(ir ** 2), 1.0)
    # Energy 10 ms after the direct path vs. RT60/2 later: about 30 dB lower.
    win = int(0.02 * SR)
    e1 = np.sum(ir[160:160 + win] ** 2)
    e2 = np.sum(ir[160 + int(rt60 / 2 * SR):160 + int(rt60 / 2 * SR) + win] ** 2)
    assert 22 < 10 * np.log10(e1 / e2) < 38
    x = _tone(0.5)
    x[: SR // 4] = 0
    y = reverberate(x, ir)
    assert y.shape == x.shape
    assert np.isclose(np.sqrt(np.mean(y ** 2)), np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    assert np.corrcoef(x, y)[0, 1] < 0.99
    assert np.abs(y[: SR // 4]).max() < 1e-6  # causal: nothing before the onset


def test_clip_safe_and_trim():
    loud = np.array([0.1, -3.0, 2.0])
    assert np.abs(clip_safe(loud)).max() == pytest.approx(0.95)
    assert np.allclose(clip_safe(loud), loud * 0.95 / 3.0)
    quiet = np.array([0.1, -0.2])
    assert np.allclose(clip_safe(quiet), quiet)
    x = np.concatenate([np.zeros(SR), _tone(0.5), np.zeros(SR)])
    y = trim_silence(x, SR, keep_sec=0.1)
    assert abs(len(y) - int(0.7 * SR)) <= SR // 100
    assert np.abs(y[: SR // 20]).max() == 0  # the kept margin is the silence


def test_draw_degradation_respects_probabilities():
    rng = np.random.default_rng(3)
    none = [draw_degradation(DegradeConfig(noise_prob=0.0, reverb_prob=0.0), rng) for _ in range(50)]
    assert all(p == DegradeParams() for p in none)
    full = [draw_degradation(DegradeConfig(noise_prob=1.0, reverb_prob=1.0), rng) for _ in range(50)]
    cfg = DegradeConfig()
    assert all(cfg.snr_db[0] <= p.snr_db <= cfg.snr_db[1] and cfg.rt60_sec[0] <= p.rt60_sec <= cfg.rt60_sec[1] for p in full)


# ---------------------------------------------------------------- plan and build
_SENTENCES = [f"SENTENCE NUMBER {number_to_words(i)} IS HERE" for i in range(60)]


def test_plan_by_hours_and_disjoint():
    train_v = [v for v in ALL_VOICES if v.name not in DEFAULT_TEST_VOICES]
    test_v = [v for v in ALL_VOICES if v.name in DEFAULT_TEST_VOICES]
    plan = plan_corpus(_SENTENCES, train_v, test_v, hours=0.02, seed=5)
    assert plan == plan_corpus(_SENTENCES, train_v, test_v, hours=0.02, seed=5)
    assert plan != plan_corpus(_SENTENCES, train_v, test_v, hours=0.02, seed=6)
    for split, share in (("train", 0.8), ("dev", 0.1), ("test", 0.1)):
        est = [u.est_sec() for u in plan if u.split == split]
        target = share * 0.02 * 3600
        assert len(est) >= 3 and sum(est) >= target and (len(est) <= 3 or sum(est[:-1]) < target)
    assert len({u.text for u in plan}) == len(plan)
    assert {u.voice.name for u in plan if u.split == "test"} <= set(DEFAULT_TEST_VOICES)
    with pytest.raises(DataError, match="fewer hours"):
        plan_corpus(_SENTENCES[:5], train_v, test_v, hours=1.0, seed=0)


def test_a_smaller_corpus_tests_on_the_first_test_utterances_of_a_larger_one():
    """What lets the demo score the pretrained benchmark teacher on its own
    small corpus: with the same seed, the small corpus's test utterances are
    the first ones of the large corpus's test split (same text, voice, rate,
    pitch, degradation: same audio), and none of their sentences is in the
    large corpus's train or dev split."""
    sentences = [f"SENTENCE NUMBER {number_to_words(i)} IS HERE" for i in range(1000)]
    train_v = [v for v in ALL_VOICES if v.name not in DEFAULT_TEST_VOICES]
    test_v = [v for v in ALL_VOICES if v.name in DEFAULT_TEST_VOICES]
    small = [u for u in plan_corpus(sentences, train_v, test_v, hours=0.04, seed=0) if u.split == "test"]
    large = plan_corpus(sentences, train_v, test_v, hours=0.3, seed=0)
    large_test = [u for u in large if u.split == "test"]
    assert len(large_test) > len(small) >= 3
    assert small == large_test[:len(small)]
    assert not {u.text for u in small} & {u.text for u in large if u.split != "test"}


def _check_manifests(out: Path) -> dict[str, list]:
    rows = {s: read_manifest(out / f"{s}.jsonl") for s in ("train", "dev", "test")}
    for split, items in rows.items():
        assert len(items) >= 3, split
        for r in items:
            assert r.speaker and r.text
            assert {"engine", "rate", "pitch", "snr_db", "noise", "reverb", "seed"} <= r.extra.keys()
            assert r.audio_path.is_relative_to(out.absolute() / "wav" / split)
            info = sf.info(str(r.audio_path))
            assert (info.samplerate, info.channels, info.subtype) == (SR, 1, "PCM_16")
            assert r.duration == pytest.approx(info.frames / SR, abs=1e-3)
    speakers = {s: {r.speaker for r in items} for s, items in rows.items()}
    texts = {s: {r.text for r in items} for s, items in rows.items()}
    assert not speakers["test"] & (speakers["train"] | speakers["dev"])
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"]
    assert not texts["dev"] & texts["test"]
    return rows


def test_build_deterministic_and_resumable(tmp_path):
    for engine in ENGINE_BINARIES:
        _engine_voice(engine)
    voices = [v for v in ALL_VOICES if v.name in DEFAULT_TEST_VOICES or v.name in
              ("espeak_en-us_m1", "flite_slt", "festival_cmu_us_slt_arctic_hts")]
    kw = dict(sentences=_SENTENCES, voices=voices, max_utts=4, progress=False, log=lambda *a: None)
    first = build_corpus(tmp_path / "a", hours=0.005, seed=3, jobs=2, **kw)
    rows = _check_manifests(tmp_path / "a")
    assert first["made"] == sum(len(r) for r in rows.values()) and first["skipped"] == 0
    assert any(r.extra["snr_db"] is not None for s in rows.values() for r in s)
    wavs = {p: p.read_bytes() for p in (tmp_path / "a").rglob("*.wav")}
    manifests = {s: (tmp_path / "a" / f"{s}.jsonl").read_bytes() for s in rows}
    again = build_corpus(tmp_path / "a", hours=0.005, seed=3, jobs=1, **kw)
    assert again["made"] == 0 and again["skipped"] == first["made"]
    assert {p: p.read_bytes() for p in (tmp_path / "a").rglob("*.wav")} == wavs
    assert {s: (tmp_path / "a" / f"{s}.jsonl").read_bytes() for s in rows} == manifests
    fresh = build_corpus(tmp_path / "b", hours=0.005, seed=3, jobs=1, **kw)
    assert fresh["made"] == first["made"]
    for p, data in wavs.items():  # same audio whatever the scheduling
        assert (tmp_path / "b" / p.relative_to(tmp_path / "a")).read_bytes() == data
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["splits"]["test"]["voices"] == sorted({r.speaker for r in rows["test"]})


def test_cli_build_no_degrade(tmp_path):
    for engine in ENGINE_BINARIES:
        _engine_voice(engine)
    if not FORTUNES_DIR.is_dir():
        pytest.skip("fortunes package not installed (make setup)")
    out = tmp_path / "c"
    rc = cli_main(["corpus", "build", "--out", str(out), "--hours", "0.001", "--seed", "1",
                   "--jobs", "1", "--no-degrade", "--no-progress"])
    assert rc == 0
    rows = _check_manifests(out)
    assert all(r.extra["snr_db"] is None and r.extra["reverb"] is None for s in rows.values() for r in s)
    summary = json.loads((out / "summary.json").read_text())
    drops = summary["text"]["sentence_drops"]
    assert summary["text"]["sentence_candidates"] == summary["sentences_available"] + sum(drops.values())
