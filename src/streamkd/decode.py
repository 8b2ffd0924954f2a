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
import multiprocessing
import os
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import jiwer
import torch
from tqdm import tqdm

from streamkd.atomic import write_atomic
from streamkd.dataset import make_dataloader
from streamkd.kd.losses import ctc_loss
from streamkd.manifest import read_manifest
from streamkd.model.asr import MODEL_CHUNK
from streamkd.tokenizer import SPACE
from streamkd.types import Skip, count_reasons

__all__ = [
    "CTCGreedySearch",
    "CTCPrefixBeamSearch",
    "make_search",
    "SearchOptions",
    "LM_BEAM",
    "PrefixNode",
    "PrefixText",
    "token_texts",
    "decode_utterance",
    "error_rates",
    "decode_manifest",
    "per_utt_errors",
    "manifest_log_probs",
    "search_scores",
    "search_workers",
    "AcousticScores",
    "read_hyps",
    "DecodeResult",
]


class PrefixNode:
    """One token of a prefix tree: a prefix is the path from the root to a
    node, so extending one costs O(1) however long it is. Nodes are unique
    per prefix while alive (children are held weakly, parents strongly), so
    the search can key hypotheses by node. ``frame``: where the token was
    first emitted; ``lm``: the LM context of the prefix (LMFusion), or None."""

    __slots__ = ("parent", "token", "frame", "depth", "lm", "_children", "__weakref__")

    def __init__(self, parent: Optional["PrefixNode"], token: int, frame: int, lm=None) -> None:
        self.parent, self.token, self.frame, self.lm = parent, token, frame, lm
        self.depth = 0 if parent is None else parent.depth + 1
        self._children: Optional[weakref.WeakValueDictionary] = None

    def child(self, token: int, frame: int, fusion=None) -> "PrefixNode":
        """The node of this prefix + token (made on first use)."""
        if self._children is None:
            self._children = weakref.WeakValueDictionary()
        node = self._children.get(token)
        if node is None:
            node = PrefixNode(self, token, frame, None if fusion is None else fusion.extend(self.lm, token))
            self._children[token] = node
        return node

    def path(self) -> list["PrefixNode"]:
        """The nodes from the first token to this one (the root excluded)."""
        out, node = [], self
        while node.parent is not None:
            out.append(node)
            node = node.parent
        return out[::-1]


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
        self._node = PrefixNode(None, -1, -1)
        self._prev = self.blank_id
        self._t = 0

    def continue_after(self, token: int) -> None:
        """The frame before this search's first one had best symbol
        ``token``: a repeat of it at the start is not a new token (a search
        that takes over a stream cut after a non-blank frame)."""
        self._prev = token

    def step(self, log_probs: torch.Tensor) -> None:
        """log_probs: (T, V) for the next T frames."""
        if log_probs.numel() == 0:
            return
        best = log_probs.argmax(dim=-1).tolist()
        for i, tok in enumerate(best):
            if tok != self.blank_id and tok != self._prev:
                self.tokens.append(tok)
                self.frames.append(self._t + i)
                self._node = PrefixNode(self._node, tok, self._t + i)  # a chain: no sibling to share
            self._prev = tok
        self._t += len(best)

    def finish(self) -> None:
        """End of input (nothing left to do without an LM)."""

    def best_node(self) -> PrefixNode:
        return self._node

    def best(self) -> list[int]:
        return list(self.tokens)

    def text(self, tokenizer) -> str:
        """The transcript of the best hypothesis."""
        return tokenizer.decode(self.best())


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
    """CTC prefix beam search, incremental over frames, optionally with a
    word LM by shallow fusion (``fusion``: an ``LMFusion``).

    Per frame only the ``beam`` most likely tokens are expanded (and of
    them only those with log-prob >= ``token_min_logp``), and frames whose
    blank probability exceeds ``blank_skip`` only extend the blank paths,
    which keeps the search cheap on CTC's spiky posteriors. Hypotheses are
    ranked by CTC log-prob plus the fusion weight of their complete words;
    those more than ``prune_logp`` below the best are dropped. ``finish()``
    scores the last word and the sentence end. With alpha = beta = 0 the
    ranking, hence the result, is that of the search without an LM.
    """

    def __init__(self, beam: int = 4, blank_id: int = 0, blank_skip: float = 0.999, *, fusion=None,
                 token_min_logp: float = -math.inf, prune_logp: float = math.inf) -> None:
        if beam < 1:
            raise ValueError(f"beam must be >= 1, got {beam}")
        self.beam = beam
        self.blank_id = blank_id
        self.log_blank_skip = math.log(blank_skip)
        self.fusion = fusion
        self.token_min_logp = token_min_logp
        self.prune_logp = prune_logp
        self.reset()

    def reset(self) -> None:
        root = PrefixNode(None, -1, -1, None if self.fusion is None else self.fusion.start())
        self._hyps: dict[PrefixNode, _Hyp] = {root: _Hyp(0.0, -math.inf)}
        self._final: Optional[dict[PrefixNode, float]] = None  # scores after finish()
        self._t = 0

    def _lm_weight(self, node: PrefixNode) -> float:
        return 0.0 if self.fusion is None else self.fusion.weight(node.lm)

    def step(self, log_probs: torch.Tensor) -> None:
        """log_probs: (T, V) for the next T frames."""
        if self._final is not None:
            raise RuntimeError("finish() was called; reset() before stepping again")
        lp = log_probs.detach().to(torch.float64).cpu()
        k = min(self.beam, lp.size(-1))
        top_vals, top_ids = lp.topk(k, dim=-1)
        blank_col = lp[:, self.blank_id].tolist()
        for t in range(lp.size(0)):
            self._step_frame(blank_col[t], top_ids[t].tolist(), top_vals[t].tolist())
            self._t += 1

    def _step_frame(self, lp_blank: float, ids: list[int], vals: list[float]) -> None:
        new: dict[PrefixNode, _Hyp] = {}

        def add(node, blank=-math.inf, non_blank=-math.inf):
            hyp = new.get(node)
            if hyp is None:
                new[node] = _Hyp(blank, non_blank)
            else:
                hyp.blank = _logaddexp(hyp.blank, blank)
                hyp.non_blank = _logaddexp(hyp.non_blank, non_blank)

        skip = lp_blank > self.log_blank_skip
        for node, hyp in self._hyps.items():
            add(node, blank=hyp.total + lp_blank)
            if skip:
                continue
            for tok, lp in zip(ids, vals):
                if tok == self.blank_id or lp < self.token_min_logp:
                    continue
                if tok == node.token:
                    add(node, non_blank=hyp.non_blank + lp)  # repeat collapsed
                    ext = hyp.blank + lp  # a blank separated the repeat
                else:
                    ext = hyp.total + lp
                add(node.child(tok, self._t, self.fusion), non_blank=ext)
        scored = sorted(((h.total + self._lm_weight(n), n, h) for n, h in new.items()),
                        key=lambda x: x[0], reverse=True)[: self.beam]
        floor = scored[0][0] - self.prune_logp
        self._hyps = {n: h for s, n, h in scored if s >= floor}

    def finish(self) -> None:
        """End of input: rank by the complete LM score (last word, ``</s>``)."""
        if self._final is None:
            fusion = self.fusion
            self._final = {n: h.total + (0.0 if fusion is None else fusion.weight(fusion.finish(n.lm)))
                           for n, h in self._hyps.items()}

    def scores(self) -> dict[PrefixNode, float]:
        """Each live hypothesis's ranking score (final after ``finish()``)."""
        if self._final is not None:
            return dict(self._final)
        return {n: h.total + self._lm_weight(n) for n, h in self._hyps.items()}

    def best_node(self) -> PrefixNode:
        ranked = self._final if self._final is not None else None
        if ranked is None:
            return max(self._hyps.items(), key=lambda kv: kv[1].total + self._lm_weight(kv[0]))[0]
        return max(ranked.items(), key=lambda kv: kv[1])[0]

    def best(self) -> list[int]:
        return [n.token for n in self.best_node().path()]

    def text(self, tokenizer) -> str:
        """The transcript of the best hypothesis."""
        return tokenizer.decode(self.best())

    @property
    def frames(self) -> list[int]:
        return [n.frame for n in self.best_node().path()]


