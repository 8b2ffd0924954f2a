"""Inverted dropout with a cheaper mask.

``nn.Dropout`` on CPU draws its mask with ``bernoulli_`` (about 5 ns per
element here) and ``torch.rand`` costs about 2.5 ns per element; dropout
masks were 15-20% of a demo student's training step (``streamkd bench
--profile none``). ``keep_mask`` draws 64 random bits per four elements
(``random_`` over the whole int64 range, ~0.65 ns per element) and compares
each 16-bit lane with a threshold, so the drop probability is p rounded to
a multiple of 1/65536 (0.1 -> 0.100006) and the scale 1/(1 - p) uses that
rounded p, which keeps E[y] = x exactly. ``dropout_mask`` holds the scale
in the mask itself, so dropout is one product forward and one backward.
The attention's dropout uses the same mask (``streamkd.model.attention``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Dropout", "dropout_mask", "keep_mask"]

_LEVELS = 1 << 16  # values of one 16-bit lane


def _check_probability(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")


def keep_mask(shape, p: float, device=None) -> tuple[torch.Tensor, float]:
    """(mask, scale): mask of ``shape``, True with probability 1 - p' i.i.d.,
    where p' = round(p * 65536) / 65536, and scale = 1 / (1 - p').

    Draws from torch's default generator of ``device``, so masks follow
    ``torch.manual_seed`` and a resumed run's restored RNG state.
    """
    _check_probability(p)
    n = math.prod(shape)
    dropped = round(p * _LEVELS)
    if dropped == _LEVELS:  # p within 2^-17 of 1
        dropped -= 1
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    lanes = bits.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    return lanes >= dropped - (_LEVELS // 2), _LEVELS / (_LEVELS - dropped)


def dropout_mask(shape, p: float, dtype: torch.dtype, device=None) -> torch.Tensor:
    """keep_mask as a tensor of ``dtype`` holding scale where kept and 0 where
    dropped, so that dropout is one product forward and one backward (a
    boolean mask would be converted to ``dtype`` in both, and the scale
    would be a second product)."""
    keep, scale = keep_mask(shape, p, device)
    return keep.to(dtype).mul_(scale)  # half the time of torch.where(keep, scale, 0) here


class Dropout(nn.Module):
    """y = x * m with m = dropout_mask(x.shape, p): m_i = 1 / (1 - p') kept,
    0 dropped (see keep_mask); identity in eval mode or when p = 0. Same
    interface and state as ``nn.Dropout``."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        _check_probability(p)
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * dropout_mask(x.shape, self.p, x.dtype, x.device)

    def extra_repr(self) -> str:
        return f"p={self.p}"
