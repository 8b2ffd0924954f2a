"""``streamkd bench``: the speed figures users compare toolkits on.

Training: audio seconds per second of the demo teacher and student, the
share of this machine's fp32 matmul peak (measured in the same run) a
training step reaches, the step time of each distillation method relative
to ``none``, and peak memory. Streaming (one thread): per-chunk compute and
RTF for PyTorch, our ONNX Runtime path and sherpa-onnx at two chunk sizes;
and how the cost per second of audio scales with input length, streaming
against full context. Models have random weights: speed does not depend on
what they learned.
"""
from __future__ import annotations

import json
import resource
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from streamkd.config import Config, load_config
from streamkd.types import Batch

__all__ = ["matmul_peak_gflops", "train_step_bench", "kd_method_bench", "run_bench"]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _timeit(fn: Callable[[], None], *, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def matmul_peak_gflops(n: int = 2048, reps: int = 10) -> dict:
    """fp32 (n x n) @ (n x n) through torch.mm on the current threads: the
    ceiling a training step's matrix products can reach here."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    times = _timeit(lambda: torch.mm(a, b), warmup=3, reps=reps)
    flops = 2.0 * n ** 3
    return {"n": n, "threads": torch.get_num_threads(), "gflops_best": flops / min(times) / 1e9,
            "gflops_median": flops / float(np.median(times)) / 1e9}


def synthetic_batch(batch: int, seconds: float, vocab: int, seed: int = 0) -> Batch:
    """Random fbank-like features and token labels of a fixed shape."""
    g = torch.Generator().manual_seed(seed)
    frames = int(seconds * 100)
    tokens = torch.randint(1, vocab, (batch, int(seconds * 8)), generator=g)
    return Batch(ids=[f"b{i}" for i in range(batch)], feats=torch.randn(batch, frames, 80, generator=g),
                 feat_lens=torch.full((batch,), frames), tokens=tokens,
                 token_lens=torch.full((batch,), tokens.size(1)))


def _model(cfg: Config, vocab: int):
    from streamkd.model import CTCModel

    return CTCModel(cfg.model, vocab, torch.zeros(80), torch.ones(80))


def _flops_of(fn: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def train_step_bench(cfg: Config, *, teacher=None, batch: Batch, vocab: int, reps: int = 5) -> dict:
    """Time forward + backward + AdamW step of ``cfg``'s objective on ``batch``."""
    from streamkd.kd.harness import build_objective

    torch.manual_seed(0)
    student = _model(cfg, vocab)
    objective = build_objective(cfg, student, "cpu", teacher=teacher).train()
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-4)

    def step():
        loss = objective(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = _timeit(step, warmup=2, reps=reps)
    flops = _flops_of(lambda: objective(batch)["loss"].backward())
    opt.zero_grad(set_to_none=True)
    sec = float(np.median(times))
    audio = float(batch.feat_lens.sum()) / 100.0
    return {"method": cfg.kd.method, "params": sum(p.numel() for p in student.parameters()),
            "step_sec": sec, "audio_sec_per_sec": audio / sec, "gflop_per_step": flops / 1e9,
            "achieved_gflops": flops / sec / 1e9}


def kd_method_bench(batch: Batch, vocab: int, reps: int = 4) -> list[dict]:
    """Step time of every distillation method relative to none (demo sizes)."""
    teacher_cfg = load_config(CONFIGS / "demo" / "teacher.yaml")
    torch.manual_seed(1)
    teacher = _model(teacher_cfg, vocab).eval()
    rows = []
    for name in ("none", "token", "layer", "aux", "aux_token"):
        cfg = load_config(CONFIGS / "demo" / f"student_{name}.yaml")
        rows.append(train_step_bench(cfg, teacher=teacher, batch=batch, vocab=vocab, reps=reps))
    base = rows[0]["step_sec"]
    for r in rows:
        r["relative_to_none"] = r["step_sec"] / base
    return rows


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
