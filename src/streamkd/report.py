"""The results of an experiment grid: JSON of every run, a Markdown table,
a paired bootstrap test and plots (``streamkd report``).

Numbers are read from the runs' ``eval.json`` (see ``experiment.evaluate_run``);
nothing here trains or chooses anything.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["summarise", "paired_bootstrap", "write_report"]


def paired_bootstrap(a: dict[str, list[int]], b: dict[str, list[int]], *, n: int = 2000,
                     seed: int = 0) -> dict:
    """Paired bootstrap over utterances: is system ``a``'s WER lower than ``b``'s?

    a, b: utterance key -> [word errors, reference words], same keys (the
    keys shared by both are used). Returns the observed WER difference
    (a - b) and p = the share of resamples in which a is NOT better
    (difference >= 0): small p means a is reliably better.
    """
    keys = sorted(set(a) & set(b))
    if not keys:
        return {"diff": float("nan"), "p": float("nan"), "utterances": 0}
    ea = np.array([a[k][0] for k in keys], dtype=np.float64)
    eb = np.array([b[k][0] for k in keys], dtype=np.float64)
    words = np.array([a[k][1] for k in keys], dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(keys), size=(n, len(keys)))
    tot = words[idx].sum(axis=1)
    diff = (ea[idx].sum(axis=1) - eb[idx].sum(axis=1)) / np.maximum(tot, 1)
    return {"diff": float((ea.sum() - eb.sum()) / max(words.sum(), 1)), "p": float((diff >= 0).mean()),
            "utterances": len(keys)}


def _pooled(rows: list[dict], split: str) -> dict[str, list[int]]:
    """Per-utterance errors of several seeds, keyed (seed, utterance)."""
    out = {}
    for r in rows:
        for uid, v in r.get(f"{split}_utts", {}).items():
            out[f"{r['seed']}/{uid}"] = v
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (method, chunk): mean and std over seeds, relative WER
    reduction against none and token, share of the teacher gap closed,
    emission delay and the bootstrap test against none."""
    teacher = [r for r in rows if r["method"] == "teacher"]
    t_wer = {s: _mean_std([100 * r[s]["wer"] for r in teacher if s in r])[0] for s in ("dev", "test")}
    t_cer = _mean_std([100 * r["test"]["cer"] for r in teacher if "test" in r])[0]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["method"] != "teacher":
            groups.setdefault((r["method"], r["chunk"]), []).append(r)
    lines = []
    for (method, chunk), rs in groups.items():
        line = {"method": method, "chunk": chunk, "seeds": len(rs)}
        for s in ("dev", "test"):
            line[f"{s}_wer"], line[f"{s}_wer_std"] = _mean_std([100 * r[s]["wer"] for r in rs if s in r])
        line["test_cer"] = _mean_std([100 * r["test"]["cer"] for r in rs if "test" in r])[0]
        delays = [r["delay"]["emission_mean_ms"] for r in rs if "delay" in r]
        aligns = [r["delay"]["alignment_mean_ms"] for r in rs if "delay" in r]
        line["emission_delay_ms"] = _mean_std(delays)[0]
        line["token_emission_delay_ms"] = _mean_std(
            [r["delay"]["token_emission_mean_ms"] for r in rs if "token_emission_mean_ms" in r.get("delay", {})])[0]
        line["alignment_shift_ms"] = _mean_std(aligns)[0]
        lines.append(line)
    by_key = {(x["method"], x["chunk"]): x for x in lines}
    for line in lines:
        none, token = by_key.get(("none", line["chunk"])), by_key.get(("token", line["chunk"]))
        w = line["test_wer"]
        line["rel_vs_none"] = _rel(none["test_wer"], w) if none else float("nan")
        line["rel_vs_token"] = _rel(token["test_wer"], w) if token else float("nan")
        gap = none["test_wer"] - t_wer["test"] if none else float("nan")
        line["gap_closed"] = (none["test_wer"] - w) / gap if none and gap and not math.isnan(gap) else float("nan")
        if none and line["method"] != "none":
            test = paired_bootstrap(_pooled(groups[(line["method"], line["chunk"])], "test"),
                                    _pooled(groups[("none", line["chunk"])], "test"))
            line["p_vs_none"] = test["p"]
        else:
            line["p_vs_none"] = float("nan")
    order = {m: i for i, m in enumerate(["none", "token", "layer", "aux", "aux+token"])}
    lines.sort(key=lambda x: (str(x["chunk"]), order.get(x["method"], 99), x["method"]))
    return [{"method": "teacher", "chunk": None, "seeds": len(teacher),
             "dev_wer": t_wer["dev"], "test_wer": t_wer["test"], "test_cer": t_cer}] + lines


