"""Building a word n-gram LM with KenLM (``lmplz``, ``build_binary``).

The text is the training manifest's transcripts, optionally plus the
embedded corpus's fortunes sentences; every sentence that occurs in a dev
or test manifest is removed from both, and a text manifest that shares
utterance ids with a dev or test manifest is refused outright. What went in
and what was left out is counted in ``meta.json``.

Output folder: ``lm.arpa``, ``lm.bin`` (KenLM binary, loads faster),
``vocab.txt`` (one word a line, the LM's unigrams) and ``meta.json``; each
file is written atomically. ``lmplz`` and ``build_binary`` are searched on
PATH and beside the Python interpreter (the Makefile builds them into the
virtual environment's bin folder).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from streamkd.atomic import write_atomic
from streamkd.errors import LMError
from streamkd.manifest import read_manifest

__all__ = ["ARPA_FILE", "BINARY_FILE", "VOCAB_FILE", "META_FILE", "TUNE_FILE", "LMText", "find_tool",
           "gather_text", "build_lm", "arpa_counts"]

ARPA_FILE = "lm.arpa"
BINARY_FILE = "lm.bin"
VOCAB_FILE = "vocab.txt"
META_FILE = "meta.json"
TUNE_FILE = "tune.json"
_SPECIAL = ("<s>", "</s>", "<unk>")


def find_tool(name: str) -> Path:
    """A KenLM program on PATH or beside the Python interpreter, else LMError."""
    found = shutil.which(name)
    if found:
        return Path(found)
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return local
    raise LMError(f"KenLM's {name} was found neither on PATH nor in {local.parent}; "
                  "run `make setup`, which builds lmplz and build_binary into the virtual environment")


def _norm(text: str) -> str:
    return " ".join(text.split())


@dataclass
class LMText:
    """The LM's training sentences and the account of where they came from."""
    sentences: list[str] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)  # per source: kind, path, kept, dropped counts
    excluded_manifests: list[str] = field(default_factory=list)
    excluded_sentences: int = 0  # distinct dev/test sentences held out


def gather_text(text_manifests: Sequence[str | Path], exclude_manifests: Sequence[str | Path], *,
                fortunes: bool = False, fortunes_dir: Optional[str | Path] = None) -> LMText:
    """Sentences for the LM: transcripts of ``text_manifests`` (and the
    fortunes sentences with ``fortunes``), minus every sentence of
    ``exclude_manifests`` (the dev and test sets; at least one is required)."""
    if not exclude_manifests:
        raise LMError("name the dev and test manifests to hold out (--exclude); an LM must never see their text")
    held_out: set[str] = set()
    held_ids: dict[str, str] = {}
    for path in exclude_manifests:
        for utt in read_manifest(path):
            held_out.add(_norm(utt.text))
            held_ids[utt.id] = str(path)
    result = LMText(excluded_manifests=[str(p) for p in exclude_manifests], excluded_sentences=len(held_out))
    for path in text_manifests:
        _refuse_held_out(Path(path), exclude_manifests, held_ids)
        texts = [_norm(u.text) for u in read_manifest(path)]
        _add_source(result, {"kind": "manifest", "path": str(path)}, texts, held_out)
    if fortunes:
        from streamkd.corpus.text import FORTUNES_DIR, load_sentences

        directory = Path(fortunes_dir) if fortunes_dir else FORTUNES_DIR
        sentences, _ = load_sentences(directory)
        # The corpus's transcripts are fortunes sentences too: count each once.
        seen = set(result.sentences)
        fresh = [t for t in sentences if t not in seen]
        _add_source(result, {"kind": "fortunes", "path": str(directory),
                             "dropped_already_in_text": len(sentences) - len(fresh)}, fresh, held_out)
    if not result.sentences:
        raise LMError("no LM text is left after holding out the dev/test sentences; check the text sources")
    return result


