"""Errors that name what is wrong and where, so a user can fix their input.

Every error streamkd raises on purpose is a ``StreamkdError``; the command
line catches this one family once (``streamkd.cli.main``) and prints its
message without a traceback. The subclasses that were ``ValueError``s
before the family existed stay ``ValueError``s too, so older ``except``
clauses keep working.
"""
from __future__ import annotations

__all__ = ["StreamkdError", "ConfigError", "UsageError", "CheckpointError", "DataError", "AudioError",
           "ManifestError", "TokenizerError", "LMError"]


class StreamkdError(Exception):
    """Base of every error streamkd raises on purpose."""


class ConfigError(StreamkdError, ValueError):
    """A configuration value is missing, unknown or of the wrong type (the
    message names the key and the file or command-line argument)."""


class UsageError(StreamkdError, ValueError):
    """Command-line arguments or API arguments that do not fit together."""


class CheckpointError(StreamkdError, ValueError):
    """A file that is missing or is not a streamkd checkpoint, or a
    checkpoint that does not fit its own config."""


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
