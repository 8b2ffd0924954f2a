"""Training-only modules of the distillation (docs/method.md).

``AuxiliaryBranch``: the paper's auxiliary non-streaming layer. It reads a
student layer's streaming output s_i and turns it, with full context, into
z_i at the teacher's width, so that the KD losses compare features computed
with the same context as the teacher's. It is one ``ConformerLayer`` of the
model package (no copied layer code) with ``causal=False`` and an attend mask
that allows every valid key, plus an input projection where the widths
differ. It only reads: nothing flows back into the streaming encoder except
gradients.

``APCPredictor``: the small autoregressive predictor of the future-prediction
loss, a one-layer unidirectional LSTM and a linear output.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from streamkd.config import EncoderConfig
from streamkd.model.conformer import ConformerLayer

__all__ = ["AuxiliaryBranch", "APCPredictor"]

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class AuxiliaryBranch(nn.Module):
    """Optional Linear(D_s -> D_t) then one full-context ConformerLayer of width D_t.

    student_dim D_s, teacher_dim D_t; the layer's other options (heads,
    feed-forward multiple, kernel, dropout, relative positions) are keyword
    arguments, normally the teacher's (see ``from_teacher``).
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        *,
        num_heads: int,
        ff_mult: int,
        conv_kernel: int,
        dropout: float,
        max_rel_pos: int,
    ) -> None:
        super().__init__()
        # Identity keeps the state dict free of a useless square matrix when
        # the widths agree.
        self.proj: nn.Module = (
            nn.Identity() if student_dim == teacher_dim else nn.Linear(student_dim, teacher_dim)
        )
        self.layer = ConformerLayer(
            teacher_dim, num_heads, ff_mult, conv_kernel, dropout, max_rel_pos, causal=False
        )

    @classmethod
    def from_teacher(cls, student_dim: int, teacher_cfg: EncoderConfig) -> "AuxiliaryBranch":
        """A branch shaped like one layer of the teacher described by ``teacher_cfg``."""
        return cls(
            student_dim,
            teacher_cfg.d_model,
            num_heads=teacher_cfg.num_heads,
            ff_mult=teacher_cfg.ff_mult,
            conv_kernel=teacher_cfg.conv_kernel,
            dropout=teacher_cfg.dropout,
            max_rel_pos=teacher_cfg.max_rel_pos,
        )

    def forward(
        self,
        s: torch.Tensor,
        valid_mask: torch.Tensor,
        attend_mask: Optional[torch.Tensor] = None,
        return_qkv: bool = False,
    ) -> tuple[torch.Tensor, Optional[QKV]]:
        """s: (B, T, D_s) streaming output of a student layer; valid_mask: (B, T);
        attend_mask: (T, T) or (B|1, T, T) bool, default full context (e.g. a
        hole mask for the APC variant); padded keys are always forbidden.

        Returns z (B, T, D_t) and, on request, the layer's (Q, K, V), each
        (B, H_t, T, Dh_t).
        """
        t = s.size(1)
        if attend_mask is None:
            attend_mask = torch.ones(1, t, t, dtype=torch.bool, device=s.device)
        # The layer itself forbids padded keys (valid_mask).
        return self.layer(self.proj(s), attend_mask, valid_mask, return_qkv=return_qkv)


class APCPredictor(nn.Module):
    """LSTM(in_dim -> hidden), one layer, unidirectional, then Linear(hidden -> out_dim).

    Causal by construction: the output at t depends on inputs 0..t only, so
    padding at the end of an utterance cannot change its valid frames and no
    packing is needed.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(in_dim, hidden, num_layers=1, batch_first=True)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, valid_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, T, in_dim) -> P (B, T, out_dim). Padded frames (valid_mask
        False) are zeroed on the way in so that non-finite padding cannot reach
        the gradient of the LSTM weights."""
        if valid_mask is not None:
            x = x.masked_fill(~valid_mask[..., None], 0.0)
        y, _ = self.lstm(x)
        return self.out(y)
