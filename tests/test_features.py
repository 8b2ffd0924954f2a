import json

import kaldi_native_fbank as knf
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import synth
from streamkd.config import FeatureConfig
from streamkd.errors import DataError
from streamkd.features import CmvnAccumulator, Fbank, OnlineFeatures, compute_cmvn, load_cmvn, save_cmvn


def _knf_direct(samples, snip_edges=False, num_bins=80, high_freq=-400.0):
    """kaldi-native-fbank set up by hand, independently of fbank_options."""
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = snip_edges
    opts.frame_opts.samp_freq = 16000
    opts.frame_opts.frame_length_ms = 25.0
    opts.frame_opts.frame_shift_ms = 10.0
    opts.mel_opts.num_bins = num_bins
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = high_freq
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, samples.tolist())
    fb.input_finished()
    return np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])


@pytest.mark.parametrize("snip_edges", [False, True])
def test_fbank_equals_kaldi_native_fbank(snip_edges):
    x = synth(0.73, seed=2)
    cfg = FeatureConfig(snip_edges=snip_edges)
    feats = Fbank(cfg).compute(x)
    ref = _knf_direct(x, snip_edges=snip_edges)
    assert feats.dtype == torch.float32 and feats.shape == (ref.shape[0], 80)
    np.testing.assert_array_equal(feats.numpy(), ref)
    # snip_edges=False: one frame per 10 ms shift, rounded
    if not snip_edges:
        assert feats.shape[0] == round(len(x) / 160)


def test_fbank_honours_bins_and_band():
    x = synth(0.3, seed=5)
    feats = Fbank(FeatureConfig(num_mel_bins=40, high_freq=-1000.0)).compute(x)
    np.testing.assert_array_equal(feats.numpy(), _knf_direct(x, num_bins=40, high_freq=-1000.0))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), n=st.integers(0, 9000))
def test_online_in_random_pieces_equals_whole(seed, n):
    rng = np.random.default_rng(seed)
    x = (0.3 * rng.standard_normal(n)).clip(-1, 1).astype(np.float32)
    whole = Fbank(FeatureConfig()).compute(x)
    online = OnlineFeatures(FeatureConfig())
    got, pos = [], 0
    while pos < n:
        step = int(rng.integers(1, 1200))
        online.accept_waveform(x[pos:pos + step])
        pos += step
        got.append(online.pop_frames())
    online.input_finished()
    got.append(online.pop_frames())
    got.append(online.pop_frames())  # nothing new: (0, C)
    assert got[-1].shape == (0, 80)
    stream = torch.cat(got)
    assert online.num_popped == stream.shape[0]
    assert torch.equal(stream, whole)


def test_bad_samples_are_refused():
    fb = Fbank(FeatureConfig())
    with pytest.raises(DataError, match="int16"):
        fb.compute(synth(0.1) * 32768)
    with pytest.raises(DataError, match="mono"):
        fb.compute(np.zeros((10, 2), dtype=np.float32))
    with pytest.raises(DataError, match="float"):
        fb.compute(np.zeros(100, dtype=np.int16))
    online = OnlineFeatures(FeatureConfig())
    online.input_finished()
    with pytest.raises(DataError, match="after input_finished"):
        online.accept_waveform(synth(0.1))


def test_cmvn_matches_float64_statistics_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    parts = [torch.from_numpy(rng.normal(5.0, 2.0, (n, 4)).astype(np.float32)) for n in (30, 7, 50)]
    mean, istd = compute_cmvn(parts)
    allf = torch.cat(parts).double()
    np.testing.assert_allclose(mean.numpy(), allf.mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(istd.numpy(), (1 / allf.std(0, unbiased=False)).numpy(), rtol=1e-5)
    path = tmp_path / "cmvn.json"
    save_cmvn(path, mean, istd, 87)
    data = json.loads(path.read_text())
    assert data["frames"] == 87 and len(data["mean"]) == 4
    m2, i2 = load_cmvn(path)
    assert torch.equal(m2, mean) and torch.equal(i2, istd)


def test_cmvn_constant_bin_is_finite_and_bad_files_fail(tmp_path):
    acc = CmvnAccumulator(2)
    acc.add(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
    assert acc.frames == 2 and torch.isfinite(acc.result()[1]).all()
    with pytest.raises(DataError, match="no feature frames"):
        CmvnAccumulator(2).result()
    with pytest.raises(DataError, match="does not exist"):
        load_cmvn(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"mean": [1.0], "istd": "x"}')
    with pytest.raises(DataError, match="bad.json.*'istd'"):
        load_cmvn(bad)
    bad.write_text('{"mean": [1.0, 2.0], "istd": [1.0]}')
    with pytest.raises(DataError, match="bins"):
        load_cmvn(bad)
