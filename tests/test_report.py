"""Experiment grid planning and the report's statistics."""
import json
import math
import subprocess
import sys

import pytest

from streamkd.config import ConfigError
from streamkd.decode import read_hyps
from streamkd.experiment import build_config, load_grid, plan_runs
from streamkd.manifest import read_manifest
from streamkd.report import _palette, _spread, markdown_table, paired_bootstrap, summarise, write_report


def test_paired_bootstrap_detects_a_clear_difference_and_not_a_null_one():
    better = {f"u{i}": [0, 10] for i in range(50)}
    worse = {f"u{i}": [3, 10] for i in range(50)}
    r = paired_bootstrap(better, worse)
    assert r["diff"] == pytest.approx(-0.3) and r["p"] == 0.0 and r["utterances"] == 50
    same = paired_bootstrap(worse, worse)
    assert same["diff"] == 0.0 and same["p"] == 1.0  # never strictly better


def _row(method, chunk, seed, test_wer, errs):
    return {"method": method, "chunk": chunk, "seed": seed, "dev": {"wer": test_wer, "cer": test_wer / 2}, "test": {"wer": test_wer, "cer": test_wer / 2},
            "test_utts": {f"u{i}": [e, 10] for i, e in enumerate(errs)},
            "test_utts_chars": {f"u{i}": [e, 20] for i, e in enumerate(errs)},
            "delay": {"emission_mean_ms": 100.0, "alignment_mean_ms": 20.0, "token_emission_mean_ms": 90.0}}


def test_summarise_gap_closed_and_relative_reduction(tmp_path):
    rows = [
        {"method": "teacher", "chunk": None, "seed": 0, "dev": {"wer": 0.10, "cer": 0.05}, "test": {"wer": 0.10, "cer": 0.05}},
        _row("none", "160ms", 0, 0.30, [3] * 20), _row("none", "160ms", 1, 0.30, [3] * 20),
        _row("aux", "160ms", 0, 0.20, [2] * 20), _row("aux", "160ms", 1, 0.20, [2] * 20),
    ]
    lines = {x["method"]: x for x in summarise(rows)}
    assert lines["teacher"]["test_wer"] == pytest.approx(10.0)
    aux = lines["aux"]
    assert aux["seeds"] == 2 and aux["test_wer"] == pytest.approx(20.0) and aux["test_wer_std"] == 0.0
    assert aux["gap_closed"] == pytest.approx(0.5)  # (30 - 20) / (30 - 10)
    assert aux["test_cer"] == pytest.approx(10.0) and lines["teacher"]["test_cer"] == pytest.approx(5.0)
    assert aux["rel_vs_none"] == pytest.approx(1 / 3)
    assert lines["none"]["rel_vs_teacher"] == pytest.approx(2.0)  # the streaming gap: (30 - 10) / 10
    assert aux["rel_vs_teacher"] == pytest.approx(1.0)
    assert aux["p_vs_none"] == 0.0 and aux["token_emission_delay_ms"] == pytest.approx(90.0)
    out = write_report(rows, tmp_path / "res")
    assert (tmp_path / "res" / "by_method.png").stat().st_size > 1000
    assert "| aux | 160ms | 2 |" in (tmp_path / "res" / "table.md").read_text()
    assert "test_utts" not in json.loads((tmp_path / "res" / "runs.json").read_text())[1]
    # runs.json stays small: a dev set's hundreds of speakers and the skipped utterances are counts there
    many = {f"spk{i}": {"wer": 0.5} for i in range(25)}
    dev = {**rows[1]["dev"], "by_speaker": many, "skipped": 1, "skipped_reasons": {"too short": 1},
           "skipped_items": [{"id": "x", "reason": "too short"}]}
    test = {**rows[1]["test"], "by_speaker": {"a": {"wer": 0.2}, "b": {"wer": 0.2}}}
    write_report([rows[0], {**rows[1], "dev": dev, "test": test}, *rows[2:]], tmp_path / "slim")
    kept = json.loads((tmp_path / "slim" / "runs.json").read_text())[1]
    assert kept["dev"] == {**rows[1]["dev"], "by_speaker": "25 speakers (decode_<split>/summary.json has each)",
                           "skipped": 1, "skipped_reasons": {"too short": 1}}
    assert kept["test"] == test
    assert markdown_table(out["lines"]).count("\n") == len(out["lines"]) + 2
    write_report(rows[:1], tmp_path / "res")  # the teacher alone: no student plots, stale ones removed
    assert not (tmp_path / "res" / "by_method.png").exists() and not (tmp_path / "res" / "vs_delay.png").exists()
    assert "| teacher | full | 1 |" in (tmp_path / "res" / "table.md").read_text()


