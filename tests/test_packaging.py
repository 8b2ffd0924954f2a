"""Packaging promises: installing streamkd keeps a user's torch (a range,
not a pin), while the Makefile's set-up pins the build CI tests."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import torch
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["dependencies"])}


def test_torch_is_a_range_that_holds_the_pinned_and_the_installed_build():
    spec = _requirements()["torch"].specifier
    assert not any(s.operator in ("==", "===") for s in spec), spec  # a range: pip keeps the user's torch
    pinned = re.search(r"^TORCH_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert spec.contains(pinned) and spec.contains(torch.__version__.split("+")[0])
    assert not spec.contains("2.4.1") and not spec.contains("3.0.0")
