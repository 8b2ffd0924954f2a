"""Errors that name what is wrong and where, so a user can fix their input."""
from __future__ import annotations

__all__ = ["StreamkdError", "DataError", "AudioError", "ManifestError", "TokenizerError", "LMError"]


class StreamkdError(Exception):
    """Base of every error streamkd raises on purpose."""


class DataError(StreamkdError):
    """An input file or item cannot be used."""


class AudioError(DataError):
    """Audio that is missing, unreadable, empty, non-finite or of a wrong format."""


class ManifestError(DataError):
    """A manifest line that is not valid (the message names file and line)."""


class TokenizerError(DataError):
    """A transcript the tokenizer cannot encode, or a missing tokenizer."""


class LMError(DataError):
    """A language model folder or file that is missing, corrupt or does not
    fit the model's tokens, or an LM toolkit that is not installed."""
