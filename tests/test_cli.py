"""The command line: every command's --help, and `streamkd demo` end to end
on a tiny grid (corpus, teacher, students, evaluation, report, plots)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import CONFIGS, data_overrides
from streamkd.cli import build_parser

COMMANDS = ["corpus build", "import librispeech", "import kaldi", "prepare", "train", "decode", "stream",
            "export", "serve", "experiment", "report", "demo", "bench", "compare", "errors"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(command.split() + ["--help"])
    assert exit_info.value.code == 0
    assert "usage: streamkd" in capsys.readouterr().out


def test_demo_runs_a_tiny_grid_end_to_end(tiny_corpus, tmp_path):
    overrides = data_overrides(tiny_corpus) + ["train.max_steps=2", "train.num_threads=1"]
    grid = tmp_path / "tiny_grid.yaml"
    grid.write_text(
        "name: tiny\n"
        f"teacher: {CONFIGS / 'tiny.yaml'}\n"
        "methods:\n"
        f"  none: {{config: {CONFIGS / 'tiny_student.yaml'}}}\n"
        f"  aux: {{config: {CONFIGS / 'tiny_student.yaml'}, overrides: [kd.method=aux, 'kd.layer_map=[[2,2]]']}}\n"
        "chunks:\n  160ms: {chunk_frames: 4, left_chunks: 2}\n"
        f"overrides: {json.dumps(overrides)}\n"
        "emission_delay_utts: 3\n"
        "lm: {out: elsewhere, order: 2, fortunes: false}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "streamkd", "demo", "--grid", str(grid), "--out", str(tmp_path / "exp")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    results = tmp_path / "exp" / "results"
    lines = json.loads((results / "summary.json").read_text())
    assert [x["method"] for x in lines] == ["teacher", "none", "aux"]
    assert all(0 <= x["test_wer"] for x in lines)
    assert "delay" in json.loads((tmp_path / "exp" / "aux_160ms_seed0" / "eval.json").read_text())
    assert (results / "by_method.png").stat().st_size > 1000
    assert "| aux | 160ms |" in r.stdout
    # the word LM is built with the demo's runs, and every model is also scored and shown through it
    assert (tmp_path / "exp" / "lm" / "graph_a0.8_b0" / "HLG.fst").is_file() and not (tmp_path / "elsewhere").exists()
    assert [x["method"] for x in json.loads((results / "summary_lm.json").read_text())] == ["teacher", "none", "aux"]
    assert "## With the word LM" in r.stdout and "  aux +LM  " in r.stdout
    # a second run finds every run done and trains nothing
    r2 = subprocess.run([sys.executable, "-m", "streamkd", "demo", "--grid", str(grid), "--out", str(tmp_path / "exp")],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0 and r2.stdout.count(": done") == 3


def test_help_does_not_wait_for_torch():
    """Building the parser (every `streamkd ... --help`) imports no torch:
    the CLI imports what a command needs when it runs, and the package's
    top level resolves load_model and StreamingRecognizer on first use."""
    code = ("import sys; from streamkd.cli import build_parser; build_parser(); import streamkd; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert streamkd.StreamingRecognizer.__name__ == 'StreamingRecognizer' and 'torch' in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