class PrefixText:
    """The text of a search's best prefix, kept up to date incrementally:
    ``update(node)`` walks only from the new best node and the previous one
    to their common ancestor, so showing a partial result after every chunk
    costs the tokens that changed, not the whole transcript. ``steps``
    counts the nodes walked (the work, for tests).

    The previous node is held weakly, so that showing a partial never keeps
    a pruned prefix alive (which would change the search's frames); when it
    is gone, the text is rebuilt from the root.

    pieces: token id -> its text (``▁`` as a space; blank "").
    """

    def __init__(self, pieces: Sequence[str]) -> None:
        self.pieces = list(pieces)
        self.steps = 0
        self._ref = lambda: None  # weak reference to the node shown last
        self._texts: list[str] = []
        self._text = ""

    def update(self, node: PrefixNode) -> str:
        old = self._ref()
        if node is old:
            return self._text
        new, suffix = node, []
        if old is None:  # first call, or the node shown last was pruned: from the root
            old = node
            while old.parent is not None:
                old = old.parent
        while node.depth > old.depth:
            suffix.append(node)
            node = node.parent
            self.steps += 1
        while old.depth > node.depth:
            old = old.parent
            self.steps += 1
        while node is not old:
            suffix.append(node)
            node, old = node.parent, old.parent
            self.steps += 2
        del self._texts[node.depth:]
        self._texts.extend(self.pieces[n.token] for n in reversed(suffix))
        self._ref = weakref.ref(new)
        self._text = "".join(self._texts).strip()
        return self._text


