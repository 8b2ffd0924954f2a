"""streamkd: distil a non-streaming ASR teacher into a streaming student."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load_model", "__version__"]


def load_model(path, device="cpu"):
    """Load a checkpoint (training or inference) as a CTC model in eval mode.

    The model carries its tokenizer (``model.tokenizer``), its CMVN and its
    ``model.chunk`` (the ChunkConfig it streams with; None: full context).
    """
    from streamkd.checkpoint import load_model as _load

    return _load(path, device=device)
