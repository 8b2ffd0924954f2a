
import numpy as np
import pytest

from streamkd.audio import load_audio, load_utterance
from streamkd.cli import main
from streamkd.errors import DataError
from streamkd.importers import import_kaldi, import_librispeech, import_lhotse
from streamkd.manifest import read_manifest


def _librispeech_tree(root, make_wav):
    """Speaker 19, chapter 198: two transcribed flacs, one flac without a
    transcript line, one transcript line without audio."""
    chapter = root / "19" / "198"
    make_wav("ls/19/198/19-198-0000.flac", 0.5, seed=1)
    make_wav("ls/19/198/19-198-0001.flac", 0.75, seed=2)
    make_wav("ls/19/198/19-198-0002.flac", 0.3, seed=3)
    (chapter / "19-198.trans.txt").write_text(
        "19-198-0000 HELLO WORLD\n19-198-0001 A STREAMING STUDENT\n19-198-0009 NO AUDIO HERE\n")


def test_librispeech(tmp_path, make_wav):
    root = tmp_path / "ls"
    _librispeech_tree(root, make_wav)
    result = import_librispeech(root)
    got = {u.id: u for u in result.utterances}
    assert sorted(got) == ["19-198-0000", "19-198-0001"]
    assert got["19-198-0001"].text == "A STREAMING STUDENT" and got["19-198-0001"].speaker == "19"
    assert got["19-198-0000"].duration == pytest.approx(0.5)
    reasons = dict(result.skipped)
    assert set(reasons) == {"19-198-0009", "19-198-0002"}
    assert "does not exist" in reasons["19-198-0009"] and "no transcript" in reasons["19-198-0002"]
    with pytest.raises(DataError, match="no \\*.trans.txt"):
        import_librispeech(make_wav("plain/a.wav", 0.1).parent)


def _kaldi_dir(tmp_path, make_wav, segments):
    d = tmp_path / "kaldi"
    d.mkdir()
    rec1 = make_wav("rec/r1.wav", 2.0, seed=4, subtype="FLOAT")
    rec2 = make_wav("rec/r2.wav", 1.0, seed=5, subtype="FLOAT")
    (d / "wav.scp").write_text(f"r1 {rec1}\nr2 {rec2}\n")
    if segments:
        (d / "segments").write_text("u1 r1 0.00 0.80\nu2 r1 1.00 -1\nu3 r2 0.10 0.60\nu4 r9 0 1\nu5 r2 0.5 0.5\n")
        (d / "text").write_text("u1 first part\nu2 second part\nu3 other file\nu4 lost\nu5 empty span\nu6 orphan\n")
        (d / "utt2spk").write_text("u1 alice\nu2 alice\nu3 bob\n")
    else:
        (d / "text").write_text("r1 whole first\n")
    return d, rec1


def test_kaldi_with_segments(tmp_path, make_wav):
    d, rec1 = _kaldi_dir(tmp_path, make_wav, segments=True)
    result = import_kaldi(d)
    got = {u.id: u for u in result.utterances}
    assert sorted(got) == ["u1", "u2", "u3"]
    assert got["u1"].extra == {"offset": 0.0} and got["u1"].duration == pytest.approx(0.8)
    assert got["u2"].duration == pytest.approx(1.0)  # end -1: to the end of the file
    assert got["u3"].speaker == "bob" and got["u3"].text == "other file"
    whole = load_audio(rec1)
    np.testing.assert_array_equal(load_utterance(got["u2"]), whole[16000:32000])
    reasons = dict(result.skipped)
    assert set(reasons) == {"u4", "u5", "u6"}
    assert "r9" in reasons["u4"] and "positive interval" in reasons["u5"] and "no segment" in reasons["u6"]


def test_kaldi_without_segments_and_manifest_cli(tmp_path, make_wav, capsys):
    d, rec1 = _kaldi_dir(tmp_path, make_wav, segments=False)
    result = import_kaldi(d)
    assert [u.id for u in result.utterances] == ["r1"] and result.utterances[0].extra == {}
    assert result.skipped == [("r2", f"no transcript in {d / 'text'}")]
    out = tmp_path / "m" / "kaldi.jsonl"
    assert main(["import", "kaldi", str(d), "--out", str(out)]) == 0
    assert "wrote 1 utterances" in capsys.readouterr().out
    assert read_manifest(out)[0].audio_path == rec1
    assert (tmp_path / "m" / "kaldi.jsonl.skipped.tsv").read_text().startswith("r2\t")


def test_kaldi_piped_wav_scp_is_a_clear_error(tmp_path, make_wav, capsys):
    d, _ = _kaldi_dir(tmp_path, make_wav, segments=False)
    (d / "wav.scp").write_text("r1 sox r1.sph -t wav - |\n")
    with pytest.raises(DataError, match="'r1' is a piped command"):
        import_kaldi(d)
    assert main(["import", "kaldi", str(d), "--out", str(tmp_path / "x.jsonl")]) == 1
    assert "piped command" in capsys.readouterr().err
    (d / "wav.scp").write_text("r1 a.wav\nr1 b.wav\n")
    with pytest.raises(DataError, match=r"wav.scp:2: duplicate key 'r1'"):
        import_kaldi(d)
    (d / "wav.scp").unlink()
    with pytest.raises(DataError, match="wav.scp: missing"):
        import_kaldi(d)


def test_librispeech_cli_reports_skips(tmp_path, make_wav, capsys):
    _librispeech_tree(tmp_path / "ls", make_wav)
    out = tmp_path / "ls.jsonl"
    assert main(["import", "librispeech", str(tmp_path / "ls"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "wrote 2 utterances" in captured.out and "skipped 2" in captured.out
    assert "19-198-0009" in captured.err
    assert len((tmp_path / "ls.jsonl.skipped.tsv").read_text().splitlines()) == 2
    assert len(read_manifest(out)) == 2


def test_lhotse(tmp_path, make_wav):
    lhotse = pytest.importorskip("lhotse")
    path = make_wav("lh/r.wav", 2.0, seed=6)
    rec = lhotse.Recording.from_file(str(path))
    sup = lhotse.SupervisionSegment(id="s1", recording_id=rec.id, start=0.5, duration=1.0,
                                    text="lhotse text", speaker="carol")
    cuts = lhotse.CutSet.from_manifests(recordings=lhotse.RecordingSet.from_recordings([rec]),
                                        supervisions=lhotse.SupervisionSet.from_segments([sup]))
    cuts = cuts.trim_to_supervisions()
    cuts_path = tmp_path / "cuts.jsonl.gz"
    cuts.to_file(str(cuts_path))
    result = import_lhotse(cuts_path)
    [utt] = result.utterances
    assert utt.text == "lhotse text" and utt.speaker == "carol"
    assert utt.extra["offset"] == pytest.approx(0.5) and utt.duration == pytest.approx(1.0)


def test_lhotse_missing_gives_install_hint(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lhotse(name, *args, **kwargs):
        if name == "lhotse" or name.startswith("lhotse."):
            raise ImportError("No module named 'lhotse'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lhotse)
    with pytest.raises(DataError, match=r"pip install 'streamkd\[lhotse\]'"):
        import_lhotse(tmp_path / "cuts.jsonl.gz")
