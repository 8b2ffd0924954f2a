"""ONNX export in the layout sherpa-onnx runs as a WeNet streaming CTC model.

What sherpa-onnx 2.0.1 (``OnlineRecognizer.from_wenet_ctc``) does with the
file, read from its source (csrc/online-wenet-ctc-model.cc,
online-recognizer-ctc-impl.h, features.cc):

- Inputs, fed BY POSITION in this order (the names are read from the file
  but the values are placed positionally, so a dropped input shifts all
  the others):
  0 ``x``                   float32 (1, (chunk-1)*4 + right_context + 1, C) raw fbank
  1 ``offset``              int64 (1,): starts at required_cache_size and
                            grows by the frames each call returned
  2 ``required_cache_size`` int64 (1,) = chunk_size * num_left_chunks
  3 ``att_cache``           float32 (L, H, required_cache_size, 2*Dh) (no batch axis)
  4 ``cnn_cache``           float32 (L, 1, D, K-1)
  5 ``att_mask``            bool (1, 1, required_cache_size + chunk_size): after
                            k chunks the last min(k, left_chunks)*chunk cache
                            entries and the whole chunk are True
- Outputs: 0 log-probs (1, T, V) (log-softmax applied inside the model,
  greedy search on it, blank = the id of ``<blk>`` in tokens.txt), then the
  next att_cache and cnn_cache in the input shapes.
- Metadata it requires: head, num_blocks, output_size, cnn_module_kernel,
  right_context, subsampling_factor, vocab_size. chunk_size and left_chunks
  are NOT read from the file: the user passes them to from_wenet_ctc
  (``chunk_size``, ``num_left_chunks``); we store them for our own runtime.
- Front end: kaldi-native-fbank, dither 0, snip_edges False, 25/10 ms,
  low_freq 20, high_freq -400, ``feature_dim`` bins; for WeNet models it
  sets normalize_samples=False, i.e. it multiplies the [-1, 1] samples by
  32768 before the fbank. The fbank is linear in power up to its floor
  (log of max(mel energy, FLT_EPSILON)), so log-mel(32768 x) =
  log-mel(x) + 2 ln 32768 wherever the [-1, 1] energy is above the floor.
  The graph undoes the scale exactly, floor included:
  max(x - 2 ln 32768, ln FLT_EPSILON) is what our model (trained on
  [-1, 1] samples) saw, also for silence and for band-limited (e.g.
  8 kHz upsampled) audio whose top bins sit at the floor.
  CMVN is not applied by sherpa-onnx: it is inside the graph.
- Framing: a chunk runs when processed + chunk_length < frames ready
  (strictly), windows advance by chunk*4 frames; at the end it runs no
  partial chunk, so callers add tail padding (silence) before
  ``input_finished``. Our OrtStreamingRecognizer runs the exact partial
  chunk instead (the time axis of ``x`` is dynamic for that).
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from streamkd.config import FeatureConfig
from streamkd.errors import UsageError
from streamkd.model.subsampling import Conv2dSubsampling4

__all__ = [
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "INT16_SCALE",
    "LOG_FLOOR",
    "WenetCtcOnnxWrapper",
    "export_wenet_ctc_onnx",
    "sherpa_feature_mismatch",
]

INPUT_NAMES = ["x", "offset", "required_cache_size", "att_cache", "cnn_cache", "att_mask"]
OUTPUT_NAMES = ["log_probs", "next_att_cache", "next_cnn_cache"]
INT16_SCALE = 32768.0  # sherpa-onnx multiplies samples by this for WeNet models
# kaldi-native-fbank's log floor: log(max(mel energy, FLT_EPSILON)).
LOG_FLOOR = math.log(float(np.finfo(np.float32).eps))
MODEL_FILE = "model.onnx"
TOKENS_FILE = "tokens.txt"

# sherpa-onnx's fixed front-end options (features.cc); the rest come from
# from_wenet_ctc(sample_rate, feature_dim).
_SHERPA_FRONT_END = {"frame_length_ms": 25.0, "frame_shift_ms": 10.0, "snip_edges": False,
                     "low_freq": 20.0, "high_freq": -400.0}


class WenetCtcOnnxWrapper(nn.Module):
    """sherpa-onnx's WeNet CTC interface over ``model.encoder.step``.

    The int16-scale correction (floor included), CMVN and the CTC
    log-softmax are inside, so the graph takes sherpa-onnx's raw fbank and
    gives log-probs.
    Shapes as listed in the module docstring; L layers, H heads, Dh head
    width, D model width, K conv kernel, V vocabulary.
    """

    def __init__(self, model, cache_frames: int, feature_scale: float = INT16_SCALE) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.ctc_head = model.ctc_head
        self.cache_frames = int(cache_frames)
        self.log_shift = 2.0 * math.log(feature_scale)  # see the module docstring
        self.register_buffer("mean", model.cmvn_mean.detach().clone())
        self.register_buffer("istd", model.cmvn_istd.detach().clone())

    def forward(self, x, offset, required_cache_size, att_cache, cnn_cache, att_mask):
        """x (1, W, C), offset (1,), required_cache_size (1,), att_cache
        (L, H, T_cache, 2*Dh), cnn_cache (L, 1, D, K-1), att_mask (1, 1,
        T_cache + chunk) -> log_probs (1, T, V), att_cache, cnn_cache."""
        x = torch.clamp(x - self.log_shift, min=LOG_FLOOR)  # the fbank of [-1, 1] samples
        xn = (x - self.mean) * self.istd
        cache_valid = att_mask[:, 0, : self.cache_frames]  # (1, T_cache); the chunk part is all True
        out, att, cnn = self.encoder.step(xn, att_cache.unsqueeze(1), cnn_cache, cache_valid)
        log_probs = F.log_softmax(self.ctc_head(out), dim=-1)
        # The model uses relative positions only, so offset and
        # required_cache_size carry no information; but the TorchScript
        # exporter drops unused inputs and sherpa-onnx binds inputs by
        # position, so they must stay in the graph: add an exact zero.
        keep = (offset.sum() + required_cache_size.sum()).to(log_probs.dtype) * 0.0
        return log_probs + keep, att.squeeze(1), cnn


def sherpa_feature_mismatch(cfg: FeatureConfig) -> dict:
    """Front-end options where ``cfg`` differs from what sherpa-onnx computes."""
    return {k: (getattr(cfg, k), v) for k, v in _SHERPA_FRONT_END.items() if getattr(cfg, k) != v}


def _example_inputs(model, chunk_frames: int, left_chunks: int) -> tuple[torch.Tensor, ...]:
    enc = model.encoder
    cfg = enc.cfg
    cache = chunk_frames * left_chunks
    window = Conv2dSubsampling4.window_frames(chunk_frames)
    x = torch.randn(1, window, model.input_dim) + model.cmvn_mean + 2.0 * math.log(INT16_SCALE)
    att = torch.zeros(cfg.num_layers, cfg.num_heads, cache, 2 * enc.head_dim)
    cnn = torch.zeros(cfg.num_layers, 1, cfg.d_model, cfg.conv_kernel - 1)
    mask = torch.ones(1, 1, cache + chunk_frames, dtype=torch.bool)
    mask[:, :, :cache] = False
    return (x, torch.tensor([cache], dtype=torch.int64), torch.tensor([cache], dtype=torch.int64), att, cnn, mask)


def _metadata(model, chunk_frames: int, left_chunks: int, feature_cfg: FeatureConfig) -> dict[str, str]:
    cfg = model.encoder.cfg
    meta = {
        "model_type": "wenet_ctc",
        "version": "1",
        "model_author": "streamkd",
        "comment": "streaming",
        # what sherpa-onnx reads
        "head": cfg.num_heads,
        "num_blocks": cfg.num_layers,
        "output_size": cfg.d_model,
        "cnn_module_kernel": cfg.conv_kernel,
        "right_context": Conv2dSubsampling4.right_context,
        "subsampling_factor": Conv2dSubsampling4.subsampling,
        "vocab_size": model.vocab_size,
        # what the user must pass to from_wenet_ctc, and our runtime reads
        "chunk_size": chunk_frames,
        "left_chunks": left_chunks,
        "blank_id": 0,
        "feature_scale": INT16_SCALE,
        "cmvn": "inside",
        "feature_config": json.dumps({k: getattr(feature_cfg, k) for k in feature_cfg.__dataclass_fields__}),
    }
    return {k: str(v) for k, v in meta.items()}


def _check_graph(path: Path, meta: dict[str, str]):
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    inputs = [i.name for i in proto.graph.input]
    outputs = [o.name for o in proto.graph.output]
    if inputs != INPUT_NAMES or outputs != OUTPUT_NAMES:
        raise RuntimeError(f"exported graph has inputs {inputs} and outputs {outputs}, expected "
                           f"{INPUT_NAMES} and {OUTPUT_NAMES}: sherpa-onnx binds them by position")
    del proto.metadata_props[:]
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def _verify(path: Path, wrapper: nn.Module, example: tuple[torch.Tensor, ...], atol: float = 1e-3) -> float:
    """Run the file in onnxruntime on the example and compare with PyTorch."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = sess.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, example)})
    with torch.inference_mode():
        want = wrapper(*example)
    err = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))
    if not err <= atol:
        raise RuntimeError(f"{path}: onnxruntime differs from PyTorch by {err:.3g} (> {atol}); export is broken")
    return err


