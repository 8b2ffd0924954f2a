"""StreamingRecognizer: piece-size invariance, equality with the offline
simulated-streaming decode, partials, reset, several streams, odd inputs,
resampling, bounded memory; and the latency figures."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamkd.audio import resample
from streamkd.config import Config, DataConfig, EncoderConfig, FeatureConfig
from streamkd.decode import decode_utterance
from streamkd.errors import AudioError
from streamkd.features import Fbank
from streamkd.model import CTCModel
from streamkd.model.subsampling import Conv2dSubsampling4
from streamkd.streaming.latency import (
    ChunkTimer,
    algorithmic_latency_ms,
    compute_stats,
    emission_delay,
    word_start_tokens,
)
from streamkd.streaming.recognizer import StreamingRecognizer, decode_streams
from streamkd.tokenizer import SPACE, CharTokenizer
from streamkd.types import ChunkConfig

SR = 16000
SYMBOLS = ["<blk>", "a", "b", "c", "d", SPACE, "e", "f"]


def varied_audio(seconds: float, sample_rate: int = SR, seed: int = 0) -> np.ndarray:
    """A gliding tone with bursts of noise: its frames differ, so a random
    CTC head emits changing tokens. (N,) float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    freq = 200 + 300 * np.sin(2 * np.pi * (0.7 + 0.1 * seed) * t)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 1.3 * t) ** 2
    x = 0.3 * envelope * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(t.size)
    return x.astype(np.float32)


def tiny_model(chunk: ChunkConfig = ChunkConfig(4, 2), seed: int = 0) -> CTCModel:
    """A 2-layer d=32 streaming student with random weights whose CTC head
    is rescaled (on varied_audio) to emit a mix of blanks and tokens."""
    torch.manual_seed(seed)
    feats = Fbank(FeatureConfig()).compute(varied_audio(3.0, seed=seed))
    cfg = EncoderConfig(d_model=32, num_layers=2, num_heads=2, ff_mult=2, conv_kernel=5, dropout=0.0,
                        max_rel_pos=8, causal=chunk is not None, chunk=chunk)
    model = CTCModel(cfg, len(SYMBOLS), feats.mean(0), 1.0 / feats.std(0), tokenizer=CharTokenizer(SYMBOLS),
                     config=Config(model=cfg)).eval()
    with torch.no_grad():
        out = model(feats[None], torch.tensor([feats.size(0)])).out[0]  # (T, D)
        weight = torch.randn(len(SYMBOLS), cfg.d_model)
        weight *= 3.0 / ((out - out.mean(0)) @ weight.t()).std(0)[:, None]  # logits of std 3 per class
        model.ctc_head.weight.copy_(weight)
        model.ctc_head.bias.copy_(-(weight @ out.mean(0)))
        model.ctc_head.bias[0] += 2.0  # blanks between tokens, as in a trained model
    return model


def feed(rec, samples: np.ndarray, sizes, sample_rate: int = SR, on_piece=None) -> str:
    """Feed samples in pieces (sizes: an int or an iterable of ints, cycled)."""
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    i = k = 0
    while i < samples.size:
        n = sizes[k % len(sizes)]
        rec.accept_waveform(samples[i:i + n], sample_rate)
        i, k = i + n, k + 1
        if on_piece is not None:
            on_piece(rec)
    return rec.finalize()


def offline_tokens(model, samples: np.ndarray, beam: int = 1) -> list[int]:
    return decode_utterance(model, Fbank(FeatureConfig()).compute(samples), beam=beam)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def audio():
    return varied_audio(2.37, seed=1)


def _run_collecting(model, samples, sizes):
    outs = []
    rec = StreamingRecognizer(model, on_chunk=lambda lp, enc: outs.append(enc.clone()))
    text = feed(rec, samples, sizes)
    return text, rec.tokens(), torch.cat(outs) if outs else torch.zeros(0, 32)


