"""The experiment grid: a teacher, then students of every method, chunk size
and seed, all on the same data with the same steps.

A grid is a YAML file (``configs/experiments/*.yaml``)::

    name: paper
    out_dir: exp/paper              # one folder per run below it
    results_dir: results/paper      # what `streamkd report` writes
    corpus: {out: data/corpus, hours: 2.0, seed: 0}   # built when missing
    teacher: ../demo/teacher.yaml   # paths relative to the grid file
    # or, instead of training one: a trained teacher as `streamkd pretrained`
    # writes it (teacher.pt beside lang/); students then use its lang dir
    # teacher_checkpoint: ../../pretrained/teacher.pt
    methods:                        # name -> student config (+ overrides)
      none: {config: ../demo/student_none.yaml}
      aux-no-apc: {config: ../demo/student_aux.yaml, overrides: [kd.gamma=0]}
    chunks:                         # name -> chunk frames and left chunks
      160ms: {chunk_frames: 4, left_chunks: 8}
    seeds: [0, 1, 2]
    overrides: [train.max_steps=3000]   # applied to every run
    only: {aux-no-apc: {chunks: [160ms], seeds: [0]}}  # restrict a method
    lm: {out: exp/lm/lm12, alpha: 0.8}  # also score every run through an HLG graph
    unseen_dev: {out: data/dev_ked, voices: [festival_ked_diphone]}  # and on unseen voices

Runs are resumable: a run whose ``final.json`` exists is skipped, one with
checkpoints resumes. Test data is only scored, never used for a choice.

Each scored student also leaves its *record* in the grid's results folder
(``results/<grid>/runs/<run>.json.gz``, committed with the results): its
row of the report with the per-utterance errors, its ``final.json``, its
dev curve and its first test hypotheses. On a machine without the run's
folder (``exp/`` is not committed) the record stands for the run: the grid
does not train it again and the report reads it. Delete a record to have
its run trained and scored again.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

from streamkd.atomic import write_atomic
from streamkd.config import Config, ConfigError, DataConfig, from_dict, load_config, read_yaml
from streamkd.corpus import build_corpus, respeak_manifest
from streamkd.corpus.voices import check_speaker_perturb
from streamkd.errors import DataError
from streamkd.lm.build import ARPA_FILE, build_lm, gather_text
from streamkd.lm.graph import GRAPH_META_FILE, GraphWeights, build_graph
from streamkd.tokenizer import load_tokenizer
from streamkd.train import train

__all__ = ["Grid", "GridFile", "LMSpec", "RunSpec", "load_grid", "plan_runs", "run_grid", "build_config",
           "ensure_lm", "ensure_unseen_dev", "grid_lang", "students_data", "record_path", "read_record", "write_record"]


@dataclass(frozen=True)
class MethodSpec:
    config: str  # the student's config file (relative to the grid file)
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChunkSpec:
    chunk_frames: int  # encoder frames per chunk
    left_chunks: Optional[int] = None  # None: unbounded left context


@dataclass(frozen=True)
class OnlySpec:
    """Restricts a method (an ablation) to some chunks and seeds; None: all."""

    chunks: Optional[tuple[str, ...]] = None
    seeds: Optional[tuple[int, ...]] = None


@dataclass(frozen=True)
class CorpusSpec:
    out: str = "data/corpus"
    hours: float = 1.0
    seed: int = 0
    extra_voices: bool = False  # also train on streamkd.corpus.voices.EXTRA_VOICES
    more_voices: bool = False  # also train on streamkd.corpus.voices.MORE_VOICES (`make voices`)
    speaker_perturb: Optional[tuple[float, float]] = None  # train/dev speaker factor range, e.g. [0.85, 1.15]

    def __post_init__(self) -> None:
        if self.speaker_perturb is not None:
            check_speaker_perturb(self.speaker_perturb, "corpus.speaker_perturb")


@dataclass(frozen=True)
class LMSpec:
    """The word LM every run is also scored with: a KenLM n-gram of the
    students' training transcripts (and the fortunes sentences; dev and test
    sentences held out), compiled with the teacher's tokens into an HLG
    graph with the weights baked in, searched by Kaldi's FasterDecoder
    (``streamkd decode --graph``). One graph for every run: the weights are
    chosen on dev once, never per method. Built when missing."""

    out: str = "exp/lm/grid"  # the LM folder (`streamkd lm build`)
    order: int = 4
    fortunes: bool = True
    alpha: float = 0.8  # LM weight
    beta: float = 0.0  # word insertion bonus
    beam: float = 20.0  # decoder beam (cost units)
    max_active: int = 7000  # graph states kept per frame

    @property
    def graph_dir(self) -> Path:
        return Path(self.out) / f"graph_a{self.alpha:g}_b{self.beta:g}"


@dataclass(frozen=True)
class UnseenDevSpec:
    """A second dev set: the students' dev sentences spoken again by voices
    no split of the corpus uses (``streamkd corpus respeak``), to see on dev,
    not on test, how the models carry over to new voices. Built when missing."""

    out: str  # folder of its manifest.jsonl and audio
    voices: tuple[str, ...] = ("festival_ked_diphone",)


@dataclass(frozen=True)
class GridFile:
    """A grid file as written, checked by the typed config loader."""

    name: str
    methods: dict[str, MethodSpec]
    chunks: dict[str, ChunkSpec]
    teacher: Optional[str] = None  # the teacher's config file (relative to the grid file), to train it
    teacher_checkpoint: Optional[str] = None  # or a trained teacher, with its lang/ beside it
    out_dir: Optional[str] = None  # default exp/<name>
    results_dir: Optional[str] = None  # default results/<name>
    corpus: Optional[CorpusSpec] = None  # built when missing
    teacher_overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    overrides: tuple[str, ...] = ()  # applied to every run
    only: dict[str, OnlySpec] = field(default_factory=dict)
    emission_delay_utts: int = 50
    metric: Literal["wer", "cer"] = "wer"  # what relative reduction, gap closed and the bootstrap use
    lm: Optional[LMSpec] = None  # also score every run with this word LM
    unseen_dev: Optional[UnseenDevSpec] = None  # also score every run on a dev set of unseen voices

    def __post_init__(self) -> None:
        if (self.teacher is None) == (self.teacher_checkpoint is None):
            raise ConfigError("give exactly one of teacher (a config to train) and teacher_checkpoint "
                              "(a trained teacher)")
        if self.teacher_checkpoint is not None and self.teacher_overrides:
            raise ConfigError("teacher_overrides need a teacher to train; teacher_checkpoint is already trained")
        if not self.chunks or not self.seeds:
            raise ConfigError("chunks and seeds each need at least one entry (the first is the headline)")
        for name in self.only:
            if name not in self.methods:
                raise ConfigError(f"only.{name} names no method; methods are {sorted(self.methods)}")


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    name: str  # folder name under the grid's out_dir
    method: str  # 'teacher' or a key of the grid's methods
    config: Optional[Path]  # None: the grid's trained teacher, not trained here
    overrides: tuple[str, ...]
    chunk: Optional[str] = None
    seed: int = 0


@dataclass(frozen=True)
class Grid:
    """A grid with its paths resolved: config files against the grid
    file's folder, output folders defaulted."""

    path: Path
    spec: GridFile
    teacher: Optional[Path]  # the teacher's config; None when the grid gives a trained teacher
    methods: dict[str, Path]  # method -> student config
    out_dir: Path
    results_dir: Path
    pretrained: Optional[Path] = None  # the trained teacher's checkpoint (teacher_checkpoint)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def teacher_checkpoint(self) -> Path:
        """The teacher the students learn from and are compared with."""
        return self.pretrained or self.out_dir / "teacher" / "final.pt"

    @property
    def teacher_lang(self) -> Optional[Path]:
        """The trained teacher's language directory, which its students must
        share (its tokens and CMVN); None when the grid trains the teacher."""
        return None if self.pretrained is None else self.pretrained.parent / "lang"

    @property
    def metric(self) -> str:
        return self.spec.metric


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file; every error names the key and the file."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    spec = from_dict(read_yaml(path), GridFile, src=str(path))
    here = path.parent
    pretrained = None
    if spec.teacher_checkpoint is not None:
        pretrained = (here / spec.teacher_checkpoint).resolve()
        for need in (pretrained, pretrained.parent / "lang" / "lang.json"):
            if not need.is_file():
                raise ConfigError(f"{path}: teacher_checkpoint: {need} does not exist; write it with "
                                  f"`streamkd pretrained --checkpoint FINAL.pt --out {pretrained.parent}`")
    return Grid(
        path=path, spec=spec, teacher=None if spec.teacher is None else (here / spec.teacher).resolve(),
        methods={name: (here / m.config).resolve() for name, m in spec.methods.items()},
        out_dir=Path(spec.out_dir or f"exp/{spec.name}"),
        results_dir=Path(spec.results_dir or f"results/{spec.name}"),
        pretrained=pretrained,
    )


