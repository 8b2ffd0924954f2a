"""Conformer-CTC model: CMVN, encoder, CTC head, and chunk-by-chunk streaming.

The teacher and the student are this one class: the teacher has
``enc_cfg.chunk = None`` and a symmetric convolution, the student a
ChunkConfig and ``causal=True``. ``stream_step`` feeds features in any
amount and reproduces ``forward(...).out`` of the whole utterance.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from streamkd.config import Config, EncoderConfig, FeatureConfig
from streamkd.errors import UsageError
from streamkd.model.conformer import ConformerEncoder
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

    def init_state(self, batch_size: int = 1) -> StreamState:
        """Empty stream: caches with T_cache = 0 and no buffered frames."""
        att, cnn, _ = self.encoder.init_step_cache(batch_size, 0)
        feat_buffer = torch.zeros(batch_size, 0, self.input_dim, dtype=att.dtype, device=att.device)
        return StreamState(att_cache=att, cnn_cache=cnn, feat_buffer=feat_buffer, offset=0)

    def _run_chunk(self, window: torch.Tensor, state: StreamState, chunk: ChunkConfig) -> torch.Tensor:
        """Encode one window of raw features; update the caches in ``state``."""
        out, att, cnn = self.encoder.forward_chunk(self.normalize(window), state.att_cache, state.cnn_cache)
        if chunk.left_frames is not None:  # bounded left context: keep the newest left_frames
            att = att[:, :, :, max(0, att.size(3) - chunk.left_frames):]
        state.att_cache, state.cnn_cache = att, cnn
        state.offset += out.size(1)
        return out

    def stream_step(
        self, feats: torch.Tensor, state: StreamState, final: bool = False, *, chunk: ChunkArg = MODEL_CHUNK
    ) -> tuple[torch.Tensor, StreamState]:
        """Feed raw fbank frames (B, n, C), n >= 0. Runs one encoder chunk per
        whole window of (chunk_frames - 1) * 4 + 7 buffered frames (windows
        advance by chunk_frames * 4); with ``final`` also the last partial
        chunk. Returns the new encoder frames (B, T_new, D) and the state.
        ``chunk`` overrides the model's (use the same one for a whole stream).
        """
        chunk = self._stream_chunk(chunk)
        if feats.dim() != 3 or feats.size(2) != self.input_dim or feats.size(0) != state.feat_buffer.size(0):
            raise ValueError(f"stream_step expects feats of shape (B={state.feat_buffer.size(0)}, n, "
                             f"{self.input_dim}), got {tuple(feats.shape)}")
        buf = torch.cat([state.feat_buffer, feats.to(state.feat_buffer.dtype)], dim=1)
        window = Conv2dSubsampling4.window_frames(chunk.chunk_frames)
        hop = chunk.chunk_frames * Conv2dSubsampling4.subsampling
        outs = []
        while buf.size(1) >= window:
            outs.append(self._run_chunk(buf[:, :window], state, chunk))
            buf = buf[:, hop:]
        if final:
            # Fewer than chunk_frames encoder frames remain; the front end
            # gives exactly as many as the full forward has left.
            if Conv2dSubsampling4.output_length(buf.size(1)) > 0:
                outs.append(self._run_chunk(buf, state, chunk))
            buf = buf[:, :0]
        state.feat_buffer = buf
        if outs:
            return torch.cat(outs, dim=1), state
        empty = buf.new_zeros(buf.size(0), 0, self.enc_cfg.d_model)
        return empty, state
