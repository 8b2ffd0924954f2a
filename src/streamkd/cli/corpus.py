"""``streamkd corpus build``: synthesise the embedded corpus."""
from __future__ import annotations

import argparse
import sys

from streamkd.errors import UsageError

__all__ = ["configure"]


def configure(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("corpus", help="build the embedded TTS speech corpus")
    sub = group.add_subparsers(dest="corpus_command", metavar="SUBCOMMAND")
    build = sub.add_parser(
        "build",
        help="synthesise fortunes sentences with espeak-ng, flite and festival voices",
        description="Write DIR/wav/, DIR/{train,dev,test}.jsonl and DIR/summary.json. "
        "A rerun with the same arguments skips the audio already made.",
    )
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--hours", type=float, required=True, help="hours of audio to plan (all splits)")
    build.add_argument("--seed", type=int, default=0, help="seed of the whole corpus (default 0)")
    build.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    build.add_argument("--no-degrade", dest="degrade", action="store_false",
                       help="no added noise or reverberation")
    build.add_argument("--extra-voices", action="store_true",
                       help="also train on the voices the default corpus leaves out (festival ked_diphone)")
    build.add_argument("--more-voices", action="store_true",
                       help="also train on voices of other kinds from Debian contrib/non-free: MBROLA us1/us2/"
                       "us3/en1 (through espeak-ng and festival), festival rab_diphone, SVOX Pico en-US/en-GB "
                       "(`make voices` installs them)")
    build.add_argument("--speaker-perturb", metavar="MIN,MAX",
                       help="give each train and dev utterance a speaker factor drawn from MIN..MAX, "
                       "e.g. 0.85,1.15 (formants and pitch times the factor, speaking rate kept); "
                       "test keeps its voices as they are")
    build.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    build.set_defaults(func=_build)
    respeak = sub.add_parser(
        "respeak",
        help="speak a corpus manifest again with held-out voices (a dev set of unseen voices)",
        description="Each utterance keeps its text, rate, pitch and degradation and is spoken by one of "
        "VOICES (voices the corpus already uses are refused). Writes DIR/wav/, DIR/manifest.jsonl and "
        "DIR/summary.json; a rerun skips the audio already made.",
    )
    respeak.add_argument("--manifest", required=True, help="a manifest written by `streamkd corpus build`")
    respeak.add_argument("--voices", required=True, help="comma-separated voice names, e.g. festival_ked_diphone")
    respeak.add_argument("--out", required=True, help="output directory")
    respeak.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    respeak.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    respeak.set_defaults(func=_respeak)
    group.set_defaults(func=lambda args: group.print_help() or 2)


def _bad_jobs(args: argparse.Namespace) -> bool:
    """True (with the error printed) when --jobs is below 1."""
    if args.jobs is not None and args.jobs < 1:
        print(f"error: --jobs must be at least 1, got {args.jobs}", file=sys.stderr)
        return True
    return False


def _build(args: argparse.Namespace) -> int:
    from streamkd.corpus import build_corpus  # heavy imports only when the command runs
    from streamkd.corpus.voices import check_speaker_perturb

    if _bad_jobs(args):
        return 2
    perturb = None
    if args.speaker_perturb is not None:
        try:
            bounds = [float(b) for b in args.speaker_perturb.split(",")]
        except ValueError:
            raise UsageError(f"--speaker-perturb takes two numbers MIN,MAX (e.g. 0.85,1.15), "
                             f"got {args.speaker_perturb!r}") from None
        perturb = check_speaker_perturb(bounds, "--speaker-perturb")
    build_corpus(args.out, args.hours, args.seed, jobs=args.jobs, degrade=args.degrade,
                 extra_voices=args.extra_voices, more_voices=args.more_voices,
                 speaker_perturb=perturb, progress=args.progress)
    return 0


def _respeak(args: argparse.Namespace) -> int:
    from streamkd.corpus import respeak_manifest  # heavy imports only when the command runs

    if _bad_jobs(args):
        return 2
    voices = [v.strip() for v in args.voices.split(",") if v.strip()]
    respeak_manifest(args.manifest, voices, args.out, jobs=args.jobs, progress=args.progress)
    return 0
