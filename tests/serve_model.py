"""A tiny streaming student for the server tests: random weights (no
training), whose CTC head emits tokens on the gliding-tone audio of
``varied_audio`` and blank on silence, like a trained model does on speech
and pauses; so endpointing from CTC blanks has something to find."""
from __future__ import annotations

import numpy as np
import torch

from streamkd.audio import load_audio
from streamkd.config import FeatureConfig
from streamkd.decode import decode_utterance
from streamkd.features import Fbank
from test_recognizer import tiny_model, varied_audio

SR = 16000


def talking_model():
    """tiny_model() with the blank logit tied to a silence-vs-tone direction
    of its encoder output."""
    model = tiny_model()
    cfg = FeatureConfig()
    with torch.no_grad():
        outs = []
        for x in (np.zeros(2 * SR, np.float32), varied_audio(3.0, seed=1)):
            f = Fbank(cfg).compute(x)
            outs.append(model(f[None], torch.tensor([f.size(0)])).out[0])  # (T, D)
        silence, tone = outs
        direction = silence.mean(0) - tone.mean(0)
        lo, hi = float((tone @ direction).max()), float((silence @ direction).min())
        assert hi > lo, "silence and tone frames are not separable: change the seed"
        scale = 200.0 / (hi - lo)
        model.ctc_head.weight[0] = direction * scale
        model.ctc_head.bias[0] = -scale * (hi + lo) / 2
    return model


def offline_text(model, samples: np.ndarray) -> str:
    """What ``streamkd decode`` gives for 16 kHz samples (simulated streaming)."""
    return model.tokenizer.decode(decode_utterance(model, Fbank(model.feature_config).compute(samples)))


def offline_file_text(model, path) -> str:
    return offline_text(model, load_audio(path, SR))


def two_utterances(silence_sec: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(joined, first, second): two tone utterances with silence between."""
    first, second = varied_audio(2.5, seed=3), varied_audio(2.0, seed=4)
    gap = np.zeros(int(silence_sec * SR), np.float32)
    return np.concatenate([first, gap, second]), first, second
