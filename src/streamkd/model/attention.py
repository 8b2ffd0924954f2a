"""Multi-head self-attention with clipped relative positions (Shaw et al. 2018).

The score of query i on key j is (q_i . k_j + q_i . r_{clip(j - i)}) / sqrt(Dh),
with one learned embedding r per relative distance in [-P, P] (P =
max_rel_pos), shared by the heads. There is no absolute position anywhere, so
a streaming step with a key/value cache needs no frame offset: the queries
are simply the last T of the S keys.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from streamkd.model.dropout import dropout_mask

__all__ = ["RelPositionMultiHeadAttention", "relative_position_index"]


def relative_position_index(T: int, S: int, max_rel_pos: int, device=None) -> torch.Tensor:
    """(T, S) int64 index into the 2P+1 relative embeddings.

    The T queries are the last T of the S keys (the first S - T keys are a
    cache), so query i sits at key position S - T + i.
    """
    query_pos = torch.arange(T, device=device) + (S - T)
    key_pos = torch.arange(S, device=device)
    distance = key_pos[None, :] - query_pos[:, None]  # (T, S), j - i
    return torch.clamp(distance, -max_rel_pos, max_rel_pos) + max_rel_pos


class RelPositionMultiHeadAttention(nn.Module):
    """Self-attention over (B, T, D) with an optional key/value cache."""

    def __init__(self, d_model: int, num_heads: int, max_rel_pos: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        if max_rel_pos < 0:
            raise ValueError(f"max_rel_pos must be >= 0, got {max_rel_pos}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.max_rel_pos = max_rel_pos
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.rel_emb = nn.Parameter(torch.randn(2 * max_rel_pos + 1, self.head_dim) * self.head_dim**-0.5)

    def _position_bias(self, q: torch.Tensor, S: int) -> torch.Tensor:
        """q: (B, H, T, Dh) -> (B, H, T, S) unscaled q_i . r_{clip(j - i)}."""
        B, H, T, _ = q.shape
        per_distance = q @ self.rel_emb.t()  # (B, H, T, 2P+1)
        index = relative_position_index(T, S, self.max_rel_pos, q.device)
        return torch.gather(per_distance, 3, index.expand(B, H, T, S))

    def forward(
        self,
        x: torch.Tensor,
        attend_mask: torch.Tensor,
        kv_cache: Optional[torch.Tensor] = None,
        return_qkv: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
        """Attend.

        x: (B, T, D); attend_mask: (B|1, T, S) bool with S = T_cache + T;
        kv_cache: (B, H, T_cache, 2*Dh) keys and values of earlier frames.
        Returns y (B, T, D); kv (B, H, S, 2*Dh), the cache with this call's
        keys/values appended; and on request (Q, K, V) of this call's frames,
        each (B, H, T, Dh), Q unscaled. A query with no allowed key gets a
        zero output instead of NaN (padded frames).
        """
        B, T, D = x.shape
        H, Dh = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, T, 3, H, Dh).permute(2, 0, 3, 1, 4)  # each (B, H, T, Dh)
        kv = torch.cat([k, v], dim=-1)  # (B, H, T, 2*Dh)
        if kv_cache is not None:
            kv = torch.cat([kv_cache, kv], dim=2)  # (B, H, S, 2*Dh)
        keys, values = kv[..., :Dh], kv[..., Dh:]
        S = kv.size(2)
        if attend_mask.shape[-2:] != (T, S):
            raise ValueError(f"attend_mask has shape {tuple(attend_mask.shape)}, expected (B, {T}, {S})")

        # A row with no allowed key would softmax to NaN: let it attend to
        # everything (finite) and zero its output afterwards.
        has_key = attend_mask.any(dim=-1, keepdim=True)  # (B|1, T, 1)
        allowed = (attend_mask | ~has_key).unsqueeze(1)  # (B|1, 1, T, S)
        scale = Dh**-0.5
        q_scaled = q * scale  # (B, H, T, Dh): scaled before the products, not the (T, S) scores after
        position = self._position_bias(q_scaled, S)  # (B, H, T, S), a fresh tensor
        if self.training and self.dropout > 0.0:
            # SDPA's CPU kernels take no dropout: with it SDPA falls back to
            # its unfused path and draws the mask with bernoulli_. The same
            # product written out, with the cheaper mask and the position
            # bias and padding mask added in place, is ~2x faster forward +
            # backward (d=96, 4 s; see streamkd.model.dropout).
            scores = (q_scaled @ keys.transpose(-1, -2)).add_(position).masked_fill_(~allowed, float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            y = (weights * dropout_mask(weights.shape, self.dropout, weights.dtype, weights.device)) @ values
        else:
            bias = position.masked_fill_(~allowed, float("-inf"))
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale)  # (B, H, T, Dh)
        y = y * has_key.unsqueeze(1).to(y.dtype)
        y = self.out(y.transpose(1, 2).reshape(B, T, D))
        return y, kv, ((q, k, v) if return_qkv else None)
