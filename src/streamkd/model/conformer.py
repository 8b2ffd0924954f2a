"""Conformer encoder (Gulati et al. 2020): one layer class for the teacher,
the streaming student and the distillation branch.

Streaming differs from full context only in (a) the attend mask
(``masks.chunk_attend_mask``), (b) ``causal=True`` for the depthwise
convolution, and the front end is causal by construction. ``step`` runs one
chunk against explicit caches and reproduces the masked full forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from streamkd.config import EncoderConfig
from streamkd.model.attention import RelPositionMultiHeadAttention
from streamkd.model.dropout import Dropout
from streamkd.model.masks import chunk_attend_mask, combine_with_valid, stream_attend_mask
from streamkd.model.subsampling import Conv2dSubsampling4
from streamkd.types import ChunkConfig, EncoderOutput, lengths_to_valid_mask

__all__ = ["FeedForward", "ConvModule", "ConformerLayer", "ConformerEncoder"]

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class FeedForward(nn.Module):
    """Pre-LN feed-forward block (its residual is added by the layer)."""

    def __init__(self, d_model: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_model),
            nn.Linear(d_model, ff_mult * d_model),
            nn.SiLU(),
            Dropout(dropout),
            nn.Linear(ff_mult * d_model, d_model),
            Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T, D)."""
        return self.net(x)


