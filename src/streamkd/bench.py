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
import multiprocessing as mp
import platform
import queue as queue_mod
import resource
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils import mkldnn
from torch.utils.flop_counter import FlopCounterMode

from streamkd.atomic import write_atomic
from streamkd.checkpoint import build_model, load_model
from streamkd.config import PACKAGED_CONFIGS, Config, load_config
from streamkd.features import Fbank
from streamkd.kd import build_objective, precompute_teacher
from streamkd.runtime import keep_freed_memory
from streamkd.streaming.export import export_wenet_ctc_onnx
from streamkd.streaming.ort import OrtStreamingRecognizer, SherpaStreamingRecognizer
from streamkd.streaming.recognizer import StreamingRecognizer
from streamkd.tokenizer import BLANK, CharTokenizer
from streamkd.types import Batch, ChunkConfig

__all__ = ["KD_METHODS", "matmul_peak_gflops", "train_step_bench", "kd_method_bench", "profile_step", "run_bench"]

CONFIGS = PACKAGED_CONFIGS


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
    """A model of ``cfg`` with ``vocab`` outputs (blank and letters), unit CMVN."""
    letters = [chr(ord("a") + i) for i in range(vocab - 1)]
    return build_model(cfg, CharTokenizer([BLANK, *letters]), {"mean": [0.0] * 80, "istd": [1.0] * 80})


def _flops_of(fn: Callable[[], None]) -> float:

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


# The demo configs of each distillation method: configs/demo/student_{name with + as _}.yaml
KD_METHODS = ("none", "token", "layer", "aux", "aux+token")


def _student_cfg(method: str, overrides=()) -> Config:
    return load_config(CONFIGS / "demo" / f"student_{method.replace('+', '_')}.yaml", list(overrides))


def _random_teacher(vocab: int):
    """The demo teacher with seeded random weights (speed does not depend on them)."""
    torch.manual_seed(1)
    return _model(load_config(CONFIGS / "demo" / "teacher.yaml"), vocab).eval()


