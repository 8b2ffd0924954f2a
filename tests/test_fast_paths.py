"""The speed paths of the model compute what the plain modules compute."""
import pytest
import torch
import torch.nn.functional as F

from streamkd.model.dropout import Dropout
from streamkd.model.subsampling import Conv2dSubsampling4


def _reference_subsampling(m: Conv2dSubsampling4, x: torch.Tensor) -> torch.Tensor:
    """The textbook front end: nn.Conv2d in NCHW, then (channel, frequency) features."""
    h = m.conv(x.unsqueeze(1))
    B, D, T, Cf = h.shape
    return m.out(h.transpose(1, 2).reshape(B, T, D * Cf))


@pytest.mark.parametrize("frames,dim", [(7, 80), (8, 80), (57, 80), (203, 40), (400, 80)])
def test_subsampling_fast_path_equals_conv2d(frames, dim):
    torch.manual_seed(frames)
    m = Conv2dSubsampling4(dim, 32)
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