def test_summarise_compares_methods_over_the_seeds_both_have():
    """aux with one seed done meets none's run of that seed, not none's mean;
    a run without per-utterance errors (a record from before records) drops
    out of the bootstrap only."""
    rows = [
        {"method": "teacher", "chunk": None, "seed": None, "test": {"wer": 0.10, "cer": 0.05}},
        _row("none", "a", 0, 0.30, [3] * 20), _row("none", "a", 1, 0.50, [5] * 20),
        _row("aux", "a", 0, 0.20, [2] * 20),
    ]
    aux = {x["method"]: x for x in summarise(rows)}["aux"]
    assert aux["vs_none_seeds"] == [0] and aux["rel_vs_none"] == pytest.approx(1 / 3)  # not against 40
    assert aux["gap_closed"] == pytest.approx(0.5) and aux["vs_token_seeds"] == [] and math.isnan(aux["rel_vs_token"])
    assert aux["p_vs_none_utterances"] == 20 and aux["p_vs_none"] == 0.0
    assert aux["p_vs_token_utterances"] == 0 and math.isnan(aux["p_vs_token"])  # no token runs
    slim = {k: v for k, v in rows[1].items() if not k.startswith("test_utts")}
    aux = {x["method"]: x for x in summarise([rows[0], slim, rows[2], rows[3]])}["aux"]
    assert aux["rel_vs_none"] == pytest.approx(1 / 3) and aux["p_vs_none_utterances"] == 0 and math.isnan(aux["p_vs_none"])
    # Against token too, over the (seed, utterance) pairs both kept; token is not tested against itself.
    lines = {x["method"]: x for x in summarise(rows + [_row("token", "a", 0, 0.20, [2] * 10 + [3] * 10)])}
    aux, token = lines["aux"], lines["token"]
    assert aux["p_vs_token_utterances"] == 20 and aux["p_vs_token"] < 0.05
    assert math.isnan(token["p_vs_token"]) and token["p_vs_token_utterances"] == 0
    assert lines["none"]["p_vs_token"] == 1.0  # none's 3 errors never beat token's 2-3
    assert markdown_table(list(lines.values())).splitlines()[0].count("|") == markdown_table(
        list(lines.values())).splitlines()[2].count("|")


def test_grid_plans_teacher_then_every_method_chunk_seed(tmp_path):
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(
        "name: g\nout_dir: " + str(tmp_path / "exp") + "\n"
        "teacher: " + str(_configs() / "tiny.yaml") + "\n"
        "methods:\n  none: {config: " + str(_configs() / "tiny_student.yaml") + "}\n"
        "  aux-no-apc: {config: " + str(_configs() / "tiny_student.yaml") + ", overrides: [kd.gamma=0]}\n"
        "  layer: {config: " + str(_configs() / "tiny_student.yaml") + "}\n"
        "chunks:\n  a: {chunk_frames: 2, left_chunks: 1}\n  b: {chunk_frames: 8, left_chunks: null}\n"
        "seeds: [0, 1]\nonly: {aux-no-apc: {chunks: [a], seeds: [0]}, layer: {chunks: [b]}}\n")
    runs = plan_runs(load_grid(grid_file))
    # the headline chunk size over seeds, then every method once on the first seed, then the other seeds
    assert [r.name for r in runs] == ["teacher", "none_a_seed0", "none_a_seed1", "none_b_seed0", "aux-no-apc_a_seed0",
                                      "layer_b_seed0", "none_b_seed1", "layer_b_seed1"]
    cfg = build_config(runs[4])
    assert cfg.kd.gamma == 0 and cfg.model.chunk.chunk_frames == 2 and cfg.train.seed == 0
    assert cfg.kd.teacher.endswith("teacher/final.pt")
    assert build_config(runs[3]).model.chunk.left_chunks is None
    grid_file.write_text(grid_file.read_text() + "typo: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'typo' in .*g.yaml"):
        load_grid(grid_file)


