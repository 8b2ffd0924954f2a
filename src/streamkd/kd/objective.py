"""The training objective: CTC plus the distillation ``kd.method`` plans
(``kd.plan``), against the teacher's outputs (``kd.teacher``).

The returned terms are the unweighted sums over the layer map; the total
weights them as docs/method.md writes. The teacher is frozen and not a
submodule: it is in neither ``parameters()`` nor ``state_dict()``;
``objective.train()`` keeps it in eval mode and ``objective.to(...)``
moves it along. ``objective.student`` is the deployable model; the
branches, projections and predictors exist only here and are dropped by
``strip_to_student``. The APC predictor's LSTM has the teacher's width as
hidden size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from streamkd.config import DataConfig, KDConfig
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
from streamkd.kd.plan import KDPlan, make_plan
from streamkd.kd.teacher import (
    LiveTeacher,
    PrecomputedTeacher,
    TeacherInfo,
    TeacherOutputs,
    check_no_augmentation,
    check_teacher,
    load_teacher,
)
from streamkd.types import Batch

__all__ = ["Objective", "build_objective", "strip_to_student"]


class Objective(nn.Module):
    """Student + training-only modules; ``forward(batch) -> dict`` of losses."""

    def __init__(
        self,
        kd: KDConfig,
        student: nn.Module,
        plan: Optional[KDPlan] = None,
        teacher_info: Optional[TeacherInfo] = None,
        teacher: Optional[Union[LiveTeacher, PrecomputedTeacher]] = None,
    ) -> None:
        """plan None: CTC alone. teacher_info: the teacher the modules are
        sized for; teacher: where its outputs come from."""
        super().__init__()
        self.kd, self.plan = kd, plan
        self.student = student
        self.projections = nn.ModuleList()
        self.branches = nn.ModuleList()
        self.predictors = nn.ModuleList()
        if plan is not None and plan.uses_layers:
            d_s, t_enc = student.enc_cfg.d_model, teacher_info.encoder
            d_t = t_enc.d_model
            for _ in plan.pairs:
                if plan.use_layer:
                    self.projections.append(nn.Identity() if d_s == d_t else nn.Linear(d_s, d_t))
                if plan.needs_branch:
                    self.branches.append(AuxiliaryBranch.from_teacher(d_s, t_enc))
                if plan.use_apc:
                    d_in = d_s if plan.apc_input == "student" else d_t
                    self.predictors.append(APCPredictor(d_in, d_t, hidden=d_t))
        self._source = teacher  # not a module: out of parameters() and state_dict()

    @property
    def teacher(self) -> Optional[nn.Module]:
        """The live teacher model (None without one, or when its outputs are precomputed)."""
        return self._source.model if isinstance(self._source, LiveTeacher) else None

    def train(self, mode: bool = True) -> "Objective":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: no dropout, whatever the student does
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn)
        return self

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly the deployable student's state (what inference and export use)."""
        return self.student.state_dict()

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """batch.feats (B, F, C) -> {"loss": total, "ctc": ..., and each active term}."""
        plan, kd = self.plan, self.kd
        need_hidden = plan is not None and plan.uses_layers
        enc = self.student(batch.feats, batch.feat_lens, return_hidden=need_hidden)
        log_probs = self.student.ctc_log_probs(enc.out)
        losses = {"ctc": ctc_loss(log_probs, enc.out_lens, batch.tokens, batch.token_lens)}
        total = losses["ctc"]
        if plan is not None and (plan.use_tok or plan.uses_layers):
            teacher = self._source.outputs(batch, enc.out_lens, enc.out.size(1), plan)
            valid = enc.valid_mask
            if plan.use_tok:
                losses["tok"] = token_kd_loss(log_probs, teacher.log_probs, valid, kd.temperature, kd.shift_frames)
                total = total + kd.mu * losses["tok"]
            weights = {"layer": kd.alpha, "feat": kd.alpha, "attn": kd.beta, "apc": kd.gamma}
            for name, value in self._layer_terms(enc.hidden, teacher, valid).items():
                losses[name] = value
                total = total + kd.lambda_ * weights[name] * value
        losses["loss"] = total
        return losses

    def _layer_terms(
        self, hidden: list[torch.Tensor], teacher: TeacherOutputs, valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Sums over the layer map of each active layer loss (unweighted)."""
        plan, kd = self.plan, self.kd
        terms: dict[str, torch.Tensor] = {}

        def add(name: str, value: torch.Tensor) -> None:
            terms[name] = terms[name] + value if name in terms else value

        for m, (i, j) in enumerate(plan.pairs):
            s, h = hidden[i - 1], teacher.hidden[j]  # (B, T, D_s), (B, T, D_t)
            if plan.use_layer:
                add("layer", layer_kd_loss(self.projections[m](s), h, valid))
            if plan.use_feat or plan.use_attn:
                z, qkv = self.branches[m](s, valid, return_qkv=plan.use_attn)
                if plan.use_feat:
                    add("feat", feature_similarity_loss(z, h, valid))
                if plan.use_attn:
                    add("attn", attention_relation_loss(qkv, teacher.qkv[j], valid, kd.relation_heads))
            if plan.use_apc:
                x = s
                if plan.apc_input == "aux_hole":
                    hole = hole_attend_mask(s.size(1), kd.apc_horizon, s.device)[None]  # (1, T, T)
                    x, _ = self.branches[m](s, valid, attend_mask=hole)
                add("apc", apc_loss(self.predictors[m](x, valid), h, valid, kd.apc_horizon))
        return terms


def build_objective(
    kd: KDConfig, data: DataConfig, student: nn.Module, device: torch.device | str = "cpu", *,
    teacher: Optional[nn.Module] = None,
) -> Objective:
    """The objective of ``kd`` around ``student`` (a CTCModel), on ``device``.

    data: the student's data section (its features must be the teacher's;
    precomputed teacher outputs forbid augmentation). teacher: an already
    loaded teacher CTCModel; default: loaded from ``kd.teacher`` (unless
    ``kd.precomputed_dir`` holds its outputs). Every inconsistency is a
    ConfigError naming the config key.
    """
    if kd.method == "none":
        return Objective(kd, student).to(device)
    if kd.precomputed_dir is not None:
        check_no_augmentation(data)
        source = PrecomputedTeacher(Path(kd.precomputed_dir))
        info = TeacherInfo.of_model(teacher) if teacher is not None else source.info
    else:
        source = LiveTeacher(teacher if teacher is not None else load_teacher(kd, device), kd.teacher_bf16)
        info = source.info
    plan = make_plan(kd, student.enc_cfg.num_layers, info.encoder.num_layers)
    check_teacher(data.features, kd, student, info, plan)
    if isinstance(source, PrecomputedTeacher):
        source.check_covers(plan)
    return Objective(kd, student, plan, info, source).to(device)


def strip_to_student(objective_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An Objective's state dict -> the student's alone (keys without "student.")."""
    prefix = "student."
    return {k[len(prefix):]: v for k, v in objective_state.items() if k.startswith(prefix)}
