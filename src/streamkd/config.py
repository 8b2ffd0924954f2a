"""Configuration: frozen dataclasses loaded from plain YAML.

Unknown keys and wrong types fail loudly with the key's dotted path and the
file they came from. A config is never mutated after loading; derived copies
are made with ``dataclasses.replace``. The whole config is saved in every
checkpoint (``to_dict``) and restored from it (``from_dict``).
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml

from streamkd.errors import ConfigError
from streamkd.types import ChunkConfig

__all__ = [
    "ConfigError",
    "FeatureConfig",
    "TokenizerConfig",
    "SpecAugmentConfig",
    "DataConfig",
    "EncoderConfig",
    "OptimConfig",
    "TrainConfig",
    "KDConfig",
    "Config",
    "load_config",
    "read_yaml",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "yaml_load",
    "PACKAGED_CONFIGS",
]

# The configs that ship inside the package (the repository's configs/, linked
# in as package data): what `streamkd demo` and `streamkd bench` read, so they
# work from an installed wheel as from a checkout.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 numbers: ``5e-3`` is a float
    (YAML 1.1, which PyYAML follows, wants ``5.0e-3`` and reads ``5e-3`` as
    a string; users write ``5e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    """Plain data from YAML text, reading ``5e-3`` as a number."""
    return yaml.load(text, Loader=_Loader)


@dataclass(frozen=True)
class FeatureConfig:
    """Log-mel fbank front end. Defaults match sherpa-onnx's front end, so an
    exported model sees in deployment what it saw in training."""

    sample_rate: int = 16000  # Hz; audio at other rates is resampled with soxr
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    dither: float = 0.0  # 0 at inference; kaldi-native-fbank's default is 3e-5
    snip_edges: bool = False
    low_freq: float = 20.0
    high_freq: float = -400.0  # negative: offset from Nyquist


@dataclass(frozen=True)
class TokenizerConfig:
    kind: Literal["char", "bpe", "unigram"] = "char"
    vocab_size: int = 256  # SentencePiece only; blank (id 0) included


@dataclass(frozen=True)
class SpecAugmentConfig:
    enabled: bool = True
    num_freq_masks: int = 2
    max_freq_width: int = 15  # bins
    num_time_masks: int = 2
    max_time_frac: float = 0.05  # of the utterance's feature frames, per mask
    # Random EQ: each training utterance's log-mel bins get a smooth random
    # curve of at most this many dB (another voice's or channel's spectral
    # tilt and colour; see dataset.random_eq). 0: off.
    eq_db: float = 0.0


@dataclass(frozen=True)
class DataConfig:
    """Where the data is and how it is batched. Paths are relative to the
    current directory (or absolute)."""

    train_manifest: str = "data/corpus/train.jsonl"
    dev_manifest: str = "data/corpus/dev.jsonl"
    test_manifest: Optional[str] = "data/corpus/test.jsonl"
    lang_dir: str = "data/lang"  # tokenizer files and CMVN statistics
    max_batch_sec: float = 120.0  # total audio seconds per batch
    max_utt_sec: float = 20.0  # longer utterances are skipped (and counted)
    num_buckets: int = 10
    num_workers: int = 1
    feature_cache: Optional[str] = None  # directory for cached fbank
    speed_perturb: tuple[float, ...] = ()  # e.g. (0.9, 1.0, 1.1)
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass(frozen=True)
class EncoderConfig:
    """One Conformer-CTC encoder: a teacher when ``chunk`` is None and
    ``causal`` is False, a streaming student otherwise."""

    d_model: int = 144
    num_layers: int = 8
    num_heads: int = 4
    ff_mult: int = 4  # feed-forward width = ff_mult * d_model
    conv_kernel: int = 15
    dropout: float = 0.1
    max_rel_pos: int = 64  # relative positions are clipped to +-max_rel_pos frames
    frontend_channels: Optional[int] = None  # convolution width of the front end; None: d_model
    causal: bool = False  # causal depthwise convolution (the student)
    chunk: Optional[ChunkConfig] = None  # None: full-context attention
    # Dynamic chunk training: per batch a chunk size is drawn from
    # dynamic_chunk_choices (encoder frames; 0 is not used, full context is
    # drawn with probability dynamic_full_prob).
    dynamic_chunk: bool = False
    dynamic_chunk_choices: tuple[int, ...] = (4, 8, 16, 32)
    dynamic_full_prob: float = 0.0


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 500
    schedule: Literal["noam", "cosine", "constant"] = "noam"
    grad_clip: float = 5.0
    accum_steps: int = 1


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "exp/run"
    seed: int = 0
    max_steps: int = 10000  # optimizer steps
    max_epochs: int = 1000
    log_every: int = 20  # steps
    ckpt_every: int = 200  # steps
    keep_checkpoints: int = 3  # periodic checkpoints kept
    keep_best: int = 3  # best epoch checkpoints (by select_metric) kept and averaged into final.pt
    # What ranks the epochs: the dev CTC loss keeps falling while a short
    # run's output is still empty (WER and CER then sit at exactly 100%, and
    # a ranking by them keeps the earliest epochs); it works at any error rate.
    # wer / cer rank by greedy dev error rates (ties: the later epoch).
    select_metric: Literal["loss", "wer", "cer"] = "loss"
    device: str = "auto"  # auto: cuda if available, else cpu
    amp: bool = True  # bf16 autocast on CUDA
    # bf16 autocast on CPU too (1.6-1.8x faster steps on CPUs with AVX512-BF16;
    # the CTC loss and softmaxes stay fp32). Off: exact fp32.
    amp_cpu: bool = False
    num_threads: int = 0  # torch intra-op threads on CPU; 0: leave as is
    valid_max_utts: int = 0  # 0: whole dev set
    # Fine-tuning: start from this checkpoint's weights (same model shape and
    # tokens) with a fresh optimizer and schedule. A resumed run ignores it.
    init_from: Optional[str] = None
    # init_from was trained on other tokens (e.g. characters, this run BPE):
    # load every weight but the CTC output layer, which starts fresh.
    init_new_tokens: bool = False


@dataclass(frozen=True)
class KDConfig:
    """Distillation from a frozen non-streaming teacher (see docs/method.md)."""

    method: Literal["none", "token", "layer", "aux", "aux+token"] = "none"
    teacher: Optional[str] = None  # teacher checkpoint path
    layer_map: tuple[tuple[int, int], ...] = ()  # (student layer, teacher layer), 1-based
    lambda_: float = 1.0  # weight of the layer losses (YAML key: lambda)
    alpha: float = 1.0  # feature similarity
    beta: float = 1.0  # attention relation
    gamma: float = 1.0  # future prediction (APC)
    mu: float = 1.0  # token KD
    temperature: float = 1.0  # token KD
    shift_frames: int = 0  # token KD: student delayed by this many encoder frames
    apc_horizon: int = 2  # N, encoder frames
    apc_input: Literal["student", "aux_hole"] = "student"
    relation_heads: int = 4
    precomputed_dir: Optional[str] = None  # teacher outputs cached on disk
    # Run the frozen teacher's forward under bf16 autocast even when the
    # student trains in fp32 (its outputs are cast back to fp32): about 2x
    # cheaper on CPUs with AVX512-BF16/AMX. Off: the teacher runs in the
    # student's precision (under train.amp_cpu it is bf16 anyway).
    teacher_bf16: bool = False

    def __post_init__(self) -> None:
        """Value checks, so a bad value fails when the config is loaded."""
        for key in ("lambda_", "alpha", "beta", "gamma", "mu"):
            if getattr(self, key) < 0:
                raise ConfigError(f"kd.{key.rstrip('_')}: a loss weight must be >= 0, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ConfigError(f"kd.temperature must be > 0, got {self.temperature}")
        if self.shift_frames < 0:
            raise ConfigError(f"kd.shift_frames must be >= 0 encoder frames, got {self.shift_frames}")
        if self.apc_horizon < 1:
            raise ConfigError(f"kd.apc_horizon must be >= 1 encoder frame, got {self.apc_horizon}")
        if self.relation_heads < 1:
            raise ConfigError(f"kd.relation_heads must be >= 1, got {self.relation_heads}")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: EncoderConfig = field(default_factory=EncoderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kd: KDConfig = field(default_factory=KDConfig)


# YAML spellings of field names that are Python keywords.
_YAML_NAMES = {"lambda_": "lambda"}
_PY_NAMES = {v: k for k, v in _YAML_NAMES.items()}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str, src: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = f"{path}" + (f" (in {src})" if src else "")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, src)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is dict:  # dict[str, T]: names chosen by the user (a grid's methods, chunks)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _convert(v, args[1], f"{path}.{k}", src) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]", src) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{path}[{i}]", src) for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, path, src)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict, path: str, src: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = _PY_NAMES.get(key, key)
        if name not in known:
            names = sorted(_YAML_NAMES.get(k, k) for k in known)
            full = f"{path}.{key}" if path else str(key)
            raise ConfigError(
                f"unknown config key '{full}'" + (f" in {src}" if src else "")
                + f"; known keys here: {', '.join(names)}"
            )
        kwargs[name] = _convert(value, hints[name], f"{path}.{key}" if path else key, src)
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in kwargs]
    if required:
        name = _YAML_NAMES.get(required[0], required[0])
        raise ConfigError(f"missing config key '{f'{path}.{name}' if path else name}'" + (f" in {src}" if src else ""))
    try:
        return cls(**kwargs)
    except ConfigError as err:  # a value check of the dataclass: its message names the key
        raise ConfigError(f"{err}" + (f" (in {src})" if src else "")) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path or cls.__name__}" + (f" (in {src})" if src else "") + f": {err}") from err


def from_dict(data: dict, cls: type = Config, src: str = "") -> Any:
    """Build a config dataclass from plain data, checking every key and type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"top level of {src or 'config'} must be a mapping, got {type(data).__name__}")
    return _build(cls, data, "", src)


