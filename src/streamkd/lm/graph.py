"""A CTC decoding graph (HLG) from a word LM, for sherpa-onnx's FST decoder.

sherpa-onnx decodes a streaming CTC model (our wenet-ctc export included)
with Kaldi's FasterDecoder over an OpenFst graph when its
``OnlineCtcFstDecoderConfig.graph`` is set (docs/lm.md). The graph is
built the way icefall's ``prepare_lang_fst.py`` builds it, with kaldilm
(ARPA -> G) and kaldifst (composition, determinization, minimization):

- H: the CTC topology over the model's tokens: one state per token, blank
  and repeats output nothing, a new token outputs itself.
- L: the lexicon: each LM word spelled with the tokenizer's own encoding.
  A char tokenizer writes the space as a separate token ``▁``, so L demands
  one ``▁`` between words (and tolerates extra ones); SentencePiece pieces
  carry ``▁`` in a word's first piece, so words simply follow each other.
  Either way a token sequence spells at most one word sequence, so L needs
  no disambiguation symbols beyond G's back-off symbol ``#0``.
- G: the ARPA n-gram (kaldilm's arpa2fst, costs in natural log), its costs
  times ``alpha`` and ``beta`` subtracted on every word: the shallow-fusion
  score of ``streamkd.lm.fusion`` baked into the graph, because sherpa-onnx
  has no LM scale or word bonus for FST decoding.

Labels: input labels are token id + 1 (0 is epsilon, so the blank is 1):
sherpa-onnx subtracts one from each input label of the best path to get
token ids, and builds the text from those tokens. Output labels are word
ids of ``words.txt``. The graph is vocabulary-closed: a word the LM does
not know cannot be decoded through it (our own beam search can spell it).
"""
from __future__ import annotations

import json
import mmap
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from streamkd.atomic import atomic_open, write_atomic
from streamkd.errors import LMError
from streamkd.lm.build import ARPA_FILE
from streamkd.tokenizer import SPACE

__all__ = ["GRAPH_FILE", "GRAPH_META_FILE", "WORDS_FILE", "GraphWeights", "build_graph", "check_graph",
           "compose_hlg"]

GRAPH_FILE = "HLG.fst"
GRAPH_META_FILE = "graph.json"
WORDS_FILE = "words.txt"
_BACKOFF = "#0"
_FST_MAGIC = 2125659606  # the int32 an OpenFst binary file starts with


@dataclass(frozen=True)
class GraphWeights:
    """The fusion weights baked into G."""
    alpha: float  # LM weight: G's costs (-ln P) are multiplied by it
    beta: float  # word bonus: subtracted from the cost of every word arc


def _word_table(vocab: list[str]) -> dict[str, int]:
    """words.txt: <eps> 0, the LM's words, <s>, </s>, #0 (what arpa2fst needs)."""
    table = {"<eps>": 0}
    for word in [*vocab, "<unk>", "<s>", "</s>", _BACKOFF]:
        table.setdefault(word, len(table))
    return table


def _weighted_g(g_text: str, weights: GraphWeights, backoff_id: int) -> str:
    """G's text form with costs times alpha and beta off each word arc.

    Lines are ``src dst ilabel olabel [cost]`` (arcs) or ``state [cost]``
    (final states); back-off arcs carry #0 in and epsilon out.
    """
    out = []
    for line in g_text.splitlines():
        f = line.split()
        if len(f) >= 4:
            cost = weights.alpha * (float(f[4]) if len(f) == 5 else 0.0)
            if f[3] != "0" and int(f[3]) != backoff_id:
                cost -= weights.beta
            out.append(f"{f[0]} {f[1]} {f[2]} {f[3]} {cost:.6g}")
        elif f:
            out.append(f"{f[0]} {weights.alpha * (float(f[1]) if len(f) == 2 else 0.0):.6g}")
    return "\n".join(out) + "\n"


def _lexicon(spellings: dict[int, list[int]], separator: Optional[int]):
    """L: token labels (id + 1) in, word ids out; state 0 starts and is final."""
    import kaldifst

    L = kaldifst.StdVectorFst()
    start = L.add_state()
    L.start = start
    L.set_final(state=start, weight=0)
    word_end = start
    if separator is not None:  # words end in state 1; one ▁ leads back to 0
        word_end = L.add_state()
        L.set_final(state=word_end, weight=0)
        for src in (start, word_end):
            L.add_arc(state=src, arc=kaldifst.StdArc(separator + 1, 0, 0, start))
    for word_id, ids in spellings.items():
        state = start
        for i, token in enumerate(ids):
            nxt = word_end if i == len(ids) - 1 else L.add_state()
            L.add_arc(state=state, arc=kaldifst.StdArc(token + 1, word_id if i == 0 else 0, 0, nxt))
            state = nxt
    return L


