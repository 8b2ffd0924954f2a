"""``streamkd lm tune``: choose the LM weight and word bonus on DEV.

The acoustic log-probs are computed once; each (alpha, beta) of the grid is
then only a search over them. The best pair (lowest WER, then CER, then the
smaller weights) is written to the LM folder's ``tune.json``, which every
decoder reads as its default. A test manifest is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

from streamkd.atomic import write_atomic
from streamkd.decode import AcousticScores, SearchOptions, error_rates, search_scores, search_workers
from streamkd.errors import LMError
from streamkd.lm.build import META_FILE, TUNE_FILE
from streamkd.lm.fusion import LMFusion, WordLM

__all__ = ["tune_weights", "check_not_test", "DEFAULT_ALPHAS", "DEFAULT_BETAS"]

DEFAULT_ALPHAS = (0.3, 0.5, 0.7, 0.9)
DEFAULT_BETAS = (0.0, 1.0, 2.0)


def check_not_test(manifest: str | Path, test_manifests: Sequence[str | Path]) -> None:
    """LMError when ``manifest`` is one of the test manifests."""
    for test in test_manifests:
        if test and Path(test).exists() and Path(manifest).exists() and os.path.samefile(manifest, test):
            raise LMError(f"{manifest}: this is the test manifest; tune on the dev set only")


def tune_weights(scores: AcousticScores, tokenizer, lm: WordLM, *, alphas: Sequence[float] = DEFAULT_ALPHAS,
                 betas: Sequence[float] = DEFAULT_BETAS, options: SearchOptions = SearchOptions(),
                 log: Callable[[str], None] = print) -> dict:
    """WER/CER of every (alpha, beta) on ``scores`` and the best pair."""
    if not scores.ids:
        raise LMError("the tuning manifest gave no utterances to decode")
    refs = scores.refs
    grid, workers = [], search_workers()
    for alpha in alphas:
        for beta in betas:
            fusion = LMFusion.for_tokenizer(lm, tokenizer, alpha, beta)
            rows, seconds = search_scores(scores, tokenizer, options.factory(fusion), workers)
            rates = error_rates([r["ref"] for r in rows], [r["hyp"] for r in rows])
            grid.append({"alpha": alpha, "beta": beta, "wer": rates["wer"], "cer": rates["cer"],
                         "search_sec": round(seconds, 3)})
            log(f"alpha {alpha:g} beta {beta:g}: WER {100 * rates['wer']:.2f}% CER {100 * rates['cer']:.2f}% "
                f"({seconds:.1f} s)")
    best = min(grid, key=lambda g: (g["wer"], g["cer"], g["alpha"], g["beta"]))
    return {"alpha": best["alpha"], "beta": best["beta"], "dev_wer": best["wer"], "dev_cer": best["cer"],
            "utterances": len(refs), "search": options.as_dict(), "grid": grid}


def write_tune(lm_dir: str | Path, result: dict) -> Path:
    """Store the chosen weights beside the LM (``tune.json``)."""
    lm_dir = Path(lm_dir)
    if not (lm_dir / META_FILE).is_file():
        raise LMError(f"{lm_dir / META_FILE}: missing; tune an LM folder made by `streamkd lm build`")
    path = lm_dir / TUNE_FILE
    write_atomic(path, json.dumps(result, indent=2) + "\n")
    return path