def token_texts(symbols: Sequence[str]) -> list[str]:
    """Display text per token id: ``▁`` as a space, the blank (id 0) empty."""
    return [""] + [s.replace(SPACE, " ") for s in symbols[1:]]


def make_search(beam: int = 1, blank_id: int = 0, *, fusion=None, token_min_logp: float = -math.inf,
                prune_logp: float = math.inf):
    """Greedy search for beam 1 without an LM, prefix beam search otherwise
    (an LM needs a beam: with beam 1 the search keeps one prefix)."""
    if beam <= 1 and fusion is None:
        return CTCGreedySearch(blank_id)
    return CTCPrefixBeamSearch(max(beam, 1), blank_id, fusion=fusion, token_min_logp=token_min_logp,
                               prune_logp=prune_logp)


LM_BEAM = 16  # the default beam of every search with a word LM


@dataclass(frozen=True)
class SearchOptions:
    """Beam-search settings shared by every LM command, so that "beam" and
    "beam + LM" differ only by the LM."""
    beam: int = LM_BEAM  # hypotheses kept
    token_min_logp: float = -10.0  # tokens below this log-prob are not expanded
    prune_logp: float = 20.0  # hypotheses this far below the best are dropped

    def __post_init__(self) -> None:
        if self.beam < 2:
            raise ValueError(f"--beam must be at least 2 for beam search, got {self.beam}")

    def factory(self, fusion=None) -> Callable:
        return lambda: make_search(self.beam, fusion=fusion, token_min_logp=self.token_min_logp,
                                   prune_logp=self.prune_logp)

    def as_dict(self) -> dict:
        return {"beam": self.beam, "token_min_logp": self.token_min_logp, "prune_logp": self.prune_logp}


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


def by_speaker(rows: list[dict], manifest: str | Path) -> dict[str, dict]:
    """WER and CER of each speaker (voice) of the manifest, over its decoded
    utterances (rows: id, ref, hyp)."""
    speaker = {u.id: u.speaker for u in read_manifest(manifest)}
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(speaker.get(r["id"]) or "unknown", []).append(r)
    return {name: {k: v for k, v in error_rates([r["ref"] for r in rs], [r["hyp"] for r in rs]).items()
                   if k in ("wer", "cer", "words", "utterances")}
            for name, rs in sorted(groups.items())}


@dataclass
class DecodeResult:
    summary: dict
    hyps: list[dict]  # per utterance: id, ref, hyp


