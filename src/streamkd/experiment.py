"""The experiment grid: a teacher, then students of every method, chunk size
and seed, all on the same data with the same steps.

A grid is a YAML file (``configs/experiments/*.yaml``)::

    name: paper
    out_dir: exp/paper              # one folder per run below it
    results_dir: results/paper      # what `streamkd report` writes
    corpus: {out: data/corpus, hours: 2.0, seed: 0}   # built when missing
    teacher: ../demo/teacher.yaml   # paths relative to the grid file
    methods:                        # name -> student config (+ overrides)
      none: {config: ../demo/student_none.yaml}
      aux-no-apc: {config: ../demo/student_aux.yaml, overrides: [kd.gamma=0]}
    chunks:                         # name -> chunk frames and left chunks
      160ms: {chunk_frames: 4, left_chunks: 8}
    seeds: [0, 1, 2]
    overrides: [train.max_steps=3000]   # applied to every run
    only: {aux-no-apc: {chunks: [160ms], seeds: [0]}}  # restrict a method

Runs are resumable: a run whose ``final.json`` exists is skipped, one with
checkpoints resumes. Test data is only scored, never used for a choice.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from streamkd.atomic import write_atomic
from streamkd.config import ConfigError, apply_overrides, from_dict, read_yaml

__all__ = ["Grid", "RunSpec", "load_grid", "plan_runs", "run_grid"]


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    name: str  # folder name under the grid's out_dir
    method: str  # 'teacher' or a key of the grid's methods
    config: Path
    overrides: tuple[str, ...]
    chunk: Optional[str] = None
    seed: int = 0


@dataclass
class Grid:
    path: Path
    name: str
    out_dir: Path
    results_dir: Path
    corpus: dict
    teacher: Path
    teacher_overrides: tuple[str, ...]
    methods: dict
    chunks: dict
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    only: dict = field(default_factory=dict)
    emission_delay_utts: int = 50
    metric: str = "wer"  # what relative reduction, gap closed and the bootstrap are computed on


_GRID_KEYS = {"name", "out_dir", "results_dir", "corpus", "teacher", "teacher_overrides", "methods",
              "chunks", "seeds", "overrides", "only", "emission_delay_utts", "metric"}


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; every error names the key and the file."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - _GRID_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(_GRID_KEYS)}")
    for key in ("name", "teacher", "methods", "chunks"):
        if key not in data:
            raise ConfigError(f"{path}: missing key '{key}'")
    here = path.parent
    methods = {}
    for name, spec in data["methods"].items():
        if not isinstance(spec, dict) or "config" not in spec:
            raise ConfigError(f"{path}: methods.{name} needs a 'config' entry")
        methods[name] = {"config": (here / spec["config"]).resolve(),
                         "overrides": tuple(spec.get("overrides", ()))}
    for name, chunk in data["chunks"].items():
        if set(chunk) - {"chunk_frames", "left_chunks"} or "chunk_frames" not in chunk:
            raise ConfigError(f"{path}: chunks.{name} takes chunk_frames and left_chunks")
    if data.get("metric", "wer") not in ("wer", "cer"):
        raise ConfigError(f"{path}: metric must be wer or cer, got {data['metric']!r}")
    for name in data.get("only", {}):
        if name not in methods:
            raise ConfigError(f"{path}: only.{name} names no method")
    return Grid(
        path=path, name=data["name"],
        out_dir=Path(data.get("out_dir", f"exp/{data['name']}")),
        results_dir=Path(data.get("results_dir", f"results/{data['name']}")),
        corpus=data.get("corpus", {}), teacher=(here / data["teacher"]).resolve(),
        teacher_overrides=tuple(data.get("teacher_overrides", ())), methods=methods,
        chunks=data["chunks"], seeds=tuple(data.get("seeds", (0,))),
        overrides=tuple(data.get("overrides", ())), only=data.get("only", {}),
        emission_delay_utts=int(data.get("emission_delay_utts", 50)), metric=str(data.get("metric", "wer")),
    )


def plan_runs(grid: Grid) -> list[RunSpec]:
    """The teacher first, then every (method, chunk, seed) the grid allows,
    seed-major; within a seed the methods that ``only`` restricts (the
    ablations) come last, so a grid cut short still compares every main
    method at every chunk size of its first seed."""
    teacher_dir = grid.out_dir / "teacher"
    runs = [RunSpec("teacher", "teacher", grid.teacher,
                    grid.overrides + grid.teacher_overrides + (f"train.out_dir={teacher_dir}",))]
    for seed in grid.seeds:
        main = [m for m in grid.methods if m not in grid.only]
        restricted = [m for m in grid.methods if m in grid.only]
        for group in (main, restricted):
            for chunk_name, chunk in grid.chunks.items():
                for method in group:
                    only = grid.only.get(method, {})
                    if ("chunks" in only and chunk_name not in only["chunks"]) or \
                            ("seeds" in only and seed not in only["seeds"]):
                        continue
                    runs.append(_run_spec(grid, method, chunk_name, chunk, seed, teacher_dir))
    return runs


def _run_spec(grid: Grid, method: str, chunk_name: str, chunk: dict, seed: int, teacher_dir: Path) -> RunSpec:
    spec = grid.methods[method]
    name = f"{method}_{chunk_name}_seed{seed}"
    left = chunk.get("left_chunks")
    ovr = grid.overrides + spec["overrides"] + (
        f"model.chunk.chunk_frames={chunk['chunk_frames']}",
        f"model.chunk.left_chunks={'null' if left is None else left}",
        f"train.seed={seed}", f"train.out_dir={grid.out_dir / name}",
        f"kd.teacher={teacher_dir / 'final.pt'}",
    )
    return RunSpec(name, method, spec["config"], ovr, chunk_name, seed)


def build_config(run: RunSpec):
    from streamkd.config import Config

    data = apply_overrides(read_yaml(run.config), list(run.overrides))
    return from_dict(data, Config, src=str(run.config))


def ensure_corpus(grid: Grid) -> None:
    """Build the embedded corpus the grid names, unless it is there."""
    if not grid.corpus:
        return
    out = Path(grid.corpus.get("out", "data/corpus"))
    if (out / "train.jsonl").is_file() and (out / "summary.json").is_file():
        return
    from streamkd.corpus import build_corpus

    build_corpus(out, hours=float(grid.corpus.get("hours", 1.0)), seed=int(grid.corpus.get("seed", 0)))


def run_grid(grid: Grid, *, dry_run: bool = False, progress: bool = True,
             names: Optional[list[str]] = None) -> list[dict]:
    """Train every run of the grid that is not finished (or only the runs
    ``names``, in that order); returns their reports."""
    from streamkd.train import train

    ensure_corpus(grid)
    reports = []
    runs = plan_runs(grid)
    if names:
        by_name = {r.name: r for r in runs}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ConfigError(f"{grid.path}: no runs named {unknown}; see `streamkd experiment --dry-run`")
        runs = [by_name[n] for n in names]
    for i, run in enumerate(runs):
        cfg = build_config(run)  # every config is checked before anything trains
        out = Path(cfg.train.out_dir)
        final = out / "final.json"
        status = "done" if final.is_file() else ("resume" if any(out.glob("ckpt-*.pt")) else "new")
        print(f"[{i + 1}/{len(runs)}] {run.name}: {status}", flush=True)
        if dry_run:
            continue
        if status != "done":
            train(cfg, resume=status == "resume", progress=progress)
        report = json.loads(final.read_text())
        report.update({"run": run.name, "method": run.method, "chunk": run.chunk, "seed": run.seed,
                       "out_dir": str(out)})
        reports.append(report)
    return reports


def _greedy_with_frames(model, feats):
    import torch

    from streamkd.decode import CTCGreedySearch

    lens = torch.tensor([feats.size(0)])
    enc = model(feats[None], lens)
    search = CTCGreedySearch()
    search.step(model.ctc_log_probs(enc.out)[0, : int(enc.out_lens[0])])
    return search.best(), search.frames


def emission_delays(student, teacher, manifest: str, max_utts: int) -> dict:
    """Per word of the test utterances: when the streaming student emits it
    against when the full-context teacher does (frames of the first token,
    40 ms each). ``alignment_*``: student frame - teacher frame;
    ``emission_*``: the student's frame rounded up to the end of its chunk
    (when a streaming decoder can actually output it) - teacher frame."""
    import numpy as np
    import torch

    from streamkd.audio import load_audio
    from streamkd.features import Fbank
    from streamkd.manifest import read_manifest
    from streamkd.model.subsampling import Conv2dSubsampling4
    from streamkd.streaming.latency import emission_delay

    fbank = Fbank(student.config.data.features)
    frame_ms = Conv2dSubsampling4.frame_ms(student.config.data.features.frame_shift_ms)
    chunk = student.chunk.chunk_frames if student.chunk is not None else 1
    align, emit, matched, unmatched, tok_align, tok_emit = [], [], 0, 0, [], []
    with torch.inference_mode():
        utts = read_manifest(manifest)[:max_utts]
        for utt in utts:
            feats = fbank.compute(load_audio(utt.audio_path, student.config.data.features.sample_rate))
            s_tok, s_fr = _greedy_with_frames(student, feats)
            t_tok, t_fr = _greedy_with_frames(teacher, feats)
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
    alignment (jiwer) pairs as equal: the delay measured per token stays
    meaningful when error rates are too high for whole words to match."""
    import jiwer

    if not student or not teacher:
        return []
    out = jiwer.process_words(" ".join(map(str, teacher)), " ".join(map(str, student)))
    pairs = []
    for chunk in out.alignments[0]:
        if chunk.type == "equal":
            pairs += [(chunk.hyp_start_idx + k, chunk.ref_start_idx + k)
                      for k in range(chunk.ref_end_idx - chunk.ref_start_idx)]
    return pairs


