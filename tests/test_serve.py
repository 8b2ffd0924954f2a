"""``streamkd serve`` through its websocket protocol, with a Python client:
final text equal to the offline decode, partials before the end, endpointing
at a pause, every bad input refused with a JSON error while other streams
go on, limits (busy, idle, queued audio) and freeing on disconnect."""
from __future__ import annotations

import json
import time
import urllib.request
from contextlib import contextmanager

import numpy as np
import pytest
import soundfile as sf
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from serve_model import SR, offline_file_text, offline_text, talking_model, two_utterances
from streamkd.serve.server import ServeLimits, ServerThread
from streamkd.streaming.endpoint import EndpointConfig
from streamkd.streaming.engine import BatchedTorchEngine
from test_recognizer import varied_audio


@pytest.fixture(scope="module")
def model():
    return talking_model()


@pytest.fixture(scope="module")
def server(model):
    with ServerThread(BatchedTorchEngine(model, endpoint=EndpointConfig())) as srv:
        yield srv


@contextmanager
def open_stream(srv, sample_rate=SR, fmt="float32"):
    with connect(srv.ws_url, open_timeout=10) as ws:
        ws.send(json.dumps({"sample_rate": sample_rate, "format": fmt}))
        ready = json.loads(ws.recv(timeout=10))
        assert ready["type"] == "ready", ready
        yield ws


def messages_until_done(ws, timeout=30.0) -> list[dict]:
    out = []
    while not out or out[-1]["type"] not in ("done", "error"):
        out.append(json.loads(ws.recv(timeout=timeout)))
    return out


def finals_text(messages) -> str:
    return " ".join(m["text"] for m in messages if m["type"] == "final")


def send_pieces(ws, samples: np.ndarray, fmt: str, rng) -> None:
    """Binary frames of random sizes (1 sample to 0.3 s)."""
    data = (np.clip(samples, -1, 32767 / 32768) * 32768).astype("<i2") if fmt == "int16" else samples.astype("<f4")
    i = 0
    while i < data.size:
        n = int(rng.integers(1, int(0.3 * SR)))
        ws.send(data[i:i + n].tobytes())
        i += n


@pytest.mark.parametrize("fmt,rate", [("int16", 16000), ("float32", 22050)])
def test_file_in_random_frames_gives_the_offline_decode(server, model, tmp_path, fmt, rate):
    path = tmp_path / "a.wav"
    from streamkd.audio import resample

    sf.write(str(path), resample(varied_audio(3.3, seed=5), SR, rate), rate,
             subtype="PCM_16" if fmt == "int16" else "FLOAT")
    samples, file_rate = sf.read(str(path), dtype="float32")
    want = offline_file_text(model, path)
    assert want.strip(), "the test model must emit text on this audio"
    with open_stream(server, file_rate, fmt) as ws:
        send_pieces(ws, samples, fmt, np.random.default_rng(rate))
        ws.send(json.dumps({"type": "done"}))
        got = messages_until_done(ws)
    assert got[-1]["type"] == "done"
    assert finals_text(got) == want


def test_partials_arrive_before_the_end_of_the_audio(server, model):
    audio = varied_audio(3.0, seed=6)
    with open_stream(server) as ws:
        ws.send(audio[:SR].tobytes())  # the first second only
        first = json.loads(ws.recv(timeout=10))
        assert first["type"] == "partial" and first["text"]
        assert 0 < first["time"] <= 1.0
        ws.send(audio[SR:].tobytes())
        ws.send(json.dumps({"type": "done"}))
        got = messages_until_done(ws)
    assert finals_text(got) == offline_text(model, audio)
    times = [m["time"] for m in [first] + got if m["type"] == "partial"]
    assert times == sorted(times)