def _ctc_topology(num_tokens: int, disambig: int):
    """H: token labels (id + 1) in, the same out on a token's first frame;
    blank (label 1) and repeats output epsilon. A ``disambig``:``disambig``
    self-loop on every state passes LG's #0 through on the input side, as
    Kaldi's Ha does: determinization then keeps back-off paths apart
    instead of copying the lower-order states into every higher one."""
    import kaldifst

    H = kaldifst.StdVectorFst()
    for _ in range(num_tokens):
        H.set_final(state=H.add_state(), weight=0)
    H.start = 0  # the blank's state
    for src in range(num_tokens):
        for dst in range(num_tokens):
            out = 0 if dst == 0 or dst == src else dst + 1
            H.add_arc(state=src, arc=kaldifst.StdArc(dst + 1, out, 0, dst))
        H.add_arc(state=src, arc=kaldifst.StdArc(disambig, disambig, 0, src))
    return H


def _spell(vocab: list[str], tokenizer, table: dict[str, int]) -> dict[int, list[int]]:
    """word id -> token ids; LMError naming the word when one cannot be spelled."""
    from streamkd.errors import TokenizerError

    spellings = {}
    for word in vocab:
        try:
            ids = tokenizer.encode(word)
        except TokenizerError as err:
            raise LMError(f"LM word {word!r} cannot be spelled with the model's tokens ({err})") from None
        spellings[table[word]] = ids
    return spellings


def compose_hlg(tokenizer, vocab: list[str], g_text: str, weights: GraphWeights):
    """(HLG, words table): min(det(H o min(det(L o G)))), as icefall and Kaldi build it."""
    import kaldifst

    table = _word_table(vocab)
    num_tokens = len(tokenizer.symbols)
    token_backoff = num_tokens + 1  # the first label after the tokens' (id + 1)
    separator = tokenizer.symbols.index(SPACE) if tokenizer.kind == "char" and SPACE in tokenizer.symbols else None
    L = _lexicon(_spell(vocab, tokenizer, table), separator)
    kaldifst.add_self_loops(L, isyms=[token_backoff], osyms=[table[_BACKOFF]])
    G = kaldifst.compile(s=_weighted_g(g_text, weights, table[_BACKOFF]), acceptor=False)
    kaldifst.arcsort(L, sort_type="olabel")
    kaldifst.arcsort(G, sort_type="ilabel")
    LG = kaldifst.compose(L, G)
    kaldifst.determinize_star(LG)
    kaldifst.minimize_encoded(LG)
    kaldifst.arcsort(LG, sort_type="ilabel")
    H = _ctc_topology(num_tokens, token_backoff)
    kaldifst.arcsort(H, sort_type="olabel")
    HLG = kaldifst.compose(H, LG)
    kaldifst.determinize_star(HLG)
    kaldifst.minimize_encoded(HLG)
    for state in kaldifst.StateIterator(HLG):  # #0 has done its job: make it epsilon
        for arc in kaldifst.ArcIterator(HLG, state):
            if arc.ilabel == token_backoff:
                arc.ilabel = 0
    return HLG, table


