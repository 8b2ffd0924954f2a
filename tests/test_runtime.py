"""streamkd.runtime.keep_freed_memory: large blocks are reused, not faulted in again."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")

# Allocates and frees a 64 MiB tensor, filling it each time, and prints the
# minor page faults of 4 rounds after 10 of warm-up (one full fault-in of
# 64 MiB is ~16k faults of 4 KiB). With the setting the heap settles within
# a few rounds (aligned requests fragment it at first) and then reuses it.
_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from streamkd.runtime import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "1" else False
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(16 << 20).fill_(1.0)
    before = faults()
    for _ in range(4):
        torch.empty(16 << 20).fill_(1.0)
    print(applied, faults() - before)
""")


def _probe(keep: str, env=None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, keep], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    return out[0], int(out[1])


def test_freed_blocks_are_reused_without_page_faults():
    applied, faults = _probe("1")
    assert applied == "True"
    assert faults < 1000, faults  # the block is reused: no fault-in
    applied, faults = _probe("0")
    assert applied == "False"
    assert faults > 4 * 10000, faults  # glibc's default: mmap and munmap each time


def test_environment_turns_it_off(monkeypatch):
    import os

    env = dict(os.environ, STREAMKD_KEEP_FREED_MEMORY="0")
    applied, faults = _probe("1", env=env)
    assert applied == "False"
    assert faults > 4 * 10000, faults
