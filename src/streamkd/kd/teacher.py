"""The frozen full-context teacher, live or precomputed.

``LiveTeacher`` runs the teacher model on each batch; ``PrecomputedTeacher``
reads what ``precompute_teacher`` wrote once (one file per utterance, then
``meta.json``, written last). Both offer ``outputs(batch, out_lens,
num_frames, plan) -> TeacherOutputs`` and ``info`` (a ``TeacherInfo``, what
the checks need to know). ``load_teacher`` is the one place a teacher
checkpoint is loaded; ``check_teacher`` and ``check_no_augmentation`` are
the checks between the teacher and the student's config.
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
from streamkd.checkpoint import load_model, save_atomic
from streamkd.config import DataConfig, EncoderConfig, FeatureConfig, KDConfig, from_dict, to_dict
from streamkd.dataset import make_dataloader
from streamkd.errors import CheckpointError, ConfigError, DataError, UsageError
from streamkd.kd.plan import KDPlan, make_plan
from streamkd.types import Batch

__all__ = [
    "TeacherInfo",
    "TeacherOutputs",
    "LiveTeacher",
    "PrecomputedTeacher",
    "load_teacher",
    "run_teacher",
    "check_teacher",
    "check_no_augmentation",
    "precompute_teacher",
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


def check_no_augmentation(data: DataConfig) -> None:
    """Precomputed teacher outputs are of the clean features; a student whose
    input is augmented would be compared with the wrong teacher features."""
    if data.spec_augment.enabled:
        raise ConfigError("kd.precomputed_dir is set but data.spec_augment.enabled is true: precomputed teacher "
                          "outputs need unaugmented input; disable one of them")
    if any(f != 1.0 for f in data.speed_perturb):
        raise ConfigError(f"kd.precomputed_dir is set but data.speed_perturb={list(data.speed_perturb)}: "
                          "precomputed teacher outputs need unperturbed audio; set it to [] or unset the dir")
    if data.features.dither > 0:
        raise ConfigError("kd.precomputed_dir is set but data.features.dither > 0: the features are random per "
                          "epoch; set dither to 0 or unset the dir")


def check_teacher(features: FeatureConfig, kd: KDConfig, student: nn.Module, info: TeacherInfo,
                  plan: KDPlan) -> None:
    """ConfigError naming the key when the teacher cannot teach this student
    with this plan: a streaming teacher, other features, other tokens (token
    KD), a relation head count that does not divide its width."""
    enc = info.encoder
    if enc.chunk is not None or enc.causal or enc.dynamic_chunk:
        raise ConfigError(
            f"kd.teacher: the teacher is a streaming model (model.chunk={enc.chunk}, causal={enc.causal}, "
            f"dynamic_chunk={enc.dynamic_chunk}); distillation needs a full-context teacher "
            "(chunk null, causal false, dynamic_chunk false)"
        )
    if info.features != features:
        diffs = [
            f"{f.name}: student {getattr(features, f.name)!r}, teacher {getattr(info.features, f.name)!r}"
            for f in dataclasses.fields(FeatureConfig)
            if getattr(features, f.name) != getattr(info.features, f.name)
        ]
        raise ConfigError(f"data.features differs from the teacher's ({'; '.join(diffs)}); "
                          "the student must see the features the teacher was trained on")
    if plan.use_tok:
        _check_same_tokens(student, info)
    if plan.use_attn and enc.d_model % kd.relation_heads:
        raise ConfigError(
            f"kd.relation_heads={kd.relation_heads} does not divide the teacher's (and the branch's) "
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


def load_teacher(kd: KDConfig, device) -> nn.Module:
    """The one place a teacher checkpoint is loaded (``kd.teacher``)."""
    if kd.teacher is None:
        raise ConfigError(f"kd.teacher is not set but kd.method={kd.method!r} distils from a teacher; "
                          "give the teacher checkpoint path (or use kd.method=none)")
    try:
        return load_model(kd.teacher, device)
    except CheckpointError as err:
        raise ConfigError(f"kd.teacher: cannot load {kd.teacher}: {err}") from err


@dataclass
class TeacherOutputs:
    """Teacher layer j's output (B, T, D_t) and (Q, K, V) (B, H_t, T, Dh_t),
    keyed by 1-based j, and its CTC log-probs (B, T, V) for token KD."""

    hidden: dict[int, torch.Tensor]
    qkv: dict[int, QKV]
    log_probs: Optional[torch.Tensor]
    out_lens: torch.Tensor


def run_teacher(teacher: nn.Module, plan: KDPlan, feats: torch.Tensor, feat_lens: torch.Tensor,
                 bf16: bool = False) -> TeacherOutputs:
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
    return TeacherOutputs(
        hidden={j: keep(enc.hidden[j - 1]) for j in layers},
        qkv={j: tuple(keep(x) for x in enc.qkv[j - 1]) for j in layers} if plan.use_attn else {},
        log_probs=keep(log_probs) if log_probs is not None else None,
        out_lens=enc.out_lens.clone(),
    )


class LiveTeacher:
    """A frozen teacher model run on every batch. Not an nn.Module, so that
    it stays out of the objective's parameters and state_dict; the
    objective moves it along in ``to()`` and keeps it in eval mode."""

    def __init__(self, model: nn.Module, bf16: bool = False) -> None:
        self.model = model.eval().requires_grad_(False)
        self.info = TeacherInfo.of_model(model)
        self.bf16 = bf16

    def outputs(self, batch: Batch, out_lens: torch.Tensor, num_frames: int, plan: KDPlan) -> TeacherOutputs:
        """What ``plan`` needs of the teacher on ``batch``, whose student
        output has ``num_frames`` frames and lengths ``out_lens``."""
        out = run_teacher(self.model, plan, batch.feats, batch.feat_lens, self.bf16)
        t_frames = next(iter(out.hidden.values())).size(1) if out.hidden else out.log_probs.size(1)
        if t_frames != num_frames or not torch.equal(out.out_lens, out_lens):
            raise RuntimeError(
                f"teacher and student disagree on encoder frames (T {t_frames} vs {num_frames}, lengths "
                f"{out.out_lens.tolist()} vs {out_lens.tolist()}); they must share the subsampling"
            )
        return out


# -- precomputed teacher outputs --------------------------------------------------


def _item_path(root: Path, utt_id: str) -> Path:
    # Utterance ids may hold "/" (LibriSpeech-style paths); quoting keeps one
    # flat, collision-free file per id.
    return root / f"{quote(utt_id, safe='')}.pt"


class PrecomputedTeacher:
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

    def outputs(self, batch: Batch, out_lens: torch.Tensor, num_frames: int, plan: KDPlan) -> TeacherOutputs:
        """The utterances of a batch, stacked and zero-padded to ``num_frames``."""
        device = batch.feats.device
        items = [self._read(u, int(n)) for u, n in zip(batch.ids, out_lens.tolist())]

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
        return TeacherOutputs(hidden, qkv, log_probs, out_lens)


def precompute_teacher(
    kd: KDConfig,
    data: DataConfig,
    teacher: nn.Module,
    manifest: Optional[str] = None,
    out_dir: Optional[str | Path] = None,
    *,
    student_layers: int,
    batches: Optional[Iterable[Batch]] = None,
) -> int:
    """Write the teacher's outputs that ``kd`` needs, one file per utterance.

    data: the student's data section (no augmentation allowed; the loader's
    options); student_layers: the student's layer count (the layer map is
    resolved against it). Reads ``manifest`` through the (non-training)
    data loader, or takes ``batches`` directly. ``out_dir`` defaults to
    ``kd.precomputed_dir``.
    Each ``<quoted id>.pt`` holds the mapped layers' outputs (T_u, D_t), their
    (Q, K, V) (H_t, T_u, Dh_t) if the relation loss is on and the CTC
    log-probs (T_u, V) for token KD; ``meta.json``, written last, describes
    the teacher. Returns the number of utterances written.
    """
    root = Path(out_dir if out_dir is not None else kd.precomputed_dir or "")
    if not str(root):
        raise ConfigError("kd.precomputed_dir is not set and no out_dir was given")
    check_no_augmentation(data)
    info = TeacherInfo.of_model(teacher)
    plan = make_plan(kd, student_layers, info.encoder.num_layers)
    if batches is None:
        if manifest is None:
            raise ValueError("precompute_teacher needs a manifest path or batches")
        # seed=0: the loader uses its seed only to shuffle and augment, and neither happens here.
        batches, _ = make_dataloader(data, manifest, teacher.tokenizer, train=False, seed=0)
    teacher.eval()
    device = next(teacher.parameters()).device
    root.mkdir(parents=True, exist_ok=True)
    count = 0
    for batch in batches:
        batch = batch.to(device)
        out = run_teacher(teacher, plan, batch.feats, batch.feat_lens, kd.teacher_bf16)
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
