"""``streamkd import {librispeech,kaldi,lhotse}`` and ``streamkd prepare``."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

__all__ = ["configure"]

_SHOW_SKIPPED = 10  # reasons printed; the full list goes to MANIFEST.skipped.tsv


def configure(subparsers: argparse._SubParsersAction) -> None:
    imp = subparsers.add_parser("import", help="convert a corpus layout to a streamkd manifest")
    kinds = imp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    for name, src, helptext in [
        ("librispeech", "DIR", "LibriSpeech split (SPEAKER/CHAPTER/*.trans.txt + .flac)"),
        ("kaldi", "DIR", "Kaldi data dir (wav.scp with plain paths, text, [segments], [utt2spk])"),
        ("lhotse", "CUTS", "Lhotse cuts file (needs the optional lhotse package)"),
    ]:
        p = kinds.add_parser(name, help=helptext)
        p.add_argument("source", metavar=src)
        p.add_argument("--out", required=True, metavar="MANIFEST", help="JSONL manifest to write")
        p.set_defaults(func=_run_import)

    prep = subparsers.add_parser(
        "prepare", help="train the tokenizer and compute CMVN on a training manifest (writes lang dir)")
    prep.add_argument("--config", help="YAML config; its data section is used")
    prep.add_argument("--train-manifest", help="overrides data.train_manifest")
    prep.add_argument("--lang-dir", help="overrides data.lang_dir")
    prep.add_argument("--tokenizer", choices=["char", "bpe", "unigram"], help="overrides data.tokenizer.kind")
    prep.add_argument("--vocab-size", type=int, help="overrides data.tokenizer.vocab_size (blank included)")
    prep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.features.dither=0")
    prep.set_defaults(func=_run_prepare)


def _run_import(args: argparse.Namespace) -> int:
    from streamkd import importers
    from streamkd.atomic import write_atomic
    from streamkd.manifest import write_manifest

    run = {"librispeech": importers.import_librispeech, "kaldi": importers.import_kaldi,
           "lhotse": importers.import_lhotse}[args.format]
    result = run(args.source)
    write_manifest(args.out, result.utterances)
    hours = sum(u.duration for u in result.utterances) / 3600
    print(f"wrote {len(result.utterances)} utterances ({hours:.2f} h) to {args.out}; "
          f"skipped {len(result.skipped)}")
    if result.skipped:
        listing = Path(str(args.out) + ".skipped.tsv")
        write_atomic(listing, "".join(f"{uid}\t{reason}\n" for uid, reason in result.skipped))
        for uid, reason in result.skipped[:_SHOW_SKIPPED]:
            print(f"  skipped {uid}: {reason}", file=sys.stderr)
        more = len(result.skipped) - _SHOW_SKIPPED
        print(f"  {'... and ' + str(more) + ' more; ' if more > 0 else ''}all listed in {listing}",
              file=sys.stderr)
    return 0 if result.utterances else 1


def _data_config(args: argparse.Namespace):
    from streamkd.config import ConfigError, DataConfig, TokenizerConfig, load_config

    data = load_config(args.config, args.overrides).data if args.config else DataConfig()
    if args.overrides and not args.config:
        raise ConfigError("KEY=VALUE overrides need --config")
    tok = data.tokenizer
    if args.tokenizer or args.vocab_size is not None:
        tok = TokenizerConfig(kind=args.tokenizer or tok.kind,
                              vocab_size=tok.vocab_size if args.vocab_size is None else args.vocab_size)
    return dataclasses.replace(
        data, tokenizer=tok,
        train_manifest=args.train_manifest or data.train_manifest,
        lang_dir=args.lang_dir or data.lang_dir,
    )


def _run_prepare(args: argparse.Namespace) -> int:
    from streamkd.lang import prepare_lang

    cfg = _data_config(args)
    info = prepare_lang(cfg)
    print(f"wrote {cfg.lang_dir}: {info['vocab_size']} tokens ({cfg.tokenizer.kind}), CMVN over "
          f"{info['cmvn_frames']} frames of {info['num_utterances']} utterances; "
          f"skipped {len(info['skipped'])}")
    for uid, reason in info["skipped"][:_SHOW_SKIPPED]:
        print(f"  skipped {uid}: {reason}", file=sys.stderr)
    return 0
