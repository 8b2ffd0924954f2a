"""``build_corpus``: plan the embedded corpus by hours, render it on all
cores, write the manifests and a summary.

The plan is a pure function of (sentences, working voices, hours, seed):
utterance i draws its voice, rate, pitch and degradation from
``np.random.default_rng([seed, i])`` and its noise signals from
``default_rng([seed, i, 1])``, never from global state or scheduling, so a
build is the same whatever ``jobs`` is. Splits use disjoint sentences; the
test split speaks only with voices held out from train and dev.

Three options, off by default, add voice variety: ``extra_voices`` adds
``EXTRA_VOICES`` to the training voices, ``more_voices`` adds
``MORE_VOICES`` (MBROLA, festival rab_diphone, SVOX Pico; every one must
work, or the build stops and says how to install them), and ``speaker_perturb`` (min, max)
gives every train and dev utterance a speaker factor (``perturb_speaker``),
drawn last from its RNG so that everything else about it stays as planned
without the option. Test is never perturbed: its held-out voices keep their
identity, and its audio is the same file whichever options are on, so test
figures of corpora built with and without them compare.

Manifests are written with ``streamkd.manifest.write_manifest``; the
per-utterance details (engine, rate, pitch, speaker_alpha, snr_db, noise,
reverb, seed, index) go under ``extra``.

Resuming: each wav is written to a temporary name and renamed, and its name
carries a hash of everything that shapes it, so a rerun skips finished files
and never reuses a file made from other parameters. Manifests and the
summary are written at the end, from the plan.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import soundfile as sf
from tqdm import tqdm

from streamkd.atomic import atomic_open, write_atomic
from streamkd.corpus.degrade import DegradeConfig, DegradeParams, apply_degradation, draw_degradation, trim_silence
from streamkd.corpus.text import FORTUNES_DIR, load_sentences
from streamkd.corpus.voices import (
    ALL_VOICES, DEFAULT_TEST_VOICES, ENGINE_SHARE, EXTRA_VOICES, MORE_VOICES, MORE_VOICES_PACKAGES, SAMPLE_RATE, SynthRequest, TTSError, Voice,
    check_speaker_perturb, probe_voices, synthesize,
)
from streamkd.errors import DataError
from streamkd.manifest import Utterance, read_manifest, write_manifest

__all__ = ["PlannedUtt", "plan_corpus", "build_corpus", "respeak_manifest", "SPLITS"]

SPLITS = ("train", "dev", "test")
_PLAN_VERSION = 2  # bump when rendering changes, so old files are not reused
_WORDS_PER_SEC = 3.7  # at rate 1.0, measured on the voices here (for planning only)
_PAUSE_SEC = 0.25  # kept silence and sentence-final lengthening
_RATE_RANGE = (0.85, 1.2)
_PITCH_RANGE = (-3.0, 3.0)  # semitones
_BATCH = {"espeak": 8, "flite": 8, "festival": 24, "mbrola": 8, "pico": 8}  # utterances per worker task


@dataclass(frozen=True)
class PlannedUtt:
    """One utterance of the plan (everything its audio depends on)."""

    id: str
    split: str
    index: int  # position in the plan; its RNG is default_rng([seed, index])
    text: str
    voice: Voice
    rate: float
    pitch: float
    degrade: DegradeParams
    seed: int
    speaker_alpha: Optional[float] = None  # None: not perturbed

    @property
    def audio(self) -> str:
        """Path of the wav relative to the output directory."""
        parts = [_PLAN_VERSION, self.text, asdict(self.voice), self.rate, self.pitch,
                 asdict(self.degrade), self.seed, self.index]
        if self.speaker_alpha is not None:  # absent, the names of unperturbed corpora stay as they were
            parts.append(self.speaker_alpha)
        key = json.dumps(parts)
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        return f"wav/{self.split}/{self.id}-{digest}.wav"

    def est_sec(self) -> float:
        return len(self.text.split()) / (_WORDS_PER_SEC * self.rate) + _PAUSE_SEC


def _draw_voice(voices: Sequence[Voice], rng: np.random.Generator) -> Voice:
    """An engine by ``ENGINE_SHARE`` (renormalised over the engines present),
    then one of its voices uniformly."""
    engines = sorted({v.engine for v in voices}, key=list(ENGINE_SHARE).index)
    share = np.array([ENGINE_SHARE[e] for e in engines])
    engine = engines[int(rng.choice(len(engines), p=share / share.sum()))]
    of_engine = [v for v in voices if v.engine == engine]
    return of_engine[int(rng.integers(len(of_engine)))]


def _draw_utt(split: str, index: int, text: str, voices: Sequence[Voice], seed: int,
              degrade: Optional[DegradeConfig], speaker_perturb: Optional[tuple[float, float]]) -> PlannedUtt:
    rng = np.random.default_rng([seed, index])
    voice = _draw_voice(voices, rng)
    rate = round(float(rng.uniform(*_RATE_RANGE)), 3)
    pitch = round(float(rng.uniform(*_PITCH_RANGE)), 2)
    params = draw_degradation(degrade, rng) if degrade is not None else DegradeParams()
    alpha = None
    if speaker_perturb is not None and split != "test":  # drawn last: the draws above stay as without it
        alpha = round(float(rng.uniform(*speaker_perturb)), 3)
    return PlannedUtt(f"{split}-{index:06d}", split, index, text, voice, rate, pitch, params, seed, alpha)


def plan_corpus(sentences: Sequence[str], train_voices: Sequence[Voice], test_voices: Sequence[Voice],
                hours: float, seed: int, *, degrade: Optional[DegradeConfig] = DegradeConfig(),
                speaker_perturb: Optional[tuple[float, float]] = None,
                held_out_frac: float = 0.1, min_utts: int = 3,
                max_utts: Optional[int] = None) -> list[PlannedUtt]:
    """Pick sentences (shuffled by ``seed``) until each split's estimated
    duration reaches its share of ``hours``: test and dev ``held_out_frac``
    each (and at least ``min_utts``), train the rest. ``max_utts`` caps each
    split (for tests). Test uses ``test_voices``; train and dev the others,
    with a speaker factor from ``speaker_perturb`` (min, max) when given."""
    if hours <= 0:
        raise DataError(f"--hours must be positive, got {hours}")
    if speaker_perturb is not None:
        speaker_perturb = check_speaker_perturb(speaker_perturb, "speaker_perturb")
    if not train_voices or not test_voices:
        raise DataError("need at least one training voice and one held-out test voice")
    order = np.random.default_rng(seed).permutation(len(sentences))
    budgets = {"test": held_out_frac, "dev": held_out_frac, "train": 1.0 - 2 * held_out_frac}
    plan: list[PlannedUtt] = []
    cursor = 0
    for split in ("test", "dev", "train"):
        voices = test_voices if split == "test" else train_voices
        target, total, count = budgets[split] * hours * 3600.0, 0.0, 0
        while (total < target or count < min_utts) and (max_utts is None or count < max_utts):
            if cursor >= len(order):
                raise DataError(
                    f"only {len(sentences)} sentences available, not enough for {hours} h; "
                    "ask for fewer hours"
                )
            utt = _draw_utt(split, len(plan), sentences[order[cursor]], voices, seed, degrade, speaker_perturb)
            plan.append(utt)
            total, count, cursor = total + utt.est_sec(), count + 1, cursor + 1
    return plan


def _render_batch(voice: Voice, utts: Sequence[PlannedUtt], out_dir: str) -> list[tuple[str, Optional[float], str]]:
    """Worker: make the missing wavs of ``utts`` (all spoken by ``voice``).
    Returns (id, duration_sec or None, "skipped" | "made" | error message)."""
    out = Path(out_dir)
    results: dict[str, tuple[str, Optional[float], str]] = {}
    todo = []
    for utt in utts:
        path = out / utt.audio
        if path.is_file():
            results[utt.id] = (utt.id, sf.info(str(path)).frames / SAMPLE_RATE, "skipped")
        else:
            todo.append(utt)
    requests = [SynthRequest(u.text, u.rate, u.pitch, u.speaker_alpha or 1.0) for u in todo]
    audio = synthesize(voice, requests) if todo else []
    for utt, samples in zip(todo, audio):
        if isinstance(samples, Exception):
            results[utt.id] = (utt.id, None, f"{voice.name}: {samples}")
            continue
        samples = trim_silence(samples, SAMPLE_RATE)
        samples = apply_degradation(samples, utt.degrade, SAMPLE_RATE, np.random.default_rng([utt.seed, utt.index, 1]))
        with atomic_open(out / utt.audio, "wb") as f:
            sf.write(f, samples, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        results[utt.id] = (utt.id, len(samples) / SAMPLE_RATE, "made")
    return [results[u.id] for u in utts]


def _tasks(plan: Sequence[PlannedUtt]) -> list[tuple[Voice, list[PlannedUtt]]]:
    by_voice: dict[str, list[PlannedUtt]] = {}
    for utt in plan:
        by_voice.setdefault(utt.voice.name, []).append(utt)
    tasks = []
    for utts in by_voice.values():
        size = _BATCH[utts[0].voice.engine]
        tasks += [(utts[0].voice, utts[i:i + size]) for i in range(0, len(utts), size)]
    return tasks


def _render(plan: Sequence[PlannedUtt], out_dir: Path, jobs: int, progress: bool) -> dict[str, tuple]:
    """Render every planned utterance; returns id -> (id, duration, status)."""
    tasks = _tasks(plan)
    done: dict[str, tuple] = {}
    bar = tqdm(total=len(plan), desc="corpus", unit="utt", disable=not progress)
    if jobs <= 1:
        for voice, utts in tasks:
            for res in _render_batch(voice, utts, str(out_dir)):
                done[res[0]] = res
            bar.update(len(utts))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(_render_batch, v, u, str(out_dir)): len(u) for v, u in tasks}
            for fut in as_completed(futures):
                for res in fut.result():
                    done[res[0]] = res
                bar.update(futures[fut])
    bar.close()
    return done


def _render_rows(plan: Sequence[PlannedUtt], out: Path, jobs: Optional[int], progress: bool,
                 log) -> tuple[dict[str, list[Utterance]], list[dict], list[str]]:
    """Render the plan; returns its manifest rows by split, the failures
    (each logged: it is left out) and every utterance's status."""
    rendered = _render(plan, out, jobs or os.cpu_count() or 1, progress)
    rows: dict[str, list[Utterance]] = {}
    failures = []
    for utt in plan:
        _, duration, status = rendered[utt.id]
        if duration is None:
            failures.append({"id": utt.id, "error": status})
            log(f"utterance {utt.id} failed and is left out: {status}")
        else:
            rows.setdefault(utt.split, []).append(_utterance(utt, duration, out))
    return rows, failures, [r[2] for r in rendered.values()]