@dataclass
class AcousticScores:
    """The CTC log-probs of a manifest's utterances, computed once so that
    several searches (greedy, beam, LM weights) can run on them."""
    ids: list[str]
    refs: list[str]
    log_probs: list[torch.Tensor]  # per utterance (T, V), float32 on the CPU
    utt_sec: list[float]  # audio per utterance (fbank frames x frame shift)
    encoder_sec: float  # wall time spent in the model on these utterances
    skipped: list[Skip]
    ctc_loss: Optional[float] = None  # mean CTC loss over the batches (``with_loss``)

    @property
    def audio_sec(self) -> float:
        return sum(self.utt_sec)


@torch.inference_mode()
def manifest_log_probs(model, data_cfg, manifest: str, *, chunk=MODEL_CHUNK, device: str | torch.device = "cpu",
                       max_utts: int = 0, progress: bool = False, with_loss: bool = False) -> AcousticScores:
    """Run the model over a manifest in padded batches (first ``max_utts``
    utterances in loader order when > 0). Batching does not change results:
    every frame's output depends only on valid frames (tested in the
    model's tests). Items the loader cannot use are kept in ``skipped``.
    ``with_loss``: also the mean CTC loss of the batches (validation)."""
    model.eval()
    loss_sum, loss_batches = 0.0, 0
    loader, sampler = make_dataloader(data_cfg, manifest, model.tokenizer, train=False, seed=0)
    out = AcousticScores([], [], [], [], 0.0, list(sampler.skipped))
    iterator = loader
    if progress:
        iterator = tqdm(loader, desc=f"encode {Path(manifest).name}", unit="batch")
    shift_sec = data_cfg.features.frame_shift_ms / 1000.0
    for batch in iterator:
        out.skipped.extend(batch.skipped)
        if len(batch) == 0:
            continue
        batch = batch.to(device)
        start = time.perf_counter()
        enc = model(batch.feats, batch.feat_lens, chunk=chunk)
        log_probs = model.ctc_log_probs(enc.out).float()
        out.encoder_sec += time.perf_counter() - start
        if with_loss:
            loss_sum += float(ctc_loss(log_probs, enc.out_lens, batch.tokens, batch.token_lens))
            loss_batches += 1
        log_probs = log_probs.cpu()
        for i, uid in enumerate(batch.ids):
            out.ids.append(uid)
            out.refs.append(batch.texts[i])
            out.log_probs.append(log_probs[i, : int(enc.out_lens[i])].clone())
            out.utt_sec.append(int(batch.feat_lens[i]) * shift_sec)
        if max_utts and len(out.ids) >= max_utts:
            break
    if max_utts and len(out.ids) > max_utts:  # the limit asked for: the last batch's surplus is dropped
        encoded = out.audio_sec
        del out.ids[max_utts:], out.refs[max_utts:], out.log_probs[max_utts:], out.utt_sec[max_utts:]
        out.encoder_sec *= out.audio_sec / encoded  # the model time of the audio kept, pro rata
    if with_loss:
        out.ctc_loss = loss_sum / max(1, loss_batches)
    return out


def search_workers() -> int:
    """Processes for a search that is slow enough to share out (an LM graph
    or a prefix beam): the CPUs this process may run on (``taskset`` narrows
    them), 1 where processes cannot be forked."""
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# What forked search workers read: (scores, tokenizer, new_search). Set only
# while a pool runs; a fork copies it, so nothing is pickled but the indices.
_FORKED_JOB: Optional[tuple] = None


def _search_utterances(scores: AcousticScores, tokenizer, new_search, indices) -> list[dict]:
    rows = []
    for i in indices:
        search = new_search()
        search.step(scores.log_probs[i])
        search.finish()
        rows.append({"id": scores.ids[i], "ref": scores.refs[i], "hyp": search.text(tokenizer)})
    return rows


def _search_forked(indices: list[int]) -> list[dict]:
    torch.set_num_threads(1)  # a search is one thread per process
    return _search_utterances(*_FORKED_JOB, indices)


