"""The training objective: CTC plus the distillation of ``kd.method``.

One code path for the paper's method and its baselines (docs/method.md):

    none       L = L_ctc
    token      L = L_ctc + mu L_tok
    layer      L = L_ctc + lambda sum_M alpha L_feat(proj(s_i), h_j)          (term "layer")
    aux        L = L_ctc + lambda sum_M (alpha L_feat(z_i, h_j) + beta L_attn + gamma L_apc)
    aux+token  both

s_i: student layer i's streaming output, h_j: teacher layer j's output,
z_i: the auxiliary branch's output on s_i. A weight of 0 switches its loss
off and skips its compute (and the modules only it needs are not built).
The returned terms are the unweighted sums over the layer map M.

The teacher is frozen and not a submodule: it is in neither
``parameters()`` nor ``state_dict()``; ``objective.train()`` keeps it in
eval mode and ``objective.to(...)`` moves it along. ``objective.student`` is
the deployable model; the branches, projections and predictors exist only
here and are dropped by ``strip_to_student``.

Default layer map (``kd.layer_map: []``): k = min(3, L_s, L_t) pairs evenly
spaced and ending at both last layers, (round(m L_s / k), round(m L_t / k))
for m = 1..k: {(4,4), (8,8), (12,12)} for two 12-layer encoders and
{(2,4), (4,8), (6,12)} for a 6-layer student of a 12-layer teacher, the
examples of method.md.

The APC predictor's LSTM has the teacher's width as hidden size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional
from urllib.parse import quote

import torch
from torch import nn

from streamkd.atomic import write_atomic
from streamkd.config import Config, ConfigError, EncoderConfig, FeatureConfig, KDConfig, from_dict, to_dict
from streamkd.errors import DataError, UsageError
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
from streamkd.types import Batch

__all__ = [
    "Objective",
    "KDPlan",
    "TeacherInfo",
    "build_objective",
    "make_plan",
    "precompute_teacher",
    "strip_to_student",
]

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_META = "meta.json"
_PRECOMPUTE_FORMAT = 1


@dataclass(frozen=True)
class TeacherInfo:
    """What the checks need to know about the teacher, from the model itself or
    from the ``meta.json`` of precomputed outputs."""

    encoder: EncoderConfig
    vocab_size: int
    features: FeatureConfig
    symbols: tuple[str, ...]

    @classmethod
    def of_model(cls, model: nn.Module) -> "TeacherInfo":
        """From a teacher CTCModel, which must carry its config and tokenizer."""
        if model.tokenizer is None:
            raise UsageError("the teacher carries no tokenizer; load it with streamkd.load_model(checkpoint)")
        return cls(encoder=model.enc_cfg, vocab_size=model.vocab_size, features=model.feature_config,
                   symbols=tuple(model.tokenizer.symbols))

    def to_dict(self) -> dict:
        return {"encoder": to_dict(self.encoder), "vocab_size": self.vocab_size,
                "features": to_dict(self.features), "symbols": list(self.symbols)}

    @classmethod
    def from_dict(cls, data: dict, src: str) -> "TeacherInfo":
        if data.get("features") is None or data.get("symbols") is None:
            raise ConfigError(f"kd.precomputed_dir: {src} does not describe the teacher's features and "
                              "tokens; precompute again")
        return cls(
            encoder=from_dict(data["encoder"], EncoderConfig, src=src),
            vocab_size=int(data["vocab_size"]),
            features=from_dict(data["features"], FeatureConfig, src=src),
            symbols=tuple(data["symbols"]),
        )


@dataclass(frozen=True)
class KDPlan:
    """Which losses run, on which layer pairs (1-based (student, teacher))."""

    pairs: tuple[tuple[int, int], ...]
    use_tok: bool
    use_layer: bool
    use_feat: bool
    use_attn: bool
    use_apc: bool
    apc_input: str

    @property
    def uses_layers(self) -> bool:
        return self.use_layer or self.use_feat or self.use_attn or self.use_apc

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        return tuple(sorted({j for _, j in self.pairs})) if self.uses_layers else ()

    @property
    def needs_branch(self) -> bool:
        return self.use_feat or self.use_attn or (self.use_apc and self.apc_input == "aux_hole")


def _default_layer_map(student_layers: int, teacher_layers: int) -> tuple[tuple[int, int], ...]:
    k = min(3, student_layers, teacher_layers)
    # round half up of m * L / k in integers
    return tuple(
        ((2 * m * student_layers + k) // (2 * k), (2 * m * teacher_layers + k) // (2 * k))
        for m in range(1, k + 1)
    )


def make_plan(kd: KDConfig, student_layers: int, teacher_layers: int) -> KDPlan:
    """Resolve ``kd`` against the encoders' depths; errors name the config key."""
    method = kd.method
    layer_on = method in ("layer", "aux", "aux+token") and kd.lambda_ > 0
    aux = layer_on and method != "layer"
    pairs = tuple(tuple(p) for p in kd.layer_map) or _default_layer_map(student_layers, teacher_layers)
    for m, (i, j) in enumerate(pairs):
        if not 1 <= i <= student_layers:
            raise ConfigError(
                f"kd.layer_map[{m}]: student layer {i} is out of range 1..{student_layers} "
                f"(layers are 1-based; the student has model.num_layers={student_layers})"
            )
        if not 1 <= j <= teacher_layers:
            raise ConfigError(
                f"kd.layer_map[{m}]: teacher layer {j} is out of range 1..{teacher_layers} "
                f"(layers are 1-based; the teacher has {teacher_layers} layers)"
            )
    return KDPlan(
        pairs=pairs if layer_on else (),
        use_tok=method in ("token", "aux+token") and kd.mu > 0,
        use_layer=method == "layer" and layer_on and kd.alpha > 0,
        use_feat=aux and kd.alpha > 0,
        use_attn=aux and kd.beta > 0,
        use_apc=aux and kd.gamma > 0,
        apc_input=kd.apc_input,
    )


