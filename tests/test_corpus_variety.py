"""Voice variety of the embedded corpus: the extra voices and the speaker
factor, and that neither changes a corpus built without them."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import soundfile as sf

from streamkd.cli import main as cli_main
from streamkd.config import ConfigError
from streamkd.corpus.build import build_corpus, plan_corpus, respeak_manifest
from streamkd.corpus.text import number_to_words
from streamkd.corpus.voices import (
    ALL_VOICES, DEFAULT_TEST_VOICES, ENGINE_BINARIES, ENGINE_SHARE, EXTRA_VOICES, MORE_VOICES, SAMPLE_RATE,
    SynthRequest, TTSError, check_speaker_perturb, perturb_speaker, probe_voices, synthesize,
)
from streamkd.errors import UsageError
from streamkd.experiment import ensure_corpus, load_grid
from streamkd.manifest import read_manifest

SR = SAMPLE_RATE
_SENTENCES = [f"SENTENCE NUMBER {number_to_words(i)} IS HERE" for i in range(300)]
_TRAIN = [v for v in ALL_VOICES if v.name not in DEFAULT_TEST_VOICES]
_TEST = [v for v in ALL_VOICES if v.name in DEFAULT_TEST_VOICES]


def _need(*engines: str) -> None:
    for engine in engines:
        if shutil.which(ENGINE_BINARIES[engine][0]) is None:
            pytest.skip(f"{ENGINE_BINARIES[engine][0]} not installed (make setup)")


def _f0_hz(x: np.ndarray) -> float:
    """Median F0 of the loud, periodic 40 ms frames (autocorrelation peak
    between 60 and 400 Hz)."""
    hop = int(0.04 * SR)
    frames = [x[i:i + hop] - x[i:i + hop].mean() for i in range(0, len(x) - hop, hop)]
    energy = np.array([np.mean(f ** 2) for f in frames])
    f0s = []
    for frame, e in zip(frames, energy):
        if e < 0.1 * energy.max():
            continue
        ac = np.correlate(frame, frame, "full")[hop - 1:]
        lag = SR // 400 + int(np.argmax(ac[SR // 400:SR // 60]))
        if ac[lag] > 0.4 * ac[0]:
            f0s.append(SR / lag)
    assert len(f0s) >= 10, "too few voiced frames to measure F0"
    return float(np.median(f0s))


# ---------------------------------------------------------------- speaker factor
@pytest.mark.parametrize("alpha", [0.85, 1.1, 1.15])
def test_perturb_speaker_scales_length_and_frequency(alpha):
    t = np.arange(SR) / SR
    tone = (0.3 * np.sin(2 * np.pi * 200.0 * t)).astype(np.float32)
    y = perturb_speaker(tone, alpha, SR)
    assert y.dtype == np.float32 and abs(len(y) - SR / alpha) <= 2
    n = 1 << 18  # zero-padded FFT: 0.06 Hz bins
    peak_hz = np.argmax(np.abs(np.fft.rfft(y * np.hanning(len(y)), n))) * SR / n
    assert peak_hz == pytest.approx(200.0 * alpha, abs=0.5)


@pytest.mark.parametrize("voice", [ALL_VOICES[0], next(v for v in ALL_VOICES if v.name == "flite_slt"),
                                   EXTRA_VOICES[0]], ids=lambda v: v.name)
def test_speaker_alpha_shifts_pitch_and_keeps_the_speaking_rate(voice):
    _need(voice.engine)
    text = "THE WEATHER IS NICE TODAY AND I LIKE IT VERY MUCH"
    alphas = (0.87, 1.0, 1.15)
    low, plain, high = synthesize(voice, [SynthRequest(text, 1.0, 0.0, a) for a in alphas])
    for alpha, audio in ((0.87, low), (1.15, high)):
        # Resampling alone would make the duration ratio 1 / alpha (1.15 or 0.87).
        assert len(audio) / len(plain) == pytest.approx(1.0, abs=0.05), voice.name
        assert _f0_hz(audio) / _f0_hz(plain) == pytest.approx(alpha, rel=0.05), voice.name


@pytest.mark.parametrize("bounds", [(1.2, 0.9), (0.0, 1.1), (-1.0, 1.0), (0.3, 1.0), (0.9, 2.5),
                                    (0.9,), (0.8, 0.9, 1.0), (math.nan, 1.0)])
def test_bad_speaker_factors_are_refused_by_name(bounds):
    with pytest.raises(UsageError, match="^--speaker-perturb .*MIN,MAX"):
        check_speaker_perturb(bounds, "--speaker-perturb")
    with pytest.raises(UsageError, match="^speaker_perturb"):
        plan_corpus(_SENTENCES, _TRAIN, _TEST, hours=0.01, seed=0, speaker_perturb=bounds)
    assert check_speaker_perturb((0.9, 0.9), "x") == (0.9, 0.9)


@pytest.mark.parametrize("value", ["1.2,0.9", "0,1.1", "abc", "0.9"])
def test_cli_refuses_a_bad_speaker_perturb(tmp_path, capsys, value):
    rc = cli_main(["corpus", "build", "--out", str(tmp_path / "c"), "--hours", "0.001",
                   "--speaker-perturb", value, "--no-progress"])
    assert rc == 1
    assert "--speaker-perturb" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before anything is built


# ---------------------------------------------------------------- extra voices
def test_extra_voices_work_and_are_not_default():
    _need("festival")
    working, broken = probe_voices(EXTRA_VOICES)
    assert [v.name for v in working] == [v.name for v in EXTRA_VOICES] and not broken
    names = {v.name for v in ALL_VOICES}
    assert not names & {v.name for v in EXTRA_VOICES}
    assert not {v.spec for v in EXTRA_VOICES} & {v.spec for v in ALL_VOICES if v.name in DEFAULT_TEST_VOICES}


# ---------------------------------------------------------------- more voices (make voices)
def test_more_voices_work_are_not_default_and_follow_rate_and_pitch():
    _need("festival", "mbrola", "pico")
    working, broken = probe_voices(MORE_VOICES)
    assert not broken and [v.name for v in working] == [v.name for v in MORE_VOICES]
    assert not {v.name for v in ALL_VOICES + EXTRA_VOICES} & {v.name for v in MORE_VOICES}
    assert {v.engine for v in MORE_VOICES} <= set(ENGINE_SHARE)
    text = "THE WEATHER IS NICE TODAY AND I LIKE IT VERY MUCH"
    for voice in (MORE_VOICES[0], next(v for v in MORE_VOICES if v.engine == "pico"),
                  next(v for v in MORE_VOICES if v.spec == "us2_mbrola")):
        plain, fast, high = synthesize(voice, [SynthRequest(text), SynthRequest(text, rate=1.3),
                                               SynthRequest(text, pitch=4.0)])
        assert len(fast) / len(plain) == pytest.approx(1 / 1.3, rel=0.12), voice.name
        ratio = _f0_hz(high) / _f0_hz(plain)
        if voice.engine == "mbrola":  # espeak-ng's 0-99 pitch scale: the shift is approximate
            assert 1.1 < ratio < 1.5, (voice.name, ratio)
        else:
            assert ratio == pytest.approx(2 ** (4 / 12), rel=0.08), voice.name


def test_more_voices_must_all_work(tmp_path, monkeypatch):
    """A corpus asked for the more voices is not built silently without some."""
    import streamkd.corpus.build as build

    def probe(voices):
        return [v for v in voices if v.engine != "pico"], {v.name: "pico2wave: not found"
                                                           for v in voices if v.engine == "pico"}
    monkeypatch.setattr(build, "probe_voices", probe)
    with pytest.raises(TTSError, match="--more-voices: 2 of them .*make voices"):
        build_corpus(tmp_path / "c", 0.01, 0, jobs=1, sentences=_SENTENCES, more_voices=True, progress=False,
                     log=lambda *_: None)
    assert not list((tmp_path / "c").glob("*.jsonl"))


def test_more_engines_keep_the_default_shares():
    """Engines a corpus lacks drop out of the draw: the default voices keep 0.5 / 0.3 / 0.2."""
    rng_draws = plan_corpus(_SENTENCES, _TRAIN, _TEST, hours=0.15, seed=3)
    engines = [u.voice.engine for u in rng_draws if u.split == "train"]
    assert set(engines) == {"espeak", "flite", "festival"}
    more = plan_corpus(_SENTENCES, _TRAIN + list(MORE_VOICES), _TEST, hours=0.15, seed=3)
    assert {u.voice.engine for u in more if u.split == "train"} == set(ENGINE_SHARE)
    # Test speaks with the same held-out voices, so its utterances are the same files.
    assert [u.audio for u in more if u.split == "test"] == [u.audio for u in rng_draws if u.split == "test"]


# ---------------------------------------------------------------- the plan
def test_default_plan_of_seed_0_is_pinned():
    """Values of the plan before the options existed: a corpus built with the
    defaults must keep its utterances and its wav names."""
    plan = plan_corpus(_SENTENCES[:60], _TRAIN, _TEST, hours=0.02, seed=0)
    assert len(plan) == 43
    assert [(u.text, u.voice.name, u.rate, u.pitch, u.audio) for u in plan[:4]] == [
        ("SENTENCE NUMBER SIXTEEN IS HERE", "flite_rms", 0.944, -2.75, "wav/test/test-000000-c159671455.wav"),
        ("SENTENCE NUMBER TWENTY SEVEN IS HERE", "festival_kal_diphone", 1.045, 1.81,
         "wav/test/test-000001-f12e2b0059.wav"),
        ("SENTENCE NUMBER TWENTY IS HERE", "espeak_en-gb-x-gbcwmd_f2", 0.991, 0.61,
         "wav/test/test-000002-9513f2d167.wav"),
        ("SENTENCE NUMBER EIGHT IS HERE", "festival_kal_diphone", 1.151, -1.07, "wav/test/test-000003-eb922961fb.wav"),
    ]
    train = [u for u in plan if u.split == "train"][:3]
    assert [(u.voice.name, u.rate, u.pitch, u.audio) for u in train] == [
        ("espeak_en-us-nyc_f3", 1.066, -1.07, "wav/train/train-000010-40a61efc10.wav"),
        ("flite_kal16", 0.98, -2.16, "wav/train/train-000011-c70420a7ea.wav"),
        ("espeak_en-gb_klatt2", 0.951, -1.74, "wav/train/train-000012-6ee59d4c13.wav"),
    ]
    assert all(u.speaker_alpha is None for u in plan)


def test_options_change_train_and_dev_only():
    plain = plan_corpus(_SENTENCES, _TRAIN, _TEST, hours=0.1, seed=4)
    perturbed = plan_corpus(_SENTENCES, _TRAIN, _TEST, hours=0.1, seed=4, speaker_perturb=(0.85, 1.15))
    both = plan_corpus(_SENTENCES, _TRAIN + list(EXTRA_VOICES), _TEST, hours=0.1, seed=4,
                       speaker_perturb=(0.85, 1.15))
    for plan in (perturbed, both):
        assert [u for u in plan if u.split == "test"] == [u for u in plain if u.split == "test"]
    assert len(perturbed) == len(plain)
    for a, b in zip(plain, perturbed):
        if b.split == "test":
            continue
        assert 0.85 <= b.speaker_alpha <= 1.15
        assert (a.text, a.voice, a.rate, a.pitch, a.degrade) == (b.text, b.voice, b.rate, b.pitch, b.degrade)
        assert a.audio != b.audio  # the factor is in the wav's name
    alphas = [u.speaker_alpha for u in perturbed if u.split != "test"]
    assert len(set(alphas)) > len(alphas) // 2 and min(alphas) < 0.95 and max(alphas) > 1.05
    train_voices = {u.voice.name for u in both if u.split == "train"}
    assert EXTRA_VOICES[0].name in train_voices and not train_voices & set(DEFAULT_TEST_VOICES)


# ---------------------------------------------------------------- the build
def _small_build(out, **options):
    voices = [v for v in ALL_VOICES if v.name in DEFAULT_TEST_VOICES or v.name in ("espeak_en-us_m1", "flite_slt")]
    return build_corpus(out, hours=0.004, seed=2, jobs=1, sentences=_SENTENCES[:60], voices=voices, max_utts=3,
                        progress=False, log=lambda *a: None, **options)


def test_build_records_the_options_and_keeps_test_audio(tmp_path):
    _need(*ENGINE_BINARIES)
    plain = _small_build(tmp_path / "plain")
    varied = _small_build(tmp_path / "varied", extra_voices=True, speaker_perturb=(0.9, 1.1))
    assert (plain["extra_voices"], plain["speaker_perturb"]) == (False, None)
    assert (varied["extra_voices"], varied["speaker_perturb"]) == (True, [0.9, 1.1])
    assert plain["voices_per_engine"]["train"] == {"espeak": 1, "flite": 1}
    assert varied["voices_per_engine"] == {"train": {"espeak": 1, "flite": 1, "festival": 1},
                                           "test": {"espeak": 1, "flite": 1, "festival": 1}}
    on_disk = json.loads((tmp_path / "varied" / "summary.json").read_text())
    assert on_disk["speaker_perturb"] == [0.9, 1.1] and on_disk["voices_per_engine"] == varied["voices_per_engine"]
    for split in ("train", "dev"):
        rows = read_manifest(tmp_path / "varied" / f"{split}.jsonl")
        assert rows and all(0.9 <= r.extra["speaker_alpha"] <= 1.1 for r in rows)
    plain_test, varied_test = (read_manifest(tmp_path / name / "test.jsonl") for name in ("plain", "varied"))
    assert all(r.extra["speaker_alpha"] is None for r in varied_test)
    assert [r.audio_path.name for r in plain_test] == [r.audio_path.name for r in varied_test]
    assert [sf.read(str(r.audio_path))[0].tobytes() for r in plain_test] == \
        [sf.read(str(r.audio_path))[0].tobytes() for r in varied_test]
    again = _small_build(tmp_path / "varied", extra_voices=True, speaker_perturb=(0.9, 1.1))
    assert again["made"] == 0 and again["skipped"] == varied["made"]
    other = _small_build(tmp_path / "varied", extra_voices=True, speaker_perturb=(0.8, 0.85))
    n_test = len(varied_test)
    assert other["skipped"] == n_test and other["made"] == varied["made"] - n_test  # new factors re-render


def test_grid_corpus_spec_takes_the_options(tmp_path):
    grid_file = tmp_path / "g.yaml"
    head = "name: g\nteacher: t.yaml\nmethods: {none: {config: s.yaml}}\nchunks: {a: {chunk_frames: 4}}\n"
    grid_file.write_text(head + f"corpus: {{out: {tmp_path / 'c'}, speaker_perturb: [1.2, 0.9]}}\n")
    with pytest.raises(ConfigError, match=r"corpus .*g.yaml.*corpus.speaker_perturb must be MIN,MAX"):
        load_grid(grid_file)
    grid_file.write_text(head + f"corpus: {{out: {tmp_path / 'c'}, extra_voices: true, speaker_perturb: [0.9, 1]}}\n")
    grid = load_grid(grid_file)
    assert (grid.spec.corpus.extra_voices, grid.spec.corpus.speaker_perturb) == (True, (0.9, 1.0))
    # A corpus already there but built without the options is not reused silently.
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.jsonl").write_text("")
    (tmp_path / "c" / "summary.json").write_text(json.dumps({"seed": 0}))
    with pytest.raises(ConfigError, match="was built with .*'speaker_perturb': None.*asks for"):
        ensure_corpus(grid)
    recipe = {"hours_requested": 1.0, "seed": 0, "extra_voices": True, "speaker_perturb": [0.9, 1.0]}
    (tmp_path / "c" / "summary.json").write_text(json.dumps({**recipe, "hours_requested": 2.0}))
    with pytest.raises(ConfigError, match="was built with .*'hours': 2.0.*asks for .*'hours': 1.0"):
        ensure_corpus(grid)
    (tmp_path / "c" / "summary.json").write_text(json.dumps(recipe))
    ensure_corpus(grid)  # the same recipe: reused as it is


# ---------------------------------------------------------------- held-out voices
def test_respeak_keeps_each_utterance_but_its_voice(tmp_path, capsys):
    _need(*ENGINE_BINARIES)
    _small_build(tmp_path / "c", speaker_perturb=(0.9, 1.1))
    summary = respeak_manifest(tmp_path / "c" / "dev.jsonl", ["festival_ked_diphone"], tmp_path / "ked",
                               jobs=1, progress=False, log=lambda *a: None)
    source = read_manifest(tmp_path / "c" / "dev.jsonl")
    spoken = read_manifest(tmp_path / "ked" / "manifest.jsonl")
    assert summary["utterances"] == len(spoken) == len(source) and not summary["failures"]
    assert [(r.id, r.text) for r in spoken] == [(r.id, r.text) for r in source]
    assert {r.speaker for r in spoken} == {"festival_ked_diphone"}
    for new, old in zip(spoken, source):
        assert {k: v for k, v in new.extra.items() if k != "engine"} == \
            {k: v for k, v in old.extra.items() if k != "engine"}
        assert sf.info(str(new.audio_path)).samplerate == SR and new.duration > 0.3
    again = respeak_manifest(tmp_path / "c" / "dev.jsonl", ["festival_ked_diphone"], tmp_path / "ked",
                             jobs=1, progress=False, log=lambda *a: None)
    assert again["made"] == 0 and again["skipped"] == len(source)
    # a voice the corpus trains on is not held out; an unknown one is named
    assert cli_main(["corpus", "respeak", "--manifest", str(tmp_path / "c" / "dev.jsonl"),
                     "--voices", "flite_slt", "--out", str(tmp_path / "x")]) != 0
    assert "['flite_slt'] already speak in the corpus" in capsys.readouterr().err
    assert cli_main(["corpus", "respeak", "--manifest", str(tmp_path / "c" / "dev.jsonl"),
                     "--voices", "nobody", "--out", str(tmp_path / "x")]) != 0
    assert "--voices: unknown voice(s) ['nobody']" in capsys.readouterr().err
