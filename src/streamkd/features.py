"""The log-mel fbank front end (kaldi-native-fbank) and CMVN statistics.

kaldi-native-fbank is what sherpa-onnx computes features with, so training
uses it too: an exported model then sees in deployment exactly what it saw
in training. Its defaults are not what we want (dither 3e-5, 23 bins,
snip_edges True, high_freq 0), so every option is set from FeatureConfig.

Shapes: F feature frames, C mel bins (FeatureConfig.num_mel_bins).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import kaldi_native_fbank as knf
import numpy as np
import torch

from streamkd.atomic import write_atomic
from streamkd.config import FeatureConfig
from streamkd.errors import AudioError, DataError

__all__ = [
    "fbank_options",
    "check_samples",
    "Fbank",
    "OnlineFeatures",
    "CmvnAccumulator",
    "compute_cmvn",
    "save_cmvn",
    "load_cmvn",
]

# Samples beyond this magnitude are almost surely int16-scaled, which would
# shift every log-mel value by 2*ln(32768) against what sherpa-onnx feeds.
_MAX_ABS_SAMPLE = 2.0
# Variance floor for CMVN: a constant bin (digital silence) must not give an
# infinite inverse standard deviation.
_VAR_FLOOR = 1e-8


def fbank_options(cfg: FeatureConfig) -> knf.FbankOptions:
    """kaldi-native-fbank options with every field that matters set from ``cfg``."""
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = float(cfg.sample_rate)
    opts.frame_opts.frame_length_ms = float(cfg.frame_length_ms)
    opts.frame_opts.frame_shift_ms = float(cfg.frame_shift_ms)
    opts.frame_opts.dither = float(cfg.dither)
    opts.frame_opts.snip_edges = bool(cfg.snip_edges)
    opts.mel_opts.num_bins = int(cfg.num_mel_bins)
    opts.mel_opts.low_freq = float(cfg.low_freq)
    opts.mel_opts.high_freq = float(cfg.high_freq)
    return opts


def check_samples(samples: np.ndarray, what: str = "fbank input") -> np.ndarray:
    """(N,) float samples in [-1, 1] -> contiguous float32, or AudioError (a
    DataError) saying what is wrong (shape, dtype, NaN/inf, int16 scale);
    ``what`` names the receiver in the messages."""
    x = np.asarray(samples)
    if x.ndim != 1:
        raise AudioError(f"{what} takes mono (N,) samples, got shape {x.shape}; average the channels")
    if not np.issubdtype(x.dtype, np.floating):
        raise AudioError(f"{what} takes float samples in [-1, 1], got dtype {x.dtype}; "
                         "divide integer PCM by 32768")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size and not np.isfinite(x).all():
        raise AudioError(f"{what} got NaN or infinite samples")
    if x.size and float(np.abs(x).max()) > _MAX_ABS_SAMPLE:
        raise AudioError(f"{what}: samples peak at {float(np.abs(x).max()):.1f}: they must be in [-1, 1] "
                         "(int16-scaled audio? divide by 32768)")
    return x


def _frames(fbank: knf.OnlineFbank, start: int, stop: int, dim: int) -> torch.Tensor:
    """Frames [start, stop) of an OnlineFbank as (stop - start, C) float32."""
    if stop <= start:
        return torch.zeros(0, dim, dtype=torch.float32)
    return torch.from_numpy(np.stack([fbank.get_frame(i) for i in range(start, stop)]))


class Fbank:
    """Whole-utterance fbank: ``Fbank(cfg).compute(samples (N,)) -> (F, C)`` float32."""

    def __init__(self, cfg: FeatureConfig) -> None:
        self.cfg = cfg
        self.opts = fbank_options(cfg)

    @property
    def dim(self) -> int:
        return int(self.cfg.num_mel_bins)

    def compute(self, samples: np.ndarray) -> torch.Tensor:
        """(N,) float samples in [-1, 1] at cfg.sample_rate -> (F, C) float32."""
        x = check_samples(samples)
        fbank = knf.OnlineFbank(self.opts)
        fbank.accept_waveform(float(self.cfg.sample_rate), x)
        fbank.input_finished()
        return _frames(fbank, 0, fbank.num_frames_ready, self.dim)


class OnlineFeatures:
    """Incremental fbank for streaming: feed samples in pieces of any size;
    ``pop_frames`` returns the frames that became ready since the last call.
    The frames popped over a whole utterance equal ``Fbank.compute`` on it."""

    def __init__(self, cfg: FeatureConfig) -> None:
        self.cfg = cfg
        self._fbank = knf.OnlineFbank(fbank_options(cfg))
        self._popped = 0  # absolute index of the next frame to hand out
        self._finished = False

    @property
    def dim(self) -> int:
        return int(self.cfg.num_mel_bins)

    @property
    def num_popped(self) -> int:
        """Feature frames handed out so far."""
        return self._popped

    def accept_waveform(self, samples: np.ndarray) -> None:
        """Add (N,) float samples in [-1, 1] at cfg.sample_rate."""
        if self._finished:
            raise DataError("accept_waveform after input_finished: start a new OnlineFeatures")
        x = check_samples(samples)
        if x.size:
            self._fbank.accept_waveform(float(self.cfg.sample_rate), x)

    def input_finished(self) -> None:
        """No more samples: flush the last frames (snip_edges=False pads the end)."""
        if not self._finished:
            self._fbank.input_finished()
            self._finished = True

    def pop_frames(self) -> torch.Tensor:
        """(n, C) float32: the frames ready and not popped yet (n may be 0)."""
        ready = self._fbank.num_frames_ready
        out = _frames(self._fbank, self._popped, ready, self.dim)
        if ready > self._popped:
            # Frees the extractor's buffer; frame indices stay absolute.
            self._fbank.pop(ready - self._popped)
            self._popped = ready
        return out


class CmvnAccumulator:
    """Running per-bin mean and variance, accumulated in float64 so that
    hours of frames do not lose precision."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.frames = 0
        self._sum = np.zeros(dim, dtype=np.float64)
        self._sumsq = np.zeros(dim, dtype=np.float64)

    def add(self, feats: torch.Tensor | np.ndarray) -> None:
        """Accumulate (F, C) features."""
        x = np.asarray(feats, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise DataError(f"CMVN expects (F, {self.dim}) features, got shape {x.shape}")
        self.frames += x.shape[0]
        self._sum += x.sum(axis=0)
        self._sumsq += np.square(x).sum(axis=0)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (C,), istd (C,)) float32."""
        if self.frames == 0:
            raise DataError("CMVN: no feature frames were accumulated (empty training set?)")
        mean = self._sum / self.frames
        var = np.maximum(self._sumsq / self.frames - np.square(mean), _VAR_FLOOR)
        return (torch.from_numpy(mean.astype(np.float32)),
                torch.from_numpy((1.0 / np.sqrt(var)).astype(np.float32)))


def compute_cmvn(feats: Iterable[torch.Tensor | np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Global CMVN over an iterable of (F, C) features -> (mean (C,), istd (C,))."""
    acc = None
    for x in feats:
        if acc is None:
            if np.ndim(x) != 2:
                raise DataError(f"CMVN expects (F, C) features, got shape {tuple(np.shape(x))}")
            acc = CmvnAccumulator(int(np.shape(x)[1]))
        acc.add(x)
    if acc is None:
        raise DataError("CMVN: no features given")
    return acc.result()


