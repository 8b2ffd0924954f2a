"""Checkpoints: atomic writes, training and inference forms, averaging.

A training checkpoint holds everything a run needs to continue exactly
(config, model, objective extras, optimizer, scheduler, sampler position,
RNG states, step and epoch) plus the tokenizer and CMVN. An inference
checkpoint holds only what decoding needs: config, model, tokenizer, CMVN.
Either one alone can decode: ``load_model`` accepts both.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from streamkd.atomic import atomic_open
from streamkd.config import Config, from_dict, to_dict

__all__ = [
    "save_atomic",
    "load_checkpoint",
    "inference_checkpoint",
    "load_model",
    "build_model",
    "average_state_dicts",
    "save_pretrained",
]

FORMAT_VERSION = 1


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a
    kill at any moment leaves either the old file or the new one."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
    # fsync the folder too, so the rename itself survives a power cut.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint file, with an error that says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for a truncated file
        raise ValueError(f"checkpoint {path} cannot be read ({err}); is it a streamkd checkpoint?") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"checkpoint {path} is not a streamkd checkpoint (no 'model'/'config')")
    return ckpt


def inference_checkpoint(cfg: Config, model_state: dict, tokenizer_state: dict, cmvn: dict) -> dict:
    """The small form: enough to decode, stream and export."""
    return {
        "kind": "inference",
        "format": FORMAT_VERSION,
        "config": to_dict(cfg),
        "model": model_state,
        "tokenizer": tokenizer_state,
        "cmvn": cmvn,
    }


def build_model(cfg: Config, tokenizer, cmvn: dict):
    """A fresh CTCModel for a config, tokenizer and CMVN statistics."""
    from streamkd.model import CTCModel

    mean = torch.as_tensor(cmvn["mean"], dtype=torch.float32)
    istd = torch.as_tensor(cmvn["istd"], dtype=torch.float32)
    model = CTCModel(cfg.model, tokenizer.vocab_size, mean, istd, input_dim=cfg.data.features.num_mel_bins)
    model.tokenizer = tokenizer
    model.config = cfg
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu", *,
               state: Optional[dict] = None):
    """A CTCModel in eval mode from a training or inference checkpoint. It
    carries ``.tokenizer``, ``.config`` (the Config it was trained with),
    its CMVN buffers and ``.chunk``."""
    from streamkd.tokenizer import tokenizer_from_state

    ckpt = load_checkpoint(path) if state is None else state
    cfg = from_dict(ckpt["config"], Config, src=str(path))
    tokenizer = tokenizer_from_state(ckpt["tokenizer"])
    model = build_model(cfg, tokenizer, ckpt["cmvn"])
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit its own config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return model.to(device).eval()


def average_state_dicts(states: Sequence[dict]) -> dict:
    """Element-wise mean of model state dicts (integer buffers from the first)."""
    if not states:
        raise ValueError("no checkpoints to average")
    out = {}
    for key, first in states[0].items():
        if torch.is_floating_point(first):
            acc = torch.zeros_like(first, dtype=torch.float64)
            for s in states:
                acc += s[key].to(torch.float64)
            out[key] = (acc / len(states)).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def save_pretrained(path: str | Path, out: str | Path) -> dict:
    """Write the inference form of checkpoint ``path`` to ``out`` with its
    floating-point weights in float16: half the size, for a teacher
    committed to a repository. ``load_model`` reads it back into float32
    (``load_state_dict`` casts); the rounding changes a weight by at most
    2^-11 relative. Returns the inference checkpoint written."""
    ckpt = load_checkpoint(path)
    model = {k: v.half() if torch.is_floating_point(v) and not k.startswith("cmvn_") else v
             for k, v in ckpt["model"].items()}
    small = {"kind": "inference", "format": FORMAT_VERSION, "config": ckpt["config"], "model": model,
             "tokenizer": ckpt["tokenizer"], "cmvn": ckpt["cmvn"], "from": str(path)}
    save_atomic(small, out)
    return small