@pytest.mark.parametrize("text, error", [
    ("chunks:\n  a: {chunk_frames: four}\n", "chunks.a.chunk_frames .*expected an integer"),
    ("chunks:\n  a: {chunk_frames: 4, right: 1}\n", "unknown config key 'chunks.a.right'"),
    ("chunks:\n  a: {left_chunks: 1}\n", "missing config key 'chunks.a.chunk_frames'"),
    ("chunks: {a: {chunk_frames: 4}}\nmetric: bleu\n", "metric.*'bleu' is not one of"),
    ("chunks: {a: {chunk_frames: 4}}\nonly: {tok: {seeds: [0]}}\n", "only.tok names no method"),
    ("chunks: {a: {chunk_frames: 4}}\nseeds: 3\n", "seeds .*expected a list"),
    ("chunks: {}\n", "chunks and seeds each need at least one entry"),
    ("chunks: {a: {chunk_frames: 4}}\nseeds: []\n", "chunks and seeds each need at least one entry"),
])
def test_grid_files_go_through_the_typed_loader(tmp_path, text, error):
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text("name: g\nteacher: t.yaml\nmethods: {none: {config: s.yaml}}\n" + text)
    with pytest.raises(ConfigError, match=error):
        load_grid(grid_file)
    grid_file.write_text("name: g\nmethods: {none: {config: s.yaml}}\nchunks: {a: {chunk_frames: 4}}\n")
    with pytest.raises(ConfigError, match="exactly one of teacher .* and teacher_checkpoint"):
        load_grid(grid_file)
    grid_file.write_text("name: g\nteacher: t.yaml\nteacher_checkpoint: p/teacher.pt\n"
                         "methods: {none: {config: s.yaml}}\nchunks: {a: {chunk_frames: 4}}\n")
    with pytest.raises(ConfigError, match="exactly one of teacher"):
        load_grid(grid_file)
    grid_file.write_text("name: g\nteacher_checkpoint: p/teacher.pt\nmethods: {none: {config: s.yaml}}\nchunks: {a: {chunk_frames: 4}}\n")
    with pytest.raises(ConfigError, match=r"teacher_checkpoint: .*p/teacher.pt does not exist; write it with "
                                          r"`streamkd pretrained"):
        load_grid(grid_file)


def test_a_bad_grid_override_is_named(tmp_path):
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(f"name: g\nteacher: {_configs() / 'tiny.yaml'}\n"
                         f"methods: {{none: {{config: {_configs() / 'tiny_student.yaml'}, overrides: [kd.gama=0]}}}}\n"
                         "chunks: {a: {chunk_frames: 2}}\n")
    runs = plan_runs(load_grid(grid_file))
    with pytest.raises(ConfigError, match=r"unknown config key 'kd.gama' in grid override \(run none_a_seed0\)"):
        build_config(runs[1])


def _configs():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "configs"


def test_matched_tokens_pairs_equal_stretches_only():
    from streamkd.evaluation import _matched_tokens

    assert _matched_tokens([1, 2, 3, 4], [1, 2, 9, 4]) == [(0, 0), (1, 1), (3, 3)]
    assert _matched_tokens([5, 1, 2], [1, 2]) == [(1, 0), (2, 1)]
    assert _matched_tokens([], [1]) == []


def test_run_grid_trains_only_the_named_runs_in_order(tmp_path, monkeypatch):
    import streamkd.experiment
    from streamkd.experiment import run_grid

    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(
        "name: g\nout_dir: " + str(tmp_path / "exp") + "\n"
        "teacher: " + str(_configs() / "tiny.yaml") + "\n"
        "methods:\n  none: {config: " + str(_configs() / "tiny_student.yaml") + "}\n"
        "chunks:\n  a: {chunk_frames: 2, left_chunks: 1}\n  b: {chunk_frames: 8, left_chunks: 1}\n")
    trained = []

    def fake_train(cfg, resume, progress):
        trained.append(cfg.train.out_dir)
        from pathlib import Path
        Path(cfg.train.out_dir).mkdir(parents=True)
        (Path(cfg.train.out_dir) / "final.json").write_text("{}")

    monkeypatch.setattr(streamkd.experiment, "train", fake_train)
    run_grid(load_grid(grid_file), names=["none_b_seed0", "none_a_seed0"])
    assert [p.split("/")[-1] for p in trained] == ["none_b_seed0", "none_a_seed0"]
    with pytest.raises(ConfigError, match="no runs named"):
        run_grid(load_grid(grid_file), names=["nope"])


def test_summarise_on_cer_and_hyps_round_trip(tmp_path):
    from streamkd.decode import per_utt_errors, read_hyps

    rows = [
        {"method": "teacher", "chunk": None, "seed": 0, "dev": {"wer": 0.1, "cer": 0.05}, "test": {"wer": 0.1, "cer": 0.05}},
        _row("none", "c", 0, 0.30, [3] * 20), _row("aux", "c", 0, 0.20, [2] * 20),
    ]
    aux = {x["method"]: x for x in summarise(rows, "cer")}["aux"]
    assert aux["metric"] == "cer"
    assert aux["gap_closed"] == pytest.approx((15 - 10) / (15 - 5))  # CERs 15, 10 against the teacher's 5
    assert aux["p_vs_none"] == 0.0
    with pytest.raises(ValueError):
        summarise(rows, "ser")
    hyps = tmp_path / "hyps.txt"
    hyps.write_text("a\tREF: HELLO WORLD\na\tHYP: HELO WORLD\nb\tREF: HI\nb\tHYP: \n")
    parsed = {r["id"]: r for r in read_hyps(hyps)}
    assert parsed["a"] == {"id": "a", "ref": "HELLO WORLD", "hyp": "HELO WORLD"} and parsed["b"]["hyp"] == ""
    words, chars = per_utt_errors(list(parsed.values()))
    assert words["a"] == [1, 2] and chars["a"] == [1, 11] and words["b"] == [1, 1] and chars["b"] == [2, 2]


