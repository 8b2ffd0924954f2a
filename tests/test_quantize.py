"""``streamkd export --int8``: a dynamically quantised graph that keeps the
metadata ONNX Runtime and sherpa-onnx need, and the fp32/int8 comparison
behind ``streamkd bench --int8``."""
from __future__ import annotations

import onnx
import pytest
import soundfile as sf

from serve_model import SR, talking_model
from streamkd.manifest import Utterance, write_manifest
from streamkd.streaming.export import export_wenet_ctc_onnx
from streamkd.streaming.ort import OrtStreamingRecognizer, SherpaStreamingRecognizer
from streamkd.streaming.quantize import compare_exports, comparison_table, quantize_int8
from test_export import _write_checkpoint
from test_recognizer import feed, varied_audio


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    model = talking_model()
    fp32, int8 = tmp_path_factory.mktemp("fp32"), tmp_path_factory.mktemp("int8")
    export_wenet_ctc_onnx(model, fp32)
    export_wenet_ctc_onnx(model, int8)
    quantize_int8(int8)
    return model, fp32, int8


def test_int8_graph_is_quantised_and_keeps_the_metadata(exports):
    _, fp32, int8 = exports
    q, f = onnx.load(str(int8 / "model.onnx")), onnx.load(str(fp32 / "model.onnx"))
    ops = {n.op_type for n in q.graph.node}
    assert "DynamicQuantizeLinear" in ops and ops & {"MatMulInteger", "ConvInteger"}
    meta_q, meta_f = ({p.key: p.value for p in m.metadata_props} for m in (q, f))
    assert meta_q.pop("quantization") == "int8-dynamic" and meta_q == meta_f
    assert [i.name for i in q.graph.input] == [i.name for i in f.graph.input]
    assert (int8 / "model.onnx").stat().st_size < 0.75 * (fp32 / "model.onnx").stat().st_size
    with pytest.raises(ValueError, match="already quantised"):
        quantize_int8(int8)


def test_int8_runs_in_ort_and_sherpa_close_to_fp32(exports):
    _, fp32, int8 = exports
    audio = varied_audio(3.0, seed=11)
    texts = {}
    for name, folder in (("fp32", fp32), ("int8", int8)):
        texts[name, "ort"] = feed(OrtStreamingRecognizer(folder), audio, 1600)
        texts[name, "sherpa"] = feed(SherpaStreamingRecognizer(folder), audio, 1600)
    assert texts["fp32", "ort"] and texts["int8", "ort"] and texts["int8", "sherpa"]
    from streamkd.decode import error_rates

    # an untrained model's int8 text differs somewhat from fp32, but is that text, not noise
    assert error_rates([texts["fp32", "ort"]], [texts["int8", "ort"]])["cer"] < 0.3


def test_compare_exports_and_the_cli(exports, tmp_path, capsys):
    from streamkd.cli import main

    model, fp32, int8 = exports
    utts = []
    for k in range(2):
        path = tmp_path / f"u{k}.wav"
        sf.write(str(path), varied_audio(1.5, seed=k), SR)
        utts.append(Utterance(f"u{k}", str(path), 1.5, "a b", "s"))
    write_manifest(tmp_path / "m.jsonl", utts)
    result = compare_exports(fp32, int8, tmp_path / "m.jsonl")
    rows = result["rows"]
    assert set(rows) == {"ort fp32", "sherpa-onnx fp32", "ort int8", "sherpa-onnx int8"}
    assert rows["ort int8"]["wer_delta"] == pytest.approx(rows["ort int8"]["wer"] - rows["ort fp32"]["wer"])
    assert all(r["rtf"] > 0 and r["audio_sec"] == pytest.approx(3.0, abs=0.01) for r in rows.values())
    assert "| ort int8 |" in comparison_table(result)

    ckpt = tmp_path / "s.pt"
    _write_checkpoint(model, ckpt)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "q"), "--int8"]) == 0
    assert "int8" in capsys.readouterr().out
    assert main(["bench", "--int8", str(fp32), str(tmp_path / "q"), "--manifest", str(tmp_path / "m.jsonl"),
                 "--out", str(tmp_path / "res")]) == 0
    assert (tmp_path / "res" / "int8.json").is_file() and (tmp_path / "res" / "int8.md").is_file()
