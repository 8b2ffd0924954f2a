"""Atomic file writes: a killed or failing writer never leaves a half file.

``atomic_open`` hands out a temporary file in the target's folder; only when
the ``with`` block ends cleanly is it flushed, fsynced and renamed over the
target with ``os.replace`` (atomic on POSIX), so readers see either the old
file or the whole new one; the folder is fsynced too, so that the rename
itself survives a power cut (a completion marker such as ``final.json``
must not vanish after the work it marks is on disk). On any exception the temporary file is removed
and the target is left as it was. The new file gets the permissions a plain
``open`` would give it (0o666 less the umask).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = ["atomic_open", "write_atomic"]

_TRIES = 100


def _create_temp(path: Path, readable: bool) -> tuple[int, str]:
    """A new, empty, uniquely named file next to ``path`` -> (fd, name)."""
    flags = (os.O_RDWR if readable else os.O_WRONLY) | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(_TRIES):
        tmp = str(path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp"))
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: no free temporary name after {_TRIES} tries")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """``with atomic_open(path) as f: ...`` writes ``f`` into ``path`` atomically.

    ``mode`` is a write mode ("wb", "w", "w+b", ...) and ``open_kwargs`` go to
    ``open`` (``encoding``, ``newline``, ...). The parent folder is created.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open needs a write mode ('w', 'wb', ...), got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path, readable="+" in mode)
    try:
        f = os.fdopen(fd, mode, **open_kwargs)
    except BaseException:
        with contextlib.suppress(OSError):  # open may already have closed it
            os.close(fd)
        os.unlink(tmp)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | Path, data: str | bytes, encoding: str = "utf-8") -> None:
    """Write ``data`` (a str is encoded with ``encoding``) to ``path`` atomically."""
    if isinstance(data, str):
        data = data.encode(encoding)
    elif not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"write_atomic takes str or bytes, got {type(data).__name__}")
    with atomic_open(path, "wb") as f:
        f.write(data)