def export_wenet_ctc_onnx(
    model,
    out_dir: str | Path,
    *,
    chunk_frames: Optional[int] = None,
    left_chunks: Optional[int] = None,
    opset: int = 17,
    tokenizer=None,
    feature_cfg: Optional[FeatureConfig] = None,
    verify: bool = True,
) -> Path:
    """Write ``model.onnx`` (sherpa-onnx WeNet CTC layout) and ``tokens.txt``
    into ``out_dir``; return the model path.

    chunk_frames / left_chunks: the chunking to stream with (default the
    model's ChunkConfig); a bounded left context is required, since the
    cache has a fixed size. tokenizer: default ``model.tokenizer``.
    feature_cfg: the front end (default the model's training config); a
    front end that differs from sherpa-onnx's warns (our ORT runtime still
    uses the stored one). ``verify`` runs the file in onnxruntime once.
    """
    chunk = model.chunk
    chunk_frames = chunk_frames if chunk_frames is not None else (chunk.chunk_frames if chunk else None)
    left_chunks = left_chunks if left_chunks is not None else (chunk.left_chunks if chunk else None)
    if chunk_frames is None or left_chunks is None or left_chunks < 1 or chunk_frames < 1:
        raise UsageError(
            f"export needs a chunked model with a bounded left context (chunk_frames={chunk_frames}, "
            f"left_chunks={left_chunks}); pass chunk_frames=N and left_chunks=N >= 1 "
            "(CLI: --chunk-frames/--left-chunks)")
    if not model.encoder.cfg.causal:
        raise UsageError("export needs a causal student (EncoderConfig.causal=True); this model's "
                         "symmetric convolution reads future frames and cannot stream")
    tokenizer = tokenizer if tokenizer is not None else model.tokenizer
    if tokenizer is None:
        raise UsageError("export needs a tokenizer for tokens.txt: the model has none; pass tokenizer=")
    if tokenizer.vocab_size != model.vocab_size:
        raise UsageError(f"tokenizer has {tokenizer.vocab_size} symbols but the model {model.vocab_size} outputs")
    feature_cfg = feature_cfg or model.feature_config
    mismatch = sherpa_feature_mismatch(feature_cfg)
    if mismatch:
        warnings.warn(f"front end differs from sherpa-onnx's ({mismatch}, as (ours, sherpa's)): "
                      "sherpa-onnx will compute other features than the model was trained on")

    # A private float32 CPU copy: exporting must not change the caller's model.
    model = copy.deepcopy(model).cpu().float().eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    wrapper = WenetCtcOnnxWrapper(model, chunk_frames * left_chunks).eval()
    example = _example_inputs(model, chunk_frames, left_chunks)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)  # we choose the TorchScript exporter
        torch.onnx.export(
            wrapper, example, str(path), dynamo=False, opset_version=opset,
            input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
            # Only the time axis of x is dynamic (our runtime's last partial
            # chunk); sherpa-onnx always feeds the full window.
            dynamic_axes={"x": {1: "feat_frames"}, "log_probs": {1: "frames"}},
        )
    _check_graph(path, _metadata(model, chunk_frames, left_chunks, feature_cfg))
    tokenizer.write_tokens_txt(out_dir / TOKENS_FILE)
    if verify:
        _verify(path, wrapper, example)
    return path