def test_piece_sizes_give_identical_outputs(model, audio):
    rng = np.random.default_rng(0)
    text, tokens, enc = _run_collecting(model, audio, audio.size)  # the whole utterance at once
    assert len(tokens) > 5, "the test model should emit tokens"
    short = audio[: int(0.9 * SR)]
    _, short_tokens, short_enc = _run_collecting(model, short, short.size)
    _, t1, e1 = _run_collecting(model, short, 1)  # one sample at a time (shorter audio: speed)
    assert t1 == short_tokens and torch.equal(e1, short_enc)
    for sizes in (160, int(3.7 * SR), list(rng.integers(1, 4000, size=50))):
        got_text, got_tokens, got_enc = _run_collecting(model, audio, sizes)
        assert got_tokens == tokens and got_text == text
        assert got_enc.shape == enc.shape and torch.equal(got_enc, enc)


@pytest.mark.parametrize("seconds", [0.5, 1.13, 2.37])
def test_final_equals_offline_simulated_streaming(model, seconds):
    samples = varied_audio(seconds, seed=2)
    rec = StreamingRecognizer(model)
    text = feed(rec, samples, 1234)
    want = offline_tokens(model, samples)
    assert rec.tokens() == want
    assert text == model.tokenizer.decode(want)
    T = Conv2dSubsampling4.output_length(Fbank(FeatureConfig()).compute(samples).size(0))
    assert rec.frames_out == T


def test_beam_search_equals_offline_beam(model, audio):
    rec = StreamingRecognizer(model, beam=4)
    feed(rec, audio, 777)
    assert rec.tokens() == offline_tokens(model, audio, beam=4)


def test_partial_grows_as_prefix(model, audio):
    partials = []
    final = feed(StreamingRecognizer(model), audio, 800, on_piece=lambda r: partials.append(r.partial()))
    assert len(set(partials)) > 3, "partials should change while audio arrives"
    for a, b in zip(partials, partials[1:] + [final]):
        assert b.startswith(a)


def test_reset_then_same_audio_same_result(model, audio):
    rec = StreamingRecognizer(model)
    first = feed(rec, audio, 999)
    with pytest.raises(RuntimeError, match="reset"):
        rec.accept_waveform(audio[:10], SR)
    rec.reset()
    assert rec.partial() == "" and rec.frames_out == 0
    assert feed(rec, audio, 333) == first


def test_interleaved_streams_equal_separate_runs(model):
    a, b = varied_audio(1.7, seed=3), varied_audio(2.2, seed=4)
    separate = [feed(StreamingRecognizer(model), x, 1000) for x in (a, b)]
    pieces = [[x[i:i + 700] for i in range(0, x.size, 700)] for x in (a, b)]
    recs = [StreamingRecognizer(model), StreamingRecognizer(model)]
    assert decode_streams(recs, pieces, SR) == separate
    assert separate[0] != separate[1]


def test_silence_clipped_and_short_inputs(model):
    for samples in (
        np.zeros(SR, dtype=np.float32),  # digital silence
        np.clip(10 * varied_audio(1.0, seed=5), -1, 1),  # clipped
        varied_audio(0.1, seed=6),  # shorter than one chunk window
    ):
        rec = StreamingRecognizer(model)
        feed(rec, samples, 512)
        assert rec.tokens() == offline_tokens(model, samples)
    # Too short for a single encoder frame: nothing, and no error.
    rec = StreamingRecognizer(model)
    assert feed(rec, varied_audio(0.03), 100) == "" and rec.frames_out == 0
    assert StreamingRecognizer(model).finalize() == ""


@pytest.mark.parametrize("rate", [8000, 44100])
def test_other_sample_rates_are_resampled(model, rate):
    samples = varied_audio(1.5, sample_rate=rate, seed=7)
    rec = StreamingRecognizer(model)
    feed(rec, samples, [1, 300, 4411, 17], sample_rate=rate)
    at16k = resample(samples, rate, SR)
    assert rec.samples_in == at16k.size
    assert rec.tokens() == offline_tokens(model, at16k)
    rec.reset()
    rec.accept_waveform(samples[:100], rate)
    with pytest.raises(AudioError, match="sample rate changed"):
        rec.accept_waveform(samples[:100], SR)