def _training_step(cfg: Config, teacher, batch: Batch, vocab: int):
    """(student, objective, step): ``step()`` runs forward, backward and an
    AdamW update of ``cfg``'s objective on ``batch``."""
    torch.manual_seed(0)
    student = _model(cfg, vocab)
    objective = build_objective(cfg.kd, cfg.data, student, "cpu", teacher=teacher).train()
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-4, fused=True)  # as training does

    def step():
        loss = objective(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return student, objective, step


def train_step_bench(cfg: Config, *, teacher=None, batch: Batch, vocab: int, reps: int = 5) -> dict:
    """Time forward + backward + AdamW step of ``cfg``'s objective on ``batch``."""
    student, objective, step = _training_step(cfg, teacher, batch, vocab)
    times = _timeit(step, warmup=2, reps=reps)
    flops = _flops_of(lambda: objective(batch)["loss"].backward())
    objective.zero_grad(set_to_none=True)
    # Best of the repetitions, like the matmul peak it is compared with: on a
    # shared VM the slower repetitions measure the neighbours, not the code.
    sec = float(min(times))
    audio = float(batch.feat_lens.sum()) / 100.0
    return {"method": cfg.kd.method, "params": sum(p.numel() for p in student.parameters()),
            "step_sec": sec, "step_sec_median": float(np.median(times)), "audio_sec_per_sec": audio / sec,
            "gflop_per_step": flops / 1e9, "achieved_gflops": flops / sec / 1e9}


def kd_method_bench(batch: Batch, vocab: int, reps: int = 4) -> list[dict]:
    """Step time of every distillation method relative to none (demo sizes)."""
    teacher = _random_teacher(vocab)
    rows = [train_step_bench(_student_cfg(m), teacher=teacher, batch=batch, vocab=vocab, reps=reps)
            for m in KD_METHODS]
    rows.append(_aux_precomputed_row(teacher, batch, vocab, reps))
    # Where aux's extra time goes: layer - none is the teacher's forward,
    # this row - layer the branches, aux - this row the relation and APC losses.
    feat_only = train_step_bench(_student_cfg("aux", ["kd.beta=0", "kd.gamma=0"]), teacher=teacher, batch=batch,
                                 vocab=vocab, reps=reps)
    feat_only["method"] = "aux, feature loss only"
    rows.append(feat_only)
    bf16_teacher = train_step_bench(_student_cfg("aux", ["kd.teacher_bf16=true"]), teacher=teacher, batch=batch,
                                    vocab=vocab, reps=reps)
    bf16_teacher["method"] = "aux (kd.teacher_bf16)"
    rows.append(bf16_teacher)
    base = rows[0]["step_sec"]
    for r in rows:
        r["relative_to_none"] = r["step_sec"] / base
    return rows


def _aux_precomputed_row(teacher, batch: Batch, vocab: int, reps: int) -> dict:
    """aux with the teacher's outputs read from disk (kd.precomputed_dir):
    what a run without augmentation pays."""


    with tempfile.TemporaryDirectory() as tmp:
        cfg = _student_cfg("aux", [f"kd.precomputed_dir={tmp}", "data.spec_augment.enabled=false"])
        precompute_teacher(cfg.kd, cfg.data, teacher, student_layers=cfg.model.num_layers, batches=[batch])
        row = train_step_bench(cfg, teacher=teacher, batch=batch, vocab=vocab, reps=reps)
    row["method"] = "aux (teacher precomputed)"
    return row


def profile_step(method: str = "none", *, amp: bool = False, steps: int = 2, rows: int = 30,
                 threads: int = 2) -> str:
    """torch.profiler table (self CPU time, by operator and input shape) of
    ``steps`` training steps of the demo student with KD ``method`` on the
    benchmark batch: where a step's time goes."""
    torch.set_num_threads(threads)
    keep_freed_memory()  # as training does
    vocab, batch = 30, synthetic_batch(16, 4.0, 30)
    cfg = _student_cfg(method)
    teacher = _random_teacher(vocab) if cfg.kd.method != "none" else None
    _, _, step = _training_step(cfg, teacher, batch, vocab)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        for _ in range(6):  # the heap settles in a few steps (streamkd.runtime)
            step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                step()
    table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"# {steps} training steps, demo student, kd.method={method}, {'bf16 autocast' if amp else 'fp32'}, " \
           f"{threads} threads\n{table}"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _train_rows(amp: bool, batch: Batch, vocab: int) -> dict:
    """Teacher and student throughput, and every KD method relative to none."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        models = {}
        for name in ("teacher", "student_none"):
            cfg = load_config(CONFIGS / "demo" / f"{name}.yaml")
            models[name] = train_step_bench(cfg, batch=batch, vocab=vocab)
        methods = kd_method_bench(batch, vocab)
    return {"models": models, "kd_methods": methods}


def _train_worker(queue, amp: bool, threads: int, keep_freed: bool = True, only_none_aux: bool = False) -> None:
    """One precision's training figures, put on ``queue`` (or the error's
    traceback, so that the parent does not wait for a result that never comes)."""
    try:
        torch.set_num_threads(threads)
        applied = keep_freed_memory() if keep_freed else False
        batch = synthetic_batch(16, 4.0, 30)
        if only_none_aux:
            teacher = _random_teacher(30)
            rows = {m: train_step_bench(_student_cfg(m), teacher=teacher if m != "none" else None,
                                        batch=batch, vocab=30) for m in ("none", "aux")}
        else:
            rows = _train_rows(amp, batch, 30)
        rows["peak_rss_mb"] = _peak_rss_mb()
        rows["keep_freed_memory"] = applied
        queue.put(rows)
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        queue.put({"error": traceback.format_exc()})


def _in_fresh_process(threads: int, amp: bool, **kwargs) -> dict:
    """Run ``_train_worker`` in a spawned process (so its peak memory and its
    allocator settings are its own) and return its rows."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_train_worker, args=(queue, amp, threads), kwargs=kwargs)
    proc.start()
    while True:
        try:
            rows = queue.get(timeout=5.0)
            break
        except queue_mod.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the training bench worker exited with code {proc.exitcode} "
                                   "without a result") from None
    proc.join()
    if "error" in rows:
        raise RuntimeError("the training bench worker failed:\n" + rows["error"])
    return rows


def training_bench(threads: int = 2) -> dict:
    """fp32 and bf16-autocast training figures, each in a fresh process,
    against the fp32 matmul peak; and, for contrast, fp32 none and aux with
    glibc's default allocator settings (see streamkd.runtime)."""
    torch.set_num_threads(threads)
    peak = {"torch_mm": matmul_peak_gflops(), "onednn_linear": onednn_peak_gflops()}
    out = {"threads": threads, "batch": "16 x 4 s synthetic", "matmul_peak": peak}

    def add_shares(row: dict) -> None:
        row["share_of_mkl_peak"] = row["achieved_gflops"] / peak["torch_mm"]["gflops_best"]
        row["share_of_onednn_peak"] = row["achieved_gflops"] / peak["onednn_linear"]["gflops_best"]

    for label, amp in (("fp32", False), ("bf16_autocast", True)):
        rows = _in_fresh_process(threads, amp)
        for r in list(rows["models"].values()) + rows["kd_methods"]:
            add_shares(r)
        out[label] = rows
    rows = _in_fresh_process(threads, False, keep_freed=False, only_none_aux=True)
    for m in ("none", "aux"):
        add_shares(rows[m])
    out["fp32_default_malloc"] = rows
    return out