def _check_kd_values(kd: KDConfig) -> None:
    for key in ("lambda_", "alpha", "beta", "gamma", "mu"):
        if getattr(kd, key) < 0:
            raise ConfigError(f"kd.{key.rstrip('_')}: a loss weight must be >= 0, got {getattr(kd, key)}")
    if kd.temperature <= 0:
        raise ConfigError(f"kd.temperature must be > 0, got {kd.temperature}")
    if kd.shift_frames < 0:
        raise ConfigError(f"kd.shift_frames must be >= 0 encoder frames, got {kd.shift_frames}")
    if kd.apc_horizon < 1:
        raise ConfigError(f"kd.apc_horizon must be >= 1 encoder frame, got {kd.apc_horizon}")
    if kd.relation_heads < 1:
        raise ConfigError(f"kd.relation_heads must be >= 1, got {kd.relation_heads}")


def _check_no_augmentation(cfg: Config) -> None:
    """Precomputed teacher outputs are of the clean features; a student whose
    input is augmented would be compared with the wrong teacher features."""
    data = cfg.data
    if data.spec_augment.enabled:
        raise ConfigError("kd.precomputed_dir is set but data.spec_augment.enabled is true: precomputed teacher "
                          "outputs need unaugmented input; disable one of them")
    if any(f != 1.0 for f in data.speed_perturb):
        raise ConfigError(f"kd.precomputed_dir is set but data.speed_perturb={list(data.speed_perturb)}: "
                          "precomputed teacher outputs need unperturbed audio; set it to [] or unset the dir")
    if data.features.dither > 0:
        raise ConfigError("kd.precomputed_dir is set but data.features.dither > 0: the features are random per "
                          "epoch; set dither to 0 or unset the dir")


def _check_teacher(cfg: Config, student: nn.Module, info: TeacherInfo, plan: KDPlan) -> None:
    enc = info.encoder
    if enc.chunk is not None or enc.causal or enc.dynamic_chunk:
        raise ConfigError(
            f"kd.teacher: the teacher is a streaming model (model.chunk={enc.chunk}, causal={enc.causal}, "
            f"dynamic_chunk={enc.dynamic_chunk}); distillation needs a full-context teacher "
            "(chunk null, causal false, dynamic_chunk false)"
        )
    if info.features != cfg.data.features:
        diffs = [
            f"{f.name}: student {getattr(cfg.data.features, f.name)!r}, teacher {getattr(info.features, f.name)!r}"
            for f in dataclasses.fields(FeatureConfig)
            if getattr(cfg.data.features, f.name) != getattr(info.features, f.name)
        ]
        raise ConfigError(f"data.features differs from the teacher's ({'; '.join(diffs)}); "
                          "the student must see the features the teacher was trained on")
    if plan.use_tok:
        _check_same_tokens(student, info)
    if plan.use_attn and enc.d_model % cfg.kd.relation_heads:
        raise ConfigError(
            f"kd.relation_heads={cfg.kd.relation_heads} does not divide the teacher's (and the branch's) "
            f"attention width {enc.d_model}; pick a divisor of it"
        )


