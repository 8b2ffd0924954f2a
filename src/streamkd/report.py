"""The results of an experiment grid: JSON of every run, a Markdown table,
a paired bootstrap test and plots (``streamkd report``).

Numbers are read from the runs' ``eval.json`` (see ``experiment.evaluate_run``);
nothing here trains or chooses anything.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Optional

import jiwer
import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display: before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402

from streamkd.atomic import write_atomic
from streamkd.decode import UTT_KEYS, per_utt_errors, read_hyps
from streamkd.errors import DataError

__all__ = ["summarise", "paired_bootstrap", "compare_decodes", "word_errors_by_frequency", "write_report", "examples"]


def paired_bootstrap(a: dict[str, list[int]], b: dict[str, list[int]], *, n: int = 2000,
                     seed: int = 0) -> dict:
    """Paired bootstrap over utterances: is system ``a``'s WER lower than ``b``'s?

    a, b: utterance key -> [word errors, reference words], same keys (the
    keys shared by both are used). Returns the observed WER difference
    (a - b) and p = the share of resamples in which a is NOT better
    (difference >= 0): small p means a is reliably better.
    """
    keys = sorted(set(a) & set(b))
    if not keys:
        return {"diff": float("nan"), "p": float("nan"), "utterances": 0}
    ea = np.array([a[k][0] for k in keys], dtype=np.float64)
    eb = np.array([b[k][0] for k in keys], dtype=np.float64)
    words = np.array([a[k][1] for k in keys], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(keys), size=(n, len(keys)))
    tot = words[idx].sum(axis=1)
    diff = (ea[idx].sum(axis=1) - eb[idx].sum(axis=1)) / np.maximum(tot, 1)
    return {"diff": float((ea.sum() - eb.sum()) / max(words.sum(), 1)), "p": float((diff >= 0).mean()),
            "utterances": len(keys)}


def _hyps_file(decode: str | Path) -> Path:
    """The hyps.txt of a ``streamkd decode --out`` folder (or that file
    itself); DataError when there is none."""
    path = Path(decode)
    hyps = path / "hyps.txt" if path.is_dir() else path
    if not hyps.is_file():
        raise DataError(f"{path}: no hyps.txt there; give a `streamkd decode --out` folder or its hyps.txt, "
                        "or a grid's run record (RUN.json.gz)")
    return hyps


def _read_side(source: str | Path, split: str) -> tuple[str, Optional[dict], Optional[dict]]:
    """One side of a comparison: what was read, and either a decode's rows
    by utterance id (``source`` a decode folder or its hyps.txt) or a run
    record's per-utterance errors of set ``split`` (``source`` a grid's
    ``*.json.gz``: metric -> utt id -> [errors, reference length]; a record
    keeps no text)."""
    path = Path(source)
    if not path.name.endswith(".json.gz"):
        hyps = _hyps_file(path)
        return str(hyps), {r["id"]: r for r in read_hyps(hyps)}, None
    from streamkd.experiment import read_record

    record = read_record(path)
    errors = {metric: record.get(split + suffix) for metric, suffix in UTT_KEYS.items()}
    if not all(errors.values()):
        kept = [s for s in RECORD_SETS if all(record.get(s + suffix) for suffix in UTT_KEYS.values())]
        raise DataError(f"{path}: the record keeps no per-utterance errors of set {split!r} (it keeps "
                        f"{', '.join(kept) or 'none: it was made before records kept them'}); pick another "
                        "with --set, or compare the run's decode folders")
    return f"{path} ({split})", None, errors


def compare_decodes(a: str | Path, b: str | Path, *, n: int = 2000, seed: int = 0,
                    given: Optional[str | Path] = None, split: str = "test") -> dict:
    """Paired bootstrap of two decodes of the same manifest (``decode
    --out`` folders or their ``hyps.txt``, or a grid's run records,
    ``RUN.json.gz``, whose per-utterance errors of set ``split`` are used:
    the decode folders of a run trained elsewhere are not kept, its record
    is): WER and CER of each, a - b, and p (small: a is reliably better).
    With ``given`` (a third decode of the manifest, e.g. the teacher's; not
    a record: it needs the words), also each one's share of reference words
    wrong (substituted or deleted), apart for the words ``given`` gets right
    and those it gets wrong: is a's gain on what the teacher knows? Then
    every figure is over the utterances all three share. DataError when they
    share no utterance or their references differ (for a record: in length,
    words or characters, as it keeps no text)."""
    if split not in RECORD_SETS:
        raise ValueError(f"split must be one of {RECORD_SETS}, got {split!r}")
    paths = [a, b] + ([given] if given is not None else [])
    sources, rows, kept = zip(*(_read_side(path, split) for path in paths))
    if given is not None and None in rows:
        raise DataError(f"{paths[rows.index(None)]}: --given splits the words by the third decode's alignment, "
                        "which needs each decode's text; a run record keeps only its error counts: give decode "
                        "folders")
    ids = [set(r if r is not None else k["wer"]) for r, k in zip(rows, kept)]
    shared = sorted(set.intersection(*ids))
    if not shared:
        raise DataError(f"{' and '.join(map(str, paths))} share no utterance: decode the same manifest with each")
    # metric -> utt id -> [errors, reference length] of a and b, over the shared utterances
    errors = [k if k is not None else dict(zip(UTT_KEYS, per_utt_errors([r[u] for u in shared])))
              for r, k in zip(rows[:2], kept[:2])]
    for i, path in enumerate(paths[1:], 1):
        if rows[0] is not None and rows[i] is not None:
            bad = next((u for u in shared if rows[0][u].get("ref") != rows[i][u].get("ref")), None)
        else:  # a record (only a or b: --given refuses one) keeps the references' lengths alone
            bad = next((u for u in shared if any(errors[0][m][u][1] != errors[1][m][u][1] for m in UTT_KEYS)),
                       None)
        if bad is not None:
            raise DataError(f"utterance {bad} has other references in {a} and {path}: not decodes of one manifest")
    out = {"sources": list(sources[:2]), "utterances": len(shared),
           "only_in_a": len(ids[0]) - len(shared), "only_in_b": len(ids[1]) - len(shared)}
    for unit in UTT_KEYS:
        ea, eb = ({u: e[unit][u] for u in shared} for e in errors)
        boot = paired_bootstrap(ea, eb, n=n, seed=seed)
        total = sum(v[1] for v in ea.values())
        out[unit] = {"a": sum(v[0] for v in ea.values()) / max(total, 1),
                     "b": sum(v[0] for v in eb.values()) / max(total, 1), "a_minus_b": boot["diff"], "p": boot["p"]}
    if given is not None:
        groups = {name: {"words": 0, "a_wrong": 0, "b_wrong": 0} for name in ("given_right", "given_wrong")}
        for k in shared:
            ref = rows[0][k].get("ref", "")
            flags = [_word_alignment(ref, r[k].get("hyp", ""))[1] for r in rows]
            for in_a, in_b, in_given in zip(*flags):
                g = groups["given_right" if in_given else "given_wrong"]
                g["words"] += 1
                g["a_wrong"] += not in_a
                g["b_wrong"] += not in_b
        for g in groups.values():
            for side in ("a_wrong", "b_wrong"):
                g[f"share_{side}"] = g[side] / g["words"] if g["words"] else float("nan")
        out["given"] = {"decode": sources[2], "only_in_given": len(ids[2]) - len(shared), **groups}
    return out


def _word_alignment(ref: str, hyp: str) -> tuple[list[str], list[bool], int]:
    """The words of ``ref``, for each whether the word alignment (jiwer)
    pairs it with the same word of ``hyp`` (False: substituted or deleted),
    and the number of words ``hyp`` inserts. An empty ``ref`` has no words:
    every word of ``hyp`` is inserted."""
    if not ref.split():
        return [], [], len(hyp.split())
    out = jiwer.process_words(ref, hyp)
    right = [False] * len(out.references[0])
    for chunk in out.alignments[0]:
        if chunk.type == "equal":
            right[chunk.ref_start_idx:chunk.ref_end_idx] = [True] * (chunk.ref_end_idx - chunk.ref_start_idx)
    return out.references[0], right, out.insertions


# How often a word occurs in the training transcripts: the bins of
# word_errors_by_frequency (lowest, highest; None: no bound).
FREQUENCY_BINS = ((0, 0), (1, 2), (3, 9), (10, 99), (100, None))


def word_errors_by_frequency(decode: str | Path, train_manifests: list[str | Path],
                             vocab: Optional[str | Path] = None) -> dict:
    """Where a decode's word errors are: each reference word of ``decode``
    (a ``streamkd decode --out`` folder or its hyps.txt) is right when the
    word alignment (jiwer) pairs it with the same hypothesis word, wrong when
    it is substituted or deleted; the share wrong is given by how often the
    word occurs in the transcripts of ``train_manifests`` (never, 1-2, 3-9,
    10-99, 100 or more times). Inserted words belong to no reference word and
    are counted apart. With ``vocab`` (a word list, one word first on each
    line, such as an LM's vocab.txt), also the reference words outside it,
    which a vocabulary-closed LM search cannot get right."""
    from collections import Counter

    from streamkd.manifest import read_manifest

    hyps = _hyps_file(decode)
    rows = read_hyps(hyps)
    if not rows:
        raise DataError(f"{hyps}: no utterances in it")
    seen = Counter(w for m in train_manifests for u in read_manifest(m) for w in u.text.split())
    known = None
    if vocab is not None:
        if not Path(vocab).is_file():
            raise DataError(f"{vocab}: word list does not exist; give an LM's vocab.txt (`streamkd lm build`)")
        known = {line.split()[0] for line in Path(vocab).read_text().splitlines() if line.strip()}
    bins = [{"seen": f"{lo}" if lo == hi else f"{lo}+" if hi is None else f"{lo}-{hi}", "words": 0, "wrong": 0}
            for lo, hi in FREQUENCY_BINS]
    oov = {"words": 0, "wrong": 0}
    inserted = total = 0
    for r in rows:
        words, right, added = _word_alignment(r.get("ref", ""), r.get("hyp", ""))
        inserted += added
        for word, ok in zip(words, right):
            n = seen[word]
            b = next(b for b, (lo, hi) in zip(bins, FREQUENCY_BINS) if n >= lo and (hi is None or n <= hi))
            b["words"] += 1
            b["wrong"] += not ok
            total += 1
            if known is not None and word not in known:
                oov["words"] += 1
                oov["wrong"] += not ok
    for b in [*bins, oov]:
        b["share_of_words"] = b["words"] / max(total, 1)
        b["share_wrong"] = b["wrong"] / b["words"] if b["words"] else float("nan")
    out = {"decode": str(hyps), "utterances": len(rows), "reference_words": total, "inserted_words": inserted,
           "train_manifests": [str(m) for m in train_manifests], "by_times_seen_in_training": bins}
    if known is not None:
        out["outside_vocab"] = {"vocab": str(vocab), **oov}
    return out


def _pooled(rows: list[dict], key: str) -> dict[str, list[int]]:
    """Per-utterance errors of several seeds, keyed (seed, utterance)."""
    out = {}
    for r in rows:
        for uid, v in r.get(key, {}).items():
            out[f"{r['seed']}/{uid}"] = v
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


# How the log-probs were searched: greedy CTC (eval.json keys dev, test) or
# through the word LM's graph (dev_lm, test_lm)
DECODINGS = {"greedy": "", "lm": "_lm"}
# eval.json keys of the sets scored: dev, test, and the dev set of unseen voices when the grid has one
_SPLITS = ("dev", "test", "unseen")
# The sets a run record keeps per-utterance errors of (``compare --set``): greedy, and through the word LM
RECORD_SETS = tuple(f"{split}{suffix}" for suffix in DECODINGS.values() for split in _SPLITS)


def summarise(rows: list[dict], metric: str = "wer", decoding: str = "greedy") -> list[dict]:
    """One line per (method, chunk): mean and std over seeds of dev/test WER
    and CER, and on the test ``metric`` (wer or cer): relative reduction
    against none and token and the share of the teacher gap closed, each over
    the seeds both have (``vs_none_seeds``, ``vs_token_seeds``), relative
    excess over the teacher (none's is the streaming gap), the paired
    bootstrap against none and against token (``p_vs_none``, ``p_vs_token``,
    over the (seed, utterance) pairs both kept); emission delays. ``decoding``: the greedy
    figures or those through the word LM (runs scored without it are left
    out)."""
    if metric not in UTT_KEYS:
        raise ValueError(f"metric must be one of {sorted(UTT_KEYS)}, got {metric!r}")
    rows = [_as_decoded(r, DECODINGS[decoding]) for r in rows
            if any(f"{split}{DECODINGS[decoding]}" in r for split in ("dev", "test"))]
    if not rows:
        return []
    teacher = [r for r in rows if r["method"] == "teacher"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["method"] != "teacher":
            groups.setdefault((r["method"], r["chunk"]), []).append(r)
    lines = [_rates({"method": "teacher", "chunk": None, "seeds": len(teacher)}, teacher)]
    for (method, chunk), rs in groups.items():
        line = _rates({"method": method, "chunk": chunk, "seeds": len(rs)}, rs)
        for key, name in (("emission_mean_ms", "emission_delay_ms"),
                          ("token_emission_mean_ms", "token_emission_delay_ms"),
                          ("alignment_mean_ms", "alignment_shift_ms")):
            line[name] = _mean_std([r["delay"][key] for r in rs if key in r.get("delay", {})])[0]
        line["train_aps"] = _mean_std([r["train_aps"] for r in rs if "train_aps" in r])[0]
        lines.append(line)
    by_key = {(x["method"], x["chunk"]): x for x in lines}
    target = by_key[("teacher", None)].get(f"test_{metric}", float("nan"))
    for line in lines[1:]:
        none = by_key.get(("none", line["chunk"]))
        v = line[f"test_{metric}"]
        line["metric"] = metric
        # Against none and token over the seeds both have (the same seed: the same
        # initialisation and batches), so that a method with fewer seeds done yet
        # meets the baseline's runs of those seeds, not the mean of others.
        own = groups[(line["method"], line["chunk"])]
        for name in ("none", "token"):
            others = groups.get((name, line["chunk"]), [])
            shared = sorted({r["seed"] for r in own} & {r["seed"] for r in others})
            line[f"rel_vs_{name}"], line[f"vs_{name}_seeds"] = float("nan"), shared
            line[f"p_vs_{name}"], line[f"p_vs_{name}_utterances"] = float("nan"), 0
            if name == "none":
                line["gap_closed"] = float("nan")
            if not shared:
                continue
            mine, theirs = (_mean_std([100 * r["test"][metric] for r in runs if r["seed"] in shared and "test" in r])[0]
                            for runs in (own, others))
            line[f"rel_vs_{name}"] = _rel(theirs, mine)
            gap = theirs - target
            if name == "none" and gap and not math.isnan(gap):
                line["gap_closed"] = (theirs - mine) / gap
            if line["method"] != name:
                # Over the (seed, utterance) pairs both have: a run whose record kept no
                # per-utterance errors (one from before records) drops out of the test.
                key = "test" + UTT_KEYS[metric]
                boot = paired_bootstrap(_pooled(own, key), _pooled(others, key))
                line[f"p_vs_{name}"], line[f"p_vs_{name}_utterances"] = boot["p"], boot["utterances"]
        # How much worse than the full-context teacher (for none: the streaming gap).
        line["rel_vs_teacher"] = (v - target) / target if target and not math.isnan(target) else float("nan")
        # Wall time per epoch against none's: the same audio at none's speed over this one's.
        line["epoch_time_vs_none"] = (none["train_aps"] / line["train_aps"]) if none and line["train_aps"] else float("nan")
    order = {m: i for i, m in enumerate(["none", "token", "layer", "aux", "aux+token"])}
    lines[1:] = sorted(lines[1:], key=lambda x: (str(x["chunk"]), order.get(x["method"], 99), x["method"]))
    return lines


def _as_decoded(row: dict, suffix: str) -> dict:
    """The run's row with its figures of one decoding (eval.json keys with
    ``suffix``, e.g. test_lm, test_lm_utts) under the plain keys (test,
    test_utts) that the summary reads."""
    moved = {}
    for split in _SPLITS:
        for key in ("", *UTT_KEYS.values()):
            if f"{split}{suffix}{key}" in row:
                moved[f"{split}{key}"] = row[f"{split}{suffix}{key}"]
    return {**row, **moved}


def _rates(line: dict, rs: list[dict]) -> dict:
    """Mean and std over runs of dev/test (and unseen-voice dev) WER and CER,
    in percent, and of test by speaker."""
    for split in _SPLITS:
        for m in ("wer", "cer"):
            line[f"{split}_{m}"], line[f"{split}_{m}_std"] = _mean_std([100 * r[split][m] for r in rs if split in r])
    line["test_by_speaker"] = _by_speaker(rs)
    return line


def _by_speaker(rs: list[dict], split: str = "test") -> dict[str, dict]:
    """Mean and std over runs of each speaker's WER and CER on ``split``, in
    percent, with its utterance count, for the speakers every run kept (a
    decode of many speakers keeps only their count: then none)."""
    kept = [r[split]["by_speaker"] for r in rs if isinstance(r.get(split, {}).get("by_speaker"), dict)]
    if len(kept) != len(rs) or not kept:
        return {}
    out = {}
    for spk in sorted(set.intersection(*(set(k) for k in kept))):
        out[spk] = {"utterances": kept[0][spk].get("utterances")}
        for m in ("wer", "cer"):
            out[spk][m], out[spk][f"{m}_std"] = _mean_std([100 * k[spk][m] for k in kept])
    return out


def speaker_table(lines: list[dict]) -> str:
    """Test WER by speaker (the held-out voices), one row per (method,
    chunk): mean ± std over seeds; empty when no line has speakers or the
    test set has more than runs.json keeps."""
    speakers = sorted({s for x in lines for s in x.get("test_by_speaker", {})})
    if not speakers or len(speakers) > _SPEAKERS_KEPT:  # a test set of many speakers: decode_test/summary.json
        return ""
    count = {s: next(x["test_by_speaker"][s]["utterances"] for x in lines if s in x.get("test_by_speaker", {}))
             for s in speakers}
    head = ("| method | chunk | seeds | " + " | ".join(f"{s} ({count[s]} utt.) WER %" for s in speakers)
            + " |\n|" + "---|" * (3 + len(speakers)) + "\n")
    body = []
    for x in lines:
        cells = []
        for s in speakers:
            v = x.get("test_by_speaker", {}).get(s)
            cells.append("-" if v is None else _mean_cell(v["wer"], _spread(v["wer_std"], x["seeds"])))
        body.append(f"| {x['method']} | {x['chunk'] or 'full'} | {x['seeds']} | {' | '.join(cells)} |")
    return head + "\n".join(body) + "\n"


def _spread(std: float, seeds: int) -> float:
    """The spread to show for a std over ``seeds`` seeds: NaN (no ± and no error bar) for one seed."""
    return std if seeds > 1 else float("nan")


def _mean_cell(mean: float, spread: float) -> str:
    """A table cell: mean ± spread (see ``_spread``), or the mean alone where there is none."""
    return _fmt(mean) if math.isnan(spread) else f"{_fmt(mean)} ± {_fmt(spread)}"


def _rel(base: float, value: float) -> float:
    return (base - value) / base if base else float("nan")


def _fmt(v, pct=False, digits=2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"


def markdown_table(lines: list[dict]) -> str:
    metric = next((x["metric"] for x in lines if "metric" in x), "wer").upper()
    keys = ["test_wer", "test_cer", "dev_wer", "dev_cer"]
    names = ["test WER %", "test CER %", "dev WER %", "dev CER %"]
    if any(not math.isnan(x.get("unseen_wer", float("nan"))) for x in lines):
        keys += ["unseen_wer", "unseen_cer"]
        names += ["unseen-voice dev WER %", "unseen-voice dev CER %"]
    head = (f"| method | chunk | seeds | {' | '.join(names)} | rel. vs none ({metric}) | "
            f"rel. vs token ({metric}) | gap closed ({metric}) | above teacher ({metric}) | word emission delay ms | token emission delay ms | "
            f"p vs none ({metric}) | p vs token ({metric}) | training audio s/s | epoch time vs none |\n|"
            + "---|" * (13 + len(keys)) + "\n")
    body = []
    for x in lines:
        rates = " | ".join(_mean_cell(x[k], _spread(x[k + "_std"], x["seeds"])) for k in keys)
        body.append(f"| {x['method']} | {x['chunk'] or 'full'} | {x['seeds']} | {rates} | "
                    f"{_fmt(x.get('rel_vs_none'), pct=True)} | {_fmt(x.get('rel_vs_token'), pct=True)} | "
                    f"{_fmt(x.get('gap_closed'), pct=True)} | {_fmt(x.get('rel_vs_teacher'), pct=True)} | "
                    f"{_fmt(x.get('emission_delay_ms'), digits=0)} | "
                    f"{_fmt(x.get('token_emission_delay_ms'), digits=0)} | {_fmt(x.get('p_vs_none'), digits=3)} | "
                    f"{_fmt(x.get('p_vs_token'), digits=3)} | "
                    f"{_fmt(x.get('train_aps'), digits=0)} | {_fmt(x.get('epoch_time_vs_none'), digits=2)} |")
    return head + "\n".join(body) + "\n"


def _plots(lines: list[dict], out: Path, metric: str = "wer") -> list[str]:
    """by_method.png and vs_delay.png; none (and stale ones removed) while
    no student is scored: they compare students."""
    students = [x for x in lines if x["method"] != "teacher"]
    if not students:
        for name in ("by_method.png", "vs_delay.png"):
            (out / name).unlink(missing_ok=True)
        return []
    teacher = next((x for x in lines if x["method"] == "teacher"), None)
    chunks = sorted({x["chunk"] for x in students}, key=str)
    methods = list(dict.fromkeys(x["method"] for x in students))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(chunks))
    for ci, chunk in enumerate(chunks):
        vals = [next((x for x in students if x["method"] == m and x["chunk"] == chunk), None) for m in methods]
        xs = np.arange(len(methods)) + ci * width
        nan = float("nan")  # a method not run at this chunk size: no bar
        bars = ax.bar(xs, [v[f"test_{metric}"] if v else nan for v in vals], width,
                      yerr=[_spread(v[f"test_{metric}_std"], v["seeds"]) if v else nan for v in vals],
                      capsize=3, label=f"chunk {chunk}")
        ax.bar_label(bars, [f"{v[f'test_{metric}']:.1f}" if v else "" for v in vals], padding=3, fontsize=8)
    if teacher and not math.isnan(teacher[f"test_{metric}"]):
        ax.axhline(teacher[f"test_{metric}"], color="k", ls="--", label="teacher (full context)")
    ax.set_xticks(np.arange(len(methods)) + width * (len(chunks) - 1) / 2, methods, rotation=20)
    ax.set_ylabel(f"test {metric.upper()} (%)")
    ax.set_title(f"Streaming student {metric.upper()} by distillation method")
    ax.set_xlim(-width, len(methods) - 1 + width * len(chunks))  # missing bars keep their slot
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # room for the labels and the legend above the bars
    ax.legend(loc="upper center", ncol=len(chunks) + 1, fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "by_method.png", dpi=120)
    plt.close(fig)
    # A colour per method and a marker per chunk size, named in a legend beside
    # the axes: labels on the points collide once a grid has a dozen of them.
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = _palette(methods)
    markers = {c: "osD^v<>p*h"[i % 10] for i, c in enumerate(chunks)}
    for x in students:
        ax.errorbar(x["emission_delay_ms"], x[f"test_{metric}"], yerr=_spread(x[f"test_{metric}_std"], x["seeds"]),
                    fmt=markers[x["chunk"]], color=colours[x["method"]], capsize=3,
                    label=f"{x['method']}, {x['chunk']} ({x['seeds']} seed{'s' if x['seeds'] > 1 else ''})")
    ax.margins(x=0.1, y=0.1)
    ax.set_xlabel("word emission delay vs teacher (ms, mean)")
    ax.set_ylabel(f"test {metric.upper()} (%)")
    ax.set_title("Accuracy against emission delay")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, borderaxespad=0)
    fig.tight_layout()
    fig.savefig(out / "vs_delay.png", dpi=120)
    plt.close(fig)
    return ["by_method.png", "vs_delay.png"]


def _palette(names: list[str]) -> dict[str, tuple]:
    """A colour per name, distinct up to twenty names: tab10's while ten do
    (matplotlib's default cycle), tab20's beyond (the grid has twelve methods)."""
    cmap = plt.cm.tab10 if len(names) <= 10 else plt.cm.tab20
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def plot_learning_curves(curves: dict[str, list[dict]], out_png: Path) -> bool:
    """Dev loss, WER and CER by epoch of each run (name -> its ``valid.csv``
    rows, as a row of ``evaluate_grid`` keeps them under ``valid``), one
    panel each, into ``out_png``. False when no run has a curve yet."""
    curves = {name: rows for name, rows in curves.items() if rows}
    if not curves:
        return False
    # One colour per configuration (the run name without its seed), one line style per seed
    group_of = {name: re.sub(r"_seed\d+$", "", name) for name in curves}
    groups = list(dict.fromkeys(group_of.values()))
    colours = _palette(groups)
    styles = {}
    for name, group in group_of.items():
        nth = sum(1 for other in styles if group_of[other] == group)
        styles[name] = {"color": colours[group], "ls": ("-", "--", ":", "-.")[nth % 4]}
    fig, axes = plt.subplots(1, 3, figsize=(15, max(3.8, 0.15 * len(curves) + 0.8)))
    for ax, key, label in zip(axes, ("loss", "wer", "cer"), ("dev CTC loss", "dev WER (%)", "dev CER (%)")):
        scale = 1.0 if key == "loss" else 100.0
        for name, rows in curves.items():
            ax.plot([int(r["epoch"]) + 1 for r in rows], [float(r[key]) * scale for r in rows], marker=".",
                    label=name, **styles[name])
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Learning curves (dev, greedy CTC)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def examples(hyps: dict[str, dict[str, list[dict]]], n: int = 3, split: str = "test") -> str:
    """The first ``n`` utterances of ``split`` that every run decoded (in
    manifest order, not chosen), each with its reference and every run's
    hypothesis, as Markdown. ``hyps``: run name -> decode name -> the first
    hypothesis rows (id, ref, hyp) of that decode, as a row of
    ``evaluate_grid`` keeps them under ``examples``; "" when a run has none
    of ``split``. Where every run also has ``<split>_lm`` (searched through
    the word LM), each run's LM hypothesis follows, as "<run> +LM"."""
    if not hyps or any(not h.get(split) for h in hyps.values()):
        return ""
    shown = {name: {r["id"]: r for r in h[split]} for name, h in hyps.items()}
    if all(h.get(f"{split}_lm") for h in hyps.values()):
        shown.update({f"{name} +LM": {r["id"]: r for r in h[f"{split}_lm"]} for name, h in hyps.items()})
    first = next(iter(shown.values()))
    ids = [uid for uid in first if all(uid in h for h in shown.values())][:n]
    width = max(len(name) for name in [*shown, "reference"])
    blocks = []
    for uid in ids:
        lines = [f"{uid}", f"  {'reference':{width}s}  {first[uid]['ref']}"]
        lines += [f"  {name:{width}s}  {h[uid].get('hyp', '')}" for name, h in shown.items()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# What a row keeps of its run's folder (evaluate_grid): runs.json leaves it out.
_ROW_FILES = ("valid", "examples")
# runs.json keeps a decode's per-speaker rates up to this many speakers (the
# test voices); beyond, as for a dev set of hundreds of training voices, the
# count only: every rate is in the run's decode_<split>/summary.json.
_SPEAKERS_KEPT = 20


def _slim_decode(value):
    """A decode summary as runs.json keeps it: the skipped utterances as
    counts by reason (not each one), and the per-speaker rates only for a
    few speakers."""
    if not isinstance(value, dict) or "by_speaker" not in value:
        return value
    out = {k: v for k, v in value.items() if k != "skipped_items"}
    if len(value["by_speaker"]) > _SPEAKERS_KEPT:
        out["by_speaker"] = f"{len(value['by_speaker'])} speakers (decode_<split>/summary.json has each)"
    return out


def write_report(rows: list[dict], out_dir: str | Path, *, title: str = "results",
                 notes: Optional[str] = None, metric: str = "wer") -> dict:
    """Write runs.json, summary.json, table.md and the plots: the learning
    curves of the runs whose rows keep one (``valid``), ``examples.md`` with
    the first test utterances of the teacher and of each method's first run
    whose row keeps them (``examples``); returns the summary with the
    examples' text."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slim = [{k: _slim_decode(v) for k, v in r.items()
             if not k.endswith(tuple(UTT_KEYS.values())) and k not in _ROW_FILES} for r in rows]
    # keys sorted: a row read from its record (sorted keys) and one scored here give the same bytes
    write_atomic(out / "runs.json", json.dumps(slim, indent=1, sort_keys=True) + "\n")
    lines = summarise(rows, metric)
    write_atomic(out / "summary.json", json.dumps(lines, indent=1) + "\n")
    table = markdown_table(lines)
    lm_lines = summarise(rows, metric, "lm")
    if lm_lines:  # the grid scored its runs through a word LM too
        write_atomic(out / "summary_lm.json", json.dumps(lm_lines, indent=1) + "\n")
        lm = next(r["lm"] for r in rows if "lm" in r)
        table = ("## Acoustic only (greedy CTC)\n\n" + table
                 + f"\n## With the word LM ({lm.get('order')}-gram HLG graph, LM weight {lm.get('alpha')}, "
                 f"word bonus {lm.get('beta')}, beam {lm.get('beam')}, max_active {lm.get('max_active')}; "
                 f"{lm.get('dir')})\n\n" + markdown_table(lm_lines))
    by_voice = speaker_table(lines)
    if by_voice:
        table += "\n## Test WER by test speaker (greedy)\n\n" + by_voice
        if lm_lines:
            table += "\n## Test WER by test speaker, with the word LM\n\n" + speaker_table(lm_lines)
    write_atomic(out / "table.md", f"# {title}\n\n" + table + (f"\n{notes}\n" if notes else ""))
    _plots(lines, out, metric)
    plot_learning_curves({r["run"]: r["valid"] for r in rows if r.get("valid")}, out / "curves.png")
    shown_runs = {}  # the teacher and each method's first run with hypotheses kept
    for r in rows:
        if r.get("examples", {}).get("test"):
            shown_runs.setdefault(r["method"], r["examples"])
    shown = examples(shown_runs)
    if shown:
        write_atomic(out / "examples.md", "# The first test utterances (reference, then each model)\n\n```\n"
                     + shown + "\n```\n")
    return {"lines": lines, "lm_lines": lm_lines, "table": table, "examples": shown}
