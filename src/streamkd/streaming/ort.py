"""Streaming recognition with ONNX Runtime over a ``streaming.export`` file.

It feeds the model exactly as sherpa-onnx does (int16-scale samples into
kaldi-native-fbank, fixed windows of (chunk-1)*4 + 7 frames advancing by
chunk*4, the cache mask sherpa-onnx builds), so its results are those of
sherpa-onnx, with one difference at the end: it runs the last partial chunk
(the graph's time axis is dynamic) instead of dropping it, which makes
``finalize()`` equal the PyTorch recognizer's.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import kaldi_native_fbank as knf
import numpy as np
import onnxruntime as ort
import sherpa_onnx
import torch
from sherpa_onnx.lib import _sherpa_onnx as lib

from streamkd.config import FeatureConfig, from_dict
from streamkd.errors import CheckpointError
from streamkd.features import fbank_options
from streamkd.lm.graph import check_graph
from streamkd.model.subsampling import Conv2dSubsampling4
from streamkd.streaming.export import INPUT_NAMES, MODEL_FILE, TOKENS_FILE
from streamkd.streaming.recognizer import RecognizerBase
from streamkd.tokenizer import SPACE

__all__ = ["OrtStreamingRecognizer", "SherpaStreamingRecognizer", "read_tokens_txt", "TokensTxtDecoder"]

_REQUIRED_META = ["chunk_size", "left_chunks", "head", "num_blocks", "output_size", "cnn_module_kernel",
                  "subsampling_factor", "right_context", "vocab_size", "feature_scale"]


def read_tokens_txt(path: str | Path) -> list[str]:
    """``symbol id`` lines -> symbols indexed by id; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; export writes it next to {MODEL_FILE}")
    table: dict[int, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit():
            raise CheckpointError(f"{path}:{lineno}: expected 'symbol id', got {line!r}")
        table[int(parts[1])] = parts[0]
    if sorted(table) != list(range(len(table))):
        raise CheckpointError(f"{path}: ids are not 0..{len(table) - 1} without gaps")
    return [table[i] for i in range(len(table))]


class TokensTxtDecoder:
    """ids -> text from tokens.txt symbols, the way sherpa-onnx does it
    (concatenate, ``▁`` -> space), stripped; blank (id 0) skipped."""

    def __init__(self, symbols: list[str]) -> None:
        self.symbols = symbols
        self.vocab_size = len(symbols)

    def decode(self, ids) -> str:
        return "".join(self.symbols[i] for i in ids if i != 0).replace(SPACE, " ").strip()


class _ScaledOnlineFbank:
    """kaldi-native-fbank over samples * scale (sherpa-onnx's WeNet input),
    frames popped as they are handed out so memory stays bounded."""

    def __init__(self, cfg: FeatureConfig, scale: float) -> None:
        self.cfg, self.scale = cfg, scale
        self._fbank = knf.OnlineFbank(fbank_options(cfg))
        self._popped = 0

    def accept(self, x: np.ndarray) -> None:
        self._fbank.accept_waveform(float(self.cfg.sample_rate), x * np.float32(self.scale))

    def finish(self) -> None:
        self._fbank.input_finished()

    def pop(self) -> np.ndarray:
        """(n, C) float32 frames not handed out yet."""
        ready = self._fbank.num_frames_ready
        if ready <= self._popped:
            return np.zeros((0, self.cfg.num_mel_bins), dtype=np.float32)
        out = np.stack([self._fbank.get_frame(i) for i in range(self._popped, ready)]).astype(np.float32)
        self._fbank.pop(ready - self._popped)
        self._popped = ready
        return out


class OrtStreamingRecognizer(RecognizerBase):
    """Same API as ``StreamingRecognizer`` (accept_waveform, partial,
    finalize, reset, latency_report) over ``model_dir/model.onnx``.

    beam: 1 greedy, k > 1 prefix beam search; num_threads: onnxruntime
    intra-op threads (1: one core per stream); tokenizer: default the
    tokens.txt next to the model; lm, lm_weights: word LM shallow fusion as
    in ``StreamingRecognizer`` (sherpa-onnx takes the LM as an HLG graph
    instead: ``SherpaStreamingRecognizer(graph=...)``).
    """

    def __init__(self, model_dir: str | Path, *, beam: int = 1, num_threads: int = 1, tokenizer=None,
                 on_chunk: Optional[Callable] = None, lm=None, lm_weights: Optional[tuple] = None) -> None:

        model_dir = Path(model_dir)
        path = model_dir / MODEL_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist; create it with `streamkd export`")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(num_threads)
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        if names != INPUT_NAMES:
            raise CheckpointError(f"{path}: inputs {names}, expected {INPUT_NAMES}; not a streamkd wenet-ctc export")
        meta = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in _REQUIRED_META if k not in meta]
        if missing:
            raise CheckpointError(f"{path}: metadata lacks {missing}; re-export with `streamkd export`")
        self.meta = meta
        self.chunk_frames = int(meta["chunk_size"])
        self.left_chunks = int(meta["left_chunks"])
        self.cache_frames = self.chunk_frames * self.left_chunks
        geometry = (int(meta["subsampling_factor"]), int(meta["right_context"]))
        if geometry != (Conv2dSubsampling4.subsampling, Conv2dSubsampling4.right_context):
            raise CheckpointError(f"{path}: subsampling_factor/right_context {geometry} are not this front "
                                  f"end's ({Conv2dSubsampling4.subsampling}, {Conv2dSubsampling4.right_context})")
        self.feature_scale = float(meta["feature_scale"])
        self.feature_cfg = (from_dict(json.loads(meta["feature_config"]), FeatureConfig, src=f"{path} metadata")
                            if "feature_config" in meta else FeatureConfig())
        self._att_shape = (int(meta["num_blocks"]), int(meta["head"]), self.cache_frames,
                           2 * int(meta["output_size"]) // int(meta["head"]))
        self._cnn_shape = (int(meta["num_blocks"]), 1, int(meta["output_size"]), int(meta["cnn_module_kernel"]) - 1)
        if tokenizer is None:
            tokenizer = TokensTxtDecoder(read_tokens_txt(model_dir / TOKENS_FILE))
        self._init_common(beam, tokenizer, on_chunk, lm, lm_weights)
        self.reset()

    def _reset_stream(self) -> None:
        self._fbank = _ScaledOnlineFbank(self.feature_cfg, self.feature_scale)
        self._buf = torch.zeros(1, 0, self.feature_cfg.num_mel_bins)  # (1, F_buf, C) frames not consumed
        self.att_cache = np.zeros(self._att_shape, dtype=np.float32)
        self.cnn_cache = np.zeros(self._cnn_shape, dtype=np.float32)

    def _accept(self, x: np.ndarray) -> None:
        self._fbank.accept(x)

    def _run(self, window: np.ndarray) -> int:
        """One chunk: window (F_w, C) raw frames -> encoder frames emitted."""
        cache = self.cache_frames
        # sherpa-onnx's mask: the newest cache entries hold the frames so far
        # (at most the cache), the older ones are still zeros; then the chunk.
        mask = np.ones((1, 1, cache + self.chunk_frames), dtype=bool)
        mask[:, :, : cache - min(self.frames_out, cache)] = False
        offset = np.array([cache + self.frames_out], dtype=np.int64)
        log_probs, self.att_cache, self.cnn_cache = self.session.run(None, {
            "x": window[None], "offset": offset, "required_cache_size": np.array([cache], dtype=np.int64),
            "att_cache": self.att_cache, "cnn_cache": self.cnn_cache, "att_mask": mask,
        })
        self._emit(torch.from_numpy(log_probs[0]))  # (T_new, V)
        return log_probs.shape[1]

    def _advance(self, final: bool) -> int:
        if final:
            self._fbank.finish()
        new = self._fbank.pop()
        if new.shape[0]:
            self._buf = torch.cat([self._buf, torch.from_numpy(new)[None]], dim=1)
        emitted = 0
        while True:
            window, self._buf = Conv2dSubsampling4.next_window(self._buf, self.chunk_frames, final)
            if window is None:
                return emitted
            emitted += self._run(window[0].numpy())


class SherpaStreamingRecognizer(RecognizerBase):
    """sherpa-onnx's own runtime (``OnlineRecognizer.from_wenet_ctc``) over
    an export, behind our recognizer API, for deployment checks.

    Without ``graph`` sherpa-onnx decodes greedily. With ``graph`` (a folder
    that ``streamkd lm graph`` wrote: HLG.fst with the word LM and its
    weights baked in) it decodes with its CTC FST decoder (Kaldi's
    FasterDecoder, at most ``max_active`` states per frame). sherpa-onnx
    runs no partial last chunk, so ``finalize`` appends ``tail_sec`` of
    silence before ``input_finished`` (sherpa-onnx's usual practice); its
    last words can therefore differ from ``StreamingRecognizer``'s exact end.
    """

    def __init__(self, model_dir: str | Path, *, num_threads: int = 1, tail_sec: Optional[float] = None,
                 graph: Optional[str | Path] = None, max_active: int = 3000) -> None:
        model_dir = Path(model_dir)
        probe = OrtStreamingRecognizer(model_dir)  # checks the file and reads its metadata
        self.chunk_frames, self.feature_cfg = probe.chunk_frames, probe.feature_cfg
        # Enough silence to complete the last chunk window.
        tail_frames = (Conv2dSubsampling4.window_frames(self.chunk_frames)
                       + self.chunk_frames * Conv2dSubsampling4.subsampling)
        self.tail_sec = tail_sec if tail_sec is not None else tail_frames * self.feature_cfg.frame_shift_ms / 1000.0
        self.graph = None
        if graph is not None:

            self.graph = check_graph(graph, probe.tokenizer.symbols)
        self._sherpa = _sherpa_wenet_ctc(model_dir, probe, num_threads, self.graph, max_active)
        self._init_common(1, probe.tokenizer, None)
        self.reset()

    def _reset_stream(self) -> None:
        self._stream = self._sherpa.create_stream()

    def _accept(self, x: np.ndarray) -> None:
        self._stream.accept_waveform(self.feature_cfg.sample_rate, x)

    def _advance(self, final: bool) -> int:
        if final:
            tail = np.zeros(int(round(self.tail_sec * self.feature_cfg.sample_rate)), dtype=np.float32)
            self._stream.accept_waveform(self.feature_cfg.sample_rate, tail)
            self._stream.input_finished()
        emitted = 0
        while self._sherpa.is_ready(self._stream):
            self._sherpa.decode_stream(self._stream)
            emitted += self.chunk_frames
        self.frames_out += emitted
        return emitted

    def partial(self) -> str:
        return self._sherpa.get_result(self._stream).strip()

    def finalize(self) -> str:
        if not self.finished:
            start = time.perf_counter()
            self._feed(self._resampler.flush(), start, final=True)
            self.finished = True
            self._final_text = self.partial()
        return self._final_text

    def tokens(self) -> list[str]:
        return list(self._sherpa.get_result_all(self._stream).tokens)

    def token_frames(self) -> list[int]:
        shift = self.frame_ms / 1000.0
        return [round(t / shift) for t in self._sherpa.get_result_all(self._stream).timestamps]


def _sherpa_wenet_ctc(model_dir: Path, probe: OrtStreamingRecognizer, num_threads: int,
                      graph: Optional[Path], max_active: int):
    """sherpa-onnx's OnlineRecognizer for the export; with ``graph`` (an
    HLG.fst) its CTC FST decoder. ``from_wenet_ctc`` takes no graph, so the
    lower-level config it builds is built here with the decoder set."""

    kwargs = dict(tokens=str(model_dir / TOKENS_FILE), model=str(model_dir / MODEL_FILE),
                  chunk_size=probe.chunk_frames, num_left_chunks=probe.left_chunks, num_threads=num_threads,
                  sample_rate=probe.feature_cfg.sample_rate, feature_dim=probe.feature_cfg.num_mel_bins)
    if graph is None:
        return sherpa_onnx.OnlineRecognizer.from_wenet_ctc(**kwargs)
    model_config = lib.OnlineModelConfig(
        wenet_ctc=lib.OnlineWenetCtcModelConfig(model=kwargs["model"], chunk_size=kwargs["chunk_size"],
                                                num_left_chunks=kwargs["num_left_chunks"]),
        tokens=kwargs["tokens"], num_threads=num_threads)
    config = lib.OnlineRecognizerConfig(
        feat_config=lib.FeatureExtractorConfig(sampling_rate=kwargs["sample_rate"], feature_dim=kwargs["feature_dim"]),
        model_config=model_config, enable_endpoint=False, decoding_method="greedy_search",
        ctc_fst_decoder_config=lib.OnlineCtcFstDecoderConfig(graph=str(graph), max_active=max_active))
    # The wrapper object as sherpa-onnx's own from_* classmethods make it.
    recognizer = sherpa_onnx.OnlineRecognizer.__new__(sherpa_onnx.OnlineRecognizer)
    recognizer.recognizer, recognizer.config = lib.OnlineRecognizer(config), config
    return recognizer
