"""The training loop: one loop for the teacher, every student and every
distillation method (the objective decides what is computed).

Single process on CPU by default; ``torchrun --nproc_per_node N`` runs it
under DDP (gloo on CPU, nccl on CUDA). A run resumes exactly from its last
checkpoint (``resume=True``): model, objective extras, optimizer,
scheduler, sampler position and RNG states are restored, so on CPU a run
killed and resumed reaches the same weights as one never interrupted.

Files in ``train.out_dir``: ``ckpt-<step>.pt`` (training checkpoints, the
last ``keep_checkpoints`` kept), ``epoch-<e>.pt`` (inference checkpoints of
the ``keep_best`` best epochs by ``train.select_metric`` on dev),
``final.pt`` (their average),
``log.csv``, ``valid.csv``, ``tb/`` (TensorBoard), ``config.yaml``,
``final.json`` (dev/test WER of ``final.pt``).
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from streamkd.atomic import write_atomic
from streamkd.checkpoint import (average_state_dicts, build_model, inference_checkpoint,
                                 load_checkpoint, save_atomic)
from streamkd.config import Config, DataConfig, OptimConfig, TrainConfig, to_dict
from streamkd.dataset import make_dataloader
from streamkd.decode import error_rates, make_search, manifest_log_probs, search_scores
from streamkd.errors import CheckpointError, ConfigError
from streamkd.features import load_cmvn
from streamkd.kd import build_objective
from streamkd.lang import check_lang, prepare_lang
from streamkd.runtime import keep_freed_memory
from streamkd.tokenizer import load_tokenizer
from streamkd.types import Skip, count_reasons

__all__ = ["train", "make_scheduler", "validate", "TrainProgress"]

_CKPT_RE = re.compile(r"ckpt-(\d+)\.pt$")


@dataclass
class TrainProgress:
    """Where a run is: saved in every training checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batches_in_epoch: int = 0  # batches of the current epoch consumed
    skipped: int = 0  # items the loader could not use, so far (each epoch counts its own)
    skipped_reasons: dict = field(default_factory=dict)  # reason -> items, so far
    epoch_skipped: dict = field(default_factory=dict)  # reason -> items, this epoch
    best: list = field(default_factory=list)  # [(dev value of select_metric, epoch, path)] kept
    select_metric: str = "wer"  # what ``best`` ranks by (checkpoints from before the choice: wer)
    done: bool = False


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """Linear warm-up to ``lr``, then noam (1/sqrt decay), cosine (to 0 at
    max_steps) or constant."""
    warm = max(1, cfg.warmup_steps)

    def factor(step: int) -> float:
        s = step + 1
        if s <= warm:
            return s / warm
        if cfg.schedule == "noam":
            return math.sqrt(warm / s)
        if cfg.schedule == "cosine":
            frac = min(1.0, (s - warm) / max(1, max_steps - warm))
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _setup_distributed(train_cfg: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want = train_cfg.device
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device(want if want not in ("auto", "cuda") else "cpu")
    if train_cfg.num_threads > 0:
        torch.set_num_threads(train_cfg.num_threads)
    if device.type == "cpu":
        keep_freed_memory()  # no page faults through every large activation at every step
    return rank, world, device


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _load_lang(data: DataConfig, rank: int, world: int):
    """Tokenizer and CMVN from ``data.lang_dir``; prepared from the training
    manifest first when the folder does not exist yet, and checked against
    ``data`` (the CMVN must be of these very features)."""
    lang = Path(data.lang_dir)
    if rank == 0 and not (lang / "cmvn.json").is_file():
        print(f"lang dir {lang} not found: preparing it from {data.train_manifest}", flush=True)
        prepare_lang(data)
    _barrier(world)
    check_lang(lang, data)
    tokenizer = load_tokenizer(lang)
    mean, istd = load_cmvn(lang / "cmvn.json")
    cmvn = {"mean": [float(v) for v in mean], "istd": [float(v) for v in istd]}
    return tokenizer, cmvn


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def latest_checkpoint(out_dir: str | Path) -> Optional[Path]:
    """The training checkpoint with the highest step in ``out_dir``."""
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob("ckpt-*.pt") if (m := _CKPT_RE.search(p.name))]
    return max(found)[1] if found else None


