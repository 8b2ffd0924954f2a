"""The embedded speech corpus: fortunes text spoken by local TTS voices
(espeak-ng, flite, festival), degraded with noise and reverberation.

``build_corpus(out_dir, hours, seed)`` is the entry point; ``text``,
``voices`` and ``degrade`` hold its parts.
"""
from __future__ import annotations

from streamkd.corpus.build import build_corpus, plan_corpus, respeak_manifest
from streamkd.corpus.degrade import DegradeConfig
from streamkd.corpus.text import load_sentences, normalize_sentence, number_to_words
from streamkd.corpus.voices import ALL_VOICES, DEFAULT_TEST_VOICES, TTSError, Voice

__all__ = [
    "build_corpus",
    "plan_corpus",
    "respeak_manifest",
    "DegradeConfig",
    "load_sentences",
    "normalize_sentence",
    "number_to_words",
    "ALL_VOICES",
    "DEFAULT_TEST_VOICES",
    "TTSError",
    "Voice",
]
