"""``streamkd bench --serve`` end to end at toy scale: a served student, two
real-time clients, then 10x overload refused cleanly."""
from __future__ import annotations

import numpy as np
import soundfile as sf

from serve_model import SR, talking_model
from streamkd.manifest import Utterance, write_manifest
from streamkd.serve.loadtest import run_serve_bench, serve_table
from test_export import _write_checkpoint
from test_recognizer import varied_audio


def test_serve_bench_ladder_and_overload(tmp_path):
    ckpt = tmp_path / "s.pt"
    _write_checkpoint(talking_model(), ckpt)
    utts = []
    for k in range(3):
        x = np.concatenate([varied_audio(0.8, seed=k), np.zeros(SR // 4, np.float32)])
        sf.write(str(tmp_path / f"u{k}.wav"), x, SR)
        utts.append(Utterance(f"u{k}", str(tmp_path / f"u{k}.wav"), x.size / SR, "a", "s"))
    write_manifest(tmp_path / "m.jsonl", utts)
    # keep_up_sec is loose: this checks the mechanics, not the speed of a busy test machine
    result = run_serve_bench(str(ckpt), str(tmp_path / "m.jsonl"), max_clients=2, stream_sec=1.5, threads=1,
                             keep_up_sec=30.0,
                             log=lambda *a: None)
    assert [lv["streams"] for lv in result["levels"]] == [1, 2]
    for lv in result["levels"]:
        assert lv["correct"] == lv["admitted"] == lv["streams"] and lv["partials"] > 0
        assert lv["latency_ms_p50"] <= lv["latency_ms_p95"] <= lv["latency_ms_max"]
    assert result["largest_realtime_streams"] == 2
    over = result["overload"]
    assert over["streams"] == 20 and over["admitted"] == 2 and over["refused_busy"] == 18
    assert over["refused_cleanly"] and over["admitted_correct"]
    batched, single = result["engine_cpu"]
    assert batched["mean_batch"] > 1 and single["mean_batch"] == 1 and batched["cpu_ms_per_audio_sec"] > 0
    assert "**2**" in serve_table(result)
