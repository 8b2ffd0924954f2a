"""The benchmark's pieces run and report consistent figures (no timing is
asserted: speed targets live in results/bench, not in tests)."""
import torch

from streamkd.bench import _targets, matmul_peak_gflops, scaling_bench, streaming_bench, synthetic_batch


def test_streaming_bench_runs_every_backend_at_both_chunks(tmp_path):
    rows = streaming_bench(tmp_path, audio_sec=3.0, passes=2)
    assert {(r["backend"], r["chunk_ms"]) for r in rows} == {
        (b, c) for b in ("pytorch", "onnxruntime", "sherpa-onnx") for c in (160, 640)}
    for r in rows:
        assert r["rtf"] > 0 and r["chunk_ms_p50"] <= r["chunk_ms_p95"] <= r["chunk_ms_max"]
        assert r["passes"] == 2 and r["rtf"] <= r["rtf_median_of_passes"]  # the best pass is reported
        assert r["algorithmic_latency_ms"] == r["chunk_ms"] + 60 + 25


def test_scaling_bench_keeps_the_stream_cache_bounded():
    rows = scaling_bench((2.0, 6.0), full_max_sec=3.0)
    stream = [r for r in rows if r["mode"].startswith("streaming")]
    assert [r["att_cache_frames"] for r in stream] == [32, 32]  # 2 left chunks x 16 frames
    full = [r for r in rows if r["mode"] == "full context"]
    assert "compute_sec" in full[0] and "skipped" in full[1]


def test_targets_compare_each_figure_with_its_threshold():
    model = {"share_of_mkl_peak": 0.6, "share_of_onednn_peak": 0.3}
    model16 = {"share_of_mkl_peak": 0.45, "share_of_onednn_peak": 0.2}
    kd = [{"method": "none", "relative_to_none": 1.0}, {"method": "aux", "relative_to_none": 1.5},
          {"method": "aux (teacher precomputed)", "relative_to_none": 1.3},
          {"method": "aux (kd.teacher_bf16)", "relative_to_none": 1.45}]
    train = {"fp32": {"models": {"student_none": model}, "kd_methods": kd},
             "bf16_autocast": {"models": {"student_none": model16}, "kd_methods": kd}}
    stream = [{"backend": b, "chunk_ms": 640, "rtf": 0.015, "p95_share_of_chunk": 0.05}
              for b in ("pytorch", "onnxruntime", "sherpa-onnx")]
    met = {r["target"]: r["met"] for r in _targets(train, stream)}
    assert met["training step >= 50% of fp32 matmul peak (MKL sgemm, torch.mm)"]
    assert not met["training step >= 50% of fp32 matmul peak (oneDNN)"]
    assert not met["training step (bf16 autocast, as configs/demo train) >= 50% of fp32 MKL peak"]
    assert not met["aux step time <= 1.4x none (fp32)"]
    assert met["aux step time, teacher precomputed, <= 1.4x none (fp32)"]
    assert not met["aux step time, teacher under bf16 (kd.teacher_bf16), <= 1.4x none (fp32)"]
    assert met["PyTorch streaming RTF at 640 ms <= 0.02"]
    assert not met["ONNX Runtime streaming RTF at 640 ms <= 0.01"]


def test_matmul_peak_and_synthetic_batch():
    assert matmul_peak_gflops(n=256, reps=2)["gflops_best"] > 0
    b = synthetic_batch(3, 1.5, 20)
    assert b.feats.shape == (3, 150, 80) and int(b.tokens.max()) < 20 and int(b.tokens.min()) >= 1
    assert torch.equal(b.token_lens, torch.full((3,), 12))


def test_profile_step_names_the_operators_of_a_kd_step():
    from streamkd.bench import profile_step

    text = profile_step("layer", steps=1, rows=8, threads=1)
    assert "kd.method=layer" in text and "aten::" in text


def test_bench_cli_rejects_an_unknown_profile_method(tmp_path):
    import pytest

    from streamkd.cli import main

    with pytest.raises(SystemExit, match="unknown method 'bogus'"):
        main(["bench", "--profile", "bogus", "--out", str(tmp_path)])


def test_kd_method_bench_times_every_method_against_none():
    from streamkd.bench import KD_METHODS, kd_method_bench

    torch.set_num_threads(1)
    rows = kd_method_bench(synthetic_batch(2, 1.0, 30), 30, reps=1)
    assert [r["method"] for r in rows] == [*KD_METHODS, "aux (teacher precomputed)", "aux, feature loss only",
                                            "aux (kd.teacher_bf16)"]
    assert rows[0]["relative_to_none"] == 1.0
    for r in rows:
        assert r["step_sec"] > 0 and r["step_sec"] <= r["step_sec_median"] and r["gflop_per_step"] > 0
    # The feature-only row runs the branches but not the relation and APC losses.
    flops = {r["method"]: r["gflop_per_step"] for r in rows}
    assert flops["none"] < flops["aux, feature loss only"] < flops["aux"]


def test_training_bench_worker_error_is_raised_not_waited_for():
    import pytest

    from streamkd.bench import _in_fresh_process

    # 0 threads makes torch.set_num_threads raise inside the spawned worker.
    with pytest.raises(RuntimeError, match="worker failed(.|\n)*set_num_threads|worker failed(.|\n)*positive"):
        _in_fresh_process(0, False)
