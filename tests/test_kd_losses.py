"""The distillation losses against explicit per-frame loops on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch

from streamkd.kd.losses import (
    apc_loss,
    attention_relation_loss,
    ctc_loss,
    feature_similarity_loss,
    hole_attend_mask,
    layer_kd_loss,
    token_kd_loss,
)


@pytest.fixture(autouse=True)
def _float64():
    """Exact comparisons with the loop oracles; restored so that other test
    modules of the session keep float32."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


B, T, D = 2, 3, 4
LENS = [3, 2]  # second utterance has one padded frame
MIN_FEAT = -math.log(1.0 / (1.0 + math.exp(-1.0)))  # -log sigmoid(1)


def _valid(lens=LENS, t=T):
    return torch.tensor([[i < n for i in range(t)] for n in lens])


def _pad_garbage(x, valid):
    """Put wild values (huge, inf, NaN) in every padded frame of (B, T, ...)."""
    x = x.clone()
    junk = torch.tensor([1e30, float("inf"), float("nan"), -7.0])
    for b in range(x.size(0)):
        for t in range(x.size(1)):
            if not valid[b, t]:
                flat = x[b, t].reshape(-1)
                flat[:] = junk[torch.arange(flat.numel()) % 4]
    return x


def _frame_oracle(h, z):
    """One frame: (1/D) sum |h - z| - log sigmoid(cos(h, z)), written out."""
    d = len(h)
    l1 = sum(abs(float(h[i]) - float(z[i])) for i in range(d)) / d
    dot = sum(float(h[i]) * float(z[i]) for i in range(d))
    nh = math.sqrt(sum(float(v) ** 2 for v in h))
    nz = math.sqrt(sum(float(v) ** 2 for v in z))
    cos = dot / (nh * nz)
    return l1 - math.log(1.0 / (1.0 + math.exp(-cos)))


# ---------------------------------------------------------------- feature loss
def test_feature_loss_matches_loop():
    g = torch.Generator().manual_seed(0)
    z, h = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    valid = _valid()
    vals = [_frame_oracle(h[b, t], z[b, t]) for b in range(B) for t in range(LENS[b])]
    expected = sum(vals) / len(vals)
    assert feature_similarity_loss(z, h, valid).item() == pytest.approx(expected, rel=1e-12)
    # the layer baseline is the same loss, applied to the projected student
    assert layer_kd_loss(z, h, valid).item() == pytest.approx(expected, rel=1e-12)


def test_feature_loss_minimum_when_equal():
    h = torch.randn(B, T, D)
    loss = feature_similarity_loss(h.clone(), h, _valid())
    assert loss.item() == pytest.approx(MIN_FEAT, abs=1e-12)
    # any other student is strictly worse
    assert feature_similarity_loss(h + 0.1, h, _valid()).item() > MIN_FEAT


def test_feature_loss_ignores_padding_values_and_grads():
    g = torch.Generator().manual_seed(1)
    z, h = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    valid = _valid()
    ref = feature_similarity_loss(z, h, valid)
    zg = _pad_garbage(z, valid).requires_grad_(True)
    loss = feature_similarity_loss(zg, _pad_garbage(h, valid), valid)
    assert loss.item() == ref.item()
    loss.backward()
    assert torch.isfinite(zg.grad).all()
    assert (zg.grad[1, 2] == 0).all()  # padded frame gets no gradient


def test_feature_loss_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="project"):
        feature_similarity_loss(torch.zeros(B, T, D), torch.zeros(B, T, D + 1), _valid())


# ------------------------------------------------------------------ APC loss
@pytest.mark.parametrize("horizon", [1, 2])
def test_apc_loss_matches_loop(horizon):
    g = torch.Generator().manual_seed(2)
    p, h = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    vals = [
        _frame_oracle(h[b, t + horizon], p[b, t])
        for b in range(B)
        for t in range(T)
        if t + horizon < LENS[b]
    ]
    expected = sum(vals) / len(vals)
    valid = _valid()
    assert apc_loss(p, h, valid, horizon).item() == pytest.approx(expected, rel=1e-12)
    got = apc_loss(_pad_garbage(p, valid), _pad_garbage(h, valid), valid, horizon)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_apc_loss_minimum_when_prediction_is_the_future():
    h = torch.randn(B, T, D)
    p = torch.zeros_like(h)
    p[:, :-1] = h[:, 1:]
    assert apc_loss(p, h, _valid(), 1).item() == pytest.approx(MIN_FEAT, abs=1e-12)


