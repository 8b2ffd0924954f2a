"""Signal processing for the corpus: silence trimming and degradation.

TTS audio is clean and perfectly regular; the degradation (additive
coloured noise at a random SNR, synthetic reverberation) makes recognition
hard enough that the future context a streaming model lacks matters.
Everything is numpy only (scipy is not installed here) and draws its
randomness from the ``np.random.Generator`` it is given, so an utterance's
audio depends only on its own seed.

Signals are (N,) float32 at 16 kHz in [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = [
    "DegradeConfig",
    "DegradeParams",
    "trim_silence",
    "colored_noise",
    "add_noise",
    "reverb_ir",
    "reverberate",
    "clip_safe",
    "draw_degradation",
    "apply_degradation",
]

NOISE_TYPES = ("white", "pink", "brown")
_PEAK = 0.95  # largest sample magnitude written, leaves headroom


@dataclass(frozen=True)
class DegradeConfig:
    """How often and how strongly utterances are degraded. The defaults are
    moderate: at the earlier 80% noise (5-25 dB) and 50% reverb (RT60 up to
    0.8 s) a few hours of TTS trained no usable teacher on 2 CPU cores."""

    noise_prob: float = 0.5  # share of utterances with additive noise
    snr_db: tuple[float, float] = (10.0, 30.0)  # uniform range
    noise_types: tuple[str, ...] = NOISE_TYPES
    reverb_prob: float = 0.25  # share of utterances with reverberation
    rt60_sec: tuple[float, float] = (0.2, 0.6)  # uniform range


@dataclass(frozen=True)
class DegradeParams:
    """What is done to one utterance (recorded in its manifest line)."""

    snr_db: Optional[float] = None  # None: no noise
    noise: Optional[str] = None  # noise type
    rt60_sec: Optional[float] = None  # None: no reverberation


def trim_silence(x: np.ndarray, sample_rate: int, keep_sec: float = 0.1,
                 threshold_db: float = -40.0) -> np.ndarray:
    """Cut leading/trailing silence, keeping ``keep_sec`` around the speech.

    Speech is any 10 ms frame whose energy is within ``threshold_db`` of the
    loudest frame. (N,) -> (M,) with M <= N.
    """
    hop = max(1, sample_rate // 100)
    n_frames = len(x) // hop
    if n_frames == 0:
        return x
    energy = np.mean(x[: n_frames * hop].reshape(n_frames, hop).astype(np.float64) ** 2, axis=1)
    loud = np.flatnonzero(energy > energy.max() * 10 ** (threshold_db / 10))
    if loud.size == 0:
        return x
    keep = int(round(keep_sec * sample_rate))
    start = max(0, loud[0] * hop - keep)
    end = min(len(x), (loud[-1] + 1) * hop + keep)
    return x[start:end]


def colored_noise(n: int, kind: str, rng: np.random.Generator) -> np.ndarray:
    """(n,) float64 noise of unit RMS. Power spectrum ~ 1/f^a: white a=0,
    pink a=1, brown a=2 (shaped in the frequency domain)."""
    exponent = {"white": 0.0, "pink": 1.0, "brown": 2.0}.get(kind)
    if exponent is None:
        raise ValueError(f"unknown noise type {kind!r}; choose one of {NOISE_TYPES}")
    white = rng.standard_normal(n)
    if exponent > 0:
        spec = np.fft.rfft(white)
        freqs = np.arange(spec.size, dtype=np.float64)
        freqs[0] = 1.0  # no infinite gain at DC
        white = np.fft.irfft(spec / freqs ** (exponent / 2), n)
    return white / max(np.sqrt(np.mean(white ** 2)), 1e-12)


def add_noise(x: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """x + g * noise with g chosen so that power(x) / power(g * noise) is
    exactly ``snr_db``. (N,), (N,) -> (N,) float64."""
    p_signal = np.mean(np.asarray(x, np.float64) ** 2)
    p_noise = np.mean(noise ** 2)
    gain = np.sqrt(p_signal / (max(p_noise, 1e-20) * 10 ** (snr_db / 10)))
    return x + gain * noise


def reverb_ir(rt60_sec: float, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Synthetic room impulse response: a direct path then exponentially
    decaying Gaussian noise that falls by 60 dB in ``rt60_sec``. (K,) with
    K = 1.2 * rt60 * rate, unit energy."""
    k = max(2, int(1.2 * rt60_sec * sample_rate))
    t = np.arange(k) / sample_rate
    ir = rng.standard_normal(k) * np.exp(-np.log(1000.0) * t / rt60_sec) * 0.3
    ir[0] = 1.0
    return ir / np.sqrt(np.sum(ir ** 2))


def reverberate(x: np.ndarray, ir: np.ndarray) -> np.ndarray:
    """Convolve with ``ir`` (FFT), keep the input length and RMS. (N,) -> (N,)."""
    n = len(x) + len(ir) - 1
    size = 1 << (n - 1).bit_length()
    wet = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(ir, size), size)[: len(x)]
    rms_in = np.sqrt(np.mean(np.asarray(x, np.float64) ** 2))
    rms_out = np.sqrt(np.mean(wet ** 2))
    return wet * (rms_in / max(rms_out, 1e-12))


def clip_safe(x: np.ndarray) -> np.ndarray:
    """Scale down (never up) so that no sample exceeds 0.95. -> float32."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > _PEAK:
        x = x * (_PEAK / peak)
    return np.asarray(x, dtype=np.float32)


def draw_degradation(cfg: DegradeConfig, rng: np.random.Generator) -> DegradeParams:
    """Draw what to do to one utterance (a fixed number of draws, so the
    stream of random numbers does not depend on the outcome)."""
    u_noise, u_reverb = rng.random(2)
    snr = float(rng.uniform(*cfg.snr_db))
    kind = str(cfg.noise_types[int(rng.integers(len(cfg.noise_types)))])
    rt60 = float(rng.uniform(*cfg.rt60_sec))
    return DegradeParams(
        snr_db=round(snr, 2) if u_noise < cfg.noise_prob else None,
        noise=kind if u_noise < cfg.noise_prob else None,
        rt60_sec=round(rt60, 3) if u_reverb < cfg.reverb_prob else None,
    )


def apply_degradation(x: np.ndarray, params: DegradeParams, sample_rate: int,
                      rng: np.random.Generator) -> np.ndarray:
    """Reverberate, then add noise (the SNR is measured against the
    reverberant speech), then make clip-safe. (N,) -> (N,) float32."""
    y = np.asarray(x, dtype=np.float64)
    if params.rt60_sec is not None:
        y = reverberate(y, reverb_ir(params.rt60_sec, sample_rate, rng))
    if params.snr_db is not None:
        y = add_noise(y, colored_noise(len(y), params.noise or "white", rng), params.snr_db)
    return clip_safe(y)
