"""The few types every part of streamkd speaks.

Dimension legend used in every docstring of the package:
    B: batch, T: encoder frames (after subsampling), F: feature frames
    (before subsampling), C: feature bins (80), D: model width,
    H: attention heads, Dh: width of one head, U: tokens, V: vocabulary,
    L: encoder layers, K: depthwise convolution kernel.

Mask polarity, once for the whole package: a boolean mask is True where a
query MAY attend to a key (or where a frame is valid). Masks are named for
that: ``attend_mask``, ``valid_mask``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Iterable, NamedTuple, Optional

import torch

__all__ = [
    "ChunkConfig",
    "Batch",
    "Skip",
    "count_reasons",
    "EncoderOutput",
    "StreamState",
    "lengths_to_valid_mask",
]


@dataclass(frozen=True)
class ChunkConfig:
    """How a streaming encoder sees context. ``None`` in place of a
    ChunkConfig means full context (a non-streaming teacher)."""

    chunk_frames: int  # encoder frames per chunk (after subsampling)
    left_chunks: Optional[int] = None  # chunks to the left a frame may see; None: all

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_frames, int) or self.chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive int, got {self.chunk_frames!r}")
        if self.left_chunks is not None and (
            not isinstance(self.left_chunks, int) or self.left_chunks < 0
        ):
            raise ValueError(f"left_chunks must be None or an int >= 0, got {self.left_chunks!r}")

    @property
    def left_frames(self) -> Optional[int]:
        """Encoder frames of left context a chunk keeps (None: unbounded)."""
        return None if self.left_chunks is None else self.left_chunks * self.chunk_frames


def lengths_to_valid_mask(lens: torch.Tensor, max_len: Optional[int] = None) -> torch.Tensor:
    """(B,) int64 lengths -> (B, T) bool, True on valid frames."""
    max_len = int(lens.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lens.device)[None, :] < lens[:, None]


class Skip(NamedTuple):
    """An utterance left out, and why."""

    id: str
    reason: str  # a short fixed phrase: counts are keyed by it
    detail: str = ""  # this item's specifics (its file, its numbers)


def count_reasons(skipped: Iterable[Skip]) -> dict[str, int]:
    """{reason: number of items}, most frequent first."""
    return dict(Counter(s.reason for s in skipped).most_common())


@dataclass
class Batch:
    """A padded mini-batch of utterances.

    feats: (B, F, C) raw log-mel fbank (CMVN is applied inside the model),
    feat_lens: (B,) int64, tokens: (B, U) int64 padded with -1,
    token_lens: (B,) int64.
    """

    ids: list[str]
    feats: torch.Tensor
    feat_lens: torch.Tensor
    tokens: torch.Tensor
    token_lens: torch.Tensor
    texts: list[str] = field(default_factory=list)
    # Items the loader could not use: the trainer and the decoder count and
    # report them by reason; nothing is dropped silently.
    skipped: list["Skip"] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            ids=self.ids,
            feats=self.feats.to(device, non_blocking=True),
            feat_lens=self.feat_lens.to(device),
            tokens=self.tokens.to(device),
            token_lens=self.token_lens.to(device),
            texts=self.texts,
            skipped=self.skipped,
        )

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class EncoderOutput:
    """What an encoder forward returns.

    out: (B, T, D) final output; out_lens: (B,) int64.
    hidden: on request, each layer's output, hidden[i] is layer i+1's (B, T, D).
    qkv: on request, each layer's attention (Q, K, V), each (B, H, T, Dh),
        before the attention softmax (relation distillation needs them).
    """

    out: torch.Tensor
    out_lens: torch.Tensor
    hidden: Optional[list[torch.Tensor]] = None
    qkv: Optional[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = None

    @property
    def valid_mask(self) -> torch.Tensor:
        """(B, T) bool, True on valid (non-padded) frames."""
        return lengths_to_valid_mask(self.out_lens, self.out.size(1))


@dataclass
class StreamState:
    """Everything a streaming encoder carries from one chunk to the next
    (docs/streaming.md).

    att_cache: (L, B, H, T_cache, 2*Dh) keys and values of the newest
        T_cache frames, per layer; T_cache <= the left context.
    cnn_cache: (L, B, D, K-1) the last K-1 inputs of each causal convolution.
    cache_valid_mask: (B, T_cache) bool, False on att_cache entries that
        hold no frame yet (a cache allocated at full size at the start).
    feat_buffer: (B, F_buf, C) feature frames received but not yet consumed
        by the subsampling (it needs a right context).
    offset: encoder frames emitted so far (absolute position of the next one).
    """

    att_cache: torch.Tensor
    cnn_cache: torch.Tensor
    cache_valid_mask: torch.Tensor
    feat_buffer: torch.Tensor
    offset: int = 0

    def detach(self) -> "StreamState":
        return StreamState(
            **{f.name: (getattr(self, f.name).detach() if torch.is_tensor(getattr(self, f.name))
                        else getattr(self, f.name)) for f in fields(self)}
        )