def test_apc_loss_no_pairs_is_zero_with_graph():
    p = torch.randn(B, T, D, requires_grad=True)
    loss = apc_loss(p, torch.randn(B, T, D), _valid(), horizon=T)
    assert loss.item() == 0.0
    loss.backward()  # still differentiable


# ------------------------------------------------------------- relation loss
def _relation_oracle(x, n, heads):
    """x: (H, T, Dh) one utterance -> list over r of (n x n) softmax rows on
    the first n frames, built with explicit loops."""
    h, _, dh = x.shape
    width = h * dh
    d_r = width // heads
    cat = [[float(x[i // dh, t, i % dh]) for i in range(width)] for t in range(n)]
    rels = []
    for r in range(heads):
        rows = []
        for t in range(n):
            s = [
                sum(cat[t][r * d_r + c] * cat[u][r * d_r + c] for c in range(d_r)) / math.sqrt(d_r)
                for u in range(n)
            ]
            m = max(s)
            e = [math.exp(v - m) for v in s]
            rows.append([v / sum(e) for v in e])
        rels.append(rows)
    return rels


def _kl_oracle(student_qkv, teacher_qkv, lens, heads):
    total = 0.0
    for xs, xt in zip(student_qkv, teacher_qkv):
        kls = []
        for b, n in enumerate(lens):
            rs, rt = _relation_oracle(xs[b], n, heads), _relation_oracle(xt[b], n, heads)
            for r in range(heads):
                for t in range(n):
                    kls.append(sum(p * math.log(p / q) for p, q in zip(rt[r][t], rs[r][t])))
        total += sum(kls) / len(kls)
    return total


def test_relation_loss_matches_loop_with_different_head_counts():
    g = torch.Generator().manual_seed(3)
    # student: 2 heads of 4 (width 8); teacher: 4 heads of 3 (width 12); R = 2
    s_qkv = tuple(torch.randn(B, 2, T, 4, generator=g) for _ in range(3))
    t_qkv = tuple(torch.randn(B, 4, T, 3, generator=g) for _ in range(3))
    expected = _kl_oracle(s_qkv, t_qkv, LENS, heads=2)
    got = attention_relation_loss(s_qkv, t_qkv, _valid(), relation_heads=2)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_relation_loss_zero_when_equal_and_ignores_padding():
    g = torch.Generator().manual_seed(4)
    qkv = tuple(torch.randn(B, 2, T, 2, generator=g) for _ in range(3))
    valid = _valid()
    assert attention_relation_loss(qkv, qkv, valid, 4).item() == 0.0
    other = tuple(torch.randn(B, 2, T, 2, generator=g) for _ in range(3))
    ref = attention_relation_loss(other, qkv, valid, 2)
    assert ref.item() > 0

    def garbage(x):  # (B, H, T, Dh): padding lives on dim 2
        return _pad_garbage(x.transpose(1, 2), valid).transpose(1, 2)

    s = tuple(garbage(x).requires_grad_(True) for x in other)
    got = attention_relation_loss(s, tuple(garbage(x) for x in qkv), valid, 2)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    got.backward()
    assert all(torch.isfinite(x.grad).all() for x in s)


def test_relation_heads_must_divide_width():
    qkv = tuple(torch.randn(B, 2, T, 3) for _ in range(3))  # width 6
    with pytest.raises(ValueError, match="divisible by 4"):
        attention_relation_loss(qkv, qkv, _valid(), 4)


# ----------------------------------------------------------------- token KD
def _token_oracle(s_lp, t_lp, lens, tau, k):
    kls = []
    for b, n in enumerate(lens):
        for t in range(n - k):  # teacher frame t, student frame t + k, both valid
            ps = [math.exp(float(v) / tau) for v in t_lp[b, t]]
            qs = [math.exp(float(v) / tau) for v in s_lp[b, t + k]]
            ps = [v / sum(ps) for v in ps]
            qs = [v / sum(qs) for v in qs]
            kls.append(sum(p * math.log(p / q) for p, q in zip(ps, qs)))
    return tau**2 * sum(kls) / len(kls)


@pytest.mark.parametrize("tau,k", [(1.0, 0), (2.0, 0), (2.0, 1), (0.5, 2)])
def test_token_kd_matches_loop(tau, k):
    g = torch.Generator().manual_seed(5)
    s_lp = torch.randn(B, T, D, generator=g).log_softmax(-1)
    t_lp = torch.randn(B, T, D, generator=g).log_softmax(-1)
    expected = _token_oracle(s_lp, t_lp, LENS, tau, k)
    valid = _valid()
    got = token_kd_loss(s_lp, t_lp, valid, temperature=tau, shift_frames=k)
    assert got.item() == pytest.approx(expected, rel=1e-10)
    got = token_kd_loss(_pad_garbage(s_lp, valid), _pad_garbage(t_lp, valid), valid, tau, k)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_token_kd_tempering_log_probs_equals_tempering_logits():
    logits_s, logits_t = torch.randn(B, T, D) * 3, torch.randn(B, T, D) * 3
    tau = 3.0
    p = (logits_t / tau).softmax(-1)
    q = (logits_s / tau).softmax(-1)
    valid = _valid()
    kl = (p * (p.log() - q.log())).sum(-1)
    expected = tau**2 * kl[valid].mean()
    got = token_kd_loss(logits_s.log_softmax(-1), logits_t.log_softmax(-1), valid, tau)
    assert got.item() == pytest.approx(expected.item(), rel=1e-10)


def test_token_kd_zero_when_equal_and_shift_excludes_unpaired():
    lp = torch.randn(B, T, D).log_softmax(-1)
    valid = _valid()
    assert token_kd_loss(lp, lp.clone(), valid, 2.0).item() == 0.0
    # the student delayed by exactly one frame: zero with shift 1, not with 0
    delayed = torch.randn(B, T, D).log_softmax(-1)
    delayed[:, 1:] = lp[:, :-1]
    assert token_kd_loss(delayed, lp, valid, 1.0, shift_frames=1).item() == pytest.approx(0.0, abs=1e-14)
    assert token_kd_loss(delayed, lp, valid, 1.0, shift_frames=0).item() > 0
    # frames without a partner do not count: changing the student's frame 0
    # (no teacher frame -1) and the teacher's last valid frame (its partner
    # would be past the end) leaves the value unchanged
    s2, t2 = delayed.clone(), lp.clone()
    s2[:, 0] = torch.randn(B, D).log_softmax(-1)
    t2[0, 2] = torch.randn(D).log_softmax(-1)
    t2[1, 1] = torch.randn(D).log_softmax(-1)
    assert token_kd_loss(s2, t2, valid, 1.0, shift_frames=1).item() == pytest.approx(0.0, abs=1e-14)


# -------------------------------------------------------------------- CTC
def test_ctc_loss_per_token_normalisation():
    g = torch.Generator().manual_seed(6)
    lp = torch.randn(B, 5, D, generator=g).log_softmax(-1)
    out_lens = torch.tensor([5, 4])
    tokens = torch.tensor([[1, 2], [3, -1]])
    token_lens = torch.tensor([2, 1])

    def nll(b, target, n):  # brute force: sum over all alignments of length n
        import itertools

        total = 0.0
        for path in itertools.product(range(D), repeat=n):
            collapsed = [c for i, c in enumerate(path) if c != 0 and (i == 0 or c != path[i - 1])]
            if collapsed == target:
                total += math.exp(sum(float(lp[b, t, path[t]]) for t in range(n)))
        return -math.log(total)

    expected = (nll(0, [1, 2], 5) + nll(1, [3], 4)) / 3
    assert ctc_loss(lp, out_lens, tokens, token_lens).item() == pytest.approx(expected, rel=1e-10)
    # infeasible target (longer than the output) is zeroed, not inf
    inf_case = ctc_loss(lp[:, :1], torch.tensor([1, 1]), tokens, token_lens)
    assert torch.isfinite(inf_case)


# -------------------------------------------------------------- hole mask
@pytest.mark.parametrize("t,n", [(1, 1), (5, 1), (6, 2), (4, 5)])
def test_hole_mask_matches_loop(t, n):
    mask = hole_attend_mask(t, n)
    assert mask.shape == (t, t) and mask.dtype == torch.bool
    for q in range(t):
        for k in range(t):
            assert bool(mask[q, k]) == (not (q + 1 <= k <= q + n))