def test_bad_input_is_refused_clearly(model):
    rec = StreamingRecognizer(model)
    with pytest.raises(AudioError, match="divide integer PCM by 32768"):
        rec.accept_waveform(np.zeros(10, dtype=np.int16), SR)
    with pytest.raises(AudioError, match="int16-scaled"):
        rec.accept_waveform(np.full(10, 3000.0, dtype=np.float32), SR)
    with pytest.raises(AudioError, match="NaN"):
        rec.accept_waveform(np.array([0.0, np.nan], dtype=np.float32), SR)
    with pytest.raises(AudioError, match="mono"):
        rec.accept_waveform(np.zeros((10, 2), dtype=np.float32), SR)
    with pytest.raises(AudioError, match="sample_rate"):
        rec.accept_waveform(np.zeros(10, dtype=np.float32), 0)
    teacher = tiny_model(chunk=None)
    with pytest.raises(ValueError, match="full-context"):
        StreamingRecognizer(teacher)


def test_ten_minutes_keep_memory_bounded(model):
    chunk = model.chunk
    rec = StreamingRecognizer(model)
    rec.timer.max_chunks = 1000
    window = Conv2dSubsampling4.window_frames(chunk.chunk_frames)
    cache_sizes = set()
    rng = np.random.default_rng(0)
    piece = varied_audio(1.0, seed=8)
    for k in range(600):  # 10 minutes, one-second pieces (scaled so each differs)
        rec.accept_waveform(piece * np.float32(0.5 + 0.5 * rng.random()), SR)
        att, cnn, buf = rec.state.att_cache, rec.state.cnn_cache, rec.state.feat_buffer
        assert att.size(3) <= chunk.left_frames and buf.size(1) < window
        assert cnn.shape == (2, 1, 32, 4)
        if k > 2:
            cache_sizes.add(tuple(att.shape))
    rec.finalize()
    assert cache_sizes == {(2, 1, 2, chunk.left_frames, 32)}  # fixed once the left context is full
    assert rec._features.num_popped == 60000  # 600 s of 10 ms frames, all handed over and freed
    assert rec.frames_out == Conv2dSubsampling4.output_length(60000)
    assert len(rec.timer.per_chunk_sec) == 1000  # capped
    assert rec.audio_sec == pytest.approx(600.0)


# Latency -----------------------------------------------------------------

def test_algorithmic_latency_adds_its_parts():
    lat = algorithmic_latency_ms(16, FeatureConfig())
    assert lat["chunk_ms"] == 16 * 4 * 10 and lat["right_context_ms"] == 60 and lat["window_ms"] == 25
    assert lat["total_ms"] == 640 + 60 + 25
    # derived from the feature options, not fixed: 8 ms shift, 20 ms window
    lat = algorithmic_latency_ms(4, FeatureConfig(frame_shift_ms=8.0, frame_length_ms=20.0))
    assert lat == {"chunk_ms": 4 * 4 * 8.0, "right_context_ms": 6 * 8.0, "window_ms": 20.0,
                   "total_ms": 128.0 + 48.0 + 20.0}


def test_compute_stats_from_timer():
    timer = ChunkTimer()
    timer.add(0.010, 1)
    timer.add(0.030, 2)  # two chunks in one call: 15 ms each
    timer.add(0.005, 0)  # no chunk: total only
    stats = compute_stats(timer, audio_sec=2.0, chunk_ms=12.0)
    assert stats["compute_sec"] == pytest.approx(0.045) and stats["rtf"] == pytest.approx(0.0225)
    assert stats["chunks"] == 3 and stats["chunk_ms_max"] == pytest.approx(15.0)
    assert stats["chunk_ms_p50"] == pytest.approx(15.0) and stats["chunks_slower_than_realtime"] == 2


