"""Shared fixtures: tiny audio files and manifests written into tmp_path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streamkd.config import load_config
from streamkd.manifest import Utterance, write_manifest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

_WORDS = ["hello", "world", "stream", "teacher", "student", "chunk", "audio", "model"]


def synth(seconds: float, sample_rate: int = 16000, seed: int = 0, channels: int = 1) -> np.ndarray:
    """A tone plus noise, in [-1, 1]: (N,) or (N, channels) float32."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    x = 0.3 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 0.05 * rng.standard_normal(n)
    x = x.astype(np.float32)
    if channels > 1:
        x = np.stack([x * (1 + 0.1 * c) for c in range(channels)], axis=1) / 1.5
    return x


@pytest.fixture
def make_wav(tmp_path: Path):
    """make_wav(name, seconds, sample_rate=16000, seed=0, channels=1, subtype=None) -> Path."""

    def _make(name: str, seconds: float, sample_rate: int = 16000, seed: int = 0,
              channels: int = 1, subtype: str | None = None) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), synth(seconds, sample_rate, seed, channels), sample_rate, subtype=subtype)
        return path

    return _make


@pytest.fixture
def tiny_manifest(tmp_path: Path, make_wav):
    """make(n, name="train.jsonl") -> (manifest path, utterances): n wavs of
    1-2 s with 1-3 word transcripts."""

    def _make(n: int = 12, name: str = "train.jsonl", durations=None) -> tuple[Path, list[Utterance]]:
        rng = np.random.default_rng(n)
        utts = []
        for k in range(n):
            dur = float(durations[k]) if durations is not None else float(rng.uniform(1.0, 2.0))
            path = make_wav(f"wav/u{k:03d}.wav", dur, seed=k)
            words = rng.choice(_WORDS, size=int(rng.integers(1, 4)))
            utts.append(Utterance(f"u{k:03d}", str(path), dur, " ".join(words), f"spk{k % 3}"))
        manifest = tmp_path / name
        write_manifest(manifest, utts)
        return manifest, utts

    return _make


def data_overrides(corpus: Path) -> list[str]:
    """Config overrides that point the data section at a corpus folder."""
    return [f"data.train_manifest={corpus}/train.jsonl", f"data.dev_manifest={corpus}/dev.jsonl",
            f"data.test_manifest={corpus}/test.jsonl", f"data.lang_dir={corpus}/lang"]


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A few real TTS utterances (espeak-ng and flite, clean), with lang dir."""
    from streamkd.corpus.build import build_corpus
    from streamkd.corpus.voices import ALL_VOICES
    from streamkd.lang import prepare_lang

    out = tmp_path_factory.mktemp("corpus")
    voices = [v for v in ALL_VOICES if v.name in ("espeak_en-us_m1", "espeak_en-gb_f1", "flite_slt")]
    sentences = ["THE CAT SAT ON THE MAT", "A STREAMING MODEL SEES THE PAST", "HELLO WORLD AGAIN",
                 "TEACHERS KNOW THE FUTURE", "SMALL CHUNKS ARE FAST", "NO DOWNLOAD IS NEEDED",
                 "SPEECH FROM A MACHINE", "THE DOG RAN HOME", "GOOD MORNING TO YOU", "IT RAINS TODAY",
                 "WE LIKE SHORT TESTS", "BLUE SKY AND SUN",
                 "ONE TWO THREE FOUR", "THE RED HOUSE", "OPEN THE DOOR", "A QUIET NIGHT", "TRAINS ARE LATE",
                 "READ A BOOK", "WATER IS COLD", "THE END OF THE DAY"]
    build_corpus(out, hours=0.01, seed=0, sentences=sentences, voices=voices, test_voices=["flite_slt"],
                 max_utts=8, degrade=False, progress=False, log=lambda *a: None, jobs=1)
    cfg = load_config(CONFIGS / "tiny.yaml", data_overrides(out))
    prepare_lang(cfg.data)
    return out


@pytest.fixture(scope="session")
def tiny_lang(tiny_corpus):
    from streamkd.features import load_cmvn
    from streamkd.tokenizer import load_tokenizer

    mean, istd = load_cmvn(tiny_corpus / "lang" / "cmvn.json")
    return load_tokenizer(tiny_corpus / "lang"), {"mean": list(mean), "istd": list(istd)}