def onednn_peak_gflops(n: int = 2048, reps: int = 10) -> dict:
    """The same product through oneDNN's inner product (torch.utils.mkldnn):
    on AMD CPUs stock MKL sgemm takes a slow path, oneDNN does not."""
    lin = mkldnn.to_mkldnn(torch.nn.Linear(n, n, bias=False).eval())
    x = torch.randn(n, n).to_mkldnn()
    with torch.no_grad():
        times = _timeit(lambda: lin(x), warmup=3, reps=reps)
    return {"n": n, "threads": torch.get_num_threads(), "gflops_best": 2.0 * n ** 3 / min(times) / 1e9}


def _streaming_student(chunk_frames: int, left_chunks: int, checkpoint=None):
    """A demo-size student at this chunk (random weights unless a checkpoint
    is given: compute does not depend on the weights)."""
    if checkpoint is not None:
        model = load_model(checkpoint)
        model.chunk = ChunkConfig(chunk_frames, left_chunks)
        return model
    cfg = load_config(CONFIGS / "demo" / "student_none.yaml",
                      [f"model.chunk.chunk_frames={chunk_frames}", f"model.chunk.left_chunks={left_chunks}"])
    torch.manual_seed(0)
    model = build_model(cfg, CharTokenizer.train(["A"]), {"mean": [0.0] * 80, "istd": [1.0] * 80})
    return model.eval()


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise shaped in amplitude like speech (syllable-rate envelope): the
    cost of streaming does not depend on the content."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * np.arange(n) / 16000)
    return (0.1 * env * rng.standard_normal(n)).astype(np.float32)


def _stream(rec, audio: np.ndarray, piece: int = 1600) -> dict:
    rec.reset()
    for start in range(0, len(audio), piece):
        rec.accept_waveform(audio[start:start + piece], 16000)
    rec.finalize()
    return rec.latency_report()


def streaming_bench(work_dir: Path, audio_sec: float = 60.0, checkpoint=None, passes: int = 3) -> list[dict]:
    """Per-chunk compute and RTF on one thread, the same audio through
    PyTorch, our ONNX Runtime recognizer and sherpa-onnx, at 160 and 640 ms.
    Each backend streams the audio ``passes`` times; the row is the pass with
    the lowest RTF (its chunk percentiles), with the median RTF beside it."""
    torch.set_num_threads(1)
    audio = _speechlike(audio_sec)
    rows = []
    for chunk_frames, left in ((4, 8), (16, 2)):
        model = _streaming_student(chunk_frames, left, checkpoint)
        onnx_dir = work_dir / f"onnx_c{chunk_frames}"
        export_wenet_ctc_onnx(model, onnx_dir, chunk_frames=chunk_frames, left_chunks=left)
        recs = {"pytorch": StreamingRecognizer(model), "onnxruntime": OrtStreamingRecognizer(onnx_dir),
                "sherpa-onnx": SherpaStreamingRecognizer(onnx_dir, num_threads=1)}
        for backend, rec in recs.items():
            _stream(rec, audio[: 16000 * 5])  # warm-up
            reps = [_stream(rec, audio) for _ in range(passes)]
            rep = min(reps, key=lambda r: r["rtf"])
            rows.append({"backend": backend, "chunk_ms": chunk_frames * 40, "left_chunks": left,
                         "audio_sec": audio_sec, "passes": passes, "rtf": rep["rtf"],
                         "rtf_median_of_passes": float(np.median([r["rtf"] for r in reps])),
                         "chunk_ms_p50": rep["chunk_ms_p50"],
                         "chunk_ms_p95": rep["chunk_ms_p95"], "chunk_ms_max": rep["chunk_ms_max"],
                         "p95_share_of_chunk": rep["chunk_ms_p95"] / (chunk_frames * 40),
                         "algorithmic_latency_ms": rep["algorithmic_latency_ms"]["total_ms"]})
    return rows


