"""Conformer-CTC model: front end reach, attention maths, layer locality, no
future leakage, padding invariance, dynamic chunks, CMVN, overfitting."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from streamkd.config import EncoderConfig
from streamkd.model import (
    MODEL_CHUNK,
    Conv2dSubsampling4,
    ConformerLayer,
    CTCModel,
    RelPositionMultiHeadAttention,
    chunk_attend_mask,
    relative_position_index,
)
from streamkd.types import ChunkConfig

C = 20  # feature bins: small keeps the tests fast


def make_model(causal=True, chunk=ChunkConfig(4, 1), dtype=torch.float64, seed=0, input_dim=C, **kw):
    torch.manual_seed(seed)
    cfg = dict(d_model=32, num_layers=2, num_heads=4, ff_mult=2, conv_kernel=5, dropout=0.1,
               max_rel_pos=3, causal=causal, chunk=chunk)
    cfg.update(kw)
    model = CTCModel(EncoderConfig(**cfg), 12, torch.randn(input_dim), torch.rand(input_dim) + 0.5,
                     input_dim=input_dim)
    return model.to(dtype).eval()


# Front end ---------------------------------------------------------------

def test_subsampling_lengths_match_conv_output():
    sub = Conv2dSubsampling4(C, 16).double()
    for frames in range(7, 60):
        out = sub(torch.randn(1, frames, C, dtype=torch.float64))
        assert out.shape == (1, Conv2dSubsampling4.output_length(frames), 16)
        assert int(Conv2dSubsampling4.output_lengths(torch.tensor([frames]))) == out.size(1)
    assert Conv2dSubsampling4.output_lengths(torch.tensor([0, 3, 6, 7])).tolist() == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="at least 7 feature frames"):
        sub(torch.randn(1, 6, C, dtype=torch.float64))


def test_subsampling_reads_exactly_frames_4t_to_4t_plus_6():
    sub = Conv2dSubsampling4(C, 16).double()
    x = torch.randn(1, 60, C, dtype=torch.float64)
    base = sub(x)
    for t in (0, 3, 7):
        changed = []
        for f in range(x.size(1)):
            y = x.clone()
            y[:, f] += 5.0
            changed.append(not torch.allclose(sub(y)[:, t], base[:, t]))
        reach = [f for f, c in enumerate(changed) if c]
        assert reach == list(range(4 * t, 4 * t + Conv2dSubsampling4.right_context + 1))


# Attention -----------------------------------------------------------------

def test_relative_position_index_matches_loop():
    for T, S, P in [(3, 3, 1), (2, 7, 2), (5, 5, 10), (1, 4, 0)]:
        got = relative_position_index(T, S, P)
        for i in range(T):
            for j in range(S):
                assert got[i, j] == max(-P, min(P, j - (S - T + i))) + P


def _naive_attention(attn, x, allowed, cache=None):
    """Explicit softmax((q.k + q.r_clip(j-i)) / sqrt(Dh)) with per-pair embedding lookup."""
    B, T, D = x.shape
    H, Dh, P = attn.num_heads, attn.head_dim, attn.max_rel_pos
    q, k, v = attn.qkv(x).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)
    if cache is not None:
        k, v = torch.cat([cache[..., :Dh], k], 2), torch.cat([cache[..., Dh:], v], 2)
    S = k.size(2)
    scores = torch.empty(B, H, T, S, dtype=x.dtype)
    for i in range(T):
        for j in range(S):
            r = attn.rel_emb[max(-P, min(P, j - (S - T + i))) + P]
            scores[:, :, i, j] = ((q[:, :, i] * k[:, :, j]).sum(-1) + (q[:, :, i] * r).sum(-1)) / math.sqrt(Dh)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    y = torch.softmax(scores, -1) @ v
    return attn.out(y.transpose(1, 2).reshape(B, T, D)), q


def test_attention_matches_naive_formula_with_cache():
    torch.manual_seed(0)
    attn = RelPositionMultiHeadAttention(16, 2, max_rel_pos=2).double().eval()
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    cache = torch.randn(2, 2, 3, 16, dtype=torch.float64)
    allowed = torch.rand(2, 4, 7) > 0.3
    allowed[..., -1] = True  # every row keeps a key
    y, kv, qkv = attn(x, allowed, kv_cache=cache, return_qkv=True)
    ref, q = _naive_attention(attn, x, allowed, cache)
    assert torch.allclose(y, ref, atol=1e-10)
    assert kv.shape == (2, 2, 7, 16) and torch.equal(kv[:, :, :3], cache)
    assert torch.equal(qkv[0], q)  # Q is returned unscaled
    assert all(t.shape == (2, 2, 4, 8) for t in qkv)


def test_attention_row_without_keys_is_zero_not_nan():
    torch.manual_seed(0)
    attn = RelPositionMultiHeadAttention(16, 2, max_rel_pos=2).double().eval()
    x = torch.randn(1, 3, 16, dtype=torch.float64)
    allowed = torch.tensor([[[True, False, False], [False, False, False], [True, True, False]]])
    y, _, _ = attn(x, allowed)
    assert torch.isfinite(y).all()
    assert torch.allclose(y[0, 1], attn.out.bias)  # zero attention output -> only the out bias
    full, _ = _naive_attention(attn, x, allowed | torch.tensor([[[False], [True], [False]]]))
    assert torch.allclose(y[0, [0, 2]], full[0, [0, 2]], atol=1e-10)


# Layer -------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_layer_convolution_reach(causal):
    """With a self-only attend mask, frame t sees only the depthwise kernel's
    reach: [t-K+1, t] when causal, [t-(K-1)/2, t+(K-1)/2] otherwise."""
    torch.manual_seed(0)
    K, T = 5, 16
    layer = ConformerLayer(16, 2, 2, K, 0.0, 4, causal).double().eval()
    x = torch.randn(1, T, 16, dtype=torch.float64)
    eye, valid = torch.eye(T, dtype=torch.bool)[None], torch.ones(1, T, dtype=torch.bool)
    base, _ = layer(x, eye, valid)
    t = 8
    lo, hi = (t - K + 1, t) if causal else (t - K // 2, t + K // 2)
    for f in range(T):
        y = x.clone()
        y[:, f] += 3.0 * torch.randn(16, dtype=torch.float64)  # not constant: LayerNorm removes a shift
        changed = not torch.allclose(layer(y, eye, valid)[0][:, t], base[:, t], rtol=0, atol=1e-12)
        assert changed == (lo <= f <= hi), f
    if not causal:
        with pytest.raises(ValueError, match="causal=True"):
            layer.step(x[:, :2], torch.zeros(1, 2, 0, 16, dtype=torch.float64),
                       torch.zeros(1, 16, K - 1, dtype=torch.float64), torch.ones(1, 2, 2, dtype=torch.bool))


def test_layer_standalone_ignores_padded_frames():
    torch.manual_seed(0)
    layer = ConformerLayer(16, 2, 2, 5, 0.0, 4, causal=False).double().eval()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False
    full = torch.ones(1, 10, 10, dtype=torch.bool)
    y, qkv = layer(x, full, valid, return_qkv=True)
    alone, _ = layer(x[1:, :6], full[:, :6, :6], valid[1:, :6])
    assert torch.allclose(y[1, :6], alone[0], atol=1e-10)
    assert len(qkv) == 3 and qkv[0].shape == (2, 2, 10, 8)


# Encoder -----------------------------------------------------------------

def test_forward_shapes_hidden_and_qkv():
    model = make_model()
    feats = torch.randn(2, 50, C, dtype=torch.float64)
    enc = model(feats, torch.tensor([50, 31]), return_hidden=True, return_qkv=True)
    T = Conv2dSubsampling4.output_length(50)
    assert enc.out.shape == (2, T, 32)
    assert enc.out_lens.tolist() == [T, Conv2dSubsampling4.output_length(31)]
    assert len(enc.hidden) == 2 and torch.equal(enc.hidden[-1], enc.out)
    assert len(enc.qkv) == 2 and all(t.shape == (2, 4, T, 8) for t in enc.qkv[0])
    assert model.ctc_log_probs(enc.out).exp().sum(-1).allclose(torch.ones(2, T, dtype=torch.float64))
    out, lens = model.encode(feats, torch.tensor([50, 31]))
    assert torch.equal(out, enc.out) and torch.equal(lens, enc.out_lens)


def test_cmvn_is_applied_inside():
    model = make_model()
    feats = torch.randn(1, 40, C, dtype=torch.float64)
    lens = torch.tensor([40])
    direct = model.encoder((feats - model.cmvn_mean) * model.cmvn_istd, lens, model.chunk).out
    assert torch.allclose(model(feats, lens).out, direct)
    with pytest.raises(ValueError, match=r"cmvn_mean must have shape \(20,\)"):
        CTCModel(EncoderConfig(d_model=32, num_layers=1, num_heads=4), 5, [0.0] * 3, [1.0] * C, input_dim=C)


@pytest.mark.parametrize("chunk", [ChunkConfig(4, 1), ChunkConfig(2, None), ChunkConfig(1, 0)])
def test_student_has_no_future_leakage(chunk):
    model = make_model(causal=True, chunk=chunk)
    F_ = 90
    feats = torch.randn(1, F_, C, dtype=torch.float64)
    lens = torch.tensor([F_])
    base = model(feats, lens, return_hidden=True).hidden
    T = base[0].size(1)
    for c in range(0, T // chunk.chunk_frames - 1):
        end = (c + 1) * chunk.chunk_frames - 1  # last encoder frame of chunk c
        reach = 4 * end + Conv2dSubsampling4.right_context
        perturbed = feats.clone()
        perturbed[:, reach + 1:] = torch.randn(1, F_ - reach - 1, C, dtype=torch.float64) * 3
        hidden = model(perturbed, lens, return_hidden=True).hidden
        for layer_base, layer_new in zip(base, hidden):
            assert torch.allclose(layer_new[:, : end + 1], layer_base[:, : end + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(hidden[-1], base[-1])  # the perturbation does reach later frames


def test_teacher_sees_the_future():
    model = make_model(causal=False, chunk=None)
    feats = torch.randn(1, 90, C, dtype=torch.float64)
    lens = torch.tensor([90])
    perturbed = feats.clone()
    perturbed[:, 60:] += 2.0
    assert not torch.allclose(model(perturbed, lens).out[:, 0], model(feats, lens).out[:, 0])


@pytest.mark.parametrize("causal,chunk", [(False, None), (True, ChunkConfig(4, 1)), (True, ChunkConfig(3, None))])
def test_alone_equals_inside_padded_batch(causal, chunk):
    model = make_model(causal=causal, chunk=chunk)
    lens = [45, 80, 63]
    feats = torch.randn(3, 80, C, dtype=torch.float64)
    for b, n in enumerate(lens):
        feats[b, n:] = torch.randn(80 - n, C, dtype=torch.float64) * 1e4  # garbage padding
    feats[0, 70] = float("nan")
    batch = model(feats, torch.tensor(lens), return_hidden=True)
    for b, n in enumerate(lens):
        alone = model(feats[b:b + 1, :n], torch.tensor([n]), return_hidden=True)
        T = int(alone.out_lens[0])
        assert int(batch.out_lens[b]) == T
        for h_batch, h_alone in zip(batch.hidden, alone.hidden):
            assert torch.allclose(h_batch[b, :T], h_alone[0], atol=1e-10)


def test_eval_mode_is_deterministic():
    model = make_model()
    feats = torch.randn(2, 40, C, dtype=torch.float64)
    lens = torch.tensor([40, 33])
    assert torch.equal(model(feats, lens).out, model(feats, lens).out)


# Dynamic chunk training ------------------------------------------------------

def test_dynamic_chunk_draws_in_training_only():
    model = make_model(chunk=ChunkConfig(4, 2), dynamic_chunk=True, dynamic_chunk_choices=(1, 2, 4, 8),
                       dynamic_full_prob=0.25, dropout=0.0)
    model.train()
    torch.manual_seed(1)
    draws = [model.resolve_chunk() for _ in range(200)]
    sizes = {d.chunk_frames for d in draws if d is not None}
    assert sizes == {1, 2, 4, 8}
    assert all(d.left_chunks == 2 for d in draws if d is not None)
    assert 20 < sum(d is None for d in draws) < 80  # about a quarter full context
    torch.manual_seed(1)
    assert [model.resolve_chunk() for _ in range(200)] == draws  # the global RNG decides

    feats, lens = torch.randn(1, 60, C, dtype=torch.float64), torch.tensor([60])
    torch.manual_seed(5)
    drawn = model.resolve_chunk()
    torch.manual_seed(5)
    assert torch.equal(model(feats, lens).out, model(feats, lens, chunk=drawn).out)
    assert model.resolve_chunk(ChunkConfig(3, 0)) == ChunkConfig(3, 0)  # explicit chunk wins
    model.eval()
    assert all(model.resolve_chunk(MODEL_CHUNK) == ChunkConfig(4, 2) for _ in range(20))


# Training ------------------------------------------------------------------

def test_tiny_model_overfits_one_batch():
    model = make_model(dtype=torch.float32, dropout=0.0).train()
    torch.manual_seed(0)
    feats = torch.randn(4, 60, C)
    feat_lens = torch.tensor([60, 55, 48, 60])
    tokens = torch.randint(1, 12, (4, 5))
    token_lens = torch.tensor([5, 4, 3, 5])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        enc = model(feats, feat_lens)
        log_probs = model.ctc_log_probs(enc.out).transpose(0, 1)  # (T, B, V)
        loss = F.ctc_loss(log_probs, tokens, enc.out_lens, token_lens, blank=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_streaming_errors_are_clear():
    teacher = make_model(causal=False, chunk=None)
    with pytest.raises(ValueError, match="needs a ChunkConfig"):
        teacher.stream_step(torch.zeros(1, 10, C, dtype=torch.float64), teacher.init_state())
    with pytest.raises(ValueError, match="causal encoder"):
        teacher.stream_step(torch.zeros(1, 10, C, dtype=torch.float64), teacher.init_state(), chunk=ChunkConfig(2))
    student = make_model()
    with pytest.raises(ValueError, match="expects feats of shape"):
        student.stream_step(torch.zeros(1, 10, C + 1, dtype=torch.float64), student.init_state())