def test_endpointing_splits_two_utterances_at_the_pause(server, model):
    joined, first, second = two_utterances(silence_sec=2.0)
    with open_stream(server) as ws:
        send_pieces(ws, joined, "float32", np.random.default_rng(1))
        ws.send(json.dumps({"type": "done"}))
        got = messages_until_done(ws)
    finals = [m for m in got if m["type"] == "final"]
    assert len(finals) == 2, finals
    assert got[-1] == {"type": "done", "segments": 2, "audio_sec": pytest.approx(joined.size / SR, abs=0.08)}
    # the cut lies in the pause, after the trailing-silence rule's 1.2 s
    pause_start, pause_end = first.size / SR, (joined.size - second.size) / SR
    assert pause_start + 1.2 - 0.1 <= finals[0]["end"] == finals[1]["start"] <= pause_end
    assert finals[0]["words"] and finals[0]["words"][-1]["end"] <= pause_start + 0.2
    assert finals[1]["words"][0]["start"] >= pause_end - 0.2
    # nothing lost at the cut: the segments hold the whole stream's tokens
    assert finals_text(got) == offline_text(model, joined)
    assert all(f["text"] for f in finals)


BAD = [  # (what the client sends after connecting, error code)
    ([b"\x00\x01"], "bad_start"),
    (["not json"], "bad_start"),
    ([json.dumps({"sample_rate": 16000})], "bad_start"),
    ([json.dumps({"sample_rate": 0, "format": "float32"})], "bad_start"),
    ([json.dumps({"sample_rate": 16000, "format": "mp3"})], "bad_format"),
    ([json.dumps({"sample_rate": 16000, "format": "int16"}), b"\x01\x02\x03"], "bad_audio"),
    ([json.dumps({"sample_rate": 16000, "format": "float32"}), np.full(8, np.nan, "<f4").tobytes()], "bad_audio"),
    ([json.dumps({"sample_rate": 16000, "format": "float32"}), np.full(8, 1e6, "<f4").tobytes()], "bad_audio"),
    ([json.dumps({"sample_rate": 16000, "format": "float32"}), "stop please"], "bad_message"),
]