def save_cmvn(path: str | Path, mean: torch.Tensor, istd: torch.Tensor, frames: int) -> None:
    """Write ``{"mean": [...], "istd": [...], "frames": N}`` atomically."""
    path = Path(path)
    data = {"mean": [float(v) for v in mean], "istd": [float(v) for v in istd], "frames": int(frames)}
    if len(data["mean"]) != len(data["istd"]):
        raise DataError(f"{path}: mean has {len(data['mean'])} bins but istd {len(data['istd'])}")
    # repr-exact floats: float32 -> float -> JSON -> float32 round-trips.
    write_atomic(path, json.dumps(data))


def load_cmvn(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a cmvn.json -> (mean (C,), istd (C,)) float32; DataError naming
    the file and the key when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: CMVN file does not exist; run `streamkd prepare` to create it")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); re-run `streamkd prepare`") from err
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with 'mean' and 'istd'")
    out = []
    for key in ("mean", "istd"):
        values = data.get(key)
        if not isinstance(values, list) or not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
        ):
            raise DataError(f"{path}: key '{key}' must be a non-empty list of finite numbers")
        out.append(torch.tensor(values, dtype=torch.float32))
    if out[0].shape != out[1].shape:
        raise DataError(f"{path}: 'mean' has {out[0].numel()} bins but 'istd' has {out[1].numel()}")
    if bool((out[1] <= 0).any()):
        raise DataError(f"{path}: 'istd' must be positive")
    return out[0], out[1]
