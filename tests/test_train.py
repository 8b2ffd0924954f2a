"""Training end to end on a tiny real (TTS) corpus: checkpoints, kill and
resume, DDP, decoding; every config in configs/ trains one step."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from streamkd.checkpoint import load_checkpoint
from streamkd.config import load_config

from conftest import CONFIGS, data_overrides as _data_overrides



def _cli(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "streamkd", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def test_teacher_trains_checkpoints_and_decodes(tiny_corpus, tmp_path):
    out = tmp_path / "teacher"
    r = _cli(["train", str(CONFIGS / "tiny.yaml"), *_data_overrides(tiny_corpus),
              f"train.out_dir={out}", "train.max_steps=4", "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "final.json").read_text())
    assert report["steps"] == 4 and report["params"] > 0 and 0 <= report["test"]["wer"]
    ckpt = load_checkpoint(out / "ckpt-4.pt")
    assert ckpt["kind"] == "train" and ckpt["progress"]["step"] == 4
    assert {"optimizer", "scheduler", "rng", "tokenizer", "cmvn", "config"} <= set(ckpt)
    assert len(list(out.glob("ckpt-*.pt"))) <= 2  # keep_checkpoints
    assert (out / "log.csv").read_text().startswith("step,")
    assert list((out / "tb").iterdir())
    final = load_checkpoint(out / "final.pt")
    assert final["kind"] == "inference" and "optimizer" not in final
    r = _cli(["decode", "--checkpoint", str(out / "final.pt"), "--manifest", str(tiny_corpus / "test.jsonl"),
              "--out", str(tmp_path / "dec"), "--beam", "3"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "dec" / "summary.json").read_text())
    assert summary["utterances"] == len((tiny_corpus / "test.jsonl").read_text().splitlines())
    assert (tmp_path / "dec" / "hyps.txt").read_text().count("REF:") == summary["utterances"]
    # training again into the same folder without --resume is refused
    r = _cli(["train", str(CONFIGS / "tiny.yaml"), *_data_overrides(tiny_corpus), f"train.out_dir={out}"], tmp_path)
    assert r.returncode != 0 and "--resume" in r.stderr


def _student_args(corpus: Path, out: Path, steps: int) -> list[str]:
    return ["train", str(CONFIGS / "tiny_student.yaml"), *_data_overrides(corpus), f"train.out_dir={out}",
            f"train.max_steps={steps}", "train.ckpt_every=3", "train.keep_checkpoints=10",
            "model.dynamic_chunk=true", "model.dynamic_chunk_choices=[1,2,4]", "model.dynamic_full_prob=0.2",
            "data.max_batch_sec=8", "--no-progress"]


def test_sigkill_then_resume_reaches_the_same_weights(tiny_corpus, tmp_path):
    steps = 12
    ref = _cli(_student_args(tiny_corpus, tmp_path / "ref", steps), tmp_path)
    assert ref.returncode == 0, ref.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "streamkd", *_student_args(tiny_corpus, run_dir, steps)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "ckpt-3.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run_dir / f"ckpt-{steps}.pt").exists()
    resumed = _cli(_student_args(tiny_corpus, run_dir, steps) + ["--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a = load_checkpoint(tmp_path / "ref" / f"ckpt-{steps}.pt")
    b = load_checkpoint(run_dir / f"ckpt-{steps}.pt")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    pa, pb = dict(a["progress"]), dict(b["progress"])
    best_a, best_b = pa.pop("best"), pb.pop("best")
    assert pa == pb
    assert [(w, e) for w, e, _ in best_a] == [(w, e) for w, e, _ in best_b]


def test_two_process_ddp_on_gloo(tiny_corpus, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).parent / "torchrun"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "streamkd",
                        "train", str(CONFIGS / "tiny_student.yaml"), *_data_overrides(tiny_corpus),
                        f"train.out_dir={out}", "train.max_steps=3", "data.max_batch_sec=8", "--no-progress"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert json.loads((out / "final.json").read_text())["steps"] == 3
    # both ranks took part: the DDP-averaged gradients leave one set of weights on rank 0's checkpoint
    assert load_checkpoint(out / "ckpt-3.pt")["progress"]["step"] == 3


def _every_config():
    return sorted(p for p in CONFIGS.rglob("*.yaml") if "experiments" not in p.parts)


@pytest.mark.parametrize("path", _every_config(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_builds_and_trains_one_step(path, tiny_lang):
    from streamkd.bench import synthetic_batch
    from streamkd.checkpoint import build_model
    from streamkd.kd import build_objective

    tokenizer, cmvn = tiny_lang
    cfg = load_config(path)
    torch.manual_seed(0)
    student = build_model(cfg, tokenizer, cmvn)
    teacher = None
    if cfg.kd.method != "none":
        teacher_cfg = load_config(path.parent / "teacher.yaml")
        teacher = build_model(teacher_cfg, tokenizer, cmvn)
    objective = build_objective(cfg.kd, cfg.data, student, "cpu", teacher=teacher).train()
    batch = synthetic_batch(2, 1.0, tokenizer.vocab_size)
    losses = objective(batch)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_every_experiment_grid_plans_valid_configs():
    from streamkd.experiment import build_config, load_grid, plan_runs

    grids = sorted((CONFIGS / "experiments").glob("*.yaml"))
    assert grids
    for g in grids:
        runs = plan_runs(load_grid(g))
        assert runs[0].method == "teacher"
        for run in runs:
            if run.config is not None:  # None: a grid's pretrained teacher, trained already
                build_config(run)


def test_a_finished_run_resumed_with_more_epochs_goes_on(tiny_corpus, tmp_path):
    from streamkd.config import TrainConfig
    from streamkd.experiment import _run_status

    out = tmp_path / "run"
    args = ["train", str(CONFIGS / "tiny.yaml"), *_data_overrides(tiny_corpus), f"train.out_dir={out}",
            "train.max_steps=1000"]
    r = _cli([*args, "train.max_epochs=1", "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "final.json").read_text())["epochs"] == 1
    no_record = tmp_path / "no_record.json.gz"
    assert _run_status(out, TrainConfig(max_epochs=1), no_record)[0] == "done"
    assert _run_status(out, TrainConfig(max_epochs=2), no_record)[0] == "resume"
    assert _run_status(tmp_path / "nothing", TrainConfig(), no_record)[0] == "new"
    # without its folder, a run's record (written on another machine) stands for it, to its limits
    from streamkd.experiment import write_record
    write_record(tmp_path / "rec.json.gz", {"run": "run", "final": json.loads((out / "final.json").read_text())})
    assert _run_status(tmp_path / "nothing", TrainConfig(max_epochs=1), tmp_path / "rec.json.gz")[0] == "recorded"
    assert _run_status(tmp_path / "nothing", TrainConfig(max_epochs=2), tmp_path / "rec.json.gz")[0] == "new"
    r = _cli([*args, "train.max_epochs=2", "--resume", "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "final.json").read_text())
    assert report["epochs"] == 2 and report["steps"] > 0
    assert (out / "valid.csv").read_text().count("\n") == 3  # header and one row per epoch


def test_validation_scores_what_decode_manifest_scores(tiny_corpus, tiny_lang):
    from streamkd.checkpoint import build_model
    from streamkd.decode import decode_manifest
    from streamkd.train import validate

    tokenizer, cmvn = tiny_lang
    cfg = load_config(CONFIGS / "tiny_student.yaml", _data_overrides(tiny_corpus))
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer, cmvn).train()
    manifest = str(tiny_corpus / "dev.jsonl")
    rates = validate(model, cfg.data, manifest, "cpu")
    assert model.training  # validation leaves the model as it found it
    dec = decode_manifest(model, cfg.data, manifest).summary
    for key in ("wer", "cer", "utterances", "skipped"):
        assert rates[key] == dec[key], key
    assert math.isfinite(rates["loss"]) and rates["loss"] > 0


def test_init_from_starts_from_the_weights_and_refuses_a_misfit(tiny_corpus, tmp_path):
    from streamkd.config import ConfigError
    from streamkd.train import train

    def cfg(out, *extra):
        return load_config(CONFIGS / "tiny.yaml", [*_data_overrides(tiny_corpus), f"train.out_dir={out}",
                                                   "train.max_steps=2", "train.ckpt_every=1", *extra])

    train(cfg(tmp_path / "src"), progress=False)
    source = load_checkpoint(tmp_path / "src" / "ckpt-2.pt")["model"]
    # lr 0: one fine-tuning step leaves the initial weights as they were
    train(cfg(tmp_path / "ft", f"train.init_from={tmp_path / 'src' / 'ckpt-2.pt'}", "optim.lr=0",
              "optim.weight_decay=0", "train.max_steps=1"), progress=False)
    tuned = load_checkpoint(tmp_path / "ft" / "ckpt-1.pt")
    assert tuned["progress"]["step"] == 1  # a fresh schedule, not the source's step 2
    assert all(torch.equal(tuned["model"][k], v) for k, v in source.items())
    fresh = load_checkpoint(tmp_path / "src" / "ckpt-1.pt")["model"]
    assert not all(torch.equal(fresh[k], v) for k, v in source.items())  # the check above can fail
    with pytest.raises(ConfigError, match=r"train.init_from: .*ckpt-2.pt does not fit this model"):
        train(cfg(tmp_path / "wide", f"train.init_from={tmp_path / 'src' / 'ckpt-2.pt'}", "model.d_model=48"),
              progress=False)
    with pytest.raises(ConfigError, match=r"train.init_from: .*nothing.pt does not exist"):
        train(cfg(tmp_path / "none", f"train.init_from={tmp_path / 'nothing.pt'}"), progress=False)


def test_init_new_tokens_carries_the_encoder_to_another_token_set(tiny_corpus, tmp_path):
    """A character model fine-tuned to BPE: every weight but the CTC head
    carries over, the head is this run's, and the CMVN stays the source's."""
    from streamkd.config import ConfigError
    from streamkd.train import train

    def cfg(out, *extra):
        return load_config(CONFIGS / "tiny.yaml", [*_data_overrides(tiny_corpus), f"train.out_dir={out}",
                                                   "train.max_steps=1", "train.ckpt_every=1", *extra])

    train(cfg(tmp_path / "src"), progress=False)
    source = load_checkpoint(tmp_path / "src" / "ckpt-1.pt")
    bpe = [f"data.lang_dir={tmp_path / 'lang_bpe'}", "data.tokenizer.kind=bpe", "data.tokenizer.vocab_size=30",
           f"train.init_from={tmp_path / 'src' / 'ckpt-1.pt'}", "optim.lr=0", "optim.weight_decay=0"]
    with pytest.raises(ConfigError, match=r"other tokens .* train.init_new_tokens=true"):
        train(cfg(tmp_path / "refused", *bpe), progress=False)
    # the refused run prepared the BPE lang dir; give it a CMVN of its own
    cmvn_file = tmp_path / "lang_bpe" / "cmvn.json"
    own = json.loads(cmvn_file.read_text())
    own["mean"] = [m + 1.0 for m in own["mean"]]
    cmvn_file.write_text(json.dumps(own))
    train(cfg(tmp_path / "ft", *bpe, "train.init_new_tokens=true"), progress=False)
    tuned = load_checkpoint(tmp_path / "ft" / "ckpt-1.pt")
    assert tuned["tokenizer"]["kind"] == "bpe"
    assert tuned["model"]["ctc_head.weight"].shape[0] == 30 != source["model"]["ctc_head.weight"].shape[0]
    body = [k for k in source["model"] if not k.startswith("ctc_head.")]
    assert body and all(torch.equal(tuned["model"][k], source["model"][k]) for k in body)
    assert tuned["cmvn"]["mean"] == source["cmvn"]["mean"] != own["mean"]  # the weights normalise with the source's CMVN