@torch.inference_mode()
def scaling_bench(lengths_sec=(10.0, 60.0, 600.0), full_max_sec: float = 120.0, checkpoint=None) -> list[dict]:
    """Compute per second of audio against input length: streaming (640 ms
    chunks, bounded left context, one thread) stays flat; a full-context
    forward over the whole input grows (its attention is quadratic)."""
    torch.set_num_threads(1)
    model = _streaming_student(16, 2, checkpoint)
    rec = StreamingRecognizer(model)
    rows = []
    for sec in lengths_sec:
        audio = _speechlike(sec, seed=1)
        t0 = time.perf_counter()
        rep = _stream(rec, audio)
        rows.append({"mode": "streaming 640 ms", "audio_sec": sec, "compute_sec": time.perf_counter() - t0,
                     "rtf": rep["rtf"], "chunk_ms_p95": rep["chunk_ms_p95"],
                     "att_cache_frames": int(rec.state.att_cache.size(3))})

    fbank = Fbank(model.config.data.features)
    for sec in lengths_sec:
        if sec > full_max_sec:
            rows.append({"mode": "full context", "audio_sec": sec, "skipped": f"longer than {full_max_sec} s"})
            continue
        feats = fbank.compute(_speechlike(sec, seed=1))
        t0 = time.perf_counter()
        model(feats[None], torch.tensor([feats.size(0)]), chunk=None)
        dt = time.perf_counter() - t0
        rows.append({"mode": "full context", "audio_sec": sec, "compute_sec": dt, "rtf": dt / sec})
    return rows


def _targets(train: dict, stream: list[dict]) -> list[dict]:
    """The issue's targets for the demo student, each with its measured figure."""
    student = train["fp32"]["models"]["student_none"]
    aux = next(r for r in train["fp32"]["kd_methods"] if r["method"] == "aux")
    aux16 = next(r for r in train["bf16_autocast"]["kd_methods"] if r["method"] == "aux")
    student16 = train["bf16_autocast"]["models"]["student_none"]
    pre = next(r for r in train["fp32"]["kd_methods"] if r["method"] == "aux (teacher precomputed)")
    at640 = {r["backend"]: r for r in stream if r["chunk_ms"] == 640}
    rows = [
        ("training step >= 50% of fp32 matmul peak (MKL sgemm, torch.mm)", student["share_of_mkl_peak"], 0.5, ">="),
        ("training step >= 50% of fp32 matmul peak (oneDNN)", student["share_of_onednn_peak"], 0.5, ">="),
        ("training step (bf16 autocast, as configs/demo train) >= 50% of fp32 MKL peak",
         student16["share_of_mkl_peak"], 0.5, ">="),
        ("aux step time <= 1.4x none (fp32)", aux["relative_to_none"], 1.4, "<="),
        ("aux step time, teacher precomputed, <= 1.4x none (fp32)", pre["relative_to_none"], 1.4, "<="),
        ("aux step time, teacher under bf16 (kd.teacher_bf16), <= 1.4x none (fp32)",
         next(r for r in train["fp32"]["kd_methods"] if r["method"] == "aux (kd.teacher_bf16)")["relative_to_none"],
         1.4, "<="),
        ("aux step time <= 1.4x none (bf16 autocast)", aux16["relative_to_none"], 1.4, "<="),
        ("PyTorch streaming RTF at 640 ms <= 0.02", at640["pytorch"]["rtf"], 0.02, "<="),
        ("ONNX Runtime streaming RTF at 640 ms <= 0.01", at640["onnxruntime"]["rtf"], 0.01, "<="),
    ]
    rows += [(f"{b} p95 chunk compute < 10% of the chunk (640 ms)", at640[b]["p95_share_of_chunk"], 0.1, "<")
             for b in ("pytorch", "onnxruntime", "sherpa-onnx")]
    ok = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, "<": lambda v, t: v < t}
    return [{"target": name, "measured": value, "threshold": thr, "met": bool(ok[op](value, thr))}
            for name, value, thr, op in rows]