def _utterance(utt: PlannedUtt, duration: float, out_dir: Path) -> Utterance:
    extra = {
        "engine": utt.voice.engine, "rate": utt.rate, "pitch": utt.pitch, "speaker_alpha": utt.speaker_alpha,
        "snr_db": utt.degrade.snr_db, "noise": utt.degrade.noise, "reverb": utt.degrade.rt60_sec,
        "seed": utt.seed, "index": utt.index,
    }
    return Utterance(utt.id, str(out_dir.absolute() / utt.audio), round(duration, 4), utt.text,
                     utt.voice.name, extra)


def _split_summary(rows: list[Utterance]) -> dict:
    words = {w for r in rows for w in r.text.split()}
    return {
        "utterances": len(rows),
        "hours": round(sum(r.duration for r in rows) / 3600.0, 4),
        "voices": sorted({r.speaker for r in rows}),
        "vocabulary": len(words),
    }


def _select_voices(voices: Sequence[Voice], test_voice_names: Sequence[str],
                   log) -> tuple[list[Voice], list[Voice], dict[str, str]]:
    """Probe every voice; split the working ones into train and test voices."""
    working, broken = probe_voices(voices)
    for name, why in broken.items():
        log(f"voice {name} is broken and skipped: {why}")
    unknown = set(test_voice_names) - {v.name for v in voices}
    if unknown:
        raise DataError(f"test voices {sorted(unknown)} are not among the voices {[v.name for v in voices]}")
    test = [v for v in working if v.name in test_voice_names]
    train = [v for v in working if v.name not in test_voice_names]
    if not test or not train:
        raise TTSError(
            f"need at least one working training voice and one working held-out test voice "
            f"(working: {[v.name for v in working]}, test voices asked for: {list(test_voice_names)})"
        )
    return train, test, broken