def _refuse_held_out(path: Path, exclude_manifests, held_ids: dict[str, str]) -> None:
    for ex in exclude_manifests:
        if path.exists() and Path(ex).exists() and os.path.samefile(path, ex):
            raise LMError(f"{path}: this is the held-out manifest {ex}; an LM must not be built from dev or test text")
    shared = [u.id for u in read_manifest(path) if u.id in held_ids]
    if shared:
        raise LMError(f"{path}: {len(shared)} of its utterances (e.g. {shared[0]!r}) are in the held-out manifest "
                      f"{held_ids[shared[0]]}; an LM must not be built from dev or test text")


def _add_source(result: LMText, source: dict, texts: list[str], held_out: set[str]) -> None:
    kept = [t for t in texts if t and t not in held_out]
    source.update({"sentences": len(texts), "kept": len(kept), "dropped_held_out": sum(t in held_out for t in texts),
                   "dropped_empty": sum(not t for t in texts)})
    result.sources.append(source)
    result.sentences.extend(kept)


def arpa_counts(arpa: Path) -> dict[int, int]:
    """The n-gram counts of an ARPA file's ``\\data\\`` header."""
    counts: dict[int, int] = {}
    with open(arpa, encoding="utf-8") as f:
        for line in f:
            if line.startswith("ngram "):
                order, n = line[6:].split("=")
                counts[int(order)] = int(n)
            elif line.startswith("\\1-grams:"):
                break
    if not counts:
        raise LMError(f"{arpa}: no \\data\\ header with ngram counts; not an ARPA file")
    return counts


def _arpa_vocab(arpa: Path) -> list[str]:
    words, inside = [], False
    with open(arpa, encoding="utf-8") as f:
        for line in f:
            if line.startswith("\\1-grams:"):
                inside = True
            elif inside and line.startswith("\\"):
                break
            elif inside and line.strip():
                words.append(line.split("\t")[1].strip())
    return [w for w in words if w not in _SPECIAL]


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise LMError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def build_lm(out_dir: str | Path, text: LMText, *, order: int = 4, memory: str = "10%") -> dict:
    """Run lmplz (modified Kneser-Ney, ``order``) and build_binary on ``text``
    into ``out_dir``; returns the metadata also written to ``meta.json``."""
    if not 2 <= order <= 6:
        raise LMError(f"--order must be 2..6 (KenLM's default build), got {order}")
    lmplz, build_binary = find_tool("lmplz"), find_tool("build_binary")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp:
        tmp_dir = Path(tmp)
        corpus = tmp_dir / "text.txt"
        write_atomic(corpus, "\n".join(text.sentences) + "\n")
        arpa, binary = tmp_dir / ARPA_FILE, tmp_dir / BINARY_FILE
        # --discount_fallback: small texts lack the counts-of-counts that
        # Kneser-Ney discounts are estimated from; KenLM then uses fixed ones.
        _run([str(lmplz), "-o", str(order), "-S", memory, "-T", str(tmp_dir), "--text", str(corpus),
              "--arpa", str(arpa), "--discount_fallback"], "lmplz")
        _run([str(build_binary), str(arpa), str(binary)], "build_binary")
        vocab = _arpa_vocab(arpa)
        meta = {
            "toolkit": "kenlm lmplz (modified Kneser-Ney, --discount_fallback)",
            "order": order,
            "ngram_counts": {str(k): v for k, v in arpa_counts(arpa).items()},
            "vocab_size": len(vocab),
            "sentences": len(text.sentences),
            "words": sum(len(s.split()) for s in text.sentences),
            "sources": text.sources,
            "excluded": {"manifests": text.excluded_manifests, "distinct_sentences": text.excluded_sentences},
            "files": {"arpa": ARPA_FILE, "binary": BINARY_FILE, "vocab": VOCAB_FILE},
        }
        os.replace(arpa, out / ARPA_FILE)  # same folder: atomic renames
        os.replace(binary, out / BINARY_FILE)
    write_atomic(out / VOCAB_FILE, "".join(w + "\n" for w in vocab))
    (out / TUNE_FILE).unlink(missing_ok=True)  # weights tuned for an older LM do not carry over
    write_atomic(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    return meta
