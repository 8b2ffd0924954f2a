"""Shared fixtures: tiny audio files and manifests written into tmp_path."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from streamkd.manifest import Utterance, write_manifest

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
