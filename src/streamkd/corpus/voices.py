"""The TTS voices of the embedded corpus: espeak-ng, flite and festival, and
(``MORE_VOICES``, from Debian's contrib and non-free sections) MBROLA and
SVOX Pico.

Every engine is driven the same way: ``synthesize(voice, requests, work_dir)``
takes a list of ``SynthRequest`` (text, rate, pitch) and returns one
16 kHz mono float32 array (or the error) per request. espeak-ng and flite run
one short process per sentence; festival runs ONE ``festival -b`` process
per batch, because its start-up costs 0.2 s and 330 MB.

Prosody is given engine-independently and mapped per engine:
``rate`` is a speed factor (1.0: the voice's normal speed, 1.2: 20% faster)
and ``pitch`` a shift in semitones from the voice's normal pitch (espeak-ng's
``-p`` is a 0-99 scale, so for it the shift is approximate).

``speaker_alpha`` makes another speaker of a voice: the audio is resampled so
that it plays ``alpha`` times faster, which scales formants and pitch by
``alpha`` like a smaller (alpha > 1) or larger (alpha < 1) vocal tract. The
engine is asked for ``rate / alpha``, so the speaking rate stays ``rate``.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import soundfile as sf
import soxr

from streamkd.errors import AudioError, StreamkdError, UsageError

__all__ = [
    "SAMPLE_RATE",
    "TTSError",
    "Voice",
    "SynthRequest",
    "ALL_VOICES",
    "EXTRA_VOICES",
    "MORE_VOICES",
    "MORE_VOICES_PACKAGES",
    "DEFAULT_TEST_VOICES",
    "check_speaker_perturb",
    "perturb_speaker",
    "ENGINE_BINARIES",
    "ENGINE_SHARE",
    "check_engines",
    "synthesize",
    "probe_voices",
]

SAMPLE_RATE = 16000
# Binary each engine needs and the Debian package that provides it.
ENGINE_BINARIES = {
    "espeak": ("espeak-ng", "espeak-ng"),
    "flite": ("flite", "flite"),
    "festival": ("festival", "festival festvox-kallpc16k festvox-us-slt-hts festvox-kdlpc16k"),
    # MBROLA diphone databases, spoken through espeak-ng's front end (`espeak-ng -v mb-us1`).
    "mbrola": ("mbrola", "espeak-ng mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1"),
    "pico": ("pico2wave", "libttspico-utils"),
}
# The Debian packages of MORE_VOICES (contrib and non-free; `make voices` installs them).
MORE_VOICES_PACKAGES = ("mbrola mbrola-us1 mbrola-us2 mbrola-us3 mbrola-en1 festvox-rablpc16k "
                        "festvox-us1 festvox-us2 festvox-us3 festvox-en1 libttspico-utils")
_ESPEAK_WPM = 175  # espeak-ng's default speed
_TIMEOUT_SEC = 60.0  # per sentence; festival batches get this per item


class TTSError(StreamkdError):
    """A TTS engine is missing or a voice cannot synthesise."""


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker. ``name`` is the speaker id in the manifests."""

    name: str
    engine: str  # "espeak" | "flite" | "festival" | "mbrola" | "pico"
    spec: str  # engine's voice argument: "en-gb+m3", "slt", "kal_diphone"
    base_f0: float = 0.0  # Hz, the voice's mean F0 (flite, festival kal_diphone)


@dataclass(frozen=True)
class SynthRequest:
    text: str  # normalised (upper-case) transcript; engines are fed lower case
    rate: float = 1.0  # speed factor of the audio returned
    pitch: float = 0.0  # semitones, before the speaker factor
    speaker_alpha: float = 1.0  # formant and pitch factor (see the module docstring)

    @property
    def engine_rate(self) -> float:
        """The speed asked of the engine: resampling by alpha speeds it up again."""
        return self.rate / self.speaker_alpha


def _espeak(spec: str) -> Voice:
    return Voice("espeak_" + spec.replace("+", "_"), "espeak", spec)