def test_bad_inputs_get_a_json_error_and_a_close_while_others_stream(server, model):
    audio = varied_audio(2.5, seed=7)
    with open_stream(server) as good:
        good.send(audio[: SR // 2].tobytes())
        for messages, code in BAD:
            with connect(server.ws_url, open_timeout=10) as ws:
                for m in messages:
                    ws.send(m)
                reply = None
                while reply is None or reply["type"] in ("ready", "partial"):
                    reply = json.loads(ws.recv(timeout=10))
                assert reply["type"] == "error" and reply["code"] == code, (messages, reply)
                assert reply["message"]
                with pytest.raises(ConnectionClosed):
                    ws.recv(timeout=10)
        good.send(audio[SR // 2:].tobytes())
        good.send(json.dumps({"type": "done"}))
        got = messages_until_done(good)
    assert finals_text(got) == offline_text(model, audio)


def wait_for(predicate, timeout=10.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_limits_busy_idle_queued_and_disconnect_frees(model):
    engine = BatchedTorchEngine(model)
    limits = ServeLimits(max_streams=2, idle_timeout_sec=2.0, max_queued_sec=0.5, max_message_bytes=32 * 1024)
    with ServerThread(engine, limits) as srv:
        with open_stream(srv) as a, open_stream(srv) as b:
            a.send(varied_audio(0.4).tobytes())
            with connect(srv.ws_url, open_timeout=10) as c:
                reply = json.loads(c.recv(timeout=10))
                assert reply["type"] == "error" and reply["code"] == "busy"
            assert json.loads(a.recv(timeout=10))["type"] == "partial"
            reply = json.loads(b.recv(timeout=10))  # b sent nothing for 2 s
            assert reply["type"] == "error" and reply["code"] == "idle"
        assert srv.server.refused == 1
        with open_stream(srv, fmt="int16") as d:
            d.send(np.zeros(SR, "<i2").tobytes())  # 1 s queued at once > 0.5 s (in one 32,000-byte message)
            reply = None
            while reply is None or reply["type"] == "partial":
                reply = json.loads(d.recv(timeout=10))
            assert reply["code"] == "overflow"
        with open_stream(srv) as f:  # a message over the size cap: the library closes with 1009
            f.send(np.zeros(10000, "<f4").tobytes())
            with pytest.raises(ConnectionClosed) as closed:
                f.recv(timeout=10)
            assert closed.value.rcvd.code == 1009
        # a client that vanishes mid-stream frees its stream
        with open_stream(srv) as e:
            e.send(varied_audio(1.0).tobytes())
            e.close_socket()
        wait_for(lambda: srv.server.connections == 0 and not engine.streams)


def test_the_page_and_its_scripts_are_served_over_http(server):
    for path, kind in [("/", "text/html"), ("/app.js", "javascript"), ("/capture-worklet.js", "javascript")]:
        with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=10) as r:
            assert r.status == 200 and kind in r.headers["Content-Type"]
            assert len(r.read()) > 500
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.url + "nothing-here", timeout=10)
    assert err.value.code == 404


def test_onnx_engine_streams_equal_the_offline_decode(model, tmp_path):
    from streamkd.streaming.engine import RecognizerEngine
    from streamkd.streaming.export import export_wenet_ctc_onnx
    from streamkd.streaming.ort import OrtStreamingRecognizer

    export_wenet_ctc_onnx(model, tmp_path)
    joined, _, _ = two_utterances(silence_sec=2.0)
    engine = RecognizerEngine(OrtStreamingRecognizer(tmp_path), endpoint=EndpointConfig())
    with ServerThread(engine) as srv, open_stream(srv) as a, open_stream(srv) as b:
        send_pieces(a, joined, "float32", np.random.default_rng(2))
        send_pieces(b, joined[: 2 * SR], "float32", np.random.default_rng(3))
        for ws in (a, b):
            ws.send(json.dumps({"type": "done"}))
        got_a, got_b = messages_until_done(a), messages_until_done(b)
    assert len([m for m in got_a if m["type"] == "final"]) == 2
    assert finals_text(got_a) == offline_text(model, joined)
    assert finals_text(got_b) == offline_text(model, joined[: 2 * SR])


class FailingOnce(BatchedTorchEngine):
    """An engine whose first step with audio fails (a bug in the recogniser)."""

    failed = False

    def _run(self, streams):
        if not self.failed and any(s.backend.state.feat_buffer.size(1) for s in streams):
            self.failed = True
            raise RuntimeError("injected failure")
        return super()._run(streams)


def test_an_engine_failure_ends_its_streams_and_the_server_goes_on(model, capsys):
    audio = varied_audio(1.5, seed=8)
    with ServerThread(FailingOnce(model)) as srv:
        with open_stream(srv) as ws:
            ws.send(audio.tobytes())
            reply = json.loads(ws.recv(timeout=10))
            assert reply["type"] == "error" and reply["code"] == "internal"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=10)
        with open_stream(srv) as ws:
            ws.send(audio.tobytes())
            ws.send(json.dumps({"type": "done"}))
            assert finals_text(messages_until_done(ws)) == offline_text(model, audio)
    assert "injected failure" in capsys.readouterr().err


def test_cli_serve_refuses_bad_arguments_with_a_message(tmp_path, capsys):
    from streamkd.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "missing.pt")]) == 1
    assert "missing.pt" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", "x.pt", "--certfile", "cert.pem"]) == 1
    assert "--keyfile" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", "x.pt", "--max-streams", "0"]) == 1
    assert "--max-streams" in capsys.readouterr().err
    from test_export import _write_checkpoint

    ckpt = tmp_path / "student.pt"
    _write_checkpoint(talking_model(), ckpt)
    assert main(["serve", "--checkpoint", str(ckpt), "--lm", str(tmp_path / "no_lm"), "--port", "0"]) == 1
    assert "no_lm" in capsys.readouterr().err  # the LM is loaded before the server listens