def to_dict(cfg: Any) -> Any:
    """Plain-data form of a config (YAML/JSON/checkpoint safe)."""
    if dataclasses.is_dataclass(cfg):
        return {_YAML_NAMES.get(f.name, f.name): to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to plain data."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a config file as plain data. A top-level ``base: other.yaml``
    (relative to this file) is read first and this file is merged over it,
    so that experiment variants state only what differs."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path in _seen:
        raise ConfigError(f"config file {path}: 'base' includes form a cycle")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a file path, got {base!r}")
        data = _deep_merge(read_yaml(path.parent / base, _seen + (path,)), data)
    return data


def load_config(path: str | Path, overrides: Sequence[str] = (), *,
                overrides_from: str = "command-line argument") -> Config:
    """Read a YAML config file (with its ``base`` chain), apply ``key=value``
    overrides, build and check a Config.

    An error names what caused it: the file, or the first override
    (``overrides_from`` says where overrides come from, e.g. a grid file)
    that makes the config invalid."""
    data = read_yaml(path)
    try:
        return from_dict(apply_overrides(copy.deepcopy(data), list(overrides)), Config, src=str(path))
    except ConfigError:
        pass
    from_dict(data, Config, src=str(path))  # the file alone: raises when the file is at fault
    for item in overrides:
        data = apply_overrides(data, [item])
        from_dict(data, Config, src=f"{overrides_from} {item!r}")
    raise AssertionError("unreachable: the last override must have failed")
