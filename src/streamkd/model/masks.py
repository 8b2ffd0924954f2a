"""Boolean attention masks (True = a query MAY attend to a key, see
``streamkd.types``), built with tensor ops only so that they trace into ONNX.

Chunked attention follows WeNet's U2 design: encoder frames are grouped into
chunks of ``chunk_frames``; a frame sees every frame of its own chunk, the
``left_chunks`` chunks before it (all of them when None) and nothing later.
"""
from __future__ import annotations

from typing import Optional

import torch

from streamkd.types import ChunkConfig

__all__ = [
    "chunk_attend_mask",
    "combine_with_valid",
    "stream_attend_mask",
    "roll_cache_valid_mask",
]


def chunk_attend_mask(
    T: int, chunk: Optional[ChunkConfig], device: Optional[torch.device | str] = None
) -> torch.Tensor:
    """(T, T) bool: entry (i, j) is True when query frame i may attend key j.

    chunk None: full context (all True). Otherwise, with c(t) = t // chunk_frames,
    True iff c(i) - left_chunks <= c(j) <= c(i) (no lower bound when
    left_chunks is None).
    """
    if chunk is None:
        return torch.ones(T, T, dtype=torch.bool, device=device)
    idx = torch.arange(T, device=device) // chunk.chunk_frames  # (T,) chunk index
    query, key = idx[:, None], idx[None, :]
    mask = key <= query
    if chunk.left_chunks is not None:
        mask = mask & (key >= query - chunk.left_chunks)
    return mask


def combine_with_valid(attend_mask: torch.Tensor, key_valid_mask: torch.Tensor) -> torch.Tensor:
    """Forbid padded keys.

    attend_mask: (T, S) or (B|1, T, S) bool; key_valid_mask: (B, S) bool.
    Returns (B, T, S) bool.
    """
    if attend_mask.dim() == 2:
        attend_mask = attend_mask.unsqueeze(0)
    return attend_mask & key_valid_mask[:, None, :]


def stream_attend_mask(cache_valid_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Attend mask of one streaming chunk of n frames over [cache, chunk].

    cache_valid_mask: (B, T_cache) bool, True on cache entries holding a real
    frame. Every frame of the chunk sees the valid cache entries and the whole
    chunk (its own chunk). Returns (B, n, T_cache + n) bool.
    """
    B, T_cache = cache_valid_mask.shape
    cache_part = cache_valid_mask[:, None, :].expand(B, n, T_cache)
    chunk_part = torch.ones(B, n, n, dtype=torch.bool, device=cache_valid_mask.device)
    return torch.cat([cache_part, chunk_part], dim=2)


def roll_cache_valid_mask(cache_valid_mask: torch.Tensor, n: int) -> torch.Tensor:
    """The cache validity after a chunk of n real frames entered a fixed-size
    cache (oldest dropped): (B, T_cache) bool -> (B, T_cache) bool."""
    B, T_cache = cache_valid_mask.shape
    new = torch.ones(B, n, dtype=torch.bool, device=cache_valid_mask.device)
    return torch.cat([cache_valid_mask, new], dim=1)[:, n:]