def evaluate_run(run_dir: str | Path, teacher_path: Optional[str | Path], delay_utts: int = 50) -> dict:
    """Score ``run_dir/final.pt`` on dev and test (per-utterance rows kept
    for significance tests) and, for students, measure emission delay
    against the teacher. Written to ``run_dir/eval.json``; cached."""
    from streamkd import load_model
    from streamkd.decode import decode_manifest

    run_dir = Path(run_dir)
    out = run_dir / "eval.json"
    if out.is_file():
        return json.loads(out.read_text())
    model = load_model(run_dir / "final.pt")
    cfg = model.config
    result = {"params": sum(p.numel() for p in model.parameters()),
              "chunk_config": None if model.chunk is None else {"chunk_frames": model.chunk.chunk_frames,
                                                                "left_chunks": model.chunk.left_chunks}}
    for split, manifest in (("dev", cfg.data.dev_manifest), ("test", cfg.data.test_manifest)):
        if not manifest or not Path(manifest).is_file():
            continue
        dec = decode_manifest(model, cfg.data, manifest, out_dir=run_dir / f"decode_{split}")
        result[split] = dec.summary
        result[f"{split}_utts"], result[f"{split}_utts_chars"] = _per_utt_errors(dec.hyps)
    if teacher_path is not None and model.chunk is not None and cfg.data.test_manifest:
        teacher = load_model(teacher_path)
        result["delay"] = emission_delays(model, teacher, cfg.data.test_manifest, delay_utts)
    write_atomic(out, json.dumps(result) + "\n")
    return result