def test_training_throughput_and_epoch_time_against_none(tmp_path):
    from streamkd.evaluation import training_throughput

    log = tmp_path / "log.csv"
    # Step 1 and the first row after a resume (step 151 after 150) cover one step each: left out.
    log.write_text("step,epoch,loss,audio_sec_per_sec\n1,0,3,10\n50,0,2,100\n100,0,2,90\n150,0,2,120\n"
                   "151,0,2,5\n200,0,2,110\n")
    assert training_throughput(log) == pytest.approx(105.0)  # median of 100, 90, 120, 110
    assert math.isnan(training_throughput(tmp_path / "missing.csv"))
    rows = [{"method": "teacher", "chunk": None, "seed": 0, "dev": {"wer": 0.1, "cer": 0.05},
             "test": {"wer": 0.1, "cer": 0.05}},
            {**_row("none", "c", 0, 0.30, [3] * 20), "train_aps": 100.0},
            {**_row("aux", "c", 0, 0.20, [2] * 20), "train_aps": 62.5}]
    lines = {x["method"]: x for x in summarise(rows)}
    assert lines["aux"]["train_aps"] == 62.5 and lines["aux"]["epoch_time_vs_none"] == pytest.approx(1.6)
    assert lines["none"]["epoch_time_vs_none"] == pytest.approx(1.0)
    table = markdown_table(list(lines.values()))
    assert "| epoch time vs none |" in table and "| 62 | 1.60 |" in table


def _hyps(path, pairs):
    path.mkdir()
    (path / "hyps.txt").write_text("".join(f"{k}\tREF: {r}\n{k}\tHYP: {h}\n" for k, (r, h) in pairs.items()))
    return path


def test_compare_decodes_bootstraps_two_decodes_of_one_manifest(tmp_path, capsys):
    from streamkd.cli import main as cli_main
    from streamkd.errors import DataError
    from streamkd.report import compare_decodes

    refs = {f"u{i}": "THE CAT SAT ON THE MAT" for i in range(40)}
    good = _hyps(tmp_path / "good", {k: (r, r) for k, r in refs.items()})
    bad = _hyps(tmp_path / "bad", {k: (r, "THE CAT SAT ON A HAT") for k, r in refs.items()} | {"extra": ("A", "A")})
    out = compare_decodes(good, bad / "hyps.txt")
    assert (out["utterances"], out["only_in_a"], out["only_in_b"]) == (40, 0, 1)
    assert out["wer"]["a"] == 0.0 and out["wer"]["b"] == pytest.approx(2 / 6) and out["wer"]["p"] == 0.0
    assert out["cer"]["a_minus_b"] == pytest.approx(-4 / 22)  # "A HAT" for "THE MAT": 4 edits in 22 characters
    assert compare_decodes(bad, good)["wer"]["p"] == 1.0
    other = _hyps(tmp_path / "other", {k: ("SOMETHING ELSE", "") for k in refs})
    with pytest.raises(DataError, match="other references"):
        compare_decodes(good, other)
    with pytest.raises(DataError, match="share no utterance"):
        compare_decodes(good, _hyps(tmp_path / "none", {"x": ("A", "A")}))
    assert cli_main(["compare", str(good), str(tmp_path)]) == 1
    assert "no hyps.txt" in capsys.readouterr().err
    assert cli_main(["compare", str(good), str(bad)]) == 0
    assert json.loads(capsys.readouterr().out)["wer"]["a_minus_b"] == pytest.approx(-2 / 6)


