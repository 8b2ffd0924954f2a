"""The speed paths of the model compute what the plain modules compute."""
import pytest
import torch
import torch.nn.functional as F

from streamkd.model.dropout import Dropout, keep_mask
from streamkd.model.subsampling import Conv2dSubsampling4


def _reference_subsampling(m: Conv2dSubsampling4, x: torch.Tensor) -> torch.Tensor:
    """The textbook front end: nn.Conv2d in NCHW, then (channel, frequency) features."""
    h = m.conv(x.unsqueeze(1))
    B, D, T, Cf = h.shape
    return m.out(h.transpose(1, 2).reshape(B, T, D * Cf))


@pytest.mark.parametrize("frames,dim,channels", [(7, 80, None), (8, 80, None), (57, 80, None), (203, 40, None),
                                                 (400, 80, None), (57, 80, 12), (203, 40, 48)])
def test_subsampling_fast_path_equals_conv2d(frames, dim, channels):
    torch.manual_seed(frames)
    m = Conv2dSubsampling4(dim, 32, channels)
    assert m.conv[0].out_channels == (channels or 32)
    x = torch.randn(3, frames, dim, requires_grad=True)
    ref = _reference_subsampling(m, x)
    out = m(x)
    assert out.shape == ref.shape == (3, Conv2dSubsampling4.output_length(frames), 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Gradients agree too, for the input and for every parameter.
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, [x, *m.parameters()], g)
    grads = torch.autograd.grad(out, [x, *m.parameters()], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_subsampling_inference_mode_equals_training_path():
    torch.manual_seed(0)
    m = Conv2dSubsampling4(80, 24)
    x = torch.randn(2, 50, 80)
    with torch.inference_mode():
        fast = m(x)
    torch.testing.assert_close(fast, _reference_subsampling(m, x), rtol=1e-5, atol=1e-5)


def test_dropout_rate_scale_and_gradient():
    torch.manual_seed(0)
    d = Dropout(0.25).train()
    x = torch.ones(200_000, requires_grad=True)
    y = d(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.25) < 0.005
    # Kept elements are scaled by 1 / (1 - p): the expectation is unchanged.
    kept = y[y != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / 0.75))
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.75)


def test_dropout_identity_in_eval_and_at_zero():
    x = torch.randn(5, 7)
    assert torch.equal(Dropout(0.5).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)


def test_dropout_masks_follow_the_seed():
    d = Dropout(0.3).train()
    x = torch.randn(1000)
    torch.manual_seed(7)
    a = d(x)
    torch.manual_seed(7)
    b = d(x)
    torch.manual_seed(8)
    c = d(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("p", [0.03, 0.1, 0.5])
def test_keep_mask_rate_in_every_lane_and_no_lane_correlation(p):
    # 4 mask elements share one 64-bit draw: each 16-bit lane must be a full
    # uniform draw (an int64 random_ without the full range leaves the top
    # bit at 0, which would bias every fourth element), and lanes must not
    # be correlated with each other.
    torch.manual_seed(0)
    mask, scale = keep_mask((1001, 401), p)  # n not a multiple of 4
    assert mask.shape == (1001, 401) and mask.dtype == torch.bool
    p_used = round(p * 65536) / 65536
    assert scale == pytest.approx(1 / (1 - p_used))
    flat = mask.flatten()[: (mask.numel() // 4) * 4].view(-1, 4).double()
    sd = (p * (1 - p) / flat.size(0)) ** 0.5
    for lane in range(4):
        assert abs(1 - flat[:, lane].mean().item() - p) < 5 * sd, lane
    centred = flat - flat.mean(0)
    corr = (centred.t() @ centred) / flat.size(0) / (p * (1 - p))
    off_diagonal = corr - torch.diag(torch.diag(corr))
    assert off_diagonal.abs().max().item() < 5 / flat.size(0) ** 0.5


def test_keep_mask_rejects_bad_probability():
    with pytest.raises(ValueError, match="dropout probability"):
        keep_mask((3,), 1.0)
    with pytest.raises(ValueError, match="dropout probability"):
        keep_mask((3,), -0.1)


def _attention_reference(attn, x, attend_mask, keep=None, scale_keep=1.0):
    """Softmax attention written out, with an optional dropout mask."""
    B, T, D = x.shape
    H, Dh = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2) + attn._position_bias(q, T)) * Dh ** -0.5
    weights = torch.softmax(scores.masked_fill(~attend_mask.unsqueeze(1), float("-inf")), dim=-1)
    if keep is not None:
        weights = weights * keep * scale_keep
    return attn.out((weights @ v).transpose(1, 2).reshape(B, T, D))


def test_attention_dropout_path_matches_the_written_out_product():
    from streamkd.model.attention import RelPositionMultiHeadAttention
    from streamkd.model.masks import chunk_attend_mask
    from streamkd.types import ChunkConfig

    torch.manual_seed(0)
    attn = RelPositionMultiHeadAttention(32, 4, max_rel_pos=8, dropout=0.2).train()
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    attn = attn.double()
    mask = chunk_attend_mask(11, ChunkConfig(chunk_frames=4, left_chunks=1)).unsqueeze(0)
    torch.manual_seed(5)
    y, _, _ = attn(x, mask)
    torch.manual_seed(5)
    keep, scale = keep_mask((3, 4, 11, 11), 0.2)
    torch.testing.assert_close(y, _attention_reference(attn, x, mask, keep, scale))
    # In eval (no dropout) the fused kernel gives the same product without the mask.
    y_eval, _, _ = attn.eval()(x, mask)
    torch.testing.assert_close(y_eval, _attention_reference(attn, x, mask))
