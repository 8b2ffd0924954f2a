"""Distillation from a full-context teacher into a streaming student.

``losses`` holds the pure loss functions (tensors only), ``branch`` the
training-only modules (auxiliary non-streaming layer, APC predictor) and
``harness`` the objective that combines them per ``kd.method``. The branch
and harness names are imported on first use so that the losses work
without the model package.
"""
from __future__ import annotations

import importlib

from streamkd.kd.losses import (
    apc_loss,
    attention_relation_loss,
    ctc_loss,
    feature_similarity_loss,
    hole_attend_mask,
    layer_kd_loss,
    token_kd_loss,
)

_LAZY = {
    "AuxiliaryBranch": "streamkd.kd.branch",
    "APCPredictor": "streamkd.kd.branch",
    "Objective": "streamkd.kd.harness",
    "build_objective": "streamkd.kd.harness",
    "strip_to_student": "streamkd.kd.harness",
    "precompute_teacher": "streamkd.kd.harness",
}

__all__ = [
    "apc_loss",
    "attention_relation_loss",
    "ctc_loss",
    "feature_similarity_loss",
    "hole_attend_mask",
    "layer_kd_loss",
    "token_kd_loss",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'streamkd.kd' has no attribute {name!r}")
