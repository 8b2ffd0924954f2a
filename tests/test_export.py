"""ONNX export (sherpa-onnx WeNet CTC layout), the ONNX Runtime recognizer,
and sherpa-onnx itself over the export, against the PyTorch recognizer."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import soundfile as sf
import torch

from streamkd.streaming.export import INPUT_NAMES, OUTPUT_NAMES, export_wenet_ctc_onnx
from streamkd.streaming.ort import OrtStreamingRecognizer, read_tokens_txt
from streamkd.streaming.recognizer import StreamingRecognizer
from streamkd.types import ChunkConfig
from test_recognizer import SR, SYMBOLS, feed, tiny_model, varied_audio

CHUNK = ChunkConfig(4, 2)


@pytest.fixture(scope="module")
def model():
    return tiny_model(CHUNK)


@pytest.fixture(scope="module")
def export_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    export_wenet_ctc_onnx(model, out)
    return out


def test_graph_names_shapes_and_metadata(model, export_dir):
    proto = onnx.load(str(export_dir / "model.onnx"))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == INPUT_NAMES  # sherpa-onnx binds by position
    assert [o.name for o in proto.graph.output] == OUTPUT_NAMES
    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    cache = CHUNK.chunk_frames * CHUNK.left_chunks
    assert shapes["att_cache"] == [2, 2, cache, 2 * 16]  # (L, H, T_cache, 2*Dh)
    assert shapes["cnn_cache"] == [2, 1, 32, 4]  # (L, 1, D, K-1)
    assert shapes["att_mask"] == [1, 1, cache + CHUNK.chunk_frames]
    assert shapes["offset"] == [1] and shapes["required_cache_size"] == [1]
    meta = {p.key: p.value for p in proto.metadata_props}
    want = {"head": "2", "num_blocks": "2", "output_size": "32", "cnn_module_kernel": "5", "right_context": "6",
            "subsampling_factor": "4", "vocab_size": str(len(SYMBOLS)), "chunk_size": "4", "left_chunks": "2"}
    assert {k: meta[k] for k in want} == want
    assert read_tokens_txt(export_dir / "tokens.txt") == SYMBOLS


def test_export_refuses_what_cannot_stream(model, tmp_path):
    with pytest.raises(ValueError, match="bounded left context"):
        export_wenet_ctc_onnx(tiny_model(ChunkConfig(4, None)), tmp_path)
    with pytest.raises(ValueError, match="causal"):
        export_wenet_ctc_onnx(tiny_model(None), tmp_path, chunk_frames=4, left_chunks=2)
    wrong = tiny_model(CHUNK)
    wrong.tokenizer = type("T", (), {"vocab_size": 3})()
    with pytest.raises(ValueError, match="3 symbols"):
        export_wenet_ctc_onnx(wrong, tmp_path)


def test_ort_log_probs_equal_pytorch_chunk_by_chunk(model, export_dir):
    samples = varied_audio(2.21, seed=11)
    torch_chunks, ort_chunks = [], []
    rec = StreamingRecognizer(model, on_chunk=lambda lp, enc: torch_chunks.append(lp))
    ort_rec = OrtStreamingRecognizer(export_dir, on_chunk=lambda lp, enc: ort_chunks.append(lp))
    feed(rec, samples, 2000)
    feed(ort_rec, samples, 2000)
    got, want = torch.cat(ort_chunks), torch.cat(torch_chunks)
    assert got.shape == want.shape and got.size(0) == rec.frames_out
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    # The last call is the exact partial chunk (dynamic time axis).
    assert rec.frames_out % CHUNK.chunk_frames != 0


@pytest.mark.parametrize("beam", [1, 3])
def test_ort_recognizer_equals_torch_recognizer(model, export_dir, beam):
    rng = np.random.default_rng(beam)
    for seed, seconds in ((12, 1.9), (13, 0.37)):
        samples = varied_audio(seconds, seed=seed)
        sizes = list(rng.integers(1, 5000, size=30))
        want = feed(StreamingRecognizer(model, beam=beam), samples, sizes)
        ort_rec = OrtStreamingRecognizer(export_dir, beam=beam)
        assert feed(ort_rec, samples, sizes) == want
        ort_rec.reset()
        assert feed(ort_rec, samples, 1600) == want
    assert want  # the model emits text


@pytest.mark.parametrize("kind", ["8k", "silence", "quiet"])
def test_ort_equals_torch_where_the_fbank_floor_matters(model, export_dir, kind):
    # Band-limited (upsampled 8 kHz) audio, digital silence and very quiet
    # audio put mel energies at the fbank floor in [-1, 1] scale but not in
    # sherpa-onnx's int16 scale: the export must undo the scale exactly.
    rate = 8000 if kind == "8k" else SR
    samples = varied_audio(1.3, sample_rate=rate, seed=14)
    if kind == "silence":
        samples[: samples.size // 2] = 0.0
    elif kind == "quiet":
        samples *= 1e-5
    torch_lp, ort_lp = [], []
    want = feed(StreamingRecognizer(model, on_chunk=lambda lp, e: torch_lp.append(lp)), samples, 999,
                sample_rate=rate)
    got = feed(OrtStreamingRecognizer(export_dir, on_chunk=lambda lp, e: ort_lp.append(lp)), samples, 999,
               sample_rate=rate)
    assert got == want
    assert torch.allclose(torch.cat(ort_lp), torch.cat(torch_lp), atol=1e-4, rtol=0)


def test_sherpa_onnx_matches_our_recognizer(model, export_dir, tmp_path):
    sherpa_onnx = pytest.importorskip("sherpa_onnx")
    # sherpa-onnx runs no partial last chunk: pick a length of whole chunks.
    # F = 4*c*K + 5 feature frames give T = c*K encoder frames, and sherpa
    # runs chunk k while k*4c + (4c + 3) < F, i.e. exactly K chunks.
    c, K = CHUNK.chunk_frames, 30
    frames = 4 * c * K + 5
    path = tmp_path / "utt.wav"
    sf.write(str(path), varied_audio(frames * 160 / SR, seed=15), SR, subtype="PCM_16")
    samples, rate = sf.read(str(path), dtype="float32")
    assert rate == SR and samples.size == frames * 160

    rec = StreamingRecognizer(model)
    want = feed(rec, samples, 1600)
    assert rec.frames_out == c * K and len(rec.tokens()) > 5

    recognizer = sherpa_onnx.OnlineRecognizer.from_wenet_ctc(
        tokens=str(export_dir / "tokens.txt"), model=str(export_dir / "model.onnx"),
        chunk_size=c, num_left_chunks=CHUNK.left_chunks, num_threads=1, sample_rate=SR, feature_dim=80)
    stream = recognizer.create_stream()
    for i in range(0, samples.size, 1600):
        stream.accept_waveform(SR, samples[i:i + 1600])
        while recognizer.is_ready(stream):
            recognizer.decode_stream(stream)
    stream.input_finished()
    while recognizer.is_ready(stream):
        recognizer.decode_stream(stream)
    result = recognizer.get_result_all(stream)
    assert result.text.strip() == want
    assert list(result.tokens) == [SYMBOLS[i].replace("\u2581", " ") for i in rec.tokens()]
    # Its timestamps (seconds, encoder frame * 40 ms) are our emission frames.
    assert [round(t / 0.04) for t in result.timestamps] == rec.token_frames()
    assert math.isfinite(rec.latency_report()["rtf"])


def _write_checkpoint(model, path):
    from streamkd.checkpoint import inference_checkpoint, save_atomic
    from streamkd.config import Config

    cfg = Config(model=model.enc_cfg)
    cmvn = {"mean": model.cmvn_mean.tolist(), "istd": model.cmvn_istd.tolist()}
    save_atomic(inference_checkpoint(cfg, model.state_dict(), model.tokenizer.state_dict(), cmvn), path)


def test_cli_export_and_stream_all_backends(model, tmp_path, capsys):
    from streamkd.cli import main

    ckpt, teacher_ckpt = tmp_path / "student.pt", tmp_path / "teacher.pt"
    _write_checkpoint(model, ckpt)
    _write_checkpoint(tiny_model(None, seed=1), teacher_ckpt)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "onnx")]) == 0
    assert "chunk_size=4, num_left_chunks=2" in capsys.readouterr().out

    samples = varied_audio(4 * 4 * 25 * 160 / SR + 5 * 160 / SR, sample_rate=SR, seed=16)  # whole chunks
    wav = tmp_path / "a.wav"
    sf.write(str(wav), varied_audio(2.0, sample_rate=22050, seed=16), 22050)  # resampled while streaming
    wav2 = tmp_path / "b.wav"
    sf.write(str(wav2), samples, SR, subtype="FLOAT")
    texts = {}
    for backend in ("torch", "ort", "sherpa"):
        out = tmp_path / f"{backend}.json"
        argv = ["stream", "--checkpoint", str(ckpt), "--onnx", str(tmp_path / "onnx"), "--backend", backend,
                "--piece-ms", "70", "--json", str(out), str(wav), str(wav2)]
        if backend == "torch":
            argv += ["--teacher", str(teacher_ckpt)]
        assert main(argv) == 0
        printed = capsys.readouterr().out
        assert "RTF" in printed and "algorithmic latency 245 ms" in printed
        data = __import__("json").loads(out.read_text())
        texts[backend] = [f["text"] for f in data["files"]]
        first = data["files"][0]
        assert first["partials"] and first["partials"][-1]["text"] and first["latency"]["chunks"] > 0
        if backend == "torch":
            assert first["emission_delay"]["matched"] + first["emission_delay"]["unmatched"] > 0
    assert texts["ort"] == texts["torch"]
    # The sherpa backend appends silence to complete its last window; on
    # audio of whole chunks everything before that padding is ours exactly.
    assert texts["sherpa"][1].startswith(texts["torch"][1])

    assert main(["stream", "--backend", "ort", str(wav)]) == 1
    assert "--onnx" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--left-chunks", "0"]) == 1
    assert "left context" in capsys.readouterr().err
