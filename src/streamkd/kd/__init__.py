"""Distillation from a full-context teacher into a streaming student.

``losses`` holds the pure loss functions (tensors only), ``branch`` the
training-only modules (auxiliary non-streaming layer, APC predictor),
``plan`` which losses ``kd.method`` runs on which layers, ``teacher`` the
frozen teacher (live or precomputed) and ``objective`` the objective that
combines them.
"""
from __future__ import annotations

from streamkd.kd.branch import APCPredictor, AuxiliaryBranch
from streamkd.kd.losses import (
    apc_loss,
    attention_relation_loss,
    ctc_loss,
    feature_similarity_loss,
    hole_attend_mask,
    layer_kd_loss,
    token_kd_loss,
)
from streamkd.kd.objective import Objective, build_objective, strip_to_student
from streamkd.kd.plan import KDPlan, make_plan
from streamkd.kd.teacher import precompute_teacher

__all__ = [
    "apc_loss",
    "attention_relation_loss",
    "ctc_loss",
    "feature_similarity_loss",
    "hole_attend_mask",
    "layer_kd_loss",
    "token_kd_loss",
    "AuxiliaryBranch",
    "APCPredictor",
    "Objective",
    "build_objective",
    "strip_to_student",
    "KDPlan",
    "make_plan",
    "precompute_teacher",
]
