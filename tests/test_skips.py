"""Nothing dropped uncounted: training and decoding report every item they
leave out, counted by reason, through the command line."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import CONFIGS
from streamkd.cli import main
from streamkd.config import load_config
from streamkd.manifest import Utterance, read_manifest, write_manifest

TOO_LONG = "longer than data.max_utt_sec"


def _manifest_with_bad_items(tiny_manifest, tmp_path: Path) -> Path:
    """Six usable utterances of 1-2 s, one of 3 s and one whose audio is missing."""
    manifest, utts = tiny_manifest(7, durations=[1.2, 1.5, 1.8, 1.1, 1.4, 1.6, 3.0])
    utts = read_manifest(manifest) + [Utterance("gone", str(tmp_path / "gone.wav"), 1.0, "hello")]
    write_manifest(manifest, utts)
    return manifest


def test_training_counts_too_long_and_bad_items_by_reason(tiny_manifest, tmp_path, capsys):
    manifest = _manifest_with_bad_items(tiny_manifest, tmp_path)
    out = tmp_path / "out"
    code = main(["train", str(CONFIGS / "tiny.yaml"), f"data.train_manifest={manifest}",
                 f"data.dev_manifest={manifest}", "data.test_manifest=null", f"data.lang_dir={tmp_path / 'lang'}",
                 "data.max_utt_sec=2.5", "data.num_buckets=1", f"train.out_dir={out}", "train.max_steps=2", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads((out / "final.json").read_text())
    epochs = report["epochs"]
    assert epochs == 2  # the six usable utterances make one batch: one step per epoch
    assert report["skipped_reasons"] == {TOO_LONG: epochs, "unusable audio": epochs}
    assert report["skipped_items"] == 2 * epochs
    assert report["dev"]["skipped_reasons"] == {TOO_LONG: 1, "unusable audio": 1}
    assert "training a full-context model (a teacher):" in printed and "none student" not in printed
    for epoch in range(epochs):
        assert (f"epoch {epoch}: 2 training items skipped ({TOO_LONG}: 1, unusable audio: 1); "
                f"2 dev items skipped") in printed


def test_decode_keys_skips_by_reason_and_lists_the_items(tiny_manifest, tmp_path, capsys):
    from test_errors import _checkpoint

    manifest = _manifest_with_bad_items(tiny_manifest, tmp_path)
    ckpt = _checkpoint(tmp_path, "tiny.yaml", [f"data.train_manifest={manifest}", f"data.lang_dir={tmp_path / 'lang'}",
                                               "data.max_utt_sec=2.5"], "model.pt")
    assert main(["decode", "--checkpoint", str(ckpt), "--manifest", str(manifest), "--out", str(tmp_path / "dec")]) == 0
    summary = json.loads((tmp_path / "dec" / "summary.json").read_text())
    assert summary["skipped"] == 2 and summary["utterances"] == 6
    assert summary["skipped_reasons"] == {TOO_LONG: 1, "unusable audio": 1}
    items = {item["id"]: item for item in summary["skipped_items"]}
    assert items["u006"]["reason"] == TOO_LONG and items["u006"]["detail"] == "3.00 s > 2.5 s"
    assert items["gone"]["reason"] == "unusable audio" and str(tmp_path / "gone.wav") in items["gone"]["detail"]
    assert json.loads(capsys.readouterr().out)["skipped_reasons"] == summary["skipped_reasons"]


def _train_three_epochs(manifest: Path, out: Path, tmp_path: Path, metric: str) -> dict:
    assert main(["train", str(CONFIGS / "tiny.yaml"), f"data.train_manifest={manifest}",
                 f"data.dev_manifest={manifest}", "data.test_manifest=null", f"data.lang_dir={tmp_path / 'lang'}",
                 "data.num_buckets=1", f"train.out_dir={out}", "train.max_steps=3", "train.keep_best=1",
                 f"train.select_metric={metric}", "--no-progress"]) == 0
    return json.loads((out / "final.json").read_text())


def test_epochs_are_ranked_by_the_chosen_metric(tiny_manifest, tmp_path, capsys):
    """keep_best=1: final.pt is the best epoch by train.select_metric (dev
    loss by default: it keeps falling while WER sits at 100%)."""
    manifest, _ = tiny_manifest(6)
    for metric in ("loss", "wer"):
        out = tmp_path / metric
        report = _train_three_epochs(manifest, out, tmp_path, metric)
        rows = [line.split(",") for line in (out / "valid.csv").read_text().splitlines()]
        col = rows[0].index(metric)
        values = {int(r[rows[0].index("epoch")]): float(r[col]) for r in rows[1:]}
        assert len(values) == 3 and report["selected_by"] == metric
        best = min(values.values())
        # the lowest value; on a tie the later epoch
        want = max(e for e, v in values.items() if v == best)
        assert report["averaged"] == [str(out / f"epoch-{want}.pt")]
    assert load_config(CONFIGS / "tiny.yaml").train.select_metric == "loss"


def test_a_checkpoint_from_before_the_choice_resumes_ranking_by_wer(tiny_manifest, tmp_path, capsys):
    """Training checkpoints written before select_metric and skip reasons
    existed still resume; such a run keeps ranking its epochs by WER."""
    import torch

    manifest, _ = tiny_manifest(6)
    out = tmp_path / "old"
    args = ["train", str(CONFIGS / "tiny.yaml"), f"data.train_manifest={manifest}", f"data.dev_manifest={manifest}",
            "data.test_manifest=null", f"data.lang_dir={tmp_path / 'lang'}", "data.num_buckets=1",
            f"train.out_dir={out}", "train.ckpt_every=1"]
    assert main([*args, "train.max_steps=1", "--no-progress"]) == 0
    ckpt = torch.load(out / "ckpt-1.pt", weights_only=False)
    for key in ("select_metric", "skipped_reasons", "epoch_skipped"):
        del ckpt["progress"][key]
    torch.save(ckpt, out / "ckpt-1.pt")
    capsys.readouterr()
    assert main([*args, "train.max_steps=2", "--no-progress", "--resume"]) == 0
    assert "ranks its epochs by dev wer as it began" in capsys.readouterr().out
    assert json.loads((out / "final.json").read_text())["selected_by"] == "wer"
