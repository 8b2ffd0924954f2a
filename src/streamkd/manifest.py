"""Manifests: one JSON object per line, one utterance per object.

    {"id": "spk1-0001", "audio": "wav/spk1-0001.wav", "duration": 3.2,
     "text": "hello world", "speaker": "spk1", "extra": {"offset": 12.5}}

``audio`` is stored relative to the manifest's directory (so a data folder
can be moved as a whole) and is an absolute path once read. ``speaker`` and
``extra`` may be left out. ``extra["offset"]`` (seconds) marks an utterance
that is a segment of a longer file (Kaldi segments, Lhotse cuts); it then
covers ``duration`` seconds from there (see ``audio.load_utterance``).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from streamkd.atomic import write_atomic
from streamkd.errors import ManifestError

__all__ = ["Utterance", "read_manifest", "write_manifest"]

_REQUIRED = {"id": str, "audio": str, "duration": float, "text": str}
_OPTIONAL = {"speaker": str, "extra": dict}


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: str  # absolute after read_manifest; relative paths resolve against the cwd
    duration: float  # seconds
    text: str
    speaker: str = ""
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def audio_path(self) -> Path:
        """Absolute path of the audio file."""
        return Path(os.path.normpath(Path(self.audio).absolute()))


def _check_value(key: str, value: Any, tp: type, where: str) -> Any:
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ManifestError(f"{where}: '{key}' must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, tp):
        raise ManifestError(f"{where}: '{key}' must be a {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _parse_line(raw: bytes, where: str, base: Path) -> Utterance:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ManifestError(f"{where}: not UTF-8 ({err}); re-encode the manifest as UTF-8") from None
    except json.JSONDecodeError as err:
        raise ManifestError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); "
                            "each line must be one JSON object") from None
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown}; known keys are "
                            f"{sorted(_REQUIRED) + sorted(_OPTIONAL)} (put anything else under 'extra')")
    values = {}
    for key, tp in _REQUIRED.items():
        if key not in obj:
            raise ManifestError(f"{where}: missing key '{key}'; every line needs {sorted(_REQUIRED)}")
        values[key] = _check_value(key, obj[key], tp, where)
    for key, tp in _OPTIONAL.items():
        if key in obj:
            values[key] = _check_value(key, obj[key], tp, where)
    if not values["id"].strip():
        raise ManifestError(f"{where}: 'id' is empty")
    if not values["audio"].strip():
        raise ManifestError(f"{where}: 'audio' is empty; give the audio file's path")
    if values["duration"] <= 0:
        raise ManifestError(f"{where}: 'duration' must be > 0 seconds, got {values['duration']}")
    offset = values.get("extra", {}).get("offset")
    if offset is not None and (isinstance(offset, bool) or not isinstance(offset, (int, float))
                               or not math.isfinite(offset) or offset < 0):
        raise ManifestError(f"{where}: 'extra.offset' must be a number >= 0 (seconds), got {offset!r}")
    values["audio"] = os.path.normpath(base / values["audio"])
    return Utterance(**values)


def read_manifest(path: str | Path) -> list[Utterance]:
    """Read and check a JSONL manifest. Blank lines are allowed; anything
    else that is wrong raises ManifestError("path:line: what; what to do")."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest does not exist")
    base = path.absolute().parent
    utts: list[Utterance] = []
    first_line: dict[str, int] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            utt = _parse_line(raw, where, base)
            if utt.id in first_line:
                raise ManifestError(f"{where}: duplicate id '{utt.id}' (first on line "
                                    f"{first_line[utt.id]}); ids must be unique")
            first_line[utt.id] = lineno
            utts.append(utt)
    return utts


def _to_json(utt: Utterance, base: Path) -> str:
    obj: dict[str, Any] = {
        "id": utt.id,
        "audio": os.path.relpath(utt.audio_path, base),
        "duration": utt.duration,
        "text": utt.text,
    }
    if utt.speaker:
        obj["speaker"] = utt.speaker
    if utt.extra:
        obj["extra"] = utt.extra
    return json.dumps(obj, ensure_ascii=False)


def write_manifest(path: str | Path, utts: Iterable[Utterance]) -> None:
    """Write utterances as JSONL, audio paths relative to the manifest's
    directory. Atomic: a temp file next to it, fsync, then os.replace."""
    path = Path(path)
    base = path.absolute().parent
    base.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    lines = []
    for utt in utts:
        if utt.id in seen:
            raise ManifestError(f"{path}: duplicate id '{utt.id}' in the utterances to write")
        seen.add(utt.id)
        lines.append(_to_json(utt, base) + "\n")
    write_atomic(path, "".join(lines))