def build_graph(lm_dir: str | Path, tokenizer, out_dir: str | Path, *, weights: GraphWeights,
                max_order: int = -1, source: str = "the model") -> dict:
    """Write ``HLG.fst``, ``words.txt`` and ``graph.json`` into ``out_dir``
    from the LM folder's ARPA and the tokenizer; returns graph.json's dict."""
    import kaldilm

    from streamkd.lm.fusion import load_lm

    lm = load_lm(lm_dir, tokenizer, source)  # checks the folder and the spellings
    arpa = Path(lm_dir) / ARPA_FILE
    if not arpa.is_file():
        raise LMError(f"{arpa}: missing; the graph is built from the ARPA file (`streamkd lm build`)")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    (out_dir / GRAPH_META_FILE).unlink(missing_ok=True)  # no old description beside a new graph
    words = out_dir / WORDS_FILE  # the graph's output symbols, and arpa2fst's symbol table
    write_atomic(words, "".join(f"{w} {i}\n" for w, i in _word_table(lm.vocab).items()))
    g_text = kaldilm.arpa2fst(input_arpa=str(arpa), disambig_symbol=_BACKOFF, read_symbol_table=str(words),
                              max_order=max_order)
    hlg, _ = compose_hlg(tokenizer, lm.vocab, g_text, weights)
    with tempfile.TemporaryDirectory(prefix="streamkd-graph-") as tmp:  # kaldifst writes to a path
        hlg_tmp = Path(tmp) / GRAPH_FILE
        hlg.write(str(hlg_tmp))
        with open(hlg_tmp, "rb") as src, atomic_open(out_dir / GRAPH_FILE, "wb") as dst:
            shutil.copyfileobj(src, dst)
    meta = {"lm": str(lm_dir), "arpa": str(arpa), "order": lm.order if max_order < 1 else min(max_order, lm.order),
            "alpha": weights.alpha, "beta": weights.beta, "tokens": list(tokenizer.symbols),
            "words": len(lm.vocab), "states": hlg.num_states, "arcs": _num_arcs(hlg),
            "build_sec": round(time.perf_counter() - started, 1)}
    write_atomic(out_dir / GRAPH_META_FILE, json.dumps(meta, indent=2) + "\n")
    return meta


def _num_arcs(fst) -> int:
    import kaldifst

    return sum(fst.num_arcs(state) for state in kaldifst.StateIterator(fst))


def check_graph(graph_dir: str | Path, symbols: list[str]) -> Path:
    """The HLG.fst of a graph folder built for the tokens ``symbols``.

    LMError naming the file when HLG.fst or graph.json is missing, graph.json
    is unreadable or names other tokens, or HLG.fst does not start like an
    OpenFst file (sherpa-onnx would abort the process on it).
    """
    graph_dir = Path(graph_dir)
    hint = f"build it with `streamkd lm graph --lm LM --lang LANG --out {graph_dir}`"
    for name in (GRAPH_FILE, GRAPH_META_FILE):
        if not (graph_dir / name).is_file():
            raise LMError(f"{graph_dir / name}: missing; {hint}")
    path = graph_dir / GRAPH_META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LMError(f"{path}: not valid JSON ({err}); {hint}") from None
    if not isinstance(meta, dict) or meta.get("tokens") != list(symbols):
        raise LMError(f"{path}: the graph was built for other tokens than the model's tokens.txt; {hint}")
    fst = graph_dir / GRAPH_FILE
    problem = _vector_fst_problem(fst)
    if problem:
        raise LMError(f"{fst}: {problem}; {hint}")
    return fst


def _vector_fst_problem(path: Path) -> Optional[str]:
    """What is wrong with an OpenFst VectorFst file, else None. sherpa-onnx
    only logs a graph it cannot read and then crashes on the first chunk.

    The header: magic, FST type and arc type (length-prefixed strings),
    version, flags, properties, start state, number of states and of arcs
    (0 for a VectorFst). Then, per state, its final weight (4 bytes), its arc
    count (8) and 16 bytes per arc: walked here to check the file's length.
    """
    if path.stat().st_size == 0:
        return "empty file"
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        try:
            magic, pos = struct.unpack_from("<i", data, 0)[0], 4
            names = []
            for _ in range(2):
                n = struct.unpack_from("<i", data, pos)[0]
                names.append(bytes(data[pos + 4: pos + 4 + n]).decode("ascii"))
                pos += 4 + n
            _, flags, _, _, states, _ = struct.unpack_from("<iiQqqq", data, pos)
        except (struct.error, UnicodeDecodeError):
            return "not an OpenFst file (header unreadable)"
        if magic != _FST_MAGIC:
            return "not an OpenFst file"
        if names != ["vector", "standard"] or flags & 0x3:  # flags 1, 2: symbol tables after the header
            return f"a {names[0]}/{names[1]} FST (flags {flags}), not the vector/standard graph `lm graph` writes"
        pos += struct.calcsize("<iiQqqq")
        for _ in range(states):
            if pos + 12 > len(data):
                return f"truncated: ends inside the {states} states its header announces"
            pos += 12 + 16 * struct.unpack_from("<q", data, pos + 4)[0]
        if pos != len(data):
            return f"{len(data)} bytes where its {states} states take {pos}: truncated or corrupt"
    return None
