"""Turn other corpora's layouts into streamkd manifests.

- LibriSpeech: ``SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt`` lines
  ``UTT-ID TEXT`` next to ``UTT-ID.flac``.
- Kaldi data dir: ``wav.scp`` (``REC path``, relative paths taken from the
  current directory as Kaldi's tools do; piped commands are refused),
  ``text`` (``UTT words...``), optional ``segments`` (``UTT REC start end``,
  end -1 meaning the end of the file) and ``utt2spk``.
- Lhotse cuts (``lhotse`` is an optional extra, imported only here).

Every entry that cannot be used is returned in ``ImportResult.skipped`` as
(id, reason); nothing is dropped without being counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from streamkd.audio import audio_duration
from streamkd.errors import AudioError, DataError
from streamkd.manifest import Utterance

__all__ = ["ImportResult", "import_librispeech", "import_kaldi", "import_lhotse"]


@dataclass
class ImportResult:
    utterances: list[Utterance] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)


def _utterance(uid: str, audio: Path, text: str, speaker: str, result: ImportResult,
               offset: Optional[float] = None, end: Optional[float] = None) -> None:
    """Append the utterance, or a skip entry saying why it cannot be used."""
    try:
        file_sec = audio_duration(audio)
    except AudioError as err:
        result.skipped.append((uid, str(err)))
        return
    if offset is None:
        duration, extra = file_sec, {}
    else:
        stop = file_sec if end is None or end < 0 else end
        if stop > file_sec + 0.01:  # Kaldi segment ends are rounded to 10 ms
            result.skipped.append((uid, f"segment ends at {stop:.2f} s, after the end of {audio} ({file_sec:.2f} s)"))
            return
        duration, extra = min(stop, file_sec) - offset, {"offset": offset}
    if duration <= 0:
        result.skipped.append((uid, f"{audio}: no audio (duration {duration:.3f} s)"))
        return
    if not text.strip():
        result.skipped.append((uid, "empty transcript"))
        return
    result.utterances.append(Utterance(uid, str(audio.absolute()), duration, text, speaker, extra))


def import_librispeech(root: str | Path) -> ImportResult:
    """All ``*.trans.txt`` under ``root``; audio files without a transcript
    line are reported as skipped too."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (expected a LibriSpeech split, e.g. LibriSpeech/dev-clean)")
    trans_files = sorted(root.rglob("*.trans.txt"))
    if not trans_files:
        raise DataError(f"{root}: no *.trans.txt files found; is this a LibriSpeech split?")
    result = ImportResult()
    listed: set[Path] = set()
    for trans in trans_files:
        for lineno, line in enumerate(trans.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            audio = trans.parent / f"{uid}.flac"
            listed.add(audio)
            _utterance(uid, audio, text.strip(), uid.split("-")[0], result)
    for audio in sorted(set(root.rglob("*.flac")) - listed):
        result.skipped.append((audio.stem, f"{audio}: no transcript line in any *.trans.txt"))
    return result


def _read_table(path: Path, min_fields: int) -> dict[str, str]:
    """Kaldi table ``KEY rest...`` -> {key: rest} (rest may be ""); DataError
    with file:line on lines of fewer than ``min_fields`` fields and on
    duplicate keys."""
    table: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        key, *tail = line.split(maxsplit=1)
        rest = tail[0].strip() if tail else ""
        if 1 + len(rest.split()) < min_fields:
            raise DataError(f"{path}:{lineno}: expected at least {min_fields} fields, got {line!r}")
        if key in table:
            raise DataError(f"{path}:{lineno}: duplicate key '{key}'")
        table[key] = rest
    return table


def _read_wav_scp(data_dir: Path) -> dict[str, Path]:
    scp = data_dir / "wav.scp"
    out = {}
    for rec, value in _read_table(scp, 2).items():
        if value.endswith("|") or len(value.split()) > 1:
            raise DataError(
                f"{scp}: recording '{rec}' is a piped command or not a plain path ({value!r}); "
                "streamkd reads plain wav/flac paths only: run the command once to write the "
                "audio to files (e.g. with sox or ffmpeg) and list those paths in wav.scp"
            )
        # Relative paths mean what they mean to Kaldi's tools: relative to
        # the directory the command runs in (the recipe directory).
        out[rec] = Path(value).absolute()
    return out


def _read_segments(seg_file: Path) -> dict[str, tuple[str, float, float]]:
    segments = {}
    for uid, rest in _read_table(seg_file, 4).items():
        rec, start, end = rest.split()[:3]
        try:
            segments[uid] = (rec, float(start), float(end))
        except ValueError:
            raise DataError(f"{seg_file}: segment '{uid}' has non-numeric times {start!r} {end!r}") from None
    return segments


def import_kaldi(data_dir: str | Path) -> ImportResult:
    """A Kaldi data directory (see the module docstring for the files)."""
    data_dir = Path(data_dir)
    for name in ("wav.scp", "text"):
        if not (data_dir / name).is_file():
            raise DataError(f"{data_dir / name}: missing; a Kaldi data dir needs wav.scp and text")
    recordings = _read_wav_scp(data_dir)
    texts = _read_table(data_dir / "text", 1)
    spk_file = data_dir / "utt2spk"
    speakers = {k: v.split()[0] for k, v in _read_table(spk_file, 2).items()} if spk_file.is_file() else {}
    seg_file = data_dir / "segments"
    segments = _read_segments(seg_file) if seg_file.is_file() else {}
    result = ImportResult()
    utt_ids = list(segments) if segments else list(recordings)
    for uid in utt_ids:
        if uid not in texts:
            result.skipped.append((uid, f"no transcript in {data_dir / 'text'}"))
            continue
        rec, start, end = segments[uid] if segments else (uid, None, None)
        if rec not in recordings:
            result.skipped.append((uid, f"recording '{rec}' is not in {data_dir / 'wav.scp'}"))
            continue
        if start is not None and (start < 0 or (end >= 0 and end <= start)):
            result.skipped.append((uid, f"segment times {start}..{end} are not a positive interval"))
            continue
        _utterance(uid, recordings[rec], texts[uid], speakers.get(uid, ""), result, start, end)
    for uid in sorted(set(texts) - set(utt_ids)):
        result.skipped.append((uid, f"has a transcript but no {'segment' if segments else 'wav.scp entry'}"))
    return result


def import_lhotse(cuts_path: str | Path) -> ImportResult:
    """A Lhotse CutSet file (jsonl/jsonl.gz); each cut must cover one mono
    recording stored as a file, and have at least one supervision."""
    try:
        from lhotse import CutSet  # optional: pulls in many dependencies
    except ImportError as err:
        raise DataError(
            f"importing Lhotse cuts needs lhotse, which is not installed ({err}); install it with "
            "`pip install 'streamkd[lhotse]'` (torch must already be installed)"
        ) from err
    cuts_path = Path(cuts_path)
    if not cuts_path.is_file():
        raise DataError(f"{cuts_path}: cuts file does not exist")
    result = ImportResult()
    for cut in CutSet.from_file(str(cuts_path)):
        reason = _lhotse_problem(cut)
        if reason:
            result.skipped.append((cut.id, reason))
            continue
        source = cut.recording.sources[0]
        text = " ".join((s.text or "").strip() for s in cut.supervisions).strip()
        speaker = cut.supervisions[0].speaker or ""
        audio = Path(source.source)
        end = cut.start + cut.duration
        _utterance(cut.id, audio, text, speaker, result, offset=float(cut.start), end=float(end))
    return result


def _lhotse_problem(cut) -> Optional[str]:
    """Why a cut cannot become an utterance, or None."""
    recording = getattr(cut, "recording", None)
    if recording is None:
        return "cut has no recording (MixedCut or padding?); mix and pad before exporting"
    if len(recording.sources) != 1 or recording.sources[0].type != "file":
        return "recording is not a single audio file (url/command/memory sources are not supported)"
    if getattr(recording, "transforms", None):
        return "recording has transforms (speed perturbation, resampling); export the plain cuts"
    if len(recording.channel_ids) != 1:
        return "recording has several channels; streamkd imports mono cuts only"
    if not cut.supervisions:
        return "cut has no supervision (no transcript)"
    return None