def _rel(base: float, value: float) -> float:
    return (base - value) / base if base else float("nan")


def _fmt(v, pct=False, digits=2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"


def markdown_table(lines: list[dict]) -> str:
    head = ("| method | chunk | seeds | test WER % | test CER % | dev WER % | rel. vs none | rel. vs token | "
            "gap closed | word emission delay ms | token emission delay ms | p (vs none) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = []
    for x in lines:
        test = f"{_fmt(x['test_wer'])} ± {_fmt(x.get('test_wer_std'))}" if "test_wer_std" in x else _fmt(x["test_wer"])
        dev = f"{_fmt(x['dev_wer'])} ± {_fmt(x.get('dev_wer_std'))}" if "dev_wer_std" in x else _fmt(x["dev_wer"])
        body.append(f"| {x['method']} | {x['chunk'] or 'full'} | {x['seeds']} | {test} | {_fmt(x.get('test_cer'))} | {dev} | "
                    f"{_fmt(x.get('rel_vs_none'), pct=True)} | {_fmt(x.get('rel_vs_token'), pct=True)} | "
                    f"{_fmt(x.get('gap_closed'), pct=True)} | {_fmt(x.get('emission_delay_ms'), digits=0)} | "
                    f"{_fmt(x.get('token_emission_delay_ms'), digits=0)} | "
                    f"{_fmt(x.get('p_vs_none'), digits=3)} |")
    return head + "\n".join(body) + "\n"


def _plots(lines: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = [x for x in lines if x["method"] != "teacher"]
    teacher = next((x for x in lines if x["method"] == "teacher"), None)
    chunks = sorted({x["chunk"] for x in students}, key=str)
    methods = list(dict.fromkeys(x["method"] for x in students))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(chunks))
    for ci, chunk in enumerate(chunks):
        vals = [next((x for x in students if x["method"] == m and x["chunk"] == chunk), None) for m in methods]
        xs = np.arange(len(methods)) + ci * width
        ax.bar(xs, [v["test_wer"] if v else 0 for v in vals], width,
               yerr=[v.get("test_wer_std", 0) if v else 0 for v in vals], capsize=3, label=f"chunk {chunk}")
    if teacher and not math.isnan(teacher["test_wer"]):
        ax.axhline(teacher["test_wer"], color="k", ls="--", label="teacher (full context)")
    ax.set_xticks(np.arange(len(methods)) + width * (len(chunks) - 1) / 2, methods, rotation=20)
    ax.set_ylabel("test WER (%)")
    ax.set_title("Streaming student WER by distillation method")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "wer_by_method.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for x in students:
        ax.scatter(x["token_emission_delay_ms"], x["test_wer"])
        ax.annotate(f"{x['method']} {x['chunk']}", (x["token_emission_delay_ms"], x["test_wer"]), fontsize=8)
    ax.set_xlabel("emission delay vs teacher (ms, mean over matched tokens)")
    ax.set_ylabel("test WER (%)")
    ax.set_title("Accuracy against emission delay")
    fig.tight_layout()
    fig.savefig(out / "wer_vs_delay.png", dpi=120)
    plt.close(fig)
    return ["wer_by_method.png", "wer_vs_delay.png"]


def write_report(rows: list[dict], out_dir: str | Path, *, title: str = "results",
                 notes: Optional[str] = None) -> dict:
    """Write runs.json, summary.json, table.md and the plots; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if not k.endswith("_utts")} for r in rows]
    (out / "runs.json").write_text(json.dumps(slim, indent=1) + "\n")
    lines = summarise(rows)
    (out / "summary.json").write_text(json.dumps(lines, indent=1) + "\n")
    table = markdown_table(lines)
    (out / "table.md").write_text(f"# {title}\n\n" + table + (f"\n{notes}\n" if notes else ""))
    _plots(lines, out)
    return {"lines": lines, "table": table}
