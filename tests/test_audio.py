import numpy as np
import pytest
import soundfile as sf
import soxr

from conftest import synth
from streamkd.audio import audio_duration, load_audio, load_utterance, write_wav
from streamkd.errors import AudioError
from streamkd.manifest import Utterance


def test_wav_and_flac_read_as_float_mono(make_wav):
    for name in ("a.wav", "a.flac"):
        path = make_wav(name, 0.5, seed=3)
        x = load_audio(path)
        assert x.dtype == np.float32 and x.ndim == 1 and x.shape[0] == 8000
        ref, _ = sf.read(str(path), dtype="float32")
        np.testing.assert_array_equal(x, ref)


def test_multichannel_is_averaged(make_wav):
    path = make_wav("st.wav", 0.25, channels=2, subtype="FLOAT")
    stereo, _ = sf.read(str(path), dtype="float32")
    np.testing.assert_allclose(load_audio(path), stereo.mean(axis=1), atol=1e-7)


def test_other_rate_is_resampled_unless_strict(make_wav):
    path = make_wav("r8k.wav", 0.5, sample_rate=8000, subtype="FLOAT")
    x = load_audio(path, 16000)
    assert x.shape[0] == 16000 // 2
    raw, _ = sf.read(str(path), dtype="float32")
    np.testing.assert_allclose(x, np.clip(soxr.resample(raw, 8000, 16000), -1, 1), atol=1e-7)
    with pytest.raises(AudioError, match="8000 Hz"):
        load_audio(path, 16000, strict_rate=True)


def test_offset_and_duration_select_a_segment(make_wav):
    path = make_wav("long.wav", 1.0, subtype="FLOAT")
    whole = load_audio(path)
    part = load_audio(path, offset=0.25, duration=0.5)
    np.testing.assert_array_equal(part, whole[4000:12000])
    utt = Utterance("x", str(path), 0.5, "t", extra={"offset": 0.25})
    np.testing.assert_array_equal(load_utterance(utt), part)
    np.testing.assert_array_equal(load_utterance(Utterance("y", str(path), 1.0, "t")), whole)
    with pytest.raises(AudioError, match="outside the file"):
        load_audio(path, offset=2.0)


def test_bad_files_raise_with_the_path(tmp_path, make_wav):
    missing = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="nope.wav.*does not exist"):
        load_audio(missing)
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    with pytest.raises(AudioError, match="corrupt.wav"):
        load_audio(corrupt)
    with pytest.raises(AudioError, match="corrupt.wav"):
        audio_duration(corrupt)
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="empty.wav.*empty"):
        load_audio(empty)
    nan = tmp_path / "nan.wav"
    x = synth(0.1)
    x[10] = np.nan
    sf.write(str(nan), x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="nan.wav.*NaN"):
        load_audio(nan)


def test_write_wav_round_trip(tmp_path):
    x = synth(0.3, seed=1)
    path = tmp_path / "sub" / "w.wav"
    write_wav(path, x, 16000)
    info = sf.info(str(path))
    assert info.subtype == "PCM_16" and info.samplerate == 16000
    assert audio_duration(path) == pytest.approx(0.3)
    # 16-bit quantisation error is at most half a step
    np.testing.assert_allclose(load_audio(path), x, atol=1 / 32768)
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp file left