# espeak-ng speakers: every training accent with every variant below (the
# whisper, robot and joke variants are left out). The West Midlands accent
# (en-gb-x-gbcwmd) speaks only in the held-out test voice, so test hears an
# accent that no training voice has. Many speakers, not a few, are what
# lets a model trained on TTS generalise to voices it never heard.
_ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-us-nyc")
_ESPEAK_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt6", "adam", "Alex", "Alicia", "Andy", "Annie",
    "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "Gene", "iven",
    "iven3", "Jacky", "john", "linda", "max", "Michael", "Mike", "norbert", "paul", "quincy",
    "rob", "robert", "steph", "steph2", "travis", "victor", "zac", "grandma", "grandpa",
)
ALL_VOICES: tuple[Voice, ...] = tuple(
    [_espeak(f"{a}+{v}") for a in _ESPEAK_ACCENTS for v in _ESPEAK_VARIANTS]
    + [_espeak("en-gb-x-gbcwmd+f2")]
    + [
        # Mean F0 measured on default flite output (autocorrelation).
        Voice("flite_kal16", "flite", "kal16", 95.0),
        Voice("flite_awb", "flite", "awb", 125.0),
        Voice("flite_rms", "flite", "rms", 105.0),
        Voice("flite_slt", "flite", "slt", 170.0),
        Voice("festival_kal_diphone", "festival", "kal_diphone", 105.0),  # from its voice file
        Voice("festival_cmu_us_slt_arctic_hts", "festival", "cmu_us_slt_arctic_hts"),
    ]
)
# Voices of Debian packages that the default corpus does not use (so that a
# corpus built with the defaults plans as before); ``build_corpus(...,
# extra_voices=True)`` adds them to the training voices. festvox-kdlpc16k is
# the only other English festival voice installable beside the ones above:
# festvox-kdlpc8k and festvox-kallpc8k conflict with the 16 kHz packages (and
# kal is the test voice's speaker); flite's voices are compiled in.
EXTRA_VOICES: tuple[Voice, ...] = (
    Voice("festival_ked_diphone", "festival", "ked_diphone", 105.0),  # from its voice file
)
# Voices of other kinds than the default ones, from Debian's contrib and
# non-free sections (MORE_VOICES_PACKAGES; free for non-commercial research,
# see their copyright files): the four English MBROLA diphone databases, each
# through espeak-ng's and festival's front ends (two prosodies, one voice
# quality), festival's British rab_diphone, and SVOX Pico's two English
# voices. ``build_corpus(..., more_voices=True)`` trains on them. Mean F0 of
# the festival ones measured on their default output (autocorrelation).
MORE_VOICES: tuple[Voice, ...] = (
    Voice("mbrola_us1", "mbrola", "mb-us1"),
    Voice("mbrola_us2", "mbrola", "mb-us2"),
    Voice("mbrola_us3", "mbrola", "mb-us3"),
    Voice("mbrola_en1", "mbrola", "mb-en1"),
    Voice("festival_rab_diphone", "festival", "rab_diphone", 110.0),
    Voice("festival_us1_mbrola", "festival", "us1_mbrola", 163.0),
    Voice("festival_us2_mbrola", "festival", "us2_mbrola", 92.0),
    Voice("festival_us3_mbrola", "festival", "us3_mbrola", 106.0),
    Voice("festival_en1_mbrola", "festival", "en1_mbrola", 113.0),
    Voice("pico_en-US", "pico", "en-US"),
    Voice("pico_en-GB", "pico", "en-GB"),
)
# Share of utterances each engine speaks (split among the engine's voices),
# renormalised over the engines a corpus has: without it the hundreds of
# espeak-ng speakers would drown the few others. A corpus of the default
# voices keeps 0.5 / 0.3 / 0.2.
ENGINE_SHARE = {"espeak": 0.5, "flite": 0.3, "festival": 0.2, "mbrola": 0.15, "pico": 0.1}
# Speaker-independent test: one voice per engine, seen only in test. The
# espeak one has an accent (West Midlands) no training voice has.
DEFAULT_TEST_VOICES = ("espeak_en-gb-x-gbcwmd_f2", "flite_rms", "festival_kal_diphone")


def check_engines(voices: Sequence[Voice]) -> None:
    """Raise TTSError naming the missing binaries (and how to install them)."""
    missing = sorted({e for e in (v.engine for v in voices) if shutil.which(ENGINE_BINARIES[e][0]) is None})
    if missing:
        bins = ", ".join(ENGINE_BINARIES[e][0] for e in missing)
        pkgs = " ".join(ENGINE_BINARIES[e][1] for e in missing)
        raise TTSError(
            f"TTS engine binary not found: {bins}. Run `make setup` "
            f"(or `sudo apt-get install {pkgs}`), or leave those voices out."
        )


def _read_wav(path: Path) -> np.ndarray:
    """Engine output -> (N,) float32 at 16 kHz, mono."""
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as err:
        raise AudioError(f"{path}: engine wrote an unreadable wav: {err}") from err
    samples = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        samples = soxr.resample(samples, rate, SAMPLE_RATE).astype(np.float32)
    if samples.size == 0 or not np.isfinite(samples).all():
        raise AudioError(f"{path}: engine wrote empty or non-finite audio")
    return samples