def test_emission_delay_pairs_words_by_alignment():
    tok = CharTokenizer(SYMBOLS)
    teacher = tok.encode("ab cd ef")  # words start at tokens 0, 3, 6
    t_frames = [10, 11, 12, 20, 21, 22, 30, 31]
    assert word_start_tokens(teacher, tok.decode) == [0, 3, 6]
    student = tok.encode("ab ce ef")  # the middle word differs
    s_frames = [13, 14, 15, 22, 23, 24, 35, 36]
    d = emission_delay(student, s_frames, teacher, t_frames, tok.decode, frame_ms=40.0)
    assert d.delays_ms == [(13 - 10) * 40.0, (35 - 30) * 40.0]
    assert d.matched == 2 and d.unmatched == 2  # "ce" and "cd"
    assert d.mean_ms == pytest.approx(160.0)
    assert d.p90_ms == pytest.approx(float(np.percentile([120.0, 200.0], 90)))
    empty = emission_delay([], [], teacher, t_frames, tok.decode, frame_ms=40.0)
    assert empty.matched == 0 and empty.unmatched == 3 and math.isnan(empty.mean_ms)


def test_recognizer_latency_report(model, audio):
    rec = StreamingRecognizer(model)
    feed(rec, audio, 1600)
    report = rec.latency_report()
    assert report["audio_sec"] == pytest.approx(audio.size / SR)
    assert report["chunks"] == math.ceil(rec.frames_out / model.chunk.chunk_frames)
    assert 0 < report["chunk_ms_p50"] <= report["chunk_ms_p95"] <= report["chunk_ms_max"]
    assert report["rtf"] > 0 and report["algorithmic_latency_ms"]["total_ms"] == 4 * 40 + 60 + 25
    # Emission delay of a stream against itself is zero for every word.
    d = emission_delay(rec.tokens(), rec.token_frames(), rec.tokens(), rec.token_frames(), model.tokenizer.decode,
                       frame_ms=rec.frame_ms)
    assert rec.frame_ms == 40.0
    assert d.matched == len(rec.partial().split()) and d.mean_ms == 0.0


def test_one_sentinel_means_the_models_own_chunk(model, audio):
    """MODEL_CHUNK is the one default for "the model's chunk" across the
    model, the offline decoders and the manifest decoder."""
    import inspect

    from streamkd.decode import decode_manifest
    from streamkd.model import MODEL_CHUNK

    for fn in (model.forward, model.stream_step, decode_utterance, decode_manifest):
        assert inspect.signature(fn).parameters["chunk"].default is MODEL_CHUNK
    feats = Fbank(FeatureConfig()).compute(audio)
    own = decode_utterance(model, feats)
    assert own == decode_utterance(model, feats, chunk=MODEL_CHUNK) == decode_utterance(model, feats, chunk=model.chunk)
    assert model.resolve_chunk() == model.resolve_chunk(MODEL_CHUNK) == model.chunk


def test_a_model_declares_what_it_carries_and_fails_loudly_without_it():
    """No silent default FeatureConfig: a bare model (no config) cannot say
    what features it expects, and a recognizer over it says so."""
    from streamkd.errors import UsageError

    cfg = EncoderConfig(d_model=32, num_layers=1, num_heads=2, causal=True, chunk=ChunkConfig(4, 2))
    bare = CTCModel(cfg, len(SYMBOLS), torch.zeros(80), torch.ones(80)).eval()
    assert bare.tokenizer is None and bare.config is None
    with pytest.raises(UsageError, match="carries no config"):
        bare.feature_config
    with pytest.raises(UsageError, match="carries no config"):
        StreamingRecognizer(bare, tokenizer=CharTokenizer(SYMBOLS))
    with pytest.raises(UsageError, match="needs a tokenizer"):
        StreamingRecognizer(bare, feature_cfg=FeatureConfig())
    rec = StreamingRecognizer(bare, feature_cfg=FeatureConfig(frame_shift_ms=8.0), tokenizer=CharTokenizer(SYMBOLS))
    assert rec.frame_ms == 32.0
    with pytest.raises(ValueError, match="3 symbols but the model 8"):
        CTCModel(cfg, len(SYMBOLS), torch.zeros(80), torch.ones(80), tokenizer=CharTokenizer(SYMBOLS[:3]))
    carried = CTCModel(cfg, len(SYMBOLS), torch.zeros(80), torch.ones(80), tokenizer=CharTokenizer(SYMBOLS),
                       config=Config(model=cfg, data=DataConfig(features=FeatureConfig(dither=0.5))))
    assert carried.feature_config.dither == 0.5