class ConvModule(nn.Module):
    """Pre-LN convolution block: pointwise -> GLU -> depthwise -> LayerNorm ->
    SiLU -> pointwise. LayerNorm, not BatchNorm: batch statistics would mix
    frames across time and utterances, breaking streaming and padding
    invariance."""

    def __init__(self, d_model: int, kernel: int, causal: bool, dropout: float) -> None:
        super().__init__()
        if kernel < 1 or (not causal and kernel % 2 == 0):
            raise ValueError(f"conv_kernel must be >= 1 and odd for a non-causal convolution, got {kernel}")
        self.kernel = kernel
        self.causal = causal
        self.norm_in = nn.LayerNorm(d_model)
        self.pointwise_in = nn.Linear(d_model, 2 * d_model)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel, groups=d_model)
        self.norm_mid = nn.LayerNorm(d_model)
        self.pointwise_out = nn.Linear(d_model, d_model)
        self.dropout = Dropout(dropout)

    def _gated(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, D, T) depthwise-conv input."""
        return F.glu(self.pointwise_in(self.norm_in(x)), dim=-1).transpose(1, 2)

    def _finish(self, h: torch.Tensor) -> torch.Tensor:
        """(B, D, T + K - 1) padded depthwise input -> (B, T, D)."""
        h = self.norm_mid(self.depthwise(h).transpose(1, 2))
        return self.dropout(self.pointwise_out(F.silu(h)))

    def forward(self, x: torch.Tensor, valid_mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D), valid_mask: (B, T) bool -> (B, T, D)."""
        h = self._gated(x).masked_fill(~valid_mask[:, None, :], 0.0)  # padding never reaches valid frames
        pad = (self.kernel - 1, 0) if self.causal else ((self.kernel - 1) // 2,) * 2
        return self._finish(F.pad(h, pad))

    def step(self, x: torch.Tensor, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal streaming step. x: (B, n, D); cache: (B, D, K-1), the last
        K-1 depthwise inputs (zeros at the start, like the left padding).
        Returns y (B, n, D) and the new cache (B, D, K-1)."""
        h = torch.cat([cache, self._gated(x)], dim=2)  # (B, D, K-1+n)
        new_cache = h[:, :, h.size(2) - (self.kernel - 1):]
        return self._finish(h), new_cache


class ConformerLayer(nn.Module):
    """Macaron FFN/2 -> rel-pos MHSA -> convolution -> FFN/2 -> LayerNorm,
    each a pre-LN residual block."""

    def __init__(
        self, d_model: int, num_heads: int, ff_mult: int, conv_kernel: int,
        dropout: float, max_rel_pos: int, causal: bool,
    ) -> None:
        super().__init__()
        self.causal = causal
        self.ff1 = FeedForward(d_model, ff_mult, dropout)
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = RelPositionMultiHeadAttention(d_model, num_heads, max_rel_pos, dropout)
        self.dropout = Dropout(dropout)
        self.conv = ConvModule(d_model, conv_kernel, causal, dropout)
        self.ff2 = FeedForward(d_model, ff_mult, dropout)
        self.norm_out = nn.LayerNorm(d_model)

    def forward(
        self, x: torch.Tensor, attend_mask: torch.Tensor, valid_mask: torch.Tensor, return_qkv: bool = False
    ) -> tuple[torch.Tensor, Optional[QKV]]:
        """x: (B, T, D); attend_mask: (B|1, T, T) or (T, T) bool; valid_mask:
        (B, T) bool (padded keys are forbidden here). Returns y (B, T, D) and,
        on request, (Q, K, V) each (B, H, T, Dh)."""
        x = x + 0.5 * self.ff1(x)
        allowed = combine_with_valid(attend_mask, valid_mask)
        a, _, qkv = self.attn(self.norm_attn(x), allowed, return_qkv=return_qkv)
        x = x + self.dropout(a)
        x = x + self.conv(x, valid_mask)
        x = x + 0.5 * self.ff2(x)
        return self.norm_out(x), qkv

    def step(
        self, x: torch.Tensor, att_cache: torch.Tensor, cnn_cache: torch.Tensor, cache_attend: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One streaming chunk. x: (B, n, D); att_cache: (B, H, T_cache, 2*Dh);
        cnn_cache: (B, D, K-1); cache_attend: (B, n, T_cache + n) bool.
        Returns y (B, n, D), the full att cache (B, H, T_cache + n, 2*Dh)
        (the caller trims it to the left context) and the cnn cache."""
        if not self.causal:
            raise ValueError("ConformerLayer.step needs causal=True (a symmetric convolution reads future frames)")
        x = x + 0.5 * self.ff1(x)
        a, kv, _ = self.attn(self.norm_attn(x), cache_attend, kv_cache=att_cache)
        x = x + self.dropout(a)
        c, new_cnn_cache = self.conv.step(x, cnn_cache)
        x = x + c
        x = x + 0.5 * self.ff2(x)
        return self.norm_out(x), kv, new_cnn_cache


class ConformerEncoder(nn.Module):
    """Conv2dSubsampling4 + ``cfg.num_layers`` ConformerLayers."""

    def __init__(self, cfg: EncoderConfig, input_dim: int = 80) -> None:
        super().__init__()
        self.cfg = cfg
        self.subsampling = Conv2dSubsampling4(input_dim, cfg.d_model, cfg.frontend_channels)
        self.dropout = Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            ConformerLayer(cfg.d_model, cfg.num_heads, cfg.ff_mult, cfg.conv_kernel,
                           cfg.dropout, cfg.max_rel_pos, cfg.causal)
            for _ in range(cfg.num_layers)
        )

    @property
    def head_dim(self) -> int:
        return self.cfg.d_model // self.cfg.num_heads

    def forward(
        self, x: torch.Tensor, feat_lens: torch.Tensor, chunk: Optional[ChunkConfig] = None,
        return_hidden: bool = False, return_qkv: bool = False,
    ) -> EncoderOutput:
        """x: (B, F, C) CMVN'ed features, feat_lens: (B,) int64. ``chunk``
        None: full context. Returns EncoderOutput with out (B, T, D)."""
        h = self.subsampling(x)  # (B, T, D)
        out_lens = Conv2dSubsampling4.output_lengths(feat_lens)
        valid = lengths_to_valid_mask(out_lens, h.size(1))  # (B, T)
        # Padded frames start at zero so that garbage input cannot overflow there.
        h = self.dropout(h.masked_fill(~valid[..., None], 0.0))
        attend = chunk_attend_mask(h.size(1), chunk, h.device)[None]  # (1, T, T)
        hidden, qkvs = [], []
        for layer in self.layers:
            h, qkv = layer(h, attend, valid, return_qkv=return_qkv)
            hidden.append(h)
            qkvs.append(qkv)
        return EncoderOutput(
            out=h, out_lens=out_lens,
            hidden=hidden if return_hidden else None, qkv=qkvs if return_qkv else None,
        )

    def init_step_cache(
        self, batch_size: int, cache_frames: int, *, dtype=None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Empty caches for ``step``: att_cache (L, B, H, cache_frames, 2*Dh)
        zeros, cnn_cache (L, B, D, K-1) zeros, cache_valid_mask
        (B, cache_frames) all False."""
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        cfg = self.cfg
        att = torch.zeros(cfg.num_layers, batch_size, cfg.num_heads, cache_frames, 2 * self.head_dim,
                          dtype=dtype, device=device)
        cnn = torch.zeros(cfg.num_layers, batch_size, cfg.d_model, cfg.conv_kernel - 1, dtype=dtype, device=device)
        valid = torch.zeros(batch_size, cache_frames, dtype=torch.bool, device=device)
        return att, cnn, valid

    def step(
        self, x_window: torch.Tensor, att_cache: torch.Tensor, cnn_cache: torch.Tensor,
        cache_valid_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one streaming step: one chunk against fixed-shape caches (what
        ``CTCModel.stream_chunk`` runs and ONNX export traces; docs/streaming.md).

        x_window: (B, F_w, C) CMVN'ed features of one chunk, F_w >= 7, giving
        n = ((F_w - 1) // 2 - 1) // 2 encoder frames (a whole window of
        ``Conv2dSubsampling4.window_frames(chunk_frames)`` gives chunk_frames;
        the last window of a stream may give fewer); att_cache: (L, B, H,
        T_cache, 2*Dh) keys and values of the newest T_cache frames before
        the chunk; cnn_cache: (L, B, D, K-1); cache_valid_mask: (B, T_cache)
        bool, False on entries holding no frame yet (None: all valid).
        Returns out (B, n, D) and both caches in their input shapes: the
        chunk's n frames appended, the oldest n dropped (T_cache = 0 works).
        The caller advances the mask with
        ``masks.roll_cache_valid_mask(mask, n)``.
        """
        h = self.subsampling(x_window)  # (B, n, D)
        if cache_valid_mask is None:
            cache_valid_mask = torch.ones(att_cache.shape[1], att_cache.shape[3], dtype=torch.bool,
                                          device=h.device)
        n = h.size(1)
        cache_attend = stream_attend_mask(cache_valid_mask, n)  # (B, n, T_cache + n)
        new_att, new_cnn = [], []
        for i, layer in enumerate(self.layers):
            h, att, cnn = layer.step(h, att_cache[i], cnn_cache[i], cache_attend)
            new_att.append(att[:, :, n:])  # (B, H, T_cache, 2*Dh): the newest T_cache
            new_cnn.append(cnn)
        return h, torch.stack(new_att), torch.stack(new_cnn)