def plan_runs(grid: Grid) -> list[RunSpec]:
    """The teacher first, then every (method, chunk, seed) the grid allows,
    in the order that answers the most per run if the grid is cut short:

    1. the main methods at the first chunk size (the headline), every seed:
       the claim over seeds;
    2. every method once, on the first seed: the main methods at each other
       chunk size, then the methods that ``only`` restricts (controls and
       ablations, in the grid file's order), at each chunk size;
    3. the remaining seeds at the other chunk sizes, main methods first.
    """
    spec = grid.spec
    teacher_dir = grid.out_dir / "teacher"
    runs = [RunSpec("teacher", "teacher", grid.teacher,
                    () if grid.teacher is None else
                    spec.overrides + spec.teacher_overrides + (f"train.out_dir={teacher_dir}",))]
    main = [m for m in spec.methods if m not in spec.only]
    restricted = [m for m in spec.methods if m in spec.only]
    headline, *other_chunks = spec.chunks
    first_seed, *more_seeds = spec.seeds
    order = [(m, headline, s) for s in spec.seeds for m in main]
    order += [(m, c, first_seed) for c in other_chunks for m in main]
    order += [(m, c, first_seed) for c in spec.chunks for m in restricted]
    order += [(m, c, s) for c in other_chunks for s in more_seeds for m in main]
    order += [(m, c, s) for c in spec.chunks for s in more_seeds for m in restricted]
    for method, chunk_name, seed in order:
        only = spec.only.get(method, OnlySpec())
        if (only.chunks is None or chunk_name in only.chunks) and (only.seeds is None or seed in only.seeds):
            runs.append(_run_spec(grid, method, chunk_name, seed))
    return runs