def _markdown(result: dict) -> str:
    t = result["training"]
    lines = ["# streamkd bench", "", f"Command: `streamkd bench` ({result['elapsed_sec']:.0f} s). "
             f"Machine: {result['machine']}.", "",
             f"fp32 matmul peak ({t['threads']} threads, 2048^3): torch.mm (MKL) "
             f"{t['matmul_peak']['torch_mm']['gflops_best']:.0f} GFLOP/s, oneDNN "
             f"{t['matmul_peak']['onednn_linear']['gflops_best']:.0f} GFLOP/s.", "",
             "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {r['target']} | {r['measured']:.3f} | {'yes' if r['met'] else 'NO'} |" for r in result["targets"]]
    lines += ["", "## Training (16 x 4 s batch, forward + backward + AdamW)", "",
              "| precision | model | params | audio s/s | GFLOP/s | share MKL peak | share oneDNN peak |",
              "|---|---|---|---|---|---|---|"]
    for label in ("fp32", "bf16_autocast"):
        for name, r in t[label]["models"].items():
            lines.append(f"| {label} | {name} | {r['params'] / 1e6:.2f}M | {r['audio_sec_per_sec']:.0f} | "
                         f"{r['achieved_gflops']:.0f} | {r['share_of_mkl_peak']:.2f} | {r['share_of_onednn_peak']:.2f} |")
    lines += ["", "Step times are the best of the repetitions (medians in training.json), like the peak.", "",
              "| precision | method | step s | relative to none | peak RSS MB (process) |", "|---|---|---|---|---|"]
    for label in ("fp32", "bf16_autocast"):
        for r in t[label]["kd_methods"]:
            lines.append(f"| {label} | {r['method']} | {r['step_sec']:.3f} | {r['relative_to_none']:.2f} | "
                         f"{t[label]['peak_rss_mb']:.0f} |")
    d = t["fp32_default_malloc"]
    kept = {r["method"]: r for r in t["fp32"]["kd_methods"]}
    lines += ["", "fp32 with glibc's default allocator settings, in a process of its own (training calls "
              "`streamkd.runtime.keep_freed_memory`, which the rows above ran with):", "",
              "| method | step s, default malloc | step s, freed memory kept | peak RSS MB, default |",
              "|---|---|---|---|"]
    lines += [f"| {m} | {d[m]['step_sec']:.3f} | {kept[m]['step_sec']:.3f} | {d['peak_rss_mb']:.0f} |"
              for m in ("none", "aux")]
    for label in ("fp32", "bf16_autocast"):
        by = {r["method"]: r["step_sec"] for r in t[label]["kd_methods"]}
        lines += ["", f"Where aux's extra time goes ({label}, s per step): teacher forward (layer - none) "
                  f"{by['layer'] - by['none']:.3f}, the auxiliary branches (aux feature-only - layer) "
                  f"{by['aux, feature loss only'] - by['layer']:.3f}, relation and APC losses (aux - "
                  f"aux feature-only) {by['aux'] - by['aux, feature loss only']:.3f}; none itself "
                  f"{by['none']:.3f}."]
    passes = result["streaming"][0]["passes"]
    lines += ["", f"## Streaming, one thread ({result['streaming'][0]['audio_sec']:.0f} s of audio, 100 ms pieces; "
              f"best of {passes} passes)", "",
              "| backend | chunk ms | RTF | RTF median of passes | chunk p50 ms | chunk p95 ms | max ms | "
              "algorithmic latency ms |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['backend']} | {r['chunk_ms']} | {r['rtf']:.4f} | {r['rtf_median_of_passes']:.4f} | "
              f"{r['chunk_ms_p50']:.2f} | "
              f"{r['chunk_ms_p95']:.2f} | {r['chunk_ms_max']:.2f} | {r['algorithmic_latency_ms']:.0f} |"
              for r in result["streaming"]]
    lines += ["", "## Scaling with input length (one thread)", "", "| mode | audio s | compute s | RTF |",
              "|---|---|---|---|"]
    for r in result["scaling"]:
        if "skipped" in r:
            lines.append(f"| {r['mode']} | {r['audio_sec']:.0f} | {r['skipped']} | - |")
        else:
            lines.append(f"| {r['mode']} | {r['audio_sec']:.0f} | {r['compute_sec']:.2f} | {r['rtf']:.4f} |")
    return "\n".join(lines) + "\n"


def run_bench(out_dir: str | Path = "results/bench", *, quick: bool = False, checkpoint=None) -> dict:
    """Every figure, written to out_dir/{training,streaming,scaling,bench}.json and README.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads available"
    train = training_bench()
    with tempfile.TemporaryDirectory() as tmp:
        stream = streaming_bench(Path(tmp), audio_sec=20.0 if quick else 60.0, checkpoint=checkpoint,
                                 passes=1 if quick else 3)
    scaling = scaling_bench((10.0, 30.0) if quick else (10.0, 60.0, 600.0), checkpoint=checkpoint)
    result = {"machine": machine, "torch": torch.__version__, "training": train, "streaming": stream,
              "scaling": scaling, "targets": _targets(train, stream), "elapsed_sec": time.perf_counter() - t0}
    for name in ("training", "streaming", "scaling", "targets"):
        write_atomic(out / f"{name}.json", json.dumps(result[name], indent=1) + "\n")
    write_atomic(out / "README.md", _markdown(result))
    return result
