"""Distillation losses: pure functions of tensors (see docs/method.md).

Every loss takes a (B, T) ``valid_mask`` (True on real frames) and returns a
scalar tensor. Padded frames never change the value: inputs are zeroed there
before any arithmetic (so even inf/NaN padding cannot leak through a product
with 0) and the per-frame values are averaged over valid frames only.
Dimension legend as in ``streamkd.types``; R: relation heads, d_r: width of
one relation head, N: future-prediction horizon, k: token-KD shift.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "ctc_loss",
    "feature_similarity_loss",
    "layer_kd_loss",
    "attention_relation_loss",
    "apc_loss",
    "token_kd_loss",
    "hole_attend_mask",
]

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is True (same shape); 0 (still in the
    graph) when nothing is selected, so a batch of very short utterances does
    not turn the loss into NaN."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def _zero_padding(x: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) with frames where ``valid_mask`` (B, T) is False set to 0."""
    keep = valid_mask.reshape(valid_mask.shape + (1,) * (x.dim() - 2))
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def ctc_loss(
    log_probs: torch.Tensor,
    out_lens: torch.Tensor,
    tokens: torch.Tensor,
    token_lens: torch.Tensor,
    blank: int = 0,
) -> torch.Tensor:
    """CTC loss normalised per token.

    L_ctc = sum_b -log p(y_b | x_b) / sum_b U_b

    Summing over the batch and dividing by the number of target tokens (rather
    than averaging per-utterance means) weights every token equally whatever
    the utterance lengths in the batch, so the loss scale does not depend on
    how the sampler bucketed the batch. Infeasible alignments (output shorter
    than the target needs) contribute 0 (``zero_infinity``).

    log_probs: (B, T, V) log-softmax output; out_lens: (B,) int64;
    tokens: (B, U) int64 padded with -1; token_lens: (B,) int64.
    """
    # The padding value -1 is not a valid class index even where ctc_loss
    # ignores it, so replace it by the blank.
    targets = tokens.clamp(min=0)
    per_utt = F.ctc_loss(
        log_probs.transpose(0, 1),  # (T, B, V), the layout ctc_loss wants
        targets,
        out_lens,
        token_lens,
        blank=blank,
        reduction="none",
        zero_infinity=True,
    )
    return per_utt.sum() / token_lens.sum().clamp(min=1)


def _frame_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, T, D) x2 -> (B, T): (1/D)||a_t - b_t||_1 - log sigmoid(cos(a_t, b_t))."""
    l1 = (a - b).abs().mean(dim=-1)
    cos = F.cosine_similarity(a, b, dim=-1)
    return l1 - F.logsigmoid(cos)


def feature_similarity_loss(
    student: torch.Tensor, teacher: torch.Tensor, valid_mask: torch.Tensor
) -> torch.Tensor:
    """DistilHuBERT-style feature loss.

    L_feat = mean over valid t of [ (1/D) ||h_t - z_t||_1 - log sigmoid(cos(h_t, z_t)) ]

    Its minimum, reached when z == h, is -log sigmoid(1) ~= 0.3133 (the L1 part
    is 0 and the cosine is 1), not 0.

    student (z): (B, T, D); teacher (h): (B, T, D); valid_mask: (B, T) bool.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"feature_similarity_loss: student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)} differ; project the student to the teacher's width first"
        )
    per_frame = _frame_similarity(
        _zero_padding(student, valid_mask), _zero_padding(teacher, valid_mask)
    )
    return _masked_mean(per_frame, valid_mask)


def layer_kd_loss(
    projected_student: torch.Tensor, teacher: torch.Tensor, valid_mask: torch.Tensor
) -> torch.Tensor:
    """The direct layer-to-layer baseline ("layer" in method.md): the feature
    similarity loss between the linearly projected *streaming* output
    proj(s_i) and the teacher's layer output h_j, with no auxiliary branch in
    between (so the student must match full-context features from streaming
    context, the mismatch the paper's branch removes).

    L_layer = L_feat(proj(s_i), h_j)

    projected_student: (B, T, D_t); teacher: (B, T, D_t); valid_mask: (B, T).
    """
    return feature_similarity_loss(projected_student, teacher, valid_mask)