def build_corpus(out_dir: str | Path, hours: float, seed: int, jobs: Optional[int] = None,
                 degrade: bool = True, *, sentences: Optional[Sequence[str]] = None,
                 fortunes_dir: str | Path = FORTUNES_DIR, voices: Sequence[Voice] = ALL_VOICES,
                 test_voices: Sequence[str] = DEFAULT_TEST_VOICES, max_utts: Optional[int] = None,
                 degrade_config: DegradeConfig = DegradeConfig(), extra_voices: bool = False,
                 more_voices: bool = False, speaker_perturb: Optional[tuple[float, float]] = None, progress: bool = True,
                 log=print) -> dict:
    """Build (or resume) the corpus in ``out_dir``: ``wav/<split>/*.wav``,
    ``train.jsonl``, ``dev.jsonl``, ``test.jsonl`` and ``summary.json``.

    ``sentences`` replaces the fortunes text (tests); ``max_utts`` caps each
    split. ``extra_voices`` adds ``EXTRA_VOICES`` to the training voices,
    ``more_voices`` adds ``MORE_VOICES`` (TTSError unless all of them work);
    ``speaker_perturb`` (min, max) draws a speaker factor for every train
    and dev utterance. Returns the summary dict (also printed through ``log``).
    """
    start = time.time()
    if speaker_perturb is not None:  # before the minutes of probing and planning
        speaker_perturb = check_speaker_perturb(speaker_perturb, "speaker_perturb")
    if extra_voices:
        voices = list(voices) + [v for v in EXTRA_VOICES if v not in voices]
    if more_voices:
        voices = list(voices) + [v for v in MORE_VOICES if v not in voices]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if sentences is None:
        sentences, stats = load_sentences(fortunes_dir)
        text_stats = stats.to_dict()
        log(stats.report())
    else:
        sentences, text_stats = list(sentences), {"sentences_kept": len(sentences), "source": "given"}
    train_voices, held_out, broken = _select_voices(voices, test_voices, log)
    if more_voices and (missing := {n: why for n, why in broken.items() if n in {v.name for v in MORE_VOICES}}):
        raise TTSError(f"--more-voices: {len(missing)} of them do not work here ({_first(sorted(missing))}: "
                       f"{next(iter(missing.values()))}). Run `make voices` (Debian contrib and non-free: "
                       f"apt-get install {MORE_VOICES_PACKAGES}), or build without --more-voices.")
    plan = plan_corpus(sentences, train_voices, held_out, hours, seed,
                       degrade=degrade_config if degrade else None, speaker_perturb=speaker_perturb,
                       max_utts=max_utts)
    per_engine = {"train": _per_engine(train_voices), "test": _per_engine(held_out)}
    log(f"plan: {len(plan)} utterances, about {sum(u.est_sec() for u in plan) / 3600:.3f} h, "
        f"{len(train_voices)} training voices {per_engine['train']}, {len(held_out)} test voices")
    rows, failures, statuses = _render_rows(plan, out, jobs, progress, log)
    rows = {s: rows.get(s, []) for s in SPLITS}
    for split in SPLITS:
        write_manifest(out / f"{split}.jsonl", rows[split])
    summary = {
        "out_dir": str(out), "seed": seed, "hours_requested": hours, "degrade": degrade,
        "extra_voices": extra_voices, "more_voices": more_voices, "speaker_perturb": list(speaker_perturb) if speaker_perturb else None,
        "splits": {s: _split_summary(rows[s]) for s in SPLITS},
        "vocabulary": len({w for s in SPLITS for r in rows[s] for w in r.text.split()}),
        "hours": round(sum(r.duration for s in SPLITS for r in rows[s]) / 3600.0, 4),
        "sentences_available": len(sentences), "text": text_stats,
        "voices_available": sorted(v.name for v in train_voices + held_out), "voices_broken": broken,
        "voices_per_engine": per_engine,
        "made": statuses.count("made"), "skipped": statuses.count("skipped"), "failures": failures,
        "build_sec": round(time.time() - start, 2),
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log(_format_summary(summary))
    return summary


def _per_engine(voices: Sequence[Voice]) -> dict[str, int]:
    """How many of ``voices`` each engine speaks, in ``ENGINE_SHARE`` order."""
    return {e: n for e in ENGINE_SHARE if (n := sum(v.engine == e for v in voices))}


def _first(names: Sequence[str], shown: int = 6) -> str:
    """The first names of a long list (summary.json keeps them all)."""
    more = f", ... ({len(names) - shown} more in summary.json)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _format_summary(summary: dict) -> str:
    lines = [f"corpus in {summary['out_dir']}: {summary['hours']:.3f} h, vocabulary {summary['vocabulary']} words"]
    for split, s in summary["splits"].items():
        lines.append(f"  {split:5s}: {s['utterances']:6d} utts {s['hours']:8.3f} h  vocabulary {s['vocabulary']:6d}"
                     f"  voices ({len(s['voices'])}): {_first(s['voices'])}")
    lines.append(f"  sentences available: {summary['sentences_available']}; voices available: "
                 f"{len(summary['voices_available'])}; broken: {len(summary['voices_broken'])}")
    lines.append(f"  training voices per engine: {summary['voices_per_engine']['train']}; extra voices: "
                 f"{summary['extra_voices']}; more voices: {summary.get('more_voices', False)}; speaker factors: {summary['speaker_perturb'] or 'none'}")
    lines.append(f"  made {summary['made']}, skipped (already there) {summary['skipped']}, "
                 f"failed {len(summary['failures'])}; {summary['build_sec']:.1f} s")
    return "\n".join(lines)


def respeak_manifest(manifest: str | Path, voice_names: Sequence[str], out_dir: str | Path, *,
                     jobs: Optional[int] = None, progress: bool = True, log=print) -> dict:
    """Speak the sentences of a corpus manifest again with other voices: a
    dev set of voices the models never heard, for choosing on dev what helps
    on new voices without looking at test.

    Utterance ``index`` of the manifest keeps its text, rate, pitch, speaker
    factor and degradation (the same noise signal too) and is spoken by one
    of ``voice_names``, drawn from ``default_rng([seed, index, 2])``. Voices
    the corpus trains or tests on (its ``summary.json``) are refused: they
    would not be held out. Writes ``out_dir/wav/``, ``out_dir/manifest.jsonl``
    and ``out_dir/summary.json``; a rerun skips the audio already made."""
    start = time.time()
    manifest = Path(manifest)
    known = {v.name: v for v in (*ALL_VOICES, *EXTRA_VOICES, *MORE_VOICES)}
    unknown = [n for n in voice_names if n not in known]
    if not voice_names or unknown:
        raise DataError(f"--voices: unknown voice(s) {unknown or '(none given)'}; choose among {sorted(known)}")
    corpus_summary = manifest.parent / "summary.json"
    if corpus_summary.is_file():
        seen = {v for s in json.loads(corpus_summary.read_text())["splits"].values() for v in s["voices"]}
        if clash := sorted(set(voice_names) & seen):
            raise DataError(f"--voices: {clash} already speak in the corpus of {manifest} "
                            f"(see {corpus_summary}); a held-out dev set needs voices it never uses")
    working, broken = probe_voices([known[n] for n in voice_names])
    if broken:
        raise TTSError(f"voice(s) not working here: {broken}")
    plan = []
    for row in read_manifest(manifest):
        extra = row.extra or {}
        if "index" not in extra or "seed" not in extra:
            raise DataError(f"{manifest}: utterance {row.id} has no extra.index/extra.seed; "
                            "respeak takes manifests written by `streamkd corpus build`")
        seed, index = int(extra["seed"]), int(extra["index"])
        voice = working[int(np.random.default_rng([seed, index, 2]).integers(len(working)))]
        degrade = DegradeParams(extra.get("snr_db"), extra.get("noise"), extra.get("reverb"))
        plan.append(PlannedUtt(row.id, "respoken", index, row.text, voice, float(extra["rate"]),
                               float(extra["pitch"]), degrade, seed, extra.get("speaker_alpha")))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_split, failures, statuses = _render_rows(plan, out, jobs, progress, log)
    rows = by_split.get("respoken", [])
    write_manifest(out / "manifest.jsonl", rows)
    summary = {"source": str(manifest), "voices": list(voice_names), **_split_summary(rows),
               "made": statuses.count("made"), "skipped": statuses.count("skipped"), "failures": failures,
               "build_sec": round(time.time() - start, 2)}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log(f"respoke {len(rows)} of {len(plan)} utterances of {manifest} ({summary['hours']:.3f} h) with "
        f"{', '.join(voice_names)} into {out / 'manifest.jsonl'}; made {summary['made']}, "
        f"skipped (already there) {summary['skipped']}, failed {len(failures)}")
    return summary