class _Run:
    """State of one training run; methods are the loop's pieces."""

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device, progress: bool):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.out = Path(cfg.train.out_dir)
        self.show_progress = progress and rank == 0
        _seed_all(cfg.train.seed)
        self.tokenizer, self.cmvn = _load_lang(cfg.data, rank, world)
        self.student = build_model(cfg, self.tokenizer, self.cmvn).to(device)
        self.objective = build_objective(cfg.kd, cfg.data, self.student, device).to(device)
        self.module = self.objective
        if world > 1:
            self.module = torch.nn.parallel.DistributedDataParallel(
                self.objective, find_unused_parameters=True)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.objective.parameters() if p.requires_grad],
            lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay,
            fused=True)  # one kernel over all parameters: ~5x cheaper than the default on CPU
        self.scheduler = make_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.loader, self.sampler = make_dataloader(
            cfg.data, cfg.data.train_manifest, self.tokenizer, train=True,
            seed=cfg.train.seed, rank=rank, world_size=world)
        # The loader draws its worker seeds from its own generator, so that
        # creating an iterator mid-epoch on resume leaves the global RNG
        # (dropout, dynamic chunk draws) exactly where the checkpoint left it.
        self.loader.generator = torch.Generator().manual_seed(cfg.train.seed)
        self.progress = TrainProgress(select_metric=cfg.train.select_metric)
        self.amp_device = device.type
        self.amp = (cfg.train.amp and device.type == "cuda") or (cfg.train.amp_cpu and device.type == "cpu")
        self.writer = None
        self.num_params = sum(p.numel() for p in self.student.parameters())

    # -- checkpoints -------------------------------------------------------
    def save(self) -> Path:
        extras = {k: v for k, v in self.objective.state_dict().items() if not k.startswith("student.")}
        ckpt = inference_checkpoint(self.cfg, self.student.state_dict(), self.tokenizer.state_dict(), self.cmvn)
        ckpt.update({
            "kind": "train",
            "objective_extras": extras,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            "progress": asdict(self.progress),
        })
        path = self.out / f"ckpt-{self.progress.step}.pt"
        save_atomic(ckpt, path)
        kept = sorted(self.out.glob("ckpt-*.pt"), key=lambda p: int(_CKPT_RE.search(p.name).group(1)))
        for old in kept[: max(0, len(kept) - self.cfg.train.keep_checkpoints)]:
            old.unlink(missing_ok=True)
        return path

    def restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        self.student.load_state_dict(ckpt["model"])
        extras = ckpt.get("objective_extras", {})
        if extras:
            missing, unexpected = self.objective.load_state_dict(
                {**{f"student.{k}": v for k, v in ckpt["model"].items()}, **extras}, strict=False)
            if unexpected:
                raise CheckpointError(f"{path}: objective state has unexpected keys {unexpected[:5]}; "
                                      "resume with the kd config the run started with")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.progress = TrainProgress(**ckpt["progress"])
        _set_rng_state(ckpt["rng"])
        if self.rank == 0:
            print(f"resumed from {path} at step {self.progress.step}, epoch {self.progress.epoch}", flush=True)
            if self.progress.select_metric != self.cfg.train.select_metric:
                print(f"this run ranks its epochs by dev {self.progress.select_metric} as it began; "
                      f"train.select_metric={self.cfg.train.select_metric} applies to new runs", flush=True)

    def init_weights(self, path: str) -> None:
        """Fine-tuning: the student's weights from ``path``; the optimizer,
        schedule and progress start fresh."""
        ckpt = load_checkpoint(path, map_location=self.device)
        weights = ckpt["model"]
        if self.cfg.train.init_new_tokens:
            # Another token set: the encoder carries over, the output layer
            # starts from this run's initialisation.
            head = {k: v for k, v in self.student.state_dict().items() if k.startswith("ctc_head.")}
            weights = {**{k: v for k, v in weights.items() if not k.startswith("ctc_head.")}, **head}
        elif ckpt.get("tokenizer") != self.tokenizer.state_dict():
            raise ConfigError(f"train.init_from: {path} was trained on other tokens than data.lang_dir "
                              f"{self.cfg.data.lang_dir}; point data.lang_dir at the lang dir it was trained with, "
                              "or set train.init_new_tokens=true to start the output layer afresh")
        try:
            self.student.load_state_dict(weights)
        except RuntimeError as err:
            lines = str(err).strip().splitlines()
            why = lines[1].strip() if len(lines) > 1 else lines[0]
            raise ConfigError(f"train.init_from: {path} does not fit this model ({why}); "
                              "the model section must match the checkpoint's") from None
        # The model normalises with the checkpoint's CMVN now; checkpoints
        # written by this run must say so.
        self.cmvn = ckpt["cmvn"]
        if self.rank == 0:
            fresh = " (output layer fresh: new tokens)" if self.cfg.train.init_new_tokens else ""
            print(f"initialised from {path}{fresh}", flush=True)

    # -- logging -----------------------------------------------------------
    def log(self, row: dict, name: str = "log.csv") -> None:
        if self.rank != 0:
            return
        path = self.out / name
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        if self.writer is None:
            self.writer = SummaryWriter(str(self.out / "tb"))
        prefix = "valid/" if name == "valid.csv" else "train/"
        for k, v in row.items():
            if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                self.writer.add_scalar(prefix + k, v, row["step"])

    # -- one optimizer step --------------------------------------------------
    def train_step(self, batches: list) -> dict:
        self.objective.train()
        totals: dict[str, float] = {}
        for batch in batches:
            batch = batch.to(self.device)
            with torch.autocast(self.amp_device, dtype=torch.bfloat16, enabled=self.amp):
                losses = self.module(batch)
            (losses["loss"] / len(batches)).backward()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + float(v.detach()) / len(batches)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in self.objective.parameters() if p.grad is not None], self.cfg.optim.grad_clip)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:
            print(f"step {self.progress.step}: non-finite gradient norm, update skipped", flush=True)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        totals["grad_norm"] = float(grad_norm)
        return totals

    def count_skips(self, skipped: list[Skip]) -> None:
        prog = self.progress
        prog.skipped += len(skipped)
        for reason, n in count_reasons(skipped).items():
            prog.skipped_reasons[reason] = prog.skipped_reasons.get(reason, 0) + n
            prog.epoch_skipped[reason] = prog.epoch_skipped.get(reason, 0) + n

    # -- the epoch loop ------------------------------------------------------
    def run_epoch(self) -> None:
        cfg, prog = self.cfg, self.progress
        self.sampler.set_epoch(prog.epoch)
        if prog.batches_in_epoch:
            # The trainer's own count: with workers the sampler runs ahead.
            self.sampler.load_state_dict(self.sampler.state_dict(batches_done=prog.batches_in_epoch))
        bar = None
        if self.show_progress:
            bar = tqdm(total=len(self.sampler), initial=prog.batches_in_epoch,
                       desc=f"epoch {prog.epoch}", unit="batch", dynamic_ncols=True)
        pending, audio_sec, t0 = [], 0.0, time.perf_counter()
        shift = cfg.data.features.frame_shift_ms / 1000.0
        if prog.batches_in_epoch == 0:
            prog.epoch_skipped = {}
            self.count_skips(self.sampler.skipped)  # too long: left out before batching
        for batch in self.loader:
            prog.batches_in_epoch += 1
            self.count_skips(batch.skipped)
            if bar is not None:
                bar.update(1)
            if len(batch) == 0:
                continue
            pending.append(batch)
            audio_sec += float(batch.feat_lens.sum()) * shift
            if len(pending) < cfg.optim.accum_steps:
                continue
            totals = self.train_step(pending)
            pending = []
            prog.step += 1
            if prog.step % cfg.train.log_every == 0 or prog.step == 1:
                elapsed = time.perf_counter() - t0
                row = {"step": prog.step, "epoch": prog.epoch, "lr": self.scheduler.get_last_lr()[0],
                       **{k: round(v, 5) for k, v in totals.items()},
                       "audio_sec_per_sec": round(audio_sec * self.world / max(elapsed, 1e-9), 2)}
                self.log(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{totals['loss']:.3f}", aps=row["audio_sec_per_sec"])
                audio_sec, t0 = 0.0, time.perf_counter()
            if prog.step % cfg.train.ckpt_every == 0 and self.rank == 0:
                self.save()
            if prog.step >= cfg.train.max_steps:
                break
        if bar is not None:
            bar.close()

    def limits_reached(self) -> bool:
        prog, limits = self.progress, self.cfg.train
        return prog.step >= limits.max_steps or prog.epoch >= limits.max_epochs

    def end_epoch(self) -> None:
        """Validate, keep the best epoch checkpoints, write a training
        checkpoint at the epoch boundary."""
        prog, cfg = self.progress, self.cfg
        finished_epoch = prog.batches_in_epoch >= len(self.sampler)
        if self.rank == 0:
            dev = validate(self.student, cfg.data, cfg.data.dev_manifest, self.device, cfg.train.valid_max_utts)
            self.log({"step": prog.step, "epoch": prog.epoch, **{k: dev[k] for k in ("loss", "wer", "cer")}},
                     "valid.csv")
            print(f"epoch {prog.epoch} step {prog.step}: dev loss {dev['loss']:.4f} "
                  f"WER {100 * dev['wer']:.2f}% CER {100 * dev['cer']:.2f}%", flush=True)
            print(f"epoch {prog.epoch}: {_skip_line(prog.epoch_skipped, 'training')}; "
                  f"{_skip_line(dev['skipped_reasons'], 'dev')}", flush=True)
            path = self.out / f"epoch-{prog.epoch}.pt"
            save_atomic(inference_checkpoint(cfg, self.student.state_dict(),
                                             self.tokenizer.state_dict(), self.cmvn), path)
            # On a tie the later epoch ranks first: it has seen more data.
            prog.best = sorted(prog.best + [[dev[prog.select_metric], prog.epoch, str(path)]],
                               key=lambda entry: (entry[0], -entry[1]))
            for _, _, old in prog.best[cfg.train.keep_best:]:
                Path(old).unlink(missing_ok=True)
            prog.best = prog.best[: cfg.train.keep_best]
        if finished_epoch:
            prog.epoch += 1
            prog.batches_in_epoch = 0
        prog.done = self.limits_reached()
        if self.rank == 0:
            self.save()
        _barrier(self.world)

    def finish(self) -> dict:
        """Average the best epochs into final.pt and score it on dev and test."""
        cfg = self.cfg
        states = [load_checkpoint(p)["model"] for _, _, p in self.progress.best if Path(p).is_file()]
        if not states:
            states = [self.student.state_dict()]
        self.student.load_state_dict(average_state_dicts(states))
        save_atomic(inference_checkpoint(cfg, self.student.state_dict(), self.tokenizer.state_dict(),
                                         self.cmvn), self.out / "final.pt")
        report = {"params": self.num_params, "steps": self.progress.step, "epochs": self.progress.epoch,
                  "averaged": [p for _, _, p in self.progress.best], "selected_by": self.progress.select_metric,
                  "skipped_items": self.progress.skipped,
                  "skipped_reasons": self.progress.skipped_reasons}
        for split, manifest in (("dev", cfg.data.dev_manifest), ("test", cfg.data.test_manifest)):
            if manifest and Path(manifest).is_file():
                r = validate(self.student, cfg.data, manifest, self.device, 0)
                report[split] = {k: r[k] for k in ("wer", "cer", "loss", "utterances", "skipped",
                                                   "skipped_reasons")}
        write_atomic(self.out / "final.json", json.dumps(report, indent=2) + "\n")
        return report


def validate(model, data_cfg: DataConfig, manifest: str, device, max_utts: int = 0) -> dict:
    """CTC loss and greedy WER/CER of the (student) model on a manifest, in
    its own streaming mode (its chunk mask): ``decode_manifest``'s path."""
    was_training = model.training
    scores = manifest_log_probs(model, data_cfg, manifest, device=device, max_utts=max_utts, with_loss=True)
    model.train(was_training)
    rows, _ = search_scores(scores, model.tokenizer, lambda: make_search(1))
    rates = error_rates([r["ref"] for r in rows], [r["hyp"] for r in rows])
    rates.update({"loss": scores.ctc_loss, "skipped": len(scores.skipped),
                  "skipped_reasons": count_reasons(scores.skipped)})
    return rates


def _role(cfg: Config) -> str:
    """What a run trains, in words: a teacher is a full-context model without distillation."""
    if cfg.kd.method != "none":
        return f"a streaming student distilled with kd.method={cfg.kd.method}"
    if cfg.model.chunk is None and not cfg.model.dynamic_chunk:
        return "a full-context model (a teacher)"
    return "a streaming student without distillation"


def _skip_line(reasons: dict[str, int], what: str) -> str:
    """"12 training items skipped (longer than data.max_utt_sec: 10, ...)"."""
    total = sum(reasons.values())
    if not total:
        return f"no {what} items skipped"
    return f"{total} {what} items skipped (" + ", ".join(f"{r}: {n}" for r, n in reasons.items()) + ")"


def _check_inputs(cfg: Config, resume: bool) -> None:
    """Fail before any work on what would fail later: missing manifests or
    teacher, and an out_dir that holds another run's checkpoints (without
    --resume)."""
    for key in ("train_manifest", "dev_manifest"):
        path = getattr(cfg.data, key)
        if not Path(path).is_file():
            raise ConfigError(f"data.{key}: {path} does not exist; give the path of a JSONL manifest "
                              "(`streamkd import` or `streamkd corpus build` make one)")
    kd = cfg.kd
    if kd.method != "none" and kd.precomputed_dir is None and kd.teacher and not Path(kd.teacher).is_file():
        raise ConfigError(f"kd.teacher: {kd.teacher} does not exist; give the teacher's checkpoint "
                          "(its final.pt)")
    if cfg.train.init_from and not Path(cfg.train.init_from).is_file():
        raise ConfigError(f"train.init_from: {cfg.train.init_from} does not exist; give the checkpoint to "
                          "fine-tune from (a final.pt or pretrained/teacher.pt)")
    if not resume and latest_checkpoint(cfg.train.out_dir) is not None:
        raise ConfigError(f"train.out_dir: {cfg.train.out_dir} already holds checkpoints; pass --resume to "
                          "continue that run, or choose another train.out_dir")


def train(cfg: Config, *, resume: bool = False, progress: bool = True) -> dict:
    """Train the student described by ``cfg`` (a teacher is a student with
    full context and no KD). Returns the final report (also final.json)."""
    _check_inputs(cfg, resume)
    rank, world, device = _setup_distributed(cfg.train)
    run = _Run(cfg, rank, world, device, progress)
    out = run.out
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    last = latest_checkpoint(out) if resume else None
    if resume and last is None and rank == 0:
        print(f"--resume: no checkpoint in {out}, starting from scratch", flush=True)
    if last is None and cfg.train.init_from:
        run.init_weights(cfg.train.init_from)
    if last is not None:
        run.restore(last)
        # The limits are the config's, not the checkpoint's: a finished run
        # resumed with a larger train.max_epochs (or max_steps) goes on.
        run.progress.done = run.limits_reached()
    if rank == 0:
        print(f"training {_role(cfg)}: {run.num_params / 1e6:.2f}M parameters, "
              f"chunk {run.student.chunk}, {len(run.sampler)} batches/epoch, device {device}", flush=True)
    while not run.progress.done:
        run.run_epoch()
        run.end_epoch()
    report = run.finish() if rank == 0 else {}
    if run.writer is not None:
        run.writer.close()
    if world > 1:
        torch.distributed.destroy_process_group()
    return report
