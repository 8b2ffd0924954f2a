"""CTC decoding (greedy and prefix beam search) and WER/CER scoring.

Searches are small strategy objects with one incremental interface, so the
offline decoder and the streaming recognizer share them:
``step(log_probs (T, V))`` consumes frames, ``best()`` returns the token ids
so far, ``reset()`` starts a new utterance. Both record the frame at which
each emitted token first appeared (``frames``), which the latency report uses.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import jiwer
import torch
from tqdm import tqdm

from streamkd.atomic import write_atomic
from streamkd.dataset import make_dataloader
from streamkd.model.asr import MODEL_CHUNK
from streamkd.types import Skip, count_reasons

__all__ = [
    "CTCGreedySearch",
    "CTCPrefixBeamSearch",
    "make_search",
    "decode_utterance",
    "error_rates",
    "decode_manifest",
    "read_hyps",
    "DecodeResult",
]


class CTCGreedySearch:
    """Best path: argmax per frame, repeats collapsed, blanks removed.

    A repeat across two ``step`` calls is collapsed as within one call, so
    chunked input gives exactly the tokens of the whole input.
    """

    def __init__(self, blank_id: int = 0) -> None:
        self.blank_id = blank_id
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.frames: list[int] = []  # frame index where each token was emitted
        self._prev = self.blank_id
        self._t = 0

    def step(self, log_probs: torch.Tensor) -> None:
        """log_probs: (T, V) for the next T frames."""
        if log_probs.numel() == 0:
            return
        best = log_probs.argmax(dim=-1).tolist()
        for i, tok in enumerate(best):
            if tok != self.blank_id and tok != self._prev:
                self.tokens.append(tok)
                self.frames.append(self._t + i)
            self._prev = tok
        self._t += len(best)

    def best(self) -> list[int]:
        return list(self.tokens)


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


@dataclass
class _Hyp:
    blank: float  # log prob of the prefix ending in blank
    non_blank: float  # log prob of the prefix ending in its last token

    @property
    def total(self) -> float:
        return _logaddexp(self.blank, self.non_blank)


class CTCPrefixBeamSearch:
    """CTC prefix beam search (no language model), incremental over frames.

    Per frame only the ``beam`` most likely tokens are expanded, and frames
    whose blank probability exceeds ``blank_skip`` only extend the blank
    paths, which keeps the search cheap on CTC's spiky posteriors.
    """

    def __init__(self, beam: int = 4, blank_id: int = 0, blank_skip: float = 0.999) -> None:
        if beam < 1:
            raise ValueError(f"beam must be >= 1, got {beam}")
        self.beam = beam
        self.blank_id = blank_id
        self.log_blank_skip = math.log(blank_skip)
        self.reset()

    def reset(self) -> None:
        self._hyps: dict[tuple[int, ...], _Hyp] = {(): _Hyp(0.0, -math.inf)}
        self._frames_of: dict[tuple[int, ...], tuple[int, ...]] = {(): ()}
        self._t = 0

    def step(self, log_probs: torch.Tensor) -> None:
        """log_probs: (T, V) for the next T frames."""
        lp = log_probs.detach().to(torch.float64).cpu()
        k = min(self.beam, lp.size(-1))
        top_vals, top_ids = lp.topk(k, dim=-1)
        blank_col = lp[:, self.blank_id].tolist()
        for t in range(lp.size(0)):
            self._step_frame(blank_col[t], top_ids[t].tolist(), top_vals[t].tolist())
            self._t += 1

    def _step_frame(self, lp_blank: float, ids: list[int], vals: list[float]) -> None:
        new: dict[tuple[int, ...], _Hyp] = {}
        frames_of = self._frames_of

        def add(prefix, blank=-math.inf, non_blank=-math.inf, frames=None):
            hyp = new.get(prefix)
            if hyp is None:
                new[prefix] = _Hyp(blank, non_blank)
                # A prefix keeps the frame it was first emitted at.
                if frames is not None and prefix not in frames_of:
                    frames_of[prefix] = frames
            else:
                hyp.blank = _logaddexp(hyp.blank, blank)
                hyp.non_blank = _logaddexp(hyp.non_blank, non_blank)

        skip = lp_blank > self.log_blank_skip
        for prefix, hyp in self._hyps.items():
            add(prefix, blank=hyp.total + lp_blank)
            if skip:
                continue
            last = prefix[-1] if prefix else None
            for tok, lp in zip(ids, vals):
                if tok == self.blank_id:
                    continue
                if tok == last:
                    add(prefix, non_blank=hyp.non_blank + lp)  # repeat collapsed
                    ext = hyp.blank + lp  # a blank separated the repeat
                else:
                    ext = hyp.total + lp
                ext_prefix = prefix + (tok,)
                add(ext_prefix, non_blank=ext, frames=frames_of[prefix] + (self._t,))
        ranked = sorted(new.items(), key=lambda kv: kv[1].total, reverse=True)[: self.beam]
        self._hyps = dict(ranked)
        self._frames_of = {p: frames_of[p] for p in self._hyps}

    def best(self) -> list[int]:
        prefix = max(self._hyps.items(), key=lambda kv: kv[1].total)[0]
        return list(prefix)

    @property
    def frames(self) -> list[int]:
        prefix = max(self._hyps.items(), key=lambda kv: kv[1].total)[0]
        return list(self._frames_of[prefix])


def make_search(beam: int = 1, blank_id: int = 0):
    """Greedy search for beam 1, prefix beam search otherwise."""
    return CTCGreedySearch(blank_id) if beam <= 1 else CTCPrefixBeamSearch(beam, blank_id)


@torch.inference_mode()
def decode_utterance(model, feats: torch.Tensor, *, chunk=MODEL_CHUNK, beam: int = 1) -> list[int]:
    """Decode one utterance offline. feats: (F, C) raw fbank. A streaming
    model decodes in simulated streaming: its own chunk mask over the whole
    utterance (or ``chunk``, a ChunkConfig or None for full context)."""
    lens = torch.tensor([feats.size(0)], device=feats.device)
    enc = model(feats[None], lens, chunk=chunk)
    log_probs = model.ctc_log_probs(enc.out)[0, : int(enc.out_lens[0])]
    search = make_search(beam)
    search.step(log_probs)
    return search.best()


def error_rates(refs: Sequence[str], hyps: Sequence[str]) -> dict:
    """Corpus-level WER and CER (jiwer), with the edit counts behind the WER."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if not refs:
        return {"wer": float("nan"), "cer": float("nan"), "words": 0, "utterances": 0}
    # jiwer refuses empty references; an empty reference never reaches here
    # (the data layer skips empty transcripts), but an empty hypothesis can.
    words = jiwer.process_words(list(refs), list(hyps))
    chars = jiwer.process_characters(list(refs), list(hyps))
    n_words = words.hits + words.substitutions + words.deletions
    return {
        "wer": words.wer,
        "cer": chars.cer,
        "substitutions": words.substitutions,
        "deletions": words.deletions,
        "insertions": words.insertions,
        "words": n_words,
        "utterances": len(refs),
    }