def _per_utt_errors(rows: list[dict]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """utt id -> [word errors, reference words] and [char errors, reference
    chars], for paired bootstrap."""
    import jiwer

    words, chars = {}, {}
    for r in rows:
        m = jiwer.process_words(r["ref"], r["hyp"])
        words[r["id"]] = [m.substitutions + m.deletions + m.insertions, m.hits + m.substitutions + m.deletions]
        c = jiwer.process_characters(r["ref"], r["hyp"])
        chars[r["id"]] = [c.substitutions + c.deletions + c.insertions, c.hits + c.substitutions + c.deletions]
    return words, chars


def evaluate_grid(grid: Grid) -> list[dict]:
    """Evaluate every finished run of the grid (cached per run)."""
    from streamkd.decode import read_hyps

    rows = []
    teacher_ckpt = grid.out_dir / "teacher" / "final.pt"
    for run in plan_runs(grid):
        run_dir = grid.out_dir / run.name
        if not (run_dir / "final.pt").is_file():
            print(f"{run.name}: not trained yet, left out of the report", flush=True)
            continue
        ev = evaluate_run(run_dir, None if run.method == "teacher" else teacher_ckpt, grid.emission_delay_utts)
        for split in ("dev", "test"):  # eval.json written before per-character errors were kept
            hyps = run_dir / f"decode_{split}" / "hyps.txt"
            if f"{split}_utts_chars" not in ev and hyps.is_file():
                ev[f"{split}_utts_chars"] = _per_utt_errors(read_hyps(hyps))[1]
        train_report = json.loads((run_dir / "final.json").read_text())
        rows.append({"run": run.name, "method": run.method, "chunk": run.chunk, "seed": run.seed,
                     "steps": train_report.get("steps"), **ev})
    return rows
