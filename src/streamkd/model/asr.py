"""Conformer-CTC model: CMVN, encoder, CTC head, and chunk-by-chunk streaming.

The teacher and the student are this one class: the teacher has
``enc_cfg.chunk = None`` and a symmetric convolution, the student a
ChunkConfig and ``causal=True``. ``forward`` is for training and offline
decoding; ``stream_step`` (explicit ``StreamState`` in and out) feeds
features in any amount and reproduces ``forward(...).out`` of the whole
utterance (docs/streaming.md).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from streamkd.config import Config, EncoderConfig, FeatureConfig
from streamkd.errors import UsageError
from streamkd.model.conformer import ConformerEncoder
from streamkd.model.masks import roll_cache_valid_mask
from streamkd.model.subsampling import Conv2dSubsampling4
from streamkd.types import ChunkConfig, EncoderOutput, StreamState

__all__ = ["CTCModel", "MODEL_CHUNK"]


class _ModelChunk:
    """Sentinel type: "use the model's own chunk (drawn if dynamic)"."""

    def __repr__(self) -> str:
        return "MODEL_CHUNK"


MODEL_CHUNK = _ModelChunk()
ChunkArg = Union[Optional[ChunkConfig], _ModelChunk]


def _stats(values: Union[torch.Tensor, Sequence[float]], name: str, input_dim: int) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).detach().clone()
    if t.shape != (input_dim,):
        raise ValueError(f"{name} must have shape ({input_dim},) (one value per feature bin), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has non-finite values; recompute the CMVN statistics (cmvn.json)")
    return t


class CTCModel(nn.Module):
    """Raw fbank (B, F, C) -> CMVN -> ConformerEncoder -> Linear(D, V).

    Besides its weights a model carries, as declared attributes: ``chunk``
    (the ChunkConfig it streams with; None: full context), ``tokenizer``
    (ids -> text) and ``config`` (the whole Config it was trained with, its
    feature options included). ``checkpoint.load_model`` and ``build_model``
    fill all of them; a bare model (tests, benchmarks) may leave
    ``tokenizer`` and ``config`` None, and whatever needs them then fails
    with a UsageError instead of guessing (``feature_config``).
    """

    def __init__(
        self, enc_cfg: EncoderConfig, vocab_size: int,
        cmvn_mean: Union[torch.Tensor, Sequence[float]], cmvn_istd: Union[torch.Tensor, Sequence[float]],
        input_dim: int = 80, *, tokenizer=None, config: Optional[Config] = None,
    ) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (blank plus at least one token), got {vocab_size}")
        if tokenizer is not None and tokenizer.vocab_size != vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} symbols but the model {vocab_size} outputs")
        if config is not None and (config.model != enc_cfg or config.data.features.num_mel_bins != input_dim):
            raise ValueError("config.model / config.data.features.num_mel_bins differ from the model's "
                             "enc_cfg / input_dim")
        self.tokenizer = tokenizer
        self.config = config
        self.enc_cfg = enc_cfg
        self.vocab_size = vocab_size
        self.input_dim = input_dim
        self.chunk: Optional[ChunkConfig] = enc_cfg.chunk
        self.register_buffer("cmvn_mean", _stats(cmvn_mean, "cmvn_mean", input_dim))
        self.register_buffer("cmvn_istd", _stats(cmvn_istd, "cmvn_istd", input_dim))
        self.encoder = ConformerEncoder(enc_cfg, input_dim)
        self.ctc_head = nn.Linear(enc_cfg.d_model, vocab_size)

    @property
    def feature_config(self) -> FeatureConfig:
        """The fbank options the model was trained on (from ``config``)."""
        if self.config is None:
            raise UsageError("this model carries no config, so the features it expects are unknown: load it "
                             "with streamkd.load_model(checkpoint), or pass the FeatureConfig explicitly")
        return self.config.data.features

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def normalize(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, F, C) raw fbank -> (B, F, C) CMVN'ed."""
        return (feats - self.cmvn_mean) * self.cmvn_istd

    def _draw_chunk(self) -> Optional[ChunkConfig]:
        """Dynamic chunk training: full context with prob dynamic_full_prob,
        else a chunk size from dynamic_chunk_choices (torch's global RNG, so
        a resumed run that restores the RNG draws the same)."""
        cfg = self.enc_cfg
        if cfg.dynamic_full_prob > 0 and float(torch.rand(())) < cfg.dynamic_full_prob:
            return None
        choice = cfg.dynamic_chunk_choices[int(torch.randint(len(cfg.dynamic_chunk_choices), ()))]
        return ChunkConfig(choice, cfg.chunk.left_chunks if cfg.chunk else None)

    def resolve_chunk(self, chunk: ChunkArg = MODEL_CHUNK) -> Optional[ChunkConfig]:
        """The chunk a forward with this ``chunk`` argument uses."""
        if not isinstance(chunk, _ModelChunk):
            return chunk
        if self.training and self.enc_cfg.dynamic_chunk:
            return self._draw_chunk()
        return self.chunk

    def forward(
        self, feats: torch.Tensor, feat_lens: torch.Tensor, *, chunk: ChunkArg = MODEL_CHUNK,
        return_hidden: bool = False, return_qkv: bool = False,
    ) -> EncoderOutput:
        """feats: (B, F, C) raw fbank, feat_lens: (B,) int64. ``chunk``:
        MODEL_CHUNK (default) uses ``self.chunk`` (drawn per call in training
        with dynamic_chunk); None or a ChunkConfig overrides it."""
        return self.encoder(
            self.normalize(feats), feat_lens, self.resolve_chunk(chunk),
            return_hidden=return_hidden, return_qkv=return_qkv,
        )

    def encode(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F, C), (B,) -> out (B, T, D), out_lens (B,)."""
        enc = self(feats, feat_lens)
        return enc.out, enc.out_lens

    def ctc_log_probs(self, out: torch.Tensor) -> torch.Tensor:
        """(B, T, D) encoder output -> (B, T, V) log-probabilities."""
        return F.log_softmax(self.ctc_head(out), dim=-1)

    # Streaming ------------------------------------------------------------

    def _stream_chunk(self, chunk: ChunkArg) -> ChunkConfig:
        chunk = self.chunk if isinstance(chunk, _ModelChunk) else chunk
        if chunk is None:
            raise ValueError("streaming needs a ChunkConfig: this model has chunk=None (full context); "
                             "pass chunk=ChunkConfig(...) or use a streaming student")
        if not self.enc_cfg.causal:
            raise ValueError("streaming needs a causal encoder (EncoderConfig.causal=True); "
                             "a symmetric convolution reads future frames")
        return chunk

    def init_state(self, batch_size: int = 1, cache_frames: int = 0) -> StreamState:
        """Empty stream: no buffered frames, caches of ``cache_frames``
        entries holding no frame yet. With 0 (the default) the attention
        cache grows chunk by chunk up to the left context; a cache allocated
        at the left context (``chunk.left_frames``, as the ONNX export and
        the batched engine use) keeps one shape for the whole stream. Both
        give the same outputs."""
        att, cnn, valid = self.encoder.init_step_cache(batch_size, cache_frames)
        feat_buffer = torch.zeros(batch_size, 0, self.input_dim, dtype=att.dtype, device=att.device)
        return StreamState(att_cache=att, cnn_cache=cnn, cache_valid_mask=valid, feat_buffer=feat_buffer)

    def stream_chunk(self, window: torch.Tensor, state: StreamState, chunk: ChunkConfig) -> torch.Tensor:
        """One chunk: window (B, F_w, C) raw fbank (from
        ``Conv2dSubsampling4.next_window``) -> (B, n, D) encoder frames; the
        caches and offset in ``state`` advance. The cache first gets room for
        the chunk's frames up to the left context (all of them when it is
        unbounded); ``ConformerEncoder.step`` then keeps its shape."""
        cached = state.att_cache.size(3)
        n = Conv2dSubsampling4.output_length(window.size(1))
        room = n if chunk.left_frames is None else min(n, chunk.left_frames - cached)
        if room < 0:
            raise ValueError(f"the stream's cache holds {cached} frames but chunk {chunk} allows "
                             f"{chunk.left_frames}: use one chunk for a whole stream and its init_state")
        att, valid = state.att_cache, state.cache_valid_mask
        if room:
            L, B, H, _, W = att.shape
            att = torch.cat([att.new_zeros(L, B, H, room, W), att], dim=3)
            valid = torch.cat([valid.new_zeros(B, room), valid], dim=1)
        out, state.att_cache, state.cnn_cache = self.encoder.step(self.normalize(window), att, state.cnn_cache,
                                                                  valid)
        state.cache_valid_mask = roll_cache_valid_mask(valid, n)
        state.offset += n
        return out

    def stream_step(
        self, feats: torch.Tensor, state: StreamState, final: bool = False, *, chunk: ChunkArg = MODEL_CHUNK
    ) -> tuple[torch.Tensor, StreamState]:
        """Feed raw fbank frames (B, n, C), n >= 0. Runs one encoder chunk per
        whole window of buffered frames (``Conv2dSubsampling4.next_window``);
        with ``final`` also the last partial chunk. Returns the new encoder
        frames (B, T_new, D) and the state. ``chunk`` overrides the model's
        (use the same one for a whole stream).
        """
        chunk = self._stream_chunk(chunk)
        if feats.dim() != 3 or feats.size(2) != self.input_dim or feats.size(0) != state.feat_buffer.size(0):
            raise ValueError(f"stream_step expects feats of shape (B={state.feat_buffer.size(0)}, n, "
                             f"{self.input_dim}), got {tuple(feats.shape)}")
        buf = torch.cat([state.feat_buffer, feats.to(state.feat_buffer.dtype)], dim=1)
        outs = []
        while True:
            window, buf = Conv2dSubsampling4.next_window(buf, chunk.chunk_frames, final)
            if window is None:
                break
            outs.append(self.stream_chunk(window, state, chunk))
        state.feat_buffer = buf
        if outs:
            return torch.cat(outs, dim=1), state
        empty = buf.new_zeros(buf.size(0), 0, self.enc_cfg.d_model)
        return empty, state