def test_compare_reads_run_records_for_runs_whose_decodes_are_gone(tmp_path, capsys):
    """A grid's run record keeps each utterance's error counts of every
    scored set: compare pairs it with a decode folder or another record, on
    the set --set names, and refuses what it cannot pair."""
    from streamkd.cli import main as cli_main
    from streamkd.decode import per_utt_errors
    from streamkd.errors import DataError
    from streamkd.experiment import write_record
    from streamkd.report import compare_decodes

    refs = {f"u{i}": "THE CAT SAT ON THE MAT" for i in range(30)}
    good = _hyps(tmp_path / "good", {k: (r, r) for k, r in refs.items()})
    bad_pairs = {k: (r, "THE CAT SAT ON A HAT") for k, r in refs.items()}
    bad = _hyps(tmp_path / "bad", bad_pairs)
    words, chars = per_utt_errors([{"id": k, "ref": r, "hyp": h} for k, (r, h) in bad_pairs.items()])
    record = tmp_path / "bad_run.json.gz"
    # the LM set holds other figures: --set must pick the one asked
    write_record(record, {"run": "bad_run", "final": {}, "test_utts": words, "test_utts_chars": chars,
                          "test_lm_utts": {k: [0, 6] for k in refs}, "test_lm_utts_chars": {k: [0, 22] for k in refs}})
    from_decode, from_record = compare_decodes(good, bad), compare_decodes(good, record)
    assert from_record["wer"] == from_decode["wer"] and from_record["cer"] == from_decode["cer"]
    assert from_record["wer"]["p"] == 0.0 and from_record["sources"][1] == f"{record} (test)"
    assert compare_decodes(record, record, split="test_lm")["wer"]["a"] == 0.0
    assert compare_decodes(good, record, split="test_lm")["wer"]["p"] == 1.0  # not better: the same errors
    with pytest.raises(DataError, match="keeps no per-utterance errors of set 'dev'.*keeps test, test_lm"):
        compare_decodes(good, record, split="dev")
    with pytest.raises(DataError, match="other references"):  # a reference of another length
        compare_decodes(_hyps(tmp_path / "other", {k: ("THE CAT", "THE CAT") for k in refs}), record)
    with pytest.raises(DataError, match="--given .* needs each decode's text"):
        compare_decodes(good, record, given=bad)
    (tmp_path / "broken.json.gz").write_bytes(b"not gzip")
    assert cli_main(["compare", str(good), str(tmp_path / "broken.json.gz")]) == 1
    assert "broken.json.gz: not a run record" in capsys.readouterr().err
    assert cli_main(["compare", str(good), str(record), "--set", "train"]) == 1
    assert "--set must be one of dev, test, unseen, dev_lm, test_lm, unseen_lm" in capsys.readouterr().err
    assert cli_main(["compare", str(record), str(good), "--set", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["wer"]["a_minus_b"] == pytest.approx(2 / 6)


def test_compare_given_a_third_decode_splits_the_words_by_whether_it_got_them_right(tmp_path, capsys):
    """--given (the teacher's decode): each reference word falls in the
    group of words the teacher got right or wrong, and A's and B's words
    wrong are counted in each; a substitution and a deletion are wrong, an
    insertion makes no reference word wrong."""
    from streamkd.cli import main as cli_main
    from streamkd.errors import DataError
    from streamkd.report import compare_decodes

    ref = "THE CAT SAT ON THE MAT"
    teacher = _hyps(tmp_path / "teacher", {"u0": (ref, "THE CAT SAT ON A MAT"), "u1": ("A B", "A C")})
    a = _hyps(tmp_path / "a", {"u0": (ref, "THE CAT SAT ON THE MAT NOW"), "u1": ("A B", "B")})
    b = _hyps(tmp_path / "b", {"u0": (ref, "THE BAT SAT THE MAT"), "u1": ("A B", "A B")})
    out = compare_decodes(a, b, given=teacher)["given"]
    # teacher right: THE CAT SAT ON MAT (u0) and A (u1); wrong: the second THE (u0) and B (u1)
    assert out["given_right"] == {"words": 6, "a_wrong": 1, "b_wrong": 2, "share_a_wrong": pytest.approx(1 / 6),
                                  "share_b_wrong": pytest.approx(2 / 6)}
    assert (out["given_wrong"]["words"], out["given_wrong"]["a_wrong"], out["given_wrong"]["b_wrong"]) == (2, 0, 0)
    assert out["decode"] == str(teacher / "hyps.txt") and out["only_in_given"] == 0
    assert "given" not in compare_decodes(a, b)
    other = _hyps(tmp_path / "other", {"u0": ("SOMETHING ELSE", "")})
    with pytest.raises(DataError, match="other references in .* and .*other"):
        compare_decodes(a, b, given=other)
    assert cli_main(["compare", str(a), str(b), "--given", str(teacher)]) == 0
    assert json.loads(capsys.readouterr().out)["given"]["given_wrong"]["words"] == 2


def test_learning_curves_plot_each_run_with_a_valid_csv(tmp_path):
    from streamkd.report import plot_learning_curves

    rows = [{"step": "10", "epoch": "0", "loss": "2.5", "wer": "0.9", "cer": "0.4"},
            {"step": "20", "epoch": "1", "loss": "1.5", "wer": "0.5", "cer": "0.2"}]
    assert not plot_learning_curves({"none": [], "aux": None}, tmp_path / "c0.png")
    assert not (tmp_path / "c0.png").exists()
    assert plot_learning_curves({"teacher": rows, "none": []}, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_method_of_the_grid_gets_its_own_colour():
    """The plots tell methods apart by colour: the paper grid's twelve
    methods must not share one (a ten-colour cycle gave the eleventh none's),
    and ten or fewer keep matplotlib's default colours."""
    import matplotlib.colors as mcolors

    twelve = [f"m{i}" for i in range(12)]
    assert len({mcolors.to_hex(c) for c in _palette(twelve).values()}) == 12
    three = _palette(["none", "token", "aux"])
    assert [mcolors.to_hex(three[m]) for m in ("none", "token", "aux")] == [mcolors.to_hex(f"C{i}") for i in range(3)]


def test_eval_cache_is_used_until_final_pt_is_newer(tmp_path):
    import os

    import pytest

    from streamkd.errors import StreamkdError
    from streamkd.evaluation import evaluate_run

    (tmp_path / "final.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "eval.json").write_text('{"cached": true}\n')
    os.utime(tmp_path / "final.pt", (1_000_000, 1_000_000))
    assert evaluate_run(tmp_path, None) == {"cached": True}
    os.utime(tmp_path / "final.pt", None)  # the run was extended: final.pt is newer
    os.utime(tmp_path / "eval.json", (1_000_000, 1_000_000))
    with pytest.raises(StreamkdError):  # scored again: the (fake) checkpoint is read
        evaluate_run(tmp_path, None)


def test_a_grid_distils_a_pretrained_teacher_and_scores_it_on_the_students_data(tiny_corpus, tiny_lang, tmp_path,
                                                                                 monkeypatch, capsys):
    """teacher_checkpoint: nothing trains the teacher; students use its
    checkpoint and its lang dir; the report scores it on the students' data."""
    import torch

    from streamkd.checkpoint import build_model, inference_checkpoint, load_model, save_atomic, save_pretrained
    from streamkd.config import load_config
    from streamkd.evaluation import evaluate_grid
    from streamkd.experiment import run_grid
    from streamkd.lang import write_lang_of_model
    from streamkd.report import examples

    from conftest import data_overrides

    tokenizer, cmvn = tiny_lang
    cfg = load_config(_configs() / "tiny.yaml", ["data.test_manifest=/nowhere/test.jsonl"])
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer, cmvn).eval()
    save_atomic(inference_checkpoint(cfg, model.state_dict(), tokenizer.state_dict(), cmvn), tmp_path / "final.pt")
    pre = tmp_path / "pre"
    pre.mkdir()
    save_pretrained(tmp_path / "final.pt", pre / "teacher.pt")
    write_lang_of_model(load_model(pre / "teacher.pt"), pre / "lang", source="test")

    data = [o for o in data_overrides(tiny_corpus) if not o.startswith("data.lang_dir")]
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(
        f"name: g\nout_dir: {tmp_path / 'exp'}\nresults_dir: {tmp_path / 'res'}\nteacher_checkpoint: pre/teacher.pt\n"
        f"methods:\n  none: {{config: {_configs() / 'tiny_student.yaml'}}}\n"
        f"chunks: {{a: {{chunk_frames: 4, left_chunks: 2}}}}\noverrides: {data + ['train.max_steps=2']}\n"
        f"emission_delay_utts: 2\nlm: {{out: {tmp_path / 'lm'}, order: 2, fortunes: false, alpha: 0.5}}\n"
        f"unseen_dev: {{out: {tmp_path / 'unseen'}, voices: [festival_ked_diphone]}}\n")
    grid = load_grid(grid_file)
    runs = plan_runs(grid)
    assert [(r.name, r.config) for r in runs][0] == ("teacher", None)
    student = build_config(runs[1])
    assert student.kd.teacher == str(pre / "teacher.pt") and student.data.lang_dir == str(pre / "lang")

    finished = []
    reports = run_grid(grid, progress=False, on_finished=finished.append)
    assert [r["run"] for r in reports] == ["none_a_seed0"] and [r.name for r in finished] == ["none_a_seed0"]
    # a finished run without its record is scored at the next start; `streamkd experiment` writes the record
    from streamkd.cli.experiment import _scorer
    from streamkd.experiment import read_record, record_path
    run_grid(grid, progress=False, on_finished=_scorer(grid))
    assert "none_a_seed0: scored, test WER" in capsys.readouterr().out
    scored = read_record(record_path(grid, "none_a_seed0"))
    run_grid(grid, progress=False, on_finished=finished.append)  # its record is newer than final.json: not again
    assert len(finished) == 1
    assert not (tmp_path / "exp" / "teacher" / "final.pt").exists()  # nothing trained a teacher
    rows = {r["run"]: r for r in evaluate_grid(grid)}
    teacher = rows["teacher"]
    assert teacher["pretrained"] == str(pre / "teacher.pt")
    # scored on the students' test manifest, not the one in its own config (/nowhere)
    assert teacher["test"]["manifest"] == str(tiny_corpus / "test.jsonl")
    assert set(teacher["test_utts"]) == set(rows["none_a_seed0"]["test_utts"])
    # the grid's word LM: built from the students' training text, every run scored through its graph too
    graph_dir = tmp_path / "lm" / "graph_a0.5_b0"
    assert json.loads((graph_dir / "graph.json").read_text())["alpha"] == 0.5
    for row in rows.values():
        assert row["lm"]["dir"] == str(graph_dir) and set(row["test_lm_utts"]) == set(row["test_utts"])
    r = subprocess.run([sys.executable, "-m", "streamkd", "decode", "--checkpoint", str(pre / "teacher.pt"),
                        "--manifest", str(tiny_corpus / "test.jsonl"), "--graph", str(graph_dir),
                        "--graph-beam", "20", "--max-active", "7000", "--out", str(tmp_path / "dec")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "dec" / "summary.json").read_text())["wer"] == teacher["test_lm"]["wer"]
    report = write_report(list(rows.values()), tmp_path / "res")
    assert [x["method"] for x in report["lm_lines"]] == ["teacher", "none"]
    assert report["lm_lines"][0]["test_wer"] == pytest.approx(100 * teacher["test_lm"]["wer"])
    table = (tmp_path / "res" / "table.md").read_text()
    assert "## With the word LM (2-gram HLG graph, LM weight 0.5" in table
    # the unseen-voice dev set: the students' dev sentences spoken by a voice the corpus never uses
    unseen = read_manifest(tmp_path / "unseen" / "manifest.jsonl")
    assert [u.text for u in unseen] == [u.text for u in read_manifest(tiny_corpus / "dev.jsonl")]
    assert {u.speaker for u in unseen} == {"festival_ked_diphone"}
    assert teacher["unseen"]["manifest"] == str(tmp_path / "unseen" / "manifest.jsonl")
    assert report["lines"][0]["unseen_wer"] == pytest.approx(100 * teacher["unseen"]["wer"])
    assert table.count("unseen-voice dev WER %") == 2
    shown = examples({"teacher": teacher["examples"], "none": rows["none_a_seed0"]["examples"]}, n=2)
    blocks = shown.split("\n\n")
    # id, reference, each run greedy, then each run through the LM graph
    assert len(blocks) == 2 and all(len(b.splitlines()) == 6 for b in blocks)
    first_id = sorted(teacher["test_utts"])[0]
    lines = blocks[0].splitlines()
    assert lines[0] == first_id and "reference" in lines[1]
    assert [line.split()[0] for line in lines[2:4]] == ["teacher", "none"]
    assert [" ".join(line.split()[:2]) for line in lines[4:6]] == ["teacher +LM", "none +LM"]
    lm_hyp = {r["id"]: r.get("hyp", "") for r in read_hyps(tmp_path / "exp" / "teacher" / "decode_test_lm" / "hyps.txt")}
    assert lines[4].split(None, 2)[2:] == ([lm_hyp[first_id]] if lm_hyp[first_id] else [])
    assert examples({"teacher": teacher["examples"], "missing": {}}) == ""

    # A report stopped part-way goes on where it stopped: each set its decode
    # folders hold for this checkpoint is read back, the rest decoded again.
    import shutil

    import streamkd.evaluation

    teacher_dir = tmp_path / "exp" / "teacher"
    (teacher_dir / "eval.json").unlink()
    shutil.rmtree(teacher_dir / "decode_test_lm")
    lm_summary = teacher_dir / "decode_dev_lm" / "summary.json"  # decoded through a graph of other settings
    lm_summary.write_text(json.dumps({**json.loads(lm_summary.read_text()),
                                      "graph": {**teacher["dev_lm"]["graph"], "max_active": 1}}))
    encoded, encode = [], streamkd.evaluation.manifest_log_probs
    with monkeypatch.context() as m:
        m.setattr(streamkd.evaluation, "manifest_log_probs",
                  lambda model, data, manifest, **kw: encoded.append(manifest) or encode(model, data, manifest, **kw))
        resumed = {r["run"]: r for r in evaluate_grid(grid)}["teacher"]
    assert encoded == [str(tiny_corpus / "dev.jsonl"), str(tiny_corpus / "test.jsonl")]  # unseen: read back
    assert json.loads(json.dumps(resumed)) == json.loads(json.dumps(teacher))

    # Each student leaves its record in the results folder; on a machine without
    # its folder the record stands for it: not trained again, read by the report.
    import streamkd.experiment
    from streamkd.errors import DataError

    record = record_path(grid, "none_a_seed0")
    assert record == tmp_path / "res" / "runs" / "none_a_seed0.json.gz"
    assert read_record(record) == json.loads(json.dumps(rows["none_a_seed0"])) == scored
    assert rows["none_a_seed0"]["valid"] and rows["none_a_seed0"]["final"]["steps"] == 2
    assert not record_path(grid, "teacher").exists()  # the teacher is scored from its checkpoint
    (tmp_path / "exp" / "none_a_seed0").rename(tmp_path / "elsewhere")

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(streamkd.experiment, "train", no_training)
    assert [r["steps"] for r in run_grid(grid, progress=False, on_finished=finished.append)] == [2]
    assert len(finished) == 1  # a recorded run is neither trained nor scored again
    again = {r["run"]: r for r in evaluate_grid(grid)}
    assert again["none_a_seed0"] == read_record(record)
    assert "from its record" in capsys.readouterr().out
    assert write_report(list(again.values()), tmp_path / "res2")["lines"][1]["test_wer"] == \
        report["lines"][1]["test_wer"]
    # runs.json is the same bytes whether a row was read from its record or scored from its folder
    assert (tmp_path / "res2" / "runs.json").read_bytes() == (tmp_path / "res" / "runs.json").read_bytes()
    # a record scored through another LM graph is left out, with the reason
    from streamkd.experiment import write_record
    write_record(record, {**again["none_a_seed0"], "lm": {"dir": "another"}})
    assert [r["run"] for r in evaluate_grid(grid)] == ["teacher"]
    assert "was scored with another lm than the grid's" in capsys.readouterr().out
    record.write_bytes(b"not gzip")
    with pytest.raises(DataError, match=r"none_a_seed0.json.gz: not a run record .*delete it to train the run again"):
        run_grid(grid, progress=False)


def test_word_errors_by_frequency_bins_reference_words_by_training_count(tmp_path):
    from streamkd.errors import DataError
    from streamkd.report import word_errors_by_frequency

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"t{i}", "audio": "x.wav", "duration": 1.0, "text": t}) + "\n"
                             for i, t in enumerate(["A B B", "B C"])))  # A 1, B 3, C 1, D never
    dec = tmp_path / "dec"
    dec.mkdir()
    # u1: B substituted, E inserted; u2: one B deleted; u3: an empty reference, one word inserted
    (dec / "hyps.txt").write_text("u1\tREF: A B C D\nu1\tHYP: A X C D E\nu2\tREF: B B\nu2\tHYP: B\n"
                                  "u3\tREF:\nu3\tHYP: Z\n")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("A 1\nB 2\nC 3\n")
    out = word_errors_by_frequency(dec, [train], vocab)
    bins = {b["seen"]: (b["words"], b["wrong"]) for b in out["by_times_seen_in_training"]}
    assert bins == {"0": (1, 0), "1-2": (2, 0), "3-9": (3, 2), "10-99": (0, 0), "100+": (0, 0)}
    assert out["reference_words"] == 6 and out["inserted_words"] == 2 and out["utterances"] == 3
    assert out["by_times_seen_in_training"][2]["share_wrong"] == pytest.approx(2 / 3)
    assert (out["outside_vocab"]["words"], out["outside_vocab"]["wrong"]) == (1, 0)
    with pytest.raises(DataError, match="no hyps.txt there"):
        word_errors_by_frequency(tmp_path / "nope", [train])
    with pytest.raises(DataError, match="word list does not exist"):
        word_errors_by_frequency(dec, [train], tmp_path / "nope.txt")


