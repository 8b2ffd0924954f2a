"""``streamkd lm report``: what the word LM buys, measured.

For a teacher and a student on dev and test: WER/CER of greedy search,
beam search without the LM and beam search with it; the decode RTF of each
on the threads given (the encoder pass is shared, so each method's RTF is
encoder time plus its own search time over the audio); and, for a
streaming model, how often the partial result shown after a chunk is
rewritten later (``partial_revisions``). Writes ``results.json`` and
``table.md`` atomically.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from streamkd.atomic import write_atomic
from streamkd.checkpoint import load_model
from streamkd.decode import AcousticScores, PrefixText, SearchOptions, error_rates, make_search, \
    manifest_log_probs, search_scores, token_texts
from streamkd.lm.fusion import LMFusion, WordLM, load_lm

__all__ = ["partial_revisions", "lm_report", "render_table"]


def partial_revisions(log_probs: Sequence[torch.Tensor], chunk_frames: int, new_search: Callable,
                      pieces: list[str]) -> dict:
    """Feed each utterance's (T, V) log-probs chunk by chunk, show the
    partial text after every chunk and the final text after ``finish()``.

    An update is a shown text that differs from the one before it; it is a
    revision when the text shown before is not a prefix of it (something
    shown was rewritten). ``words_revised`` counts the words of the earlier
    text past the longest common run of whole words."""
    updates = revisions = words_revised = final_words = 0
    for lp in log_probs:
        search, text = new_search(), PrefixText(pieces)
        shown = ""
        for start in range(0, lp.size(0), chunk_frames):
            search.step(lp[start:start + chunk_frames])
            now = text.update(search.best_node())
            updates, revisions, words_revised = _count(shown, now, updates, revisions, words_revised)
            shown = now
        search.finish()
        now = text.update(search.best_node())
        updates, revisions, words_revised = _count(shown, now, updates, revisions, words_revised)
        final_words += len(now.split())
    return {"updates": updates, "revisions": revisions,
            "revision_rate": revisions / updates if updates else 0.0,
            "words_revised": words_revised,
            "words_revised_per_100_final_words": 100.0 * words_revised / final_words if final_words else 0.0,
            "utterances": len(log_probs)}


def _count(shown: str, now: str, updates: int, revisions: int, words_revised: int) -> tuple[int, int, int]:
    if now == shown:
        return updates, revisions, words_revised
    if now.startswith(shown):
        return updates + 1, revisions, words_revised
    old, new = shown.split(), now.split()
    common = 0
    while common < min(len(old), len(new)) and old[common] == new[common]:
        common += 1
    return updates + 1, revisions + 1, words_revised + len(old) - common


def _evaluate(scores: AcousticScores, model, fusion: LMFusion, options: SearchOptions, log) -> dict:
    tokenizer = model.tokenizer
    methods = {"greedy": lambda: make_search(1), "beam": options.factory(None), "beam_lm": options.factory(fusion)}
    out = {"utterances": len(scores.ids), "audio_sec": round(scores.audio_sec, 2),
           "encoder_rtf": scores.encoder_sec / scores.audio_sec, "skipped": len(scores.skipped), "methods": {}}
    for name, factory in methods.items():
        rows, search_sec = search_scores(scores, tokenizer, factory)  # one process: its speed is reported
        rates = error_rates([r["ref"] for r in rows], [r["hyp"] for r in rows])
        entry = {"wer": rates["wer"], "cer": rates["cer"], "words": rates["words"],
                 "rtf": (scores.encoder_sec + search_sec) / scores.audio_sec,
                 "search_rtf": search_sec / scores.audio_sec}
        if model.chunk is not None:
            entry["partials"] = partial_revisions(scores.log_probs, model.chunk.chunk_frames, factory,
                                                  token_texts(tokenizer.symbols))
        out["methods"][name] = entry
        log(f"  {name}: WER {100 * entry['wer']:.2f}% CER {100 * entry['cer']:.2f}% RTF {entry['rtf']:.4f}")
    return out


def lm_report(models: dict[str, str], lm_dir: str | Path, out_dir: str | Path, *,
              manifests: Optional[dict[str, str]] = None, options: SearchOptions = SearchOptions(),
              max_utts: int = 0, alpha: Optional[float] = None, beta: Optional[float] = None,
              log: Callable[[str], None] = print) -> dict:
    """models: role ("teacher", "student") -> checkpoint; manifests: split
    ("dev", "test") -> manifest (default: each model's config's)."""

    lm: Optional[WordLM] = None
    result = {"lm": str(lm_dir), "search": options.as_dict(), "max_utts": max_utts,
              "threads": torch.get_num_threads(), "models": {}}
    for role, ckpt in models.items():
        model = load_model(ckpt)
        if lm is None:
            lm = load_lm(lm_dir, model.tokenizer, source=str(ckpt))
        else:
            lm.check_spellable(list(model.tokenizer.symbols), str(ckpt))
        fusion = LMFusion.for_tokenizer(lm, model.tokenizer, alpha, beta)
        result.setdefault("alpha", fusion.alpha)
        result.setdefault("beta", fusion.beta)
        result.setdefault("lm_tuned", lm.tuned and alpha is None and beta is None)
        splits = manifests or {"dev": model.config.data.dev_manifest, "test": model.config.data.test_manifest}
        entry = {"checkpoint": str(ckpt), "streaming": model.chunk is not None, "splits": {}}
        for split, manifest in splits.items():
            log(f"{role} {split}: {manifest}")
            scores = manifest_log_probs(model, model.config.data, manifest, max_utts=max_utts, progress=True)
            entry["splits"][split] = {"manifest": str(manifest), **_evaluate(scores, model, fusion, options, log)}
        result["models"][role] = entry
    out = Path(out_dir)
    write_atomic(out / "results.json", json.dumps(result, indent=2) + "\n")
    write_atomic(out / "table.md", render_table(result))
    return result


def render_table(result: dict) -> str:
    """results.json as a Markdown table (percentages, one row per model x split x method)."""
    lines = [f"LM: `{result['lm']}`, alpha {result['alpha']:g}, beta {result['beta']:g} "
             f"({'tuned on dev' if result['lm_tuned'] else 'not tuned'}); beam {result['search']['beam']}; "
             f"{result['threads']} thread(s)" + (f"; first {result['max_utts']} utterances per set"
                                                   if result["max_utts"] else "") + ".", "",
             "| model | set | decoding | WER % | CER % | RTF | partials revised % | words revised / 100 |",
             "|---|---|---|---|---|---|---|---|"]
    for role, entry in result["models"].items():
        for split, data in entry["splits"].items():
            for name, m in data["methods"].items():
                p = m.get("partials")
                rev = (f"{100 * p['revision_rate']:.1f} | {p['words_revised_per_100_final_words']:.1f}"
                       if p else "n/a (full context) | n/a")
                lines.append(f"| {role} | {split} ({data['utterances']} utts) | {name} | {100 * m['wer']:.2f} | "
                             f"{100 * m['cer']:.2f} | {m['rtf']:.4f} | {rev} |")
    lines += ["", "Partials revised: share of partial-result updates (after each chunk, and the final one) "
              "that rewrite text already shown. RTF: the shared encoder pass plus that method's search, "
              "over the audio decoded.", ""]
    return "\n".join(lines)
