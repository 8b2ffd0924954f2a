import json
import os

import pytest

from streamkd.errors import ManifestError
from streamkd.manifest import Utterance, read_manifest, write_manifest


def _utts(tmp_path):
    return [
        Utterance("a", str(tmp_path / "wav" / "a.wav"), 1.5, "hello world", "s1"),
        Utterance("b", str(tmp_path / "other" / "b.flac"), 0.25, "ünïcode text", "", {"offset": 2.0, "note": "x"}),
    ]


def test_round_trip_and_relative_paths(tmp_path):
    utts = _utts(tmp_path)
    manifest = tmp_path / "data" / "m.jsonl"
    write_manifest(manifest, utts)
    lines = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    assert lines[0]["audio"] == os.path.join("..", "wav", "a.wav")
    assert "speaker" not in lines[1] and lines[1]["extra"] == {"offset": 2.0, "note": "x"}
    back = read_manifest(manifest)
    assert back == utts
    assert back[0].audio_path.is_absolute() and back[0].audio_path == tmp_path / "wav" / "a.wav"
    assert [p.name for p in manifest.parent.iterdir()] == ["m.jsonl"]  # temp file replaced


def test_moving_the_folder_keeps_paths_valid(tmp_path):
    (tmp_path / "d1").mkdir()
    write_manifest(tmp_path / "d1" / "m.jsonl", [Utterance("a", str(tmp_path / "d1" / "a.wav"), 1.0, "t")])
    os.rename(tmp_path / "d1", tmp_path / "d2")
    assert read_manifest(tmp_path / "d2" / "m.jsonl")[0].audio_path == tmp_path / "d2" / "a.wav"


GOOD = '{"id": "ok", "audio": "a.wav", "duration": 1.0, "text": "t"}'


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"id": "x", "audio": "a.wav", "duration": 1.0}', "missing key 'text'"),
    ('{"id": "x", "audio": "a.wav", "duration": "1", "text": "t"}', "'duration' must be a finite number"),
    ('{"id": "x", "audio": "a.wav", "duration": true, "text": "t"}', "'duration' must be a finite number"),
    ('{"id": "x", "audio": "a.wav", "duration": 0, "text": "t"}', "'duration' must be > 0"),
    ('{"id": "x", "audio": "a.wav", "duration": -1.5, "text": "t"}', "'duration' must be > 0"),
    ('{"id": 7, "audio": "a.wav", "duration": 1.0, "text": "t"}', "'id' must be a str"),
    ('{"id": "", "audio": "a.wav", "duration": 1.0, "text": "t"}', "'id' is empty"),
    ('{"id": "x", "audio": "", "duration": 1.0, "text": "t"}', "'audio' is empty"),
    ('{"id": "x", "audio": "a.wav", "duration": 1.0, "text": 3}', "'text' must be a str"),
    ('{"id": "x", "audio": "a.wav", "duration": 1.0, "text": "t", "spk": "s"}', "unknown key.*extra"),
    ('{"id": "x", "audio": "a.wav", "duration": 1.0, "text": "t", "extra": []}', "'extra' must be a dict"),
    ('{"id": "x", "audio": "a.wav", "duration": 1.0, "text": "t", "extra": {"offset": -1}}', "extra.offset"),
    (GOOD, "duplicate id 'ok' \\(first on line 1\\)"),
])
def test_each_bad_line_names_file_and_line(tmp_path, bad_line, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(GOOD + "\n\n" + bad_line + "\n")
    with pytest.raises(ManifestError, match=rf"m\.jsonl:3: .*{message}"):
        read_manifest(manifest)


def test_non_utf8_and_missing_file(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(GOOD.encode() + b"\n" + b'{"id": "\xff"}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: not UTF-8"):
        read_manifest(manifest)
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(tmp_path / "none.jsonl")


def test_write_refuses_duplicate_ids(tmp_path):
    u = Utterance("a", str(tmp_path / "a.wav"), 1.0, "t")
    with pytest.raises(ManifestError, match="duplicate id 'a'"):
        write_manifest(tmp_path / "m.jsonl", [u, u])
    assert not (tmp_path / "m.jsonl").exists()
