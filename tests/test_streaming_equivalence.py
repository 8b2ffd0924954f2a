"""Chunk-by-chunk streaming with caches equals the masked full forward."""
from __future__ import annotations

import math

import pytest
import torch

from streamkd.config import EncoderConfig
from streamkd.model import Conv2dSubsampling4, CTCModel, roll_cache_valid_mask
from streamkd.types import ChunkConfig

C = 20


def make_student(chunk, dtype, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(d_model=32, num_layers=2, num_heads=4, ff_mult=2, conv_kernel=5, dropout=0.1,
               max_rel_pos=3, causal=True, chunk=chunk)
    cfg.update(kw)
    model = CTCModel(EncoderConfig(**cfg), 12, torch.randn(C), torch.rand(C) + 0.5, input_dim=C)
    return model.to(dtype).eval()


def stream(model, feats, piece_sizes, chunk=None):
    """Feed feats (B, F, C) in pieces of the given sizes (cycled), then final."""
    kwargs = {} if chunk is None else {"chunk": chunk}
    state, outs, start, k = model.init_state(feats.size(0)), [], 0, 0
    while start < feats.size(1):
        n = piece_sizes[k % len(piece_sizes)]
        out, state = model.stream_step(feats[:, start:start + n], state, **kwargs)
        assert state.offset == sum(o.size(1) for o in outs) + out.size(1)
        outs.append(out)
        start, k = start + n, k + 1
    out, state = model.stream_step(feats[:, :0], state, final=True, **kwargs)
    outs.append(out)
    assert state.feat_buffer.size(1) == 0
    return torch.cat(outs, dim=1), state


def _pieces(seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 14, (12,), generator=g).tolist()
    return sizes + [1, 0, 1]  # single frames and empty pieces always occur


CHUNKS = [1, 2, 4, 8]
LEFTS = [None, 0, 1, 3]


@pytest.mark.parametrize("chunk_frames", CHUNKS)
@pytest.mark.parametrize("left_chunks", LEFTS)
def test_stream_step_equals_full_forward_float64(chunk_frames, left_chunks):
    chunk = ChunkConfig(chunk_frames, left_chunks)
    model = make_student(chunk, torch.float64)
    for F_ in (83, 142):  # T = 19 and 34: not multiples of 2, 4, 8
        feats = torch.randn(2, F_, C, dtype=torch.float64)
        with torch.no_grad():
            ref = model(feats, torch.tensor([F_, F_])).out
            got, state = stream(model, feats, _pieces(F_ + chunk_frames))
        assert got.shape == ref.shape
        assert (got - ref).abs().max() < 1e-6
        assert state.offset == ref.size(1)
        cache_frames = state.att_cache.size(3)
        assert cache_frames == (ref.size(1) if left_chunks is None else min(ref.size(1), chunk.left_frames))


@pytest.mark.parametrize("chunk_frames", CHUNKS)
@pytest.mark.parametrize("left_chunks", LEFTS)
def test_stream_step_equals_full_forward_float32(chunk_frames, left_chunks):
    model = make_student(ChunkConfig(chunk_frames, left_chunks), torch.float32, seed=1)
    feats = torch.randn(1, 117, C)
    with torch.no_grad():
        ref = model(feats, torch.tensor([117])).out
        got, _ = stream(model, feats, _pieces(chunk_frames))
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-4


def test_whole_utterance_in_one_piece_and_frame_by_frame():
    model = make_student(ChunkConfig(4, 1), torch.float64)
    feats = torch.randn(1, 101, C, dtype=torch.float64)
    with torch.no_grad():
        ref = model(feats, torch.tensor([101])).out
        one, _ = stream(model, feats, [101])
        single, _ = stream(model, feats, [1])
    assert (one - ref).abs().max() < 1e-6 and (single - ref).abs().max() < 1e-6


def test_stream_emits_whole_chunks_before_final():
    chunk = ChunkConfig(4, None)
    model = make_student(chunk, torch.float64)
    window = Conv2dSubsampling4.window_frames(4)  # 19
    state = model.init_state()
    out, state = model.stream_step(torch.randn(1, window - 1, C, dtype=torch.float64), state)
    assert out.size(1) == 0  # one frame short of a window
    out, state = model.stream_step(torch.randn(1, 1, C, dtype=torch.float64), state)
    assert out.size(1) == 4 and state.feat_buffer.size(1) == window - 16
    short = model.init_state()
    out, short = model.stream_step(torch.randn(1, 6, C, dtype=torch.float64), short, final=True)
    assert out.size(1) == 0  # fewer than 7 frames give no encoder frame, as in the full forward


def test_chunk_override_decodes_dynamic_model_at_other_chunk():
    model = make_student(ChunkConfig(8, 1), torch.float64, dynamic_chunk=True, dynamic_chunk_choices=(2, 4, 8))
    other = ChunkConfig(2, 3)
    feats = torch.randn(1, 95, C, dtype=torch.float64)
    with torch.no_grad():
        ref = model(feats, torch.tensor([95]), chunk=other).out
        got, _ = stream(model, feats, [5, 0, 9], chunk=other)
        own = model(feats, torch.tensor([95])).out
    assert (got - ref).abs().max() < 1e-6
    assert not torch.allclose(own, ref)  # the override really changed the context


@pytest.mark.parametrize("chunk_frames,left_chunks", [(1, 3), (2, 0), (4, 1), (4, 3), (8, 1)])
def test_encoder_step_with_fixed_cache_matches_full_forward(chunk_frames, left_chunks):
    """What ONNX export runs: fixed T_cache, unfilled entries masked out."""
    chunk = ChunkConfig(chunk_frames, left_chunks)
    model = make_student(chunk, torch.float64)
    enc, F_ = model.encoder, 150
    feats = model.normalize(torch.randn(2, F_, C, dtype=torch.float64))
    att, cnn, valid = enc.init_step_cache(2, chunk.left_frames)
    window, hop = Conv2dSubsampling4.window_frames(chunk_frames), 4 * chunk_frames
    with torch.no_grad():
        ref = enc(feats, torch.tensor([F_, F_]), chunk).out
        outs, start = [], 0
        while start + window <= F_:
            out, att, cnn = enc.step(feats[:, start:start + window], att, cnn, valid)
            assert out.shape == (2, chunk_frames, 32)
            assert att.shape == (2, 2, 4, chunk.left_frames, 16) and cnn.shape == (2, 2, 32, 4)
            valid = roll_cache_valid_mask(valid, chunk_frames)
            outs.append(out)
            start += hop
    got = torch.cat(outs, dim=1)
    assert got.size(1) == (ref.size(1) // chunk_frames) * chunk_frames
    assert (got - ref[:, : got.size(1)]).abs().max() < 1e-6


def test_encoder_step_with_unbounded_left_matches_when_cache_holds_everything():
    chunk = ChunkConfig(2, None)
    model = make_student(chunk, torch.float64)
    enc, F_ = model.encoder, 90
    feats = model.normalize(torch.randn(1, F_, C, dtype=torch.float64))
    att, cnn, valid = enc.init_step_cache(1, 30)  # more than the utterance's 21 frames
    with torch.no_grad():
        ref = enc(feats, torch.tensor([F_]), chunk).out
        outs = []
        for start in range(0, F_ - Conv2dSubsampling4.window_frames(2) + 1, 8):
            out, att, cnn = enc.step(feats[:, start:start + 11], att, cnn, valid)
            valid = roll_cache_valid_mask(valid, 2)
            outs.append(out)
    got = torch.cat(outs, dim=1)
    assert (got - ref[:, : got.size(1)]).abs().max() < 1e-6


@pytest.mark.parametrize("chunk_frames,left_chunks", [(1, 3), (2, 0), (4, 1), (4, 2), (8, 1)])
def test_growing_cache_fixed_cache_and_export_wrapper_agree_chunk_by_chunk(chunk_frames, left_chunks):
    """The torch stream (cache grown up to the left context), the same step
    on a cache allocated at full size (the batched engine) and the graph
    ONNX export traces (sherpa-onnx's inputs: int16-scale features, a mask
    built by sherpa-onnx's rule) give the same output for every chunk,
    the last partial one included, and hold the same cached frames."""
    from streamkd.streaming.export import INT16_SCALE, WenetCtcOnnxWrapper

    chunk = ChunkConfig(chunk_frames, left_chunks)
    model = make_student(chunk, torch.float64)
    cache = chunk.left_frames
    wrapper = WenetCtcOnnxWrapper(model, cache).eval()
    feats = torch.randn(1, 141, C, dtype=torch.float64)  # T = 34: the last chunk is partial for 4 and 8
    grown, fixed = model.init_state(1), model.init_state(1, cache)
    att, cnn, _ = model.encoder.init_step_cache(1, cache)
    att, chunks_done, buf, frames = att[:, 0], 0, feats, 0
    with torch.no_grad():
        while True:
            window, buf = Conv2dSubsampling4.next_window(buf, chunk_frames, final=True)
            if window is None:
                break
            out_grown = model.stream_chunk(window, grown, chunk)
            out_fixed = model.stream_chunk(window, fixed, chunk)
            # sherpa-onnx: after k chunks the newest min(k, left) * chunk cache entries hold frames.
            mask = torch.ones(1, 1, cache + chunk_frames, dtype=torch.bool)
            mask[:, :, : cache - min(chunks_done, left_chunks) * chunk_frames] = False
            offset = torch.tensor([cache + frames])
            log_probs, att, cnn = wrapper(window + 2 * math.log(INT16_SCALE), offset, torch.tensor([cache]),
                                          att, cnn, mask)
            n = out_grown.size(1)
            assert n == out_fixed.size(1) == log_probs.size(1) > 0
            assert (out_fixed - out_grown).abs().max() < 1e-9
            assert (log_probs - model.ctc_log_probs(out_grown)).abs().max() < 1e-9
            held = min(frames + n, cache)
            assert grown.att_cache.size(3) == held and fixed.att_cache.size(3) == cache
            assert int(fixed.cache_valid_mask.sum()) == held
            newest_fixed = fixed.att_cache[..., cache - held:, :]
            assert torch.allclose(newest_fixed, grown.att_cache, atol=1e-9, rtol=0)
            assert torch.allclose(att[:, None, ..., cache - held:, :], grown.att_cache, atol=1e-9, rtol=0)
            chunks_done, frames = chunks_done + 1, frames + n
    assert frames == model(feats, torch.tensor([141])).out.size(1)
    assert frames % chunk_frames != 0 or chunk_frames <= 2
