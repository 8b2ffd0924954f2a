"""The language directory: what a model's input and output mean.

``prepare_lang`` trains the tokenizer on the training transcripts and
computes global CMVN statistics over the training features, and writes

    lang_dir/tokenizer.json (+ tokenizer.model)   the tokenizer
    lang_dir/tokens.txt                           symbol table for sherpa-onnx
    lang_dir/cmvn.json                            {"mean", "istd", "frames"}
    lang_dir/lang.json                            the feature and tokenizer
                                                  configs used, and counts

``check_lang`` compares lang.json with a DataConfig, so that a model is never
trained or decoded with features other than those its CMVN was computed on.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from streamkd.atomic import write_atomic
from streamkd.audio import load_utterance
from streamkd.config import DataConfig, to_dict
from streamkd.errors import AudioError, DataError
from streamkd.features import CmvnAccumulator, Fbank, save_cmvn
from streamkd.manifest import read_manifest
from streamkd.tokenizer import train_tokenizer

__all__ = ["prepare_lang", "write_lang_of_model", "read_lang_info", "check_lang"]

_INFO_FILE = "lang.json"


def prepare_lang(
    data_cfg: DataConfig,
    train_manifest: Optional[str | Path] = None,
    lang_dir: Optional[str | Path] = None,
) -> dict[str, Any]:
    """Train the tokenizer and compute CMVN on the training manifest; write
    ``lang_dir`` (defaults: ``data_cfg.train_manifest``, ``data_cfg.lang_dir``).

    Utterances whose audio cannot be read are left out of the CMVN and
    counted in the returned summary (``skipped``: list of (id, reason)).
    Raises DataError when nothing usable is left.
    """
    train_manifest = Path(train_manifest or data_cfg.train_manifest)
    lang_dir = Path(lang_dir or data_cfg.lang_dir)
    utts = read_manifest(train_manifest)
    if not utts:
        raise DataError(f"{train_manifest}: the training manifest holds no utterances")
    texts = [u.text for u in utts if u.text.strip()]
    skipped = [(u.id, "empty transcript") for u in utts if not u.text.strip()]
    tokenizer = train_tokenizer(data_cfg.tokenizer, texts)

    fbank = Fbank(data_cfg.features)
    acc = CmvnAccumulator(fbank.dim)
    for utt in utts:
        try:
            acc.add(fbank.compute(load_utterance(utt, data_cfg.features.sample_rate)))
        except (AudioError, DataError) as err:
            skipped.append((utt.id, str(err)))
    if acc.frames == 0:
        raise DataError(f"{train_manifest}: no readable audio, cannot compute CMVN "
                        f"(first problem: {skipped[0][1] if skipped else 'none'})")
    mean, istd = acc.result()

    lang_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(lang_dir)  # tokenizer.json (+ .model) and tokens.txt
    save_cmvn(lang_dir / "cmvn.json", mean, istd, acc.frames)
    info = {
        "features": to_dict(data_cfg.features),
        "tokenizer": to_dict(data_cfg.tokenizer),
        "vocab_size": tokenizer.vocab_size,
        "train_manifest": str(train_manifest.absolute()),
        "num_utterances": len(utts),
        "cmvn_frames": acc.frames,
        "skipped": [list(s) for s in skipped],
    }
    write_atomic(lang_dir / _INFO_FILE, json.dumps(info, indent=2, ensure_ascii=False))
    return info


def write_lang_of_model(model, lang_dir: str | Path, source: str) -> dict[str, Any]:
    """Write the language directory a trained model carries (its tokenizer,
    CMVN and feature settings), so that students distilled from it use
    exactly its symbols and input normalisation. ``source`` (the model's
    file) is recorded in lang.json."""
    lang_dir = Path(lang_dir)
    data_cfg = model.config.data
    lang_dir.mkdir(parents=True, exist_ok=True)
    model.tokenizer.save(lang_dir)
    # Checkpoints keep the statistics, not how many frames they came from.
    save_cmvn(lang_dir / "cmvn.json", model.cmvn_mean, model.cmvn_istd, 0)
    info = {
        "features": to_dict(data_cfg.features),
        "tokenizer": to_dict(data_cfg.tokenizer),
        "vocab_size": model.tokenizer.vocab_size,
        "from_model": source,
        "train_manifest": data_cfg.train_manifest,
        "cmvn_frames": None,
        "skipped": [],
    }
    write_atomic(lang_dir / _INFO_FILE, json.dumps(info, indent=2, ensure_ascii=False))
    return info


def read_lang_info(lang_dir: str | Path) -> dict[str, Any]:
    """The contents of ``lang_dir/lang.json``."""
    path = Path(lang_dir) / _INFO_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing; run `streamkd prepare` to create {lang_dir}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); re-run `streamkd prepare`") from err
    if not isinstance(info, dict) or "features" not in info or "tokenizer" not in info:
        raise DataError(f"{path}: lacks 'features'/'tokenizer'; re-run `streamkd prepare`")
    return info


def check_lang(lang_dir: str | Path, data_cfg: DataConfig) -> None:
    """Raise DataError when ``lang_dir`` was prepared with other feature or
    tokenizer settings than ``data_cfg`` (naming each differing key)."""
    info = read_lang_info(lang_dir)
    diffs = []
    want_feat = to_dict(data_cfg.features)
    for key, value in want_feat.items():
        if info["features"].get(key) != value:
            diffs.append(f"data.features.{key}: lang dir {info['features'].get(key)!r}, config {value!r}")
    if info["tokenizer"].get("kind") != data_cfg.tokenizer.kind:
        diffs.append(f"data.tokenizer.kind: lang dir {info['tokenizer'].get('kind')!r}, "
                     f"config {data_cfg.tokenizer.kind!r}")
    elif data_cfg.tokenizer.kind != "char" and info["tokenizer"].get("vocab_size") != data_cfg.tokenizer.vocab_size:
        diffs.append(f"data.tokenizer.vocab_size: lang dir {info['tokenizer'].get('vocab_size')!r}, "
                     f"config {data_cfg.tokenizer.vocab_size!r}")
    if diffs:
        raise DataError(f"{Path(lang_dir) / _INFO_FILE} does not match the config: " + "; ".join(diffs)
                        + "; re-run `streamkd prepare` or fix the config")