def _run(cmd: list[str], timeout: float) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, text=True)
    except subprocess.TimeoutExpired as err:
        raise TTSError(f"{cmd[0]} timed out after {timeout:.0f} s") from err
    if proc.returncode != 0:
        raise TTSError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}: {proc.stderr.strip()[-300:]}")


def _command(voice: Voice, req: SynthRequest, out: Path) -> list[str]:
    text = req.text.lower()
    if voice.engine in ("espeak", "mbrola"):
        pitch = int(np.clip(round(50 + 8 * req.pitch), 0, 99))
        return ["espeak-ng", "-v", voice.spec, "-s", str(round(_ESPEAK_WPM * req.engine_rate)),
                "-p", str(pitch), "-w", str(out), text]
    if voice.engine == "pico":  # SVOX Pico's markup: speed and pitch in percent of the voice's own
        return ["pico2wave", "-l", voice.spec, "-w", str(out),
                f"<speed level='{round(100 * req.engine_rate)}'><pitch level='{round(100 * 2.0 ** (req.pitch / 12.0))}'>"
                f"{text}</pitch></speed>"]
    f0 = voice.base_f0 * 2.0 ** (req.pitch / 12.0)
    return ["flite", "-voice", voice.spec, "--setf", f"duration_stretch={1.0 / req.engine_rate:.4f}",
            "--setf", f"int_f0_target_mean={f0:.1f}", "-t", text, "-o", str(out)]


def _festival_script(voice: Voice, requests: Sequence[SynthRequest], outs: Sequence[Path]) -> str:
    """A Scheme program that synthesises every request with one voice."""
    lines = [f"(voice_{voice.spec})"]
    hts = "hts" in voice.spec
    if hts:
        lines.append("(set! streamkd_hts_base hts_engine_params)")
    for req, out in zip(requests, outs):
        if hts:  # HTS ignores Duration_Stretch; its engine takes a speed and a half-tone shift
            lines.append(f'(set! hts_engine_params (append streamkd_hts_base '
                         f'(list (list "-r" {req.engine_rate:.4f}) (list "-fm" {req.pitch:.3f}))))')
        else:
            f0 = voice.base_f0 * 2.0 ** (req.pitch / 12.0)
            lines.append(f"(Parameter.set 'Duration_Stretch {1.0 / req.engine_rate:.4f})")
            lines.append(f"(set! int_lr_params '((target_f0_mean {f0:.1f}) (target_f0_std 14) "
                         "(model_f0_mean 170) (model_f0_std 34)))")
        text = req.text.lower().replace("\\", "").replace('"', "")
        path = str(out).replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'(utt.save.wave (utt.synth (Utterance Text "{text}")) "{path}" \'riff)')
    return "\n".join(lines) + "\n"


def synthesize(
    voice: Voice, requests: Sequence[SynthRequest], work_dir: Optional[Path] = None
) -> list[Union[np.ndarray, Exception]]:
    """Synthesise each request with ``voice``.

    Returns, per request, an (N,) float32 array at 16 kHz in [-1, 1] or the
    exception that explains why it failed (one bad sentence does not sink
    the batch). Each request's ``speaker_alpha`` is applied to its audio.
    """
    results = _synthesize_engine(voice, requests, work_dir)
    return [r if isinstance(r, Exception) or req.speaker_alpha == 1.0
            else perturb_speaker(r, req.speaker_alpha, SAMPLE_RATE) for r, req in zip(results, requests)]


def _synthesize_engine(voice: Voice, requests: Sequence[SynthRequest],
                       work_dir: Optional[Path]) -> list[Union[np.ndarray, Exception]]:
    """The engine's audio of each request (or the error), not yet perturbed."""
    with tempfile.TemporaryDirectory(prefix="streamkd-tts-", dir=work_dir) as tmp:
        outs = [Path(tmp) / f"{i:05d}.wav" for i in range(len(requests))]
        results: list[Union[np.ndarray, Exception]] = []
        if voice.engine == "festival":
            script = Path(tmp) / "batch.scm"
            script.write_text(_festival_script(voice, requests, outs))
            try:
                _run(["festival", "-b", str(script)], timeout=_TIMEOUT_SEC * (1 + len(requests) / 4))
                batch_error: Optional[Exception] = None
            except TTSError as err:
                batch_error = err
            for out in outs:
                if out.is_file():
                    results.append(_safe_read(out))
                else:
                    results.append(batch_error or TTSError(f"festival {voice.spec} wrote no audio"))
            return results
        for req, out in zip(requests, outs):
            try:
                _run(_command(voice, req, out), timeout=_TIMEOUT_SEC)
                results.append(_read_wav(out))
            except (TTSError, AudioError) as err:
                results.append(err)
        return results