def search_scores(scores: AcousticScores, tokenizer, new_search, workers: int = 1) -> tuple[list[dict], float]:
    """Run ``new_search()`` (a fresh search per utterance) over every
    utterance -> (rows of id, ref, hyp sorted by id, wall seconds of the search).

    ``workers`` > 1 shares the utterances out, longest first, to that many
    forked processes (each search is independent and single-threaded; the
    graph search holds the GIL, so threads would not help). The rows are the
    same whatever ``workers`` is."""
    global _FORKED_JOB
    start = time.perf_counter()
    order = sorted(range(len(scores.ids)), key=lambda i: -scores.log_probs[i].size(0))
    shards = [order[k:k + 4] for k in range(0, len(order), 4)]  # small shards keep the processes even
    workers = min(workers, len(shards))  # no process forked to sit idle
    if workers <= 1:
        rows = _search_utterances(scores, tokenizer, new_search, order)
    else:
        _FORKED_JOB = (scores, tokenizer, new_search)
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                rows = [row for shard in pool.imap_unordered(_search_forked, shards) for row in shard]
        finally:
            _FORKED_JOB = None
    seconds = time.perf_counter() - start
    rows.sort(key=lambda r: r["id"])
    return rows, seconds


def decode_manifest(model, data_cfg, manifest: str, *, chunk=MODEL_CHUNK, beam: int = 1,
                    device: str | torch.device = "cpu", max_utts: int = 0,
                    out_dir: Optional[str | Path] = None, progress: bool = False,
                    fusion=None, graph=None, scores=None, workers: Optional[int] = None) -> DecodeResult:
    """Decode a manifest in padded batches and score it (``fusion``: an
    ``LMFusion`` for beam search with a word LM; ``graph``: a
    ``GraphDecoder`` to search an HLG graph instead of prefixes). Items the loader cannot
    use are counted in ``summary["skipped"]``, by reason in
    ``skipped_reasons`` and one by one in ``skipped_items`` (id, reason,
    detail: the file or numbers at fault). With ``out_dir``, writes
    ``hyps.txt`` (id, ref, hyp per utterance) and ``summary.json``.
    ``scores``: the model's ``manifest_log_probs`` of this manifest, computed
    already (to search the same log-probs twice). ``workers``: processes for
    the search (``search_scores``); by default ``search_workers()`` for a
    graph or an LM beam, one for searches without an LM (fast)."""
    if scores is None:
        scores = manifest_log_probs(model, data_cfg, manifest, chunk=chunk, device=device, max_utts=max_utts,
                                    progress=progress)
    if graph is not None:
        new_search = graph.new_search
    elif fusion is not None:
        new_search = SearchOptions(max(beam, 2)).factory(fusion)
    else:
        new_search = lambda: make_search(beam)  # noqa: E731
    if workers is None:
        workers = search_workers() if graph is not None or fusion is not None else 1
    rows, _ = search_scores(scores, model.tokenizer, new_search, workers)
    summary = error_rates([r["ref"] for r in rows], [r["hyp"] for r in rows])
    summary["by_speaker"] = by_speaker(rows, manifest)
    summary.update({
        "manifest": str(manifest),
        "beam": beam,
        "chunk": _chunk_desc(model.resolve_chunk(chunk)),  # eval mode: never a random draw
        "skipped": len(scores.skipped),
        "skipped_reasons": count_reasons(scores.skipped),
        "skipped_items": [s._asdict() for s in scores.skipped],
    })
    if fusion is not None:
        summary["lm"] = {"dir": str(fusion.lm.dir), "alpha": fusion.alpha, "beta": fusion.beta}
    if graph is not None:
        summary["graph"] = graph.describe()
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


def per_utt_errors(rows: list[dict]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """utt id -> [word errors, reference words] and [char errors, reference
    chars], for paired bootstrap."""
    words, chars = {}, {}
    for r in rows:
        m = jiwer.process_words(r["ref"], r["hyp"])
        words[r["id"]] = [m.substitutions + m.deletions + m.insertions, m.hits + m.substitutions + m.deletions]
        c = jiwer.process_characters(r["ref"], r["hyp"])
        chars[r["id"]] = [c.substitutions + c.deletions + c.insertions, c.hits + c.substitutions + c.deletions]
    return words, chars


# The key suffix under which a record keeps per_utt_errors' output, per metric, in the order it
# returns them (words, characters): eval.json's test_utts, test_utts_chars, test_lm_utts, ...
UTT_KEYS = {"wer": "_utts", "cer": "_utts_chars"}


def _chunk_desc(chunk) -> Optional[dict]:
    if chunk is None:
        return None
    return {"chunk_frames": chunk.chunk_frames, "left_chunks": chunk.left_chunks}

