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


def test_make_voices_installs_the_packages_of_the_more_voices():
    """The package list lives in the Makefile (`make voices`) and in
    streamkd.corpus.voices (the error that names them): the two must agree."""
    from streamkd.corpus.voices import MORE_VOICES_PACKAGES

    listed = re.search(r"^VOICE_PACKAGES := (.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert listed.split() == MORE_VOICES_PACKAGES.split()


def test_the_configs_the_cli_needs_ship_in_the_wheel(tmp_path):
    """`streamkd demo` and `streamkd bench` read configs, and the demo its
    pretrained teacher, from the installed package (package data), not from
    a checkout found through parents[N]."""
    import subprocess
    import sys
    import zipfile

    import streamkd
    from streamkd.bench import CONFIGS
    from streamkd.cli.experiment import DEMO_GRID
    from streamkd.experiment import load_grid, plan_runs

    package = Path(streamkd.__file__).resolve().parent
    assert CONFIGS == package / "configs" and DEMO_GRID == package / "configs" / "experiments" / "demo.yaml"
    needed = {f"streamkd/configs/{p.relative_to(CONFIGS).as_posix()}" for p in [DEMO_GRID, *CONFIGS.glob("demo/*.yaml")]}
    grid = load_grid(DEMO_GRID)
    assert {run.config for run in plan_runs(grid)} - {None} <= {p.resolve() for p in CONFIGS.glob("demo/*.yaml")}
    pretrained = package / "pretrained"
    assert grid.teacher_checkpoint == (pretrained / "teacher.pt").resolve()
    needed |= {f"streamkd/pretrained/{p.relative_to(pretrained).as_posix()}"
               for p in [pretrained / "teacher.pt", *(pretrained / "lang").iterdir()]}
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("streamkd-*.whl")
    assert needed <= set(zipfile.ZipFile(wheel).namelist())