@dataclass
class DecodeResult:
    summary: dict
    hyps: list[dict]  # per utterance: id, ref, hyp


@torch.inference_mode()
def decode_manifest(model, data_cfg, manifest: str, *, chunk=MODEL_CHUNK, beam: int = 1,
                    device: str | torch.device = "cpu", max_utts: int = 0,
                    out_dir: Optional[str | Path] = None, progress: bool = False) -> DecodeResult:
    """Decode a manifest in padded batches and score it.

    Batching does not change results: every frame's output depends only on
    valid frames (tested in the model's tests). Items the loader cannot use
    are counted in ``summary["skipped"]``, by reason in ``skipped_reasons``
    and one by one in ``skipped_items`` (id, reason, detail: the file or
    numbers at fault). With ``out_dir``, writes
    ``hyps.txt`` (id, ref, hyp per utterance) and ``summary.json``.
    """
    model.eval()
    loader, sampler = make_dataloader(data_cfg, manifest, model.tokenizer, train=False, seed=0)
    rows: list[dict] = []
    skipped: list[Skip] = list(sampler.skipped)
    iterator = loader
    if progress:
        iterator = tqdm(loader, desc=f"decode {Path(manifest).name}", unit="batch")
    for batch in iterator:
        skipped.extend(batch.skipped)
        if len(batch) == 0:
            continue
        batch = batch.to(device)
        enc = model(batch.feats, batch.feat_lens, chunk=chunk)
        log_probs = model.ctc_log_probs(enc.out).float().cpu()
        for i, uid in enumerate(batch.ids):
            search = make_search(beam)
            search.step(log_probs[i, : int(enc.out_lens[i])])
            rows.append({"id": uid, "ref": batch.texts[i], "hyp": model.tokenizer.decode(search.best())})
        if max_utts and len(rows) >= max_utts:
            rows = rows[:max_utts]
            break
    rows.sort(key=lambda r: r["id"])
    summary = error_rates([r["ref"] for r in rows], [r["hyp"] for r in rows])
    summary.update({
        "manifest": str(manifest),
        "beam": beam,
        "chunk": _chunk_desc(model.resolve_chunk(chunk)),  # eval mode: never a random draw
        "skipped": len(skipped),
        "skipped_reasons": count_reasons(skipped),
        "skipped_items": [s._asdict() for s in skipped],
    })
    if out_dir is not None:
        out = Path(out_dir)
        write_atomic(out / "hyps.txt", "".join(f"{r['id']}\tREF: {r['ref']}\n{r['id']}\tHYP: {r['hyp']}\n"
                                               for r in rows))
        write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return DecodeResult(summary, rows)


def read_hyps(path: str | Path) -> list[dict]:
    """``hyps.txt`` as ``decode_manifest`` writes it, back into rows (id, ref, hyp)."""
    rows: dict[str, dict] = {}
    for line in Path(path).read_text().splitlines():
        uid, rest = line.split("\t", 1)
        kind, text = rest.split(": ", 1) if ": " in rest else (rest.rstrip(":"), "")
        rows.setdefault(uid, {"id": uid})["ref" if kind == "REF" else "hyp"] = text
    return list(rows.values())


def _chunk_desc(chunk) -> Optional[dict]:
    if chunk is None:
        return None
    return {"chunk_frames": chunk.chunk_frames, "left_chunks": chunk.left_chunks}

