"""The page at ``/`` in a real browser: Debian's chromium driven by
Playwright (never a downloaded browser), its fake microphone speaking a
corpus utterance, and the upload mode streaming a WAV file.

The model is the untrained test student of ``serve_model``, so the page's
text is checked against the offline decode of the same audio by the same
model, not against the reference transcript. For the microphone, "the same
audio" is what the server received (the browser resamples the file to its
own rate); that it is the utterance is checked by correlation.

Set STREAMKD_SCREENSHOT=FILE.png to save the page after the microphone run,
and STREAMKD_BROWSER_CHECKPOINT=final.pt to run these tests with a trained
student instead (the checks hold for any streaming student).
"""
from __future__ import annotations

import os
import shutil
import time
from collections import defaultdict

import numpy as np
import pytest
import soundfile as sf

from serve_model import SR, offline_file_text, offline_text, talking_model
from streamkd import load_model
from streamkd.audio import load_audio, resample
from streamkd.manifest import read_manifest
from streamkd.serve.server import ServerThread
from streamkd.streaming.endpoint import EndpointConfig
from streamkd.streaming.engine import BatchedTorchEngine

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PAD = int(0.3 * SR)  # silence around the utterance, samples
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=(
    "chromium is not installed: `make test` installs Debian's chromium with apt; "
    "where apt cannot, these browser tests are skipped"))


class RecordingEngine(BatchedTorchEngine):
    """Keeps every stream's received samples (at the client's rate)."""

    def __init__(self, model, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.received: dict[int, list[np.ndarray]] = defaultdict(list)
        self.rates: dict[int, float] = {}

    def accept(self, stream, samples) -> None:
        self.received[stream.id].append(np.asarray(samples, np.float32))
        self.rates[stream.id] = stream.sample_rate
        super().accept(stream, samples)

    def audio(self, stream_id: int) -> np.ndarray:
        return np.concatenate(self.received[stream_id])


@pytest.fixture(scope="module")
def utterance_wav(tiny_corpus, tmp_path_factory):
    """A corpus utterance, 16 kHz PCM16 mono, with 0.3 s of silence each side."""
    utt = read_manifest(tiny_corpus / "test.jsonl")[0]
    x = load_audio(utt.audio, SR)
    pad = np.zeros(PAD, np.float32)
    path = tmp_path_factory.mktemp("browser") / "utterance.wav"
    sf.write(str(path), np.concatenate([pad, x, pad]), SR, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def browser_setup(utterance_wav):
    from playwright.sync_api import sync_playwright

    checkpoint = os.environ.get("STREAMKD_BROWSER_CHECKPOINT")
    model = load_model(checkpoint) if checkpoint else talking_model()
    engine = RecordingEngine(model, endpoint=EndpointConfig())
    args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={utterance_wav}", "--autoplay-policy=no-user-gesture-required"]
    with ServerThread(engine) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield model, engine, srv, browser
        browser.close()


def squeeze(text: str) -> str:
    """Whitespace as the browser renders it (runs collapsed)."""
    return " ".join(text.split())


def page_result(page, timeout_ms=60000) -> tuple[list[str], str]:
    """Wait for the stream's end; (finals' texts, the text of the list shown)."""
    page.wait_for_function("['done', 'error'].includes(window.streamkd.state)", timeout=timeout_ms)
    assert page.evaluate("window.streamkd.error") is None
    finals = page.evaluate("window.streamkd.finals.map(f => f.text)")
    return finals, page.inner_text("#finals")


def test_microphone_page_shows_the_transcript(browser_setup, utterance_wav):
    model, engine, srv, browser = browser_setup
    page = browser.new_page()
    page.goto(srv.url)
    before = set(engine.received)
    page.click("#mic-start")
    page.wait_for_function("window.streamkd.state === 'streaming'", timeout=30000)
    seconds = sf.info(str(utterance_wav)).duration
    deadline = time.monotonic() + 2 * seconds + 60
    while not set(engine.rates) - before:
        assert time.monotonic() < deadline, "the page sent no audio"
        time.sleep(0.1)
    (sid,) = set(engine.rates) - before
    # the fake microphone loops the file: two lengths hold one whole utterance wherever capture began
    while sum(a.size for a in engine.received[sid]) < (2 * seconds + 0.5) * engine.rates[sid]:
        assert time.monotonic() < deadline, "the page did not send the utterance's length of audio"
        time.sleep(0.1)
    page.click("#mic-stop")
    finals, shown = page_result(page)

    heard = resample(engine.audio(sid), engine.rates[sid], SR)
    spoken = load_audio(utterance_wav, SR)[PAD:-PAD]
    # the microphone carried the utterance: it appears, whole, in what was sent
    corr = np.correlate(heard, spoken, mode="valid") / (np.linalg.norm(spoken) * np.sqrt(
        np.convolve(heard ** 2, np.ones(spoken.size), mode="valid")) + 1e-9)
    assert corr.max() > 0.9
    want = offline_text(model, heard)
    assert want.strip(), "the test model emits no text on this utterance: the check would be empty"
    assert " ".join(finals) == want
    assert all(squeeze(text) in squeeze(shown) for text in finals)
    if os.environ.get("STREAMKD_SCREENSHOT"):
        page.screenshot(path=os.environ["STREAMKD_SCREENSHOT"], full_page=True)
    page.close()


def test_upload_mode_streams_the_wav_file(browser_setup, utterance_wav):
    model, engine, srv, browser = browser_setup
    page = browser.new_page()
    page.goto(srv.url)
    before = set(engine.received)
    page.set_input_files("#file", str(utterance_wav))
    start = time.monotonic()
    page.click("#file-start")
    finals, shown = page_result(page)
    elapsed = time.monotonic() - start
    seconds = sf.info(str(utterance_wav)).duration
    assert elapsed >= seconds - 0.2, "the upload was not paced at real time"
    (sid,) = set(engine.received) - before
    assert engine.rates[sid] == SR
    # int16 samples are sent as they are in the file
    np.testing.assert_array_equal(engine.audio(sid), sf.read(str(utterance_wav), dtype="float32")[0])
    assert " ".join(finals) == offline_file_text(model, utterance_wav)
    assert finals and all(squeeze(text) in squeeze(shown) for text in finals)
    page.close()
