"""Conformer-CTC encoders: the full-context teacher and the streaming student
are one class (``CTCModel``) with a different ChunkConfig and causality."""
from streamkd.model.asr import MODEL_CHUNK, CTCModel
from streamkd.model.attention import RelPositionMultiHeadAttention, relative_position_index
from streamkd.model.conformer import ConformerEncoder, ConformerLayer, ConvModule, FeedForward
from streamkd.model.masks import (
    chunk_attend_mask,
    combine_with_valid,
    roll_cache_valid_mask,
    stream_attend_mask,
)
from streamkd.model.subsampling import Conv2dSubsampling4

__all__ = [
    "CTCModel",
    "MODEL_CHUNK",
    "ConformerEncoder",
    "ConformerLayer",
    "ConvModule",
    "FeedForward",
    "RelPositionMultiHeadAttention",
    "relative_position_index",
    "Conv2dSubsampling4",
    "chunk_attend_mask",
    "combine_with_valid",
    "stream_attend_mask",
    "roll_cache_valid_mask",
]