def test_the_report_breaks_test_wer_down_by_held_out_voice(tmp_path):
    """Each (method, chunk) gets the mean and std over seeds of every test
    speaker's WER; a run that kept only a speaker count leaves the method
    without the breakdown rather than averaging fewer seeds."""
    def voiced(row, a, b):
        return {**row, "test": {**row["test"], "by_speaker": {"a": {"wer": a, "cer": a / 2, "utterances": 12},
                                                                "b": {"wer": b, "cer": b / 2, "utterances": 8}}}}
    rows = [voiced({"method": "teacher", "chunk": None, "seed": 0, "test": {"wer": 0.1, "cer": 0.05}}, 0.1, 0.1),
            voiced(_row("none", "160ms", 0, 0.3, [3] * 20), 0.2, 0.4), voiced(_row("none", "160ms", 1, 0.3, [3] * 20), 0.4, 0.4),
            voiced(_row("aux", "160ms", 0, 0.2, [2] * 20), 0.1, 0.3),
            {**_row("aux", "160ms", 1, 0.2, [2] * 20)}]
    lines = {x["method"]: x for x in summarise(rows)}
    none = lines["none"]["test_by_speaker"]
    assert none["a"]["wer"] == pytest.approx(30.0) and none["a"]["wer_std"] == pytest.approx(math.sqrt(200))
    assert none["b"] == {"utterances": 8, "wer": pytest.approx(40.0), "wer_std": 0.0, "cer": pytest.approx(20.0),
                         "cer_std": 0.0}
    assert lines["aux"]["test_by_speaker"] == {}  # seed 1 kept no speakers
    write_report(rows, tmp_path / "res")
    table = (tmp_path / "res" / "table.md").read_text()
    assert "| method | chunk | seeds | a (12 utt.) WER % | b (8 utt.) WER % |" in table
    assert "| none | 160ms | 2 | 30.00 ± 14.14 | 40.00 ± 0.00 |" in table and "| aux | 160ms | 2 | - | - |" in table
    assert "| teacher | full | 1 | 10.00 | 10.00 |" in table


def test_error_bar_only_for_several_seeds():
    """A single seed has no spread to draw: its std (0.0 from _mean_std, as
    summary.json keeps it) must not become a zero-height error bar."""
    assert _spread(0.8, seeds=3) == 0.8
    assert math.isnan(_spread(0.0, seeds=1))