def _run_spec(grid: Grid, method: str, chunk_name: str, seed: int) -> RunSpec:
    chunk = grid.spec.chunks[chunk_name]
    name = f"{method}_{chunk_name}_seed{seed}"
    left = chunk.left_chunks
    ovr = grid.spec.overrides + grid.spec.methods[method].overrides + (
        f"model.chunk.chunk_frames={chunk.chunk_frames}",
        f"model.chunk.left_chunks={'null' if left is None else left}",
        f"train.seed={seed}", f"train.out_dir={grid.out_dir / name}",
        f"kd.teacher={grid.teacher_checkpoint}",
    ) + (() if grid.teacher_lang is None else (f"data.lang_dir={grid.teacher_lang}",))
    return RunSpec(name, method, grid.methods[method], ovr, chunk_name, seed)


def build_config(run: RunSpec) -> Config:
    """The Config of one run: its config file, then the grid's overrides."""
    return load_config(run.config, run.overrides, overrides_from=f"grid override (run {run.name})")


def ensure_corpus(grid: Grid) -> None:
    """Build the embedded corpus the grid names, unless it is there."""
    corpus = grid.spec.corpus
    if corpus is None:
        return
    out = Path(corpus.out)
    if (out / "train.jsonl").is_file() and (out / "summary.json").is_file():
        # A summary.json from before the voice options has neither key: it was built without them.
        summary = json.loads((out / "summary.json").read_text())
        built = {"hours": summary.get("hours_requested"), "seed": summary.get("seed"),
                 "extra_voices": summary.get("extra_voices", False), "more_voices": summary.get("more_voices", False),
                 "speaker_perturb": summary.get("speaker_perturb")}
        asked = {"hours": corpus.hours, "seed": corpus.seed, "extra_voices": corpus.extra_voices,
                 "more_voices": corpus.more_voices,
                 "speaker_perturb": list(corpus.speaker_perturb) if corpus.speaker_perturb else None}
        if built != asked:
            raise ConfigError(f"corpus {out} was built with {built}, but the grid {grid.path} asks for {asked}: "
                              "point corpus.out at another folder or delete that corpus")
        return
    build_corpus(out, hours=corpus.hours, seed=corpus.seed, extra_voices=corpus.extra_voices,
                 more_voices=corpus.more_voices, speaker_perturb=corpus.speaker_perturb)


def ensure_lm(grid: Grid) -> Optional[LMSpec]:
    """Build the grid's word LM and its HLG graph, unless they are there;
    returns the grid's LM spec (None: the grid has no LM)."""
    lm = grid.spec.lm
    if lm is None:
        return None
    out = Path(lm.out)
    if not (out / ARPA_FILE).is_file():
        data = students_data(grid)
        held_out = [m for m in (data.dev_manifest, data.test_manifest) if m]
        build_lm(out, gather_text([data.train_manifest], held_out, fortunes=lm.fortunes), order=lm.order)
    if not (lm.graph_dir / GRAPH_META_FILE).is_file():
        lang = grid_lang(grid)
        build_graph(out, load_tokenizer(lang), lm.graph_dir, weights=GraphWeights(lm.alpha, lm.beta),
                    source=f"the grid's teacher ({lang})")
    return lm


