"""Process-wide CPU settings for training.

PyTorch's CPU allocator takes every tensor from the C library's ``malloc``.
glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and gives them back with ``munmap`` on free, so a training step
whose largest activations are ~48 MiB (the demo student's first subsampling
convolution: 16 x 199 x 39 x 96 floats, and its gradient) page-faults
through every one of them again at every step: ~56k minor faults and
~0.1 s of kernel time per 0.35 s step on this machine (``streamkd bench``).
``keep_freed_memory`` tells glibc to serve every block from its heap and to
keep freed memory for the next step instead, which is what jemalloc or
tcmalloc (the usual advice for PyTorch on CPU) also achieve. The resident
size then stays at the step's peak instead of falling between steps.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory"]

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_NEVER = 2**31 - 1  # bytes of free heap top kept before trimming (int max)

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Serve all allocations from the heap and never trim it (glibc only).

    Returns True when the setting is in force. A no-op returning False on a
    C library without ``mallopt`` (macOS, musl) or when the environment sets
    ``STREAMKD_KEEP_FREED_MEMORY=0``. Safe to call more than once; the
    setting lasts for the process and is inherited by forked workers.
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("STREAMKD_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on a parameter it refuses.
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
    return _applied
