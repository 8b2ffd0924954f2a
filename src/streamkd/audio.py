"""Reading and writing audio: soundfile for the formats, soxr for the rate.

Every sample the package handles is float32 in [-1, 1], mono, at the rate of
``FeatureConfig.sample_rate`` (sherpa-onnx feeds its front end the same).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import soundfile as sf
import soxr

from streamkd.atomic import atomic_open
from streamkd.errors import AudioError

if TYPE_CHECKING:  # only for the annotation; manifest does not import audio
    from streamkd.manifest import Utterance

__all__ = ["load_audio", "load_utterance", "audio_duration", "resample", "write_wav"]


def audio_duration(path: str | Path) -> float:
    """Duration of an audio file in seconds, read from its header only."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file does not exist")
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError) as err:
        raise AudioError(f"{path}: cannot read audio header ({err}); is it a wav/flac file?") from err
    return info.frames / info.samplerate


def resample(samples: np.ndarray, in_rate: float, out_rate: float) -> np.ndarray:
    """(N,) float32 at ``in_rate`` -> (round(N * out_rate / in_rate),) float32
    at ``out_rate``, clipped to [-1, 1] (the soxr filter can overshoot)."""
    if in_rate == out_rate:
        return samples
    out = soxr.resample(np.ascontiguousarray(samples, dtype=np.float32), in_rate, out_rate)
    return np.clip(out, -1.0, 1.0).astype(np.float32, copy=False)


def _read_range(path: Path, offset: float, duration: Optional[float]) -> tuple[np.ndarray, int]:
    """Read [offset, offset + duration) seconds as (N, channels) float32."""
    try:
        with sf.SoundFile(str(path)) as f:
            rate = f.samplerate
            start = int(round(offset * rate))
            if start > f.frames or start < 0:
                raise AudioError(
                    f"{path}: offset {offset:.3f} s lies outside the file "
                    f"({f.frames / rate:.3f} s long); check the segment times"
                )
            count = -1 if duration is None else int(round(duration * rate))
            if start:
                f.seek(start)
            data = f.read(frames=count, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.SoundFileError, RuntimeError) as err:
        raise AudioError(f"{path}: cannot read audio ({err}); is the file corrupt or not wav/flac?") from err
    return data, rate


def load_audio(
    path: str | Path,
    sample_rate: int = 16000,
    *,
    offset: float = 0.0,
    duration: Optional[float] = None,
    strict_rate: bool = False,
) -> np.ndarray:
    """Read an audio file as (N,) float32 mono samples in [-1, 1].

    Multi-channel audio is averaged to mono; audio at another rate is
    resampled with soxr unless ``strict_rate``, which raises instead.
    ``offset`` and ``duration`` (seconds, None: to the end) select a segment.
    Raises AudioError naming the file when it is missing, unreadable, empty
    or holds NaN/inf samples.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file does not exist")
    data, rate = _read_range(path, offset, duration)
    if data.shape[0] == 0:
        raise AudioError(f"{path}: no samples" + (f" from offset {offset:.3f} s" if offset else "")
                         + "; the file (or segment) is empty")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: holds NaN or infinite samples; re-export the audio")
    samples = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    # Float files may exceed full scale; everything downstream assumes [-1, 1].
    samples = np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False)
    if rate != sample_rate:
        if strict_rate:
            raise AudioError(f"{path}: sample rate {rate} Hz, expected {sample_rate} Hz")
        samples = resample(samples, rate, sample_rate)
    return np.ascontiguousarray(samples)


def load_utterance(utt: "Utterance", sample_rate: int = 16000) -> np.ndarray:
    """The samples of one manifest utterance: the whole file, or, when
    ``utt.extra`` holds an ``offset`` (a Kaldi segment, a Lhotse cut),
    ``utt.duration`` seconds from there."""
    offset = utt.extra.get("offset")
    if offset is None:
        return load_audio(utt.audio_path, sample_rate)
    return load_audio(utt.audio_path, sample_rate, offset=float(offset), duration=utt.duration)


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write (N,) float samples in [-1, 1] as 16-bit PCM wav, atomically."""
    path = Path(path)
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise AudioError(f"{path}: write_wav takes mono (N,) samples, got shape {samples.shape}")
    if not np.isfinite(samples).all():
        raise AudioError(f"{path}: refusing to write NaN or infinite samples")
    with atomic_open(path, "wb") as f:
        sf.write(f, np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