def ensure_unseen_dev(grid: Grid) -> Optional[Path]:
    """The manifest of the grid's unseen-voice dev set, spoken when missing
    (None: the grid has none)."""
    spec = grid.spec.unseen_dev
    if spec is None:
        return None
    manifest = Path(spec.out) / "manifest.jsonl"
    if not manifest.is_file():
        respeak_manifest(students_data(grid).dev_manifest, list(spec.voices), spec.out)
    return manifest


def students_data(grid: Grid) -> Optional[DataConfig]:
    """The data section every student of the grid trains and is scored on
    (None: the grid has no students)."""
    runs = plan_runs(grid)
    return build_config(runs[1]).data if len(runs) > 1 else None


def grid_lang(grid: Grid) -> Path:
    """The language directory (tokens, CMVN) of the grid's teacher, which
    every student shares."""
    return grid.teacher_lang or Path(build_config(plan_runs(grid)[0]).data.lang_dir)


def record_path(grid: Grid, run: str) -> Path:
    """Where the grid keeps the record of ``run`` (see the module's doc)."""
    return grid.results_dir / "runs" / f"{run}.json.gz"


def write_record(path: Path, row: dict) -> None:
    """A run's report row as its gzipped JSON record, atomically; the same
    row gives the same bytes (no time stamp in the gzip header)."""
    write_atomic(path, gzip.compress(json.dumps(row, sort_keys=True).encode(), mtime=0))


def read_record(path: Path) -> dict:
    """A record back into its row; DataError naming the file when it is not
    one."""
    try:
        row = json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a run record ({e}); restore it from git or delete it to train the run "
                        "again") from e
    if not isinstance(row, dict) or "run" not in row or "final" not in row:
        raise DataError(f"{path}: not a run record (no 'run' or 'final' key); restore it from git or delete it "
                        "to train the run again")
    return row


def _run_status(out: Path, limits, record: Path) -> tuple[str, dict]:
    """The run's status and the report it was read from: 'done' when
    final.json (or, with no final.json on this machine, the run's record:
    'recorded') reports the run's limits reached, 'resume' when checkpoints
    exist (also a finished run whose train.max_epochs or max_steps were
    raised since), else 'new'."""
    final = out / "final.json"
    if final.is_file():
        report = json.loads(final.read_text())
    elif record.is_file():
        report = read_record(record)["final"]
    else:
        report = {}
    if report.get("epochs", 0) >= limits.max_epochs or report.get("steps", 0) >= limits.max_steps:
        return ("done" if final.is_file() else "recorded"), report
    return ("resume" if any(out.glob("ckpt-*.pt")) else "new"), report


def run_grid(grid: Grid, *, dry_run: bool = False, progress: bool = True,
             names: Optional[list[str]] = None, on_finished: Optional[Callable[[RunSpec], None]] = None) -> list[dict]:
    """Train every run of the grid that is not finished (or only the runs
    ``names``, in that order); returns their reports. ``on_finished(run)``
    (``streamkd experiment`` scores the run and writes its record) is called
    for each run as soon as it is trained, and for each finished run whose
    record is missing or older than its ``final.json``, before the next run
    trains: a grid stopped any time after a run's training leaves no run
    that is trained but unrecorded for long."""
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
        if run.config is None:
            print(f"[{i + 1}/{len(runs)}] {run.name}: trained already ({grid.teacher_checkpoint})", flush=True)
            continue
        cfg = build_config(run)  # every config is checked before anything trains
        out = Path(cfg.train.out_dir)
        final = out / "final.json"
        record = record_path(grid, run.name)
        status, report = _run_status(out, cfg.train, record)
        print(f"[{i + 1}/{len(runs)}] {run.name}: {status}" + (f" ({record})" if status == "recorded" else ""),
              flush=True)
        if dry_run:
            continue
        if status not in ("done", "recorded"):  # a recorded run was trained on another machine
            train(cfg, resume=status == "resume", progress=progress)
            report = json.loads(final.read_text())
        if on_finished is not None and status != "recorded" and (
                not record.is_file() or record.stat().st_mtime < final.stat().st_mtime):
            on_finished(run)
        report.update({"run": run.name, "method": run.method, "chunk": run.chunk, "seed": run.seed,
                       "out_dir": str(out)})
        reports.append(report)
    return reports
