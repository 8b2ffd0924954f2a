"""streamkd: distil a non-streaming ASR teacher into a streaming student."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load_model", "StreamingRecognizer", "__version__"]

# The public API: ``load_model(path, device="cpu")`` (a checkpoint as a
# CTCModel in eval mode, carrying its tokenizer, config, CMVN and chunk)
# and ``StreamingRecognizer(model, beam=1)``. They are resolved on first
# use: this package's __init__ runs for every `streamkd` command, and
# importing torch here would make `streamkd --help` wait for it.
_PUBLIC = {"load_model": "streamkd.checkpoint", "StreamingRecognizer": "streamkd.streaming.recognizer"}


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'streamkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