def _check_same_tokens(student: nn.Module, info: TeacherInfo) -> None:
    """Token KD compares posteriors id by id: the vocabularies must be equal."""
    if student.vocab_size != info.vocab_size:
        raise ConfigError(
            f"kd.method=token KD needs the teacher's vocabulary: the student (data.lang_dir) has "
            f"{student.vocab_size} symbols, the teacher {info.vocab_size}; use the teacher's lang_dir"
        )
    if student.tokenizer is None:
        raise UsageError("token KD compares the student's symbols with the teacher's: the student carries "
                         "no tokenizer; build it with checkpoint.build_model")
    for idx, (a, b) in enumerate(zip(student.tokenizer.symbols, info.symbols)):
        if a != b:
            raise ConfigError(
                f"kd.method=token KD needs the teacher's tokenizer: symbol {idx} is {a!r} in the student's "
                f"data.lang_dir and {b!r} in the teacher's; use the teacher's lang_dir"
            )


def _load_teacher(kd: KDConfig, device) -> nn.Module:
    if kd.teacher is None:
        raise ConfigError(f"kd.teacher is not set but kd.method={kd.method!r} distils from a teacher; "
                          "give the teacher checkpoint path (or use kd.method=none)")
    from streamkd.checkpoint import load_model

    try:
        return load_model(kd.teacher, device)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"kd.teacher: cannot load {kd.teacher}: {err}") from err


@dataclass
class _TeacherOutputs:
    """Teacher layer j's output (B, T, D_t) and (Q, K, V) (B, H_t, T, Dh_t),
    keyed by 1-based j, and its CTC log-probs (B, T, V) for token KD."""

    hidden: dict[int, torch.Tensor]
    qkv: dict[int, QKV]
    log_probs: Optional[torch.Tensor]
    out_lens: torch.Tensor