def _relation_log_probs(x: torch.Tensor, key_valid: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H, T, Dh) -> (B, R, T, T) log softmax(X X^T / sqrt(d_r)) over valid keys.

    key_valid: (B, T). Invalid keys get the lowest finite score, so their
    probability is exactly 0 in float32 and bfloat16 whenever a row has a
    valid key, and the log-probabilities stay finite (no 0 * -inf = NaN in
    the KL or its gradient); a row without any valid key is uniform (such
    rows are padded queries, which the loss leaves out).
    """
    b, h, t, dh = x.shape
    width = h * dh
    if width % heads:
        raise ValueError(f"attention_relation_loss: width H*Dh = {width} is not divisible by {heads} relation heads")
    d_r = width // heads
    # (B, H, T, Dh) -> (B, T, H*Dh): concatenate the heads
    cat = x.transpose(1, 2).reshape(b, t, width)
    # (B, T, R*d_r) -> (B, R, T, d_r): re-split into relation heads
    rel = cat.reshape(b, t, heads, d_r).transpose(1, 2)
    scores = rel @ rel.transpose(-1, -2) / math.sqrt(d_r)  # (B, R, T, T)
    scores = scores.masked_fill(~key_valid[:, None, None, :], torch.finfo(scores.dtype).min)
    return scores.log_softmax(dim=-1)


def attention_relation_loss(
    student_qkv: QKV,
    teacher_qkv: QKV,
    valid_mask: torch.Tensor,
    relation_heads: int,
) -> torch.Tensor:
    """MiniLMv2-style self-attention relation loss.

    For X in {Q, K, V}: concatenate the heads of X into (B, T, H*Dh), re-split
    into R relation heads X_r (B, R, T, d_r = H*Dh/R) and form
    Rel_X = softmax(X_r X_r^T / sqrt(d_r)) over valid keys (B, R, T, T). Then

    L_attn = sum over X of mean over (r, valid query t) of
             KL(Rel_X(teacher)[r, t] || Rel_X(student)[r, t])

    computed as sum_k p_t log p_t - sum_k p_t log p_s over the valid keys k
    (p = Rel_X). The teacher side is a constant: no gradient reaches it.
    Teacher and student may differ in head count and width; only each side's
    H*Dh must be divisible by R.

    student_qkv / teacher_qkv: (Q, K, V), each (B, H, T, Dh) (H, Dh per side),
    Q unscaled; valid_mask: (B, T) bool.
    """
    key_valid = valid_mask
    # A valid query row of relation r, broadcast over R: (B, R, T).
    row_mask = valid_mask[:, None, :].expand(-1, relation_heads, -1)
    total = student_qkv[0].new_zeros(())
    for xs, xt in zip(student_qkv, teacher_qkv):
        # (B, H, T, Dh) -> zero padded frames (T is dim 2)
        xs = _zero_padding(xs.transpose(1, 2), valid_mask).transpose(1, 2)
        with torch.no_grad():
            xt = _zero_padding(xt.transpose(1, 2), valid_mask).transpose(1, 2)
            log_t = _relation_log_probs(xt, key_valid, relation_heads)  # finite everywhere
            # Invalid keys: p_t = 0 exactly (also in rows without a valid key).
            p_t = log_t.exp() * key_valid[:, None, None, :]
            neg_entropy = (p_t * log_t).sum(dim=-1)  # (B, R, T), sum p_t log p_t
        log_s = _relation_log_probs(xs, key_valid, relation_heads)
        kl = neg_entropy - (p_t * log_s).sum(dim=-1)  # (B, R, T)
        total = total + _masked_mean(kl, row_mask)
    return total


def apc_loss(
    pred: torch.Tensor, teacher: torch.Tensor, valid_mask: torch.Tensor, horizon: int
) -> torch.Tensor:
    """APC-style future prediction loss: the prediction at t matches the
    teacher's feature N frames ahead.

    L_apc = mean over t with t and t+N valid of
            [ (1/D) ||h_{t+N} - P_t||_1 - log sigmoid(cos(h_{t+N}, P_t)) ]

    i.e. the feature similarity loss between P[:, :T-N] and h[:, N:]. Frames
    without a target N ahead are excluded; 0 if no frame has one.

    pred (P): (B, T, D); teacher (h): (B, T, D); valid_mask: (B, T); horizon N >= 1.
    """
    if horizon < 1:
        raise ValueError(f"apc_loss: horizon must be >= 1 encoder frame, got {horizon}")
    t = pred.size(1)
    if horizon >= t:
        return pred.sum() * 0.0  # no pairs; keep the graph for backward
    pair_mask = valid_mask[:, horizon:] & valid_mask[:, : t - horizon]
    return feature_similarity_loss(pred[:, : t - horizon], teacher[:, horizon:], pair_mask)


def token_kd_loss(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    valid_mask: torch.Tensor,
    temperature: float = 1.0,
    shift_frames: int = 0,
) -> torch.Tensor:
    """Frame-level token-posterior KD at temperature tau, student delayed by k.

    p_t = softmax(teacher logits_t / tau), q_t = softmax(student logits_t / tau)
    L_tok = tau^2 * mean over t with t and t+k valid of KL(p_t || q_{t+k})

    The inputs are log-probabilities; log_softmax(log_probs / tau) equals
    softmax(logits / tau) because log_probs = logits - logsumexp(logits) is
    logits shifted by a per-frame constant, the division turns it into
    another per-frame constant, and log_softmax is shift-invariant. The
    tau^2 factor keeps the gradient scale independent of tau (Hinton et al.).

    student_log_probs / teacher_log_probs: (B, T, V); valid_mask: (B, T);
    shift_frames k >= 0: student frame t+k is compared with teacher frame t.
    """
    if temperature <= 0:
        raise ValueError(f"token_kd_loss: temperature must be > 0, got {temperature}")
    if shift_frames < 0:
        raise ValueError(f"token_kd_loss: shift_frames must be >= 0, got {shift_frames}")
    if student_log_probs.shape != teacher_log_probs.shape:
        raise ValueError(
            f"token_kd_loss: student {tuple(student_log_probs.shape)} and teacher "
            f"{tuple(teacher_log_probs.shape)} posteriors differ in shape"
        )
    t = student_log_probs.size(1)
    k = shift_frames
    if k >= t:
        return student_log_probs.sum() * 0.0
    pair_mask = valid_mask[:, k:] & valid_mask[:, : t - k]  # (B, T-k), indexed by teacher frame
    log_q = _zero_padding(student_log_probs[:, k:], pair_mask)
    log_p = _zero_padding(teacher_log_probs[:, : t - k], pair_mask)
    log_q = (log_q / temperature).log_softmax(dim=-1)
    log_p = (log_p / temperature).log_softmax(dim=-1)
    kl = (torch.exp(log_p) * (log_p - log_q)).sum(dim=-1)  # (B, T-k)
    return temperature**2 * _masked_mean(kl, pair_mask)


def hole_attend_mask(num_frames: int, horizon: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, T) bool attend mask with a hole: query t may attend every key
    except t+1 .. t+N (the frames the APC predictor is asked about).

    num_frames T, horizon N >= 1.
    """
    if horizon < 1:
        raise ValueError(f"hole_attend_mask: horizon must be >= 1, got {horizon}")
    pos = torch.arange(num_frames, device=device)
    offset = pos[None, :] - pos[:, None]  # key - query
    return ~((offset >= 1) & (offset <= horizon))
