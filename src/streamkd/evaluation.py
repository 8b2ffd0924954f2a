"""Evaluation of a grid's finished runs: dev/test decoding with
per-utterance errors (for paired bootstrap) and, for students, emission
delay against the teacher; cached per run in ``eval.json``.
Each scored student also leaves its record (``experiment.record_path``).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from streamkd.atomic import write_atomic
from streamkd.audio import load_audio
from streamkd.checkpoint import load_model
from streamkd.decode import UTT_KEYS, decode_manifest, manifest_log_probs, per_utt_errors, read_hyps
from streamkd.experiment import (Grid, ensure_lm, ensure_unseen_dev, grid_lang, plan_runs, read_record, record_path,
                                 students_data, write_record)
from streamkd.features import Fbank
from streamkd.lm.graph_search import GraphDecoder, HLGraph
from streamkd.manifest import read_manifest
from streamkd.model.subsampling import Conv2dSubsampling4
from streamkd.streaming.latency import emission_delay, equal_pairs, greedy_alignment
from streamkd.tokenizer import load_tokenizer

__all__ = ["emission_delays", "evaluate_run", "evaluate_grid", "GridScorer", "training_throughput"]


def emission_delays(student, teacher, manifest: str, max_utts: int) -> dict:
    """Per word of the test utterances: when the streaming student emits it
    against when the full-context teacher does (frames of the first token,
    40 ms each). ``alignment_*``: student frame - teacher frame;
    ``emission_*``: the student's frame rounded up to the end of its chunk
    (when a streaming decoder can actually output it) - teacher frame."""
    fbank = Fbank(student.config.data.features)
    frame_ms = Conv2dSubsampling4.frame_ms(student.config.data.features.frame_shift_ms)
    chunk = student.chunk.chunk_frames if student.chunk is not None else 1
    align, emit, matched, unmatched, tok_align, tok_emit = [], [], 0, 0, [], []
    with torch.inference_mode():
        utts = read_manifest(manifest)[:max_utts]
        for utt in utts:
            feats = fbank.compute(load_audio(utt.audio_path, student.config.data.features.sample_rate))
            s_tok, s_fr = greedy_alignment(student, feats)
            t_tok, t_fr = greedy_alignment(teacher, feats)
            s_emit = [((f // chunk) + 1) * chunk - 1 for f in s_fr]
            d = emission_delay(s_tok, s_fr, t_tok, t_fr, student.tokenizer.decode, frame_ms=frame_ms)
            e = emission_delay(s_tok, s_emit, t_tok, t_fr, student.tokenizer.decode, frame_ms=frame_ms)
            align += d.delays_ms
            emit += e.delays_ms
            for si, ti in _matched_tokens(s_tok, t_tok):
                tok_align.append((s_fr[si] - t_fr[ti]) * frame_ms)
                tok_emit.append((s_emit[si] - t_fr[ti]) * frame_ms)
            matched += d.matched
            unmatched += d.unmatched

    def stats(v):
        return (float(np.mean(v)), float(np.percentile(v, 90))) if v else (float("nan"), float("nan"))

    (am, ap), (em, ep), (tam, _), (tem, tep) = stats(align), stats(emit), stats(tok_align), stats(tok_emit)
    return {"alignment_mean_ms": am, "alignment_p90_ms": ap, "emission_mean_ms": em,
            "emission_p90_ms": ep, "matched_words": matched, "unmatched_words": unmatched,
            "token_alignment_mean_ms": tam, "token_emission_mean_ms": tem, "token_emission_p90_ms": tep,
            "matched_tokens": len(tok_align),
            "utterances": len(utts)}


def _matched_tokens(student: list[int], teacher: list[int]) -> list[tuple[int, int]]:
    """(student index, teacher index) of the tokens a minimum-edit-distance
    alignment pairs as equal: the delay measured per token stays
    meaningful when error rates are too high for whole words to match."""
    return equal_pairs([str(t) for t in student], [str(t) for t in teacher])


def evaluate_run(run_dir: str | Path, teacher_path: Optional[str | Path], delay_utts: int = 50, *,
                 checkpoint: Optional[str | Path] = None, data=None, graph=None,
                 unseen: Optional[str | Path] = None) -> dict:
    """Score ``checkpoint`` (default ``run_dir/final.pt``) on the dev and
    test manifests of ``data`` (default: the model's own data config), with
    per-utterance rows kept for significance tests, greedy and, with
    ``graph`` (a ``GraphDecoder``), through the word LM's HLG graph too
    (keys ``dev_lm``, ``test_lm``: the same log-probs searched again), and
    on the ``unseen`` manifest (a dev set of unseen voices; key ``unseen``);
    for students, measure emission delay against the teacher. Written to
    ``run_dir/eval.json``; cached until the checkpoint is newer (a run
    extended with more epochs is scored again) or the graph or the
    unseen-voice set changes. A set whose decode folder this checkpoint's
    evaluation wrote already is read back, not decoded again
    (``_decoded_already``)."""
    run_dir = Path(run_dir)
    checkpoint = Path(checkpoint or run_dir / "final.pt")
    out = run_dir / "eval.json"
    lm = None if graph is None else graph.describe()
    unseen = None if unseen is None else str(unseen)
    if out.is_file() and out.stat().st_mtime >= checkpoint.stat().st_mtime:
        cached = json.loads(out.read_text())
        if cached.get("lm") == lm and cached.get("unseen_manifest") == unseen:
            return cached
    model = load_model(checkpoint)
    cfg_data = data or model.config.data
    result = {"params": sum(p.numel() for p in model.parameters()),
              "chunk_config": None if model.chunk is None else {"chunk_frames": model.chunk.chunk_frames,
                                                                "left_chunks": model.chunk.left_chunks}}
    if lm is not None:
        result["lm"] = lm
    if unseen is not None:
        result["unseen_manifest"] = unseen
    for split, manifest in (("dev", cfg_data.dev_manifest), ("test", cfg_data.test_manifest),
                            ("unseen", unseen)):
        if not manifest or not Path(manifest).is_file():
            continue
        scores = None  # the model's log-probs of the manifest, computed once a search needs them
        searches = [(split, None)] + ([(f"{split}_lm", graph)] if graph is not None else [])
        for key, search in searches:
            decoded = _decoded_already(run_dir / f"decode_{key}", checkpoint, manifest, search)
            if decoded is None:
                if scores is None:
                    scores = manifest_log_probs(model, cfg_data, manifest)
                dec = decode_manifest(model, cfg_data, manifest, out_dir=run_dir / f"decode_{key}", graph=search,
                                      scores=scores)
                decoded = dec.summary, dec.hyps
            result[key] = decoded[0]
            for suffix, errors in zip(UTT_KEYS.values(), per_utt_errors(decoded[1])):
                result[key + suffix] = errors
    if teacher_path is not None and model.chunk is not None and cfg_data.test_manifest:
        teacher = load_model(teacher_path)
        result["delay"] = emission_delays(model, teacher, cfg_data.test_manifest, delay_utts)
    write_atomic(out, json.dumps(result) + "\n")
    return result


def _decoded_already(out_dir: Path, checkpoint: Path, manifest: str | Path,
                     graph=None) -> Optional[tuple[dict, list[dict]]]:
    """(summary, hypothesis rows) of a ``decode_<split>`` folder that an
    evaluation of this checkpoint left, so that one stopped part-way (the
    searches through the LM take minutes a set) goes on where it stopped:
    its summary.json and hyps.txt are newer than the checkpoint, and it
    decoded ``manifest`` greedily (``graph`` None) or through a graph of
    ``graph``'s settings. None otherwise: the set is decoded again."""
    summary_file, hyps_file = out_dir / "summary.json", out_dir / "hyps.txt"
    if not (summary_file.is_file() and hyps_file.is_file()):
        return None
    if min(summary_file.stat().st_mtime, hyps_file.stat().st_mtime) < checkpoint.stat().st_mtime:
        return None
    summary = json.loads(summary_file.read_text())
    if (summary.get("manifest") != str(manifest) or summary.get("beam") != 1
            or summary.get("graph") != (None if graph is None else graph.describe())):
        return None
    return summary, read_hyps(hyps_file)


def training_throughput(log_csv: Path) -> float:
    """Median training speed of a run, in audio seconds per wall second,
    over its log.csv rows (each covers the steps since the row before; the
    first row of a run or of a resume covers one step and is left out).
    NaN without rows. Wall time per epoch is the epoch's audio over this."""
    if not log_csv.is_file():
        return float("nan")
    with log_csv.open() as f:
        rows = list(csv.DictReader(f))
    aps = [float(r["audio_sec_per_sec"]) for prev, r in zip(rows, rows[1:])
           if r.get("audio_sec_per_sec") and int(r["step"]) - int(prev["step"]) > 1]
    return float(np.median(aps)) if aps else float("nan")


# How many of a run's first test hypotheses (greedy and through the LM) its
# row and record keep, for the report's examples.
EXAMPLE_HYPS = 10


def _run_files(run_dir: Path) -> dict:
    """What a row keeps of a run's folder besides its scores: the dev curve
    (valid.csv rows) and the first test hypotheses, greedy and through the
    LM (decode_test*/hyps.txt)."""
    out = {"valid": [], "examples": {}}
    if (run_dir / "valid.csv").is_file():
        with (run_dir / "valid.csv").open() as f:
            out["valid"] = list(csv.DictReader(f))
    for split in ("test", "test_lm"):
        hyps = run_dir / f"decode_{split}" / "hyps.txt"
        if hyps.is_file():
            out["examples"][split] = read_hyps(hyps)[:EXAMPLE_HYPS]
    return out


class GridScorer:
    """Scores a grid's runs: the grid's word LM graph and unseen-voice dev
    set are built when missing and loaded once, for every run it scores."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        lm = ensure_lm(grid)
        self.unseen = ensure_unseen_dev(grid)
        self.graph = None
        if lm is not None:
            symbols = load_tokenizer(grid_lang(grid)).symbols
            self.graph = GraphDecoder(HLGraph(lm.graph_dir, symbols), lm.beam, lm.max_active)

    def teacher(self, run) -> dict:
        """The grid's pretrained teacher, scored from its checkpoint on the
        students' data (it has no record)."""
        run_dir = self.grid.out_dir / run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        ev = evaluate_run(run_dir, None, checkpoint=self.grid.teacher_checkpoint, data=students_data(self.grid),
                          graph=self.graph, unseen=self.unseen)
        about = {"seed": None, "steps": None, "pretrained": str(self.grid.teacher_checkpoint)}
        return {"run": run.name, "method": run.method, "chunk": run.chunk, **about, **ev, **_run_files(run_dir)}

    def trained(self, run) -> dict:
        """A run trained in its folder (``final.pt``): scored (cached in its
        eval.json), and its row written as its record."""
        run_dir = self.grid.out_dir / run.name
        ev = evaluate_run(run_dir, None if run.method == "teacher" else self.grid.teacher_checkpoint,
                          self.grid.spec.emission_delay_utts, graph=self.graph, unseen=self.unseen)
        for split in ("dev", "test"):  # eval.json written before per-character errors were kept
            hyps = run_dir / f"decode_{split}" / "hyps.txt"
            if split + UTT_KEYS["cer"] not in ev and hyps.is_file():
                ev[split + UTT_KEYS["cer"]] = per_utt_errors(read_hyps(hyps))[1]
        final = json.loads((run_dir / "final.json").read_text())
        about = {"seed": run.seed, "steps": final.get("steps"), "final": final,
                 "train_aps": training_throughput(run_dir / "log.csv")}
        row = {"run": run.name, "method": run.method, "chunk": run.chunk, **about, **ev, **_run_files(run_dir)}
        write_record(record_path(self.grid, run.name), row)
        return row

    def recorded(self, run) -> Optional[dict]:
        """A run whose folder is not on this machine, from its record; None
        (and why, printed) when it has none or was scored with another LM
        graph or unseen-voice set than the grid's."""
        record = record_path(self.grid, run.name)
        if not record.is_file():
            print(f"{run.name}: not trained yet, left out of the report", flush=True)
            return None
        row = read_record(record)
        scored = {"lm": None if self.graph is None else self.graph.describe(),
                  "unseen_manifest": None if self.unseen is None else str(self.unseen)}
        if stale := [k for k, v in scored.items() if row.get(k) != v]:
            print(f"{run.name}: left out of the report: its record {record} was scored with another "
                  f"{' and '.join(stale)} than the grid's; delete the record to train and score it again", flush=True)
            return None
        print(f"{run.name}: from its record {record} (its folder is not on this machine)", flush=True)
        return row


def evaluate_grid(grid: Grid) -> list[dict]:
    """Evaluate every finished run of the grid (cached per run), through
    the grid's word LM too when it names one; a student's row is also
    written as its record, and a run whose folder has no final.pt is read
    from its record when there is one."""
    scorer = GridScorer(grid)
    rows = []
    for run in plan_runs(grid):
        if run.config is None:  # the grid's pretrained teacher
            rows.append(scorer.teacher(run))
        elif (grid.out_dir / run.name / "final.pt").is_file():
            rows.append(scorer.trained(run))
        elif (row := scorer.recorded(run)) is not None:
            rows.append(row)
    return rows