def perturb_speaker(x: np.ndarray, alpha: float, sample_rate: int) -> np.ndarray:
    """Play ``x`` ``alpha`` times faster by resampling (soxr): frequencies,
    formants and pitch scale by ``alpha``, the length by ``1 / alpha``.
    (N,) -> (round(N / alpha),) float32."""
    return soxr.resample(x, sample_rate * alpha, sample_rate).astype(np.float32)


_ALPHA_LIMITS = (0.5, 2.0)  # beyond these the engine rate (rate / alpha) leaves the engines' range


def check_speaker_perturb(bounds: Sequence[float], name: str) -> tuple[float, float]:
    """``bounds`` as (min, max) speaker factors; UsageError naming ``name``
    unless it is two numbers with 0.5 <= min <= max <= 2."""
    if len(bounds) != 2:
        raise UsageError(f"{name} takes two speaker factors MIN,MAX (e.g. 0.85,1.15), got {list(bounds)}")
    low, high = (float(b) for b in bounds)
    if not _ALPHA_LIMITS[0] <= low <= high <= _ALPHA_LIMITS[1]:
        raise UsageError(f"{name} must be MIN,MAX with {_ALPHA_LIMITS[0]} <= MIN <= MAX <= "
                         f"{_ALPHA_LIMITS[1]} (1.0: the voice as it is), got {low},{high}")
    return low, high


def _safe_read(path: Path) -> Union[np.ndarray, Exception]:
    try:
        return _read_wav(path)
    except AudioError as err:
        return err


@functools.lru_cache(maxsize=None)
def _listing(*cmd: str) -> str:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=_TIMEOUT_SEC).stdout


def _unlisted(voice: Voice) -> Optional[str]:
    """Why the engine does not know ``voice``, or None. Needed because
    espeak-ng and flite fall back to a default voice, silently, for a name
    they do not know."""
    if voice.engine == "espeak":
        base, _, variant = voice.spec.partition("+")
        languages = {line.split()[1] for line in _listing("espeak-ng", "--voices").splitlines()[1:] if line.split()}
        if base not in languages:
            return f"espeak-ng has no voice {base!r} (see `espeak-ng --voices`)"
        variants = {line.split()[4].split("/")[-1] for line in
                    _listing("espeak-ng", "--voices=variant").splitlines()[1:] if len(line.split()) > 4}
        if variant and variant not in variants:
            return f"espeak-ng has no variant {variant!r} (see `espeak-ng --voices=variant`)"
    elif voice.engine == "mbrola":
        database = voice.spec.removeprefix("mb-")
        if not any(Path(d).is_file() for d in (f"{_MBROLA_DIR}/{database}/{database}", f"{_MBROLA_DIR}/{database}")):
            return (f"MBROLA database {database!r} is not installed in {_MBROLA_DIR} "
                    f"(`make voices`, or apt-get install mbrola-{database})")
    elif voice.engine == "flite" and voice.spec not in _listing("flite", "-lv").split():
        return f"flite has no voice {voice.spec!r} (see `flite -lv`)"
    return None


_MBROLA_DIR = "/usr/share/mbrola"  # where espeak-ng looks for MBROLA databases
_PROBE_TEXT = "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG"


def probe_voices(voices: Sequence[Voice]) -> tuple[list[Voice], dict[str, str]]:
    """Synthesise a short sentence with every voice. Returns the voices that
    work and, for each broken one, why (at least 1 s of audio with RMS above
    -50 dBFS is required). Missing engine binaries raise TTSError."""
    check_engines(voices)
    working, broken = [], {}
    for voice in voices:
        unknown = _unlisted(voice)
        if unknown is not None:
            broken[voice.name] = unknown
            continue
        (result,) = synthesize(voice, [SynthRequest(_PROBE_TEXT)])
        if isinstance(result, Exception):
            broken[voice.name] = str(result)
        elif result.size < SAMPLE_RATE or float(np.sqrt(np.mean(result ** 2))) < 10 ** (-50 / 20):
            broken[voice.name] = f"probe sentence gave {result.size / SAMPLE_RATE:.2f} s of near-silence"
        else:
            working.append(voice)
    return working, broken
