"""Streaming inference from raw audio, latency figures, and the ONNX export
that sherpa-onnx runs.

- ``StreamingRecognizer``: PyTorch, audio pieces of any size in, partial
  and final text out (``recognizer``).
- ``export_wenet_ctc_onnx``: sherpa-onnx's WeNet streaming CTC layout
  (``export``); ``OrtStreamingRecognizer`` runs it with ONNX Runtime and
  ``SherpaStreamingRecognizer`` with sherpa-onnx (``ort``).
- ``latency``: RTF, compute per chunk, algorithmic latency, emission delay.
"""
from streamkd.streaming.export import export_wenet_ctc_onnx
from streamkd.streaming.latency import algorithmic_latency_ms, emission_delay, teacher_alignment
from streamkd.streaming.ort import OrtStreamingRecognizer, SherpaStreamingRecognizer
from streamkd.streaming.recognizer import StreamingRecognizer, decode_streams

__all__ = [
    "StreamingRecognizer",
    "decode_streams",
    "export_wenet_ctc_onnx",
    "OrtStreamingRecognizer",
    "SherpaStreamingRecognizer",
    "algorithmic_latency_ms",
    "emission_delay",
    "teacher_alignment",
]
