import os

import pytest

from streamkd.atomic import atomic_open, write_atomic


def test_write_atomic_round_trips_str_and_bytes(tmp_path):
    text = tmp_path / "t.txt"
    write_atomic(text, "héllo ▁ wörld\nline 2\n")
    assert text.read_text(encoding="utf-8") == "héllo ▁ wörld\nline 2\n"
    assert text.read_bytes() == "héllo ▁ wörld\nline 2\n".encode("utf-8")
    write_atomic(text, "é", encoding="latin-1")
    assert text.read_bytes() == b"\xe9"
    blob = tmp_path / "b.bin"
    data = bytes(range(256)) * 3
    write_atomic(blob, data)
    assert blob.read_bytes() == data
    write_atomic(blob, b"")  # replaces, does not append
    assert blob.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "t.txt"]
    with pytest.raises(TypeError):
        write_atomic(blob, 42)
    assert blob.read_bytes() == b""


def test_exception_leaves_old_content_and_no_temp_file(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write("new, half written")
            f.flush()
            raise RuntimeError("boom")
    assert path.read_text(encoding="utf-8") == "old"
    assert os.listdir(tmp_path) == ["f.json"]
    missing = tmp_path / "never.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_open(missing) as f:
            f.write(b"x")
            raise KeyboardInterrupt
    assert not missing.exists()
    assert os.listdir(tmp_path) == ["f.json"]


def test_text_mode_and_replace_on_success(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old", encoding="utf-8")
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write("new")
        assert path.read_text(encoding="utf-8") == "old"  # target untouched until the block ends
    assert path.read_text(encoding="utf-8") == "new"
    assert os.listdir(tmp_path) == ["f.txt"]
    with pytest.raises(ValueError, match="write mode"):
        with atomic_open(path, "rb"):
            pass
    assert path.read_text(encoding="utf-8") == "new"


def test_parent_folder_is_created(tmp_path):
    path = tmp_path / "a" / "b" / "c.bin"
    write_atomic(path, b"data")
    assert path.read_bytes() == b"data"
    with atomic_open(tmp_path / "x" / "y.txt", "w", encoding="utf-8") as f:
        f.write("ok")
    assert (tmp_path / "x" / "y.txt").read_text(encoding="utf-8") == "ok"
    assert os.listdir(tmp_path / "a" / "b") == ["c.bin"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "p", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o644


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    """The rename itself must reach the disk: a completion marker (final.json,
    meta.json) that vanishes after a power cut would undo a finished run."""
    import os
    import stat

    from streamkd import atomic

    target = tmp_path / "sub" / "final.json"
    synced = []

    def fsync(fd):
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        synced.append(("dir" if is_dir else "file", target.exists()))

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    write_atomic(target, "{}\n")
    assert synced == [("file", False), ("dir", True)]


# Writes that are scratch files for a subprocess, not results anyone reads back.
_SCRATCH_WRITES = {("corpus/voices.py", "script.write_text(")}


def test_every_file_is_written_through_the_one_atomic_writer():
    """No module writes a result file around streamkd.atomic (appending to a
    log is allowed: a partial last line is a partial log, not a lie)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src" / "streamkd"
    pattern = re.compile(r"[\w.\])]+\.write_(?:text|bytes)\(|\bopen\([^)]*['\"][wx]b?\+?['\"]")
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel == "atomic.py":
            continue
        for line in path.read_text().splitlines():
            for hit in pattern.findall(line):
                if (rel, hit) not in _SCRATCH_WRITES:
                    found.append(f"{rel}: {line.strip()}")
    assert found == []