def _run_teacher(teacher: nn.Module, plan: KDPlan, feats: torch.Tensor, feat_lens: torch.Tensor,
                 bf16: bool = False) -> _TeacherOutputs:
    """One frozen forward keeping only what the plan uses; with ``bf16``
    under bf16 autocast, its outputs cast back to fp32 (kd.teacher_bf16)."""
    layers = plan.teacher_layers
    autocast = torch.autocast(feats.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        enc = teacher(feats, feat_lens, return_hidden=bool(layers), return_qkv=plan.use_attn)
        log_probs = teacher.ctc_log_probs(enc.out) if plan.use_tok else None
    # Inference tensors cannot be saved for backward by the student's graph;
    # a copy made outside inference mode is an ordinary (grad-free) tensor.
    keep = (lambda x: x.to(torch.float32, copy=True)) if bf16 else torch.clone
    return _TeacherOutputs(
        hidden={j: keep(enc.hidden[j - 1]) for j in layers},
        qkv={j: tuple(keep(x) for x in enc.qkv[j - 1]) for j in layers} if plan.use_attn else {},
        log_probs=keep(log_probs) if log_probs is not None else None,
        out_lens=enc.out_lens.clone(),
    )


class Objective(nn.Module):
    """Student + training-only modules; ``forward(batch) -> dict`` of losses."""

    def __init__(
        self,
        kd: KDConfig,
        student: nn.Module,
        plan: Optional[KDPlan],
        teacher_info: Optional[TeacherInfo] = None,
        teacher: Optional[nn.Module] = None,
        precomputed: Optional["_PrecomputedTeacher"] = None,
    ) -> None:
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
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        # Plain attribute, not a submodule: kept out of parameters() and state_dict().
        object.__setattr__(self, "_teacher", teacher)
        self._precomputed = precomputed

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self._teacher

    def train(self, mode: bool = True) -> "Objective":
        super().train(mode)
        if self._teacher is not None:
            self._teacher.eval()  # frozen: no dropout, whatever the student does
        return self

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self._teacher is not None:
            self._teacher._apply(fn)
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
            teacher = self._teacher_outputs(batch, enc.out_lens, enc.out.size(1))
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

    def _teacher_outputs(self, batch: Batch, out_lens: torch.Tensor, num_frames: int) -> _TeacherOutputs:
        if self._precomputed is not None:
            return self._precomputed.load(batch.ids, out_lens, num_frames, self.plan, batch.feats.device)
        out = _run_teacher(self._teacher, self.plan, batch.feats, batch.feat_lens, self.kd.teacher_bf16)
        t_frames = next(iter(out.hidden.values())).size(1) if out.hidden else out.log_probs.size(1)
        if t_frames != num_frames or not torch.equal(out.out_lens, out_lens):
            raise RuntimeError(
                f"teacher and student disagree on encoder frames (T {t_frames} vs {num_frames}, lengths "
                f"{out.out_lens.tolist()} vs {out_lens.tolist()}); they must share the subsampling"
            )
        return out

    def _layer_terms(
        self, hidden: list[torch.Tensor], teacher: _TeacherOutputs, valid: torch.Tensor
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
    cfg: Config, student: nn.Module, device: torch.device | str = "cpu", *, teacher: Optional[nn.Module] = None
) -> Objective:
    """The objective of ``cfg.kd`` around ``student`` (a CTCModel), on ``device``.

    teacher: an already loaded teacher CTCModel; default: loaded from
    ``cfg.kd.teacher`` (unless ``cfg.kd.precomputed_dir`` holds its outputs).
    Every inconsistency is a ConfigError naming the config key.
    """
    kd = cfg.kd
    _check_kd_values(kd)
    if kd.method == "none":
        return Objective(kd, student, None).to(device)
    precomputed = None
    if kd.precomputed_dir is not None:
        _check_no_augmentation(cfg)
        precomputed = _PrecomputedTeacher(Path(kd.precomputed_dir))
        info = TeacherInfo.of_model(teacher) if teacher is not None else precomputed.info
        teacher = None  # the outputs on disk stand in for it
    else:
        teacher = teacher if teacher is not None else _load_teacher(kd, device)
        info = TeacherInfo.of_model(teacher)
    plan = make_plan(kd, student.enc_cfg.num_layers, info.encoder.num_layers)
    _check_teacher(cfg, student, info, plan)
    if precomputed is not None:
        precomputed.check_covers(plan)
    return Objective(kd, student, plan, info, teacher, precomputed).to(device)


def strip_to_student(objective_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An Objective's state dict -> the student's alone (keys without "student.")."""
    prefix = "student."
    return {k[len(prefix):]: v for k, v in objective_state.items() if k.startswith(prefix)}


# -- precomputed teacher outputs --------------------------------------------------


def _item_path(root: Path, utt_id: str) -> Path:
    # Utterance ids may hold "/" (LibriSpeech-style paths); quoting keeps one
    # flat, collision-free file per id.
    return root / f"{quote(utt_id, safe='')}.pt"


class _PrecomputedTeacher:
    """Reads what ``precompute_teacher`` wrote and pads it into batches."""

    def __init__(self, root: Path) -> None:
        meta_path = root / _META
        if not meta_path.is_file():
            raise ConfigError(f"kd.precomputed_dir: {meta_path} does not exist; run precompute_teacher "
                              f"(it writes {_META} last, so its absence also means an unfinished run)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != _PRECOMPUTE_FORMAT:
            raise ConfigError(f"kd.precomputed_dir: {meta_path} has format {meta.get('format')!r}, "
                              f"expected {_PRECOMPUTE_FORMAT}; precompute again")
        self.root = root
        self.info = TeacherInfo.from_dict(meta["teacher"], str(meta_path))
        self.layers = tuple(meta["layers"])
        self.has_qkv = bool(meta["qkv"])
        self.has_log_probs = bool(meta["log_probs"])

    def check_covers(self, plan: KDPlan) -> None:
        missing = sorted(set(plan.teacher_layers) - set(self.layers))
        if missing or (plan.use_attn and not self.has_qkv) or (plan.use_tok and not self.has_log_probs):
            raise ConfigError(
                f"kd.precomputed_dir: {self.root} holds teacher layers {list(self.layers)} (qkv: {self.has_qkv}, "
                f"log-probs: {self.has_log_probs}) but this kd config needs layers {list(plan.teacher_layers)} "
                f"(qkv: {plan.use_attn}, log-probs: {plan.use_tok}); precompute with this config"
            )

    def _read(self, utt_id: str, frames: int) -> dict:
        path = _item_path(self.root, utt_id)
        if not path.is_file():
            raise DataError(f"kd.precomputed_dir: no teacher outputs for utterance {utt_id!r} ({path}); "
                            "precompute them for this manifest")
        item = torch.load(path, map_location="cpu", weights_only=True)
        if item["frames"] != frames:
            raise DataError(f"{path}: teacher outputs have {item['frames']} frames but the student has {frames} "
                            "for this utterance; the features changed since precomputing, precompute again")
        return item

    def load(self, ids: list[str], out_lens: torch.Tensor, num_frames: int, plan: KDPlan, device) -> _TeacherOutputs:
        """Stack the utterances of a batch, zero-padded to ``num_frames``."""
        items = [self._read(u, int(n)) for u, n in zip(ids, out_lens.tolist())]

        def pad(xs: list[torch.Tensor], time_dim: int) -> torch.Tensor:
            shape = list(xs[0].shape)
            shape[time_dim] = num_frames
            out = xs[0].new_zeros([len(xs)] + shape)
            for b, x in enumerate(xs):
                out[b].narrow(time_dim, 0, x.size(time_dim)).copy_(x)
            return out.to(device)

        hidden = {j: pad([it["hidden"][j] for it in items], 0) for j in plan.teacher_layers}
        qkv = {}
        if plan.use_attn:
            qkv = {j: tuple(pad([it["qkv"][j][n] for it in items], 1) for n in range(3)) for j in plan.teacher_layers}
        log_probs = pad([it["log_probs"] for it in items], 0) if plan.use_tok else None
        return _TeacherOutputs(hidden, qkv, log_probs, out_lens)


def _manifest_batches(cfg: Config, manifest: str, teacher: nn.Module) -> Iterable[Batch]:
    from streamkd.dataset import make_dataloader

    loader, _ = make_dataloader(cfg.data, manifest, teacher.tokenizer, train=False, seed=cfg.train.seed)
    return loader


def precompute_teacher(
    cfg: Config,
    teacher: nn.Module,
    manifest: Optional[str] = None,
    out_dir: Optional[str | Path] = None,
    *,
    batches: Optional[Iterable[Batch]] = None,
) -> int:
    """Write the teacher's outputs that ``cfg.kd`` needs, one file per utterance.

    Reads ``manifest`` through the (non-training) data loader, or takes
    ``batches`` directly. ``out_dir`` defaults to ``cfg.kd.precomputed_dir``.
    Each ``<quoted id>.pt`` holds the mapped layers' outputs (T_u, D_t), their
    (Q, K, V) (H_t, T_u, Dh_t) if the relation loss is on and the CTC
    log-probs (T_u, V) for token KD; ``meta.json``, written last, describes
    the teacher. Returns the number of utterances written.
    """
    from streamkd.checkpoint import save_atomic

    root = Path(out_dir if out_dir is not None else cfg.kd.precomputed_dir or "")
    if not str(root):
        raise ConfigError("kd.precomputed_dir is not set and no out_dir was given")
    _check_kd_values(cfg.kd)
    _check_no_augmentation(cfg)
    info = TeacherInfo.of_model(teacher)
    plan = make_plan(cfg.kd, cfg.model.num_layers, info.encoder.num_layers)
    if batches is None:
        if manifest is None:
            raise ValueError("precompute_teacher needs a manifest path or batches")
        batches = _manifest_batches(cfg, manifest, teacher)
    teacher.eval()
    device = next(teacher.parameters()).device
    root.mkdir(parents=True, exist_ok=True)
    count = 0
    for batch in batches:
        batch = batch.to(device)
        out = _run_teacher(teacher, plan, batch.feats, batch.feat_lens, cfg.kd.teacher_bf16)
        for b, utt_id in enumerate(batch.ids):
            n = int(out.out_lens[b])
            # clone(): a slice would drag the whole batch's storage into the file
            item = {
                "frames": n,
                "hidden": {j: h[b, :n].cpu().clone() for j, h in out.hidden.items()},
                "qkv": {j: tuple(x[b, :, :n].cpu().clone() for x in q) for j, q in out.qkv.items()},
                "log_probs": out.log_probs[b, :n].cpu().clone() if out.log_probs is not None else None,
            }
            save_atomic(item, _item_path(root, utt_id))
            count += 1
    meta = {
        "format": _PRECOMPUTE_FORMAT,
        "teacher": info.to_dict(),
        "layers": list(plan.teacher_layers),
        "qkv": plan.use_attn,
        "log_probs": plan.use_tok,
    }
    write_atomic(root / _META, json.dumps(meta, indent=1))
    return count
