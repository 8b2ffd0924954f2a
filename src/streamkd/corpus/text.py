"""Transcripts for the embedded corpus: sentences from Debian's fortunes.

A fortune file holds entries separated by lines of a single ``%``. Each
entry goes through three stages, and every drop is counted with its reason:

1. entry filters (the whole fortune is dropped): overstrike sequences
   (``X\\bX``), ascii-art, IRC logs (``<nick>`` lines), dictionary-style
   definitions (``Word, n.:``);
2. line filters: attribution lines (stripped text starting with ``--``) and
   their indented continuation lines are removed;
3. sentence filters, after splitting into sentences and normalising: numbers
   that cannot be spelled out, symbols that are not speech, too few or too
   many words, duplicates.

Normalised text holds upper-case letters A-Z, apostrophes inside words and
single spaces, exactly what a character tokenizer will see.

Invariants (checked by the tests):
``entries_total == entries_kept + sum(entry_drops)`` and
``sentence_candidates == sentences_kept + sum(sentence_drops)``.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from streamkd.errors import DataError

__all__ = [
    "FORTUNES_DIR",
    "EXCLUDED_FILES",
    "MIN_WORDS",
    "MAX_WORDS",
    "TextStats",
    "number_to_words",
    "normalize_sentence",
    "entry_drop_reason",
    "strip_attributions",
    "split_sentences",
    "sentences_from_entries",
    "read_fortune_entries",
    "load_sentences",
]

FORTUNES_DIR = Path("/usr/share/games/fortunes")
# Stereotype humour: left out on purpose (see docs/machine-notes.md).
EXCLUDED_FILES = frozenset({"ethnic", "men-women"})
MIN_WORDS = 3
MAX_WORDS = 25
MAX_NUMBER = 9999

_ONES = ("ZERO ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN ELEVEN TWELVE "
         "THIRTEEN FOURTEEN FIFTEEN SIXTEEN SEVENTEEN EIGHTEEN NINETEEN").split()
_TENS = "_ _ TWENTY THIRTY FORTY FIFTY SIXTY SEVENTY EIGHTY NINETY".split()

# Fortune-level patterns.
_IRC_LINE = re.compile(r"^\s*(<[@+%]?[^\s<>]{1,20}>|\*{1,3}\s+\S+\s+(has|is|was|sets)\b)", re.M)
_DICT_ENTRY = re.compile(
    r"^\s*[\w'\" .-]{1,40},?\s+\(?(n|v|vt|vi|adj|adv|prep|pron|conj|interj|abbr|pl|n\. ?pl)\.,?\)?\s*[:,]",
    re.M | re.I,
)
_ART_RUN = re.compile(r"[|/\\_~^#=<>{}\[\]()*+`]{3,}|(?:[|/\\_~^#=<>{}\[\]()*+`]\s){3,}")
_ART_CHARS = set("|/\\_~^#=<>{}[]()*+`@$%&-:;.,'\"")

# Sentence ends: terminal punctuation followed by space (and not a known
# abbreviation), or a colon that ends a line (fortune headings).
_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|:[ \t]*\n")
_ABBREV = frozenset(
    "mr mrs ms dr st jr sr vs etc prof rev gen col lt sgt capt mt no eg ie cf approx inc ltd co corp dept".split()
)
_NOT_SPEECH = re.compile(r"[@#$^~|\\<>=+_{}]|\d[.,:/]\d|\d(st|nd|rd|th|s)\b|[a-z]\d|\d[a-z]", re.I)
_NUMBER = re.compile(r"\d+")


@dataclass
class TextStats:
    """What the text pipeline read, kept and dropped (with reasons)."""

    files: list[str] = field(default_factory=list)
    entries_total: int = 0
    entries_kept: int = 0
    entry_drops: Counter = field(default_factory=Counter)
    attribution_lines: int = 0
    sentence_candidates: int = 0
    sentences_kept: int = 0
    sentence_drops: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {
            "files": list(self.files),
            "entries_total": self.entries_total,
            "entries_kept": self.entries_kept,
            "entry_drops": dict(sorted(self.entry_drops.items())),
            "attribution_lines_removed": self.attribution_lines,
            "sentence_candidates": self.sentence_candidates,
            "sentences_kept": self.sentences_kept,
            "sentence_drops": dict(sorted(self.sentence_drops.items())),
        }

    def report(self) -> str:
        """Human-readable lines for the build log."""
        lines = [
            f"text: {len(self.files)} fortune files, {self.entries_total} entries, "
            f"{self.entries_kept} kept",
        ]
        lines += [f"  entry dropped ({reason}): {n}" for reason, n in sorted(self.entry_drops.items())]
        lines.append(f"  attribution lines removed: {self.attribution_lines}")
        lines.append(f"text: {self.sentence_candidates} candidate sentences, {self.sentences_kept} kept")
        lines += [f"  sentence dropped ({reason}): {n}" for reason, n in sorted(self.sentence_drops.items())]
        return "\n".join(lines)


def number_to_words(n: int) -> str:
    """Spell out 0 <= n <= 9999 in upper-case English words ("ONE HUNDRED FIVE")."""
    if not isinstance(n, int) or not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"number_to_words handles integers 0..{MAX_NUMBER}, got {n!r}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " HUNDRED" + ("" if rest == 0 else " " + number_to_words(rest))
    thousands, rest = divmod(n, 1000)
    return _ONES[thousands] + " THOUSAND" + ("" if rest == 0 else " " + number_to_words(rest))


def _spell_numbers(text: str) -> Optional[str]:
    """Replace each integer by its words; None if one is out of range."""
    out, last = [], 0
    for match in _NUMBER.finditer(text):
        value = int(match.group())
        if value > MAX_NUMBER or (len(match.group()) > 1 and match.group()[0] == "0"):
            return None
        out += [text[last:match.start()], " ", number_to_words(value), " "]
        last = match.end()
    out.append(text[last:])
    return "".join(out)


def normalize_sentence(raw: str) -> tuple[Optional[str], str]:
    """One raw sentence -> (normalised text or None, reason).

    The reason is "ok" or why the sentence is dropped: "not_speech"
    (symbols, code, ordinals, decimals), "number_too_large", "too_short",
    "too_long".
    """
    text = unicodedata.normalize("NFKD", raw)
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = text.replace("\u2019", "'").replace("\u2018", "'").replace("`", "'")
    # List markers ("(2)", "3.", "b)") and Q/A labels are layout, not speech.
    text = re.sub(r"^\s*(\(\d{1,2}\)|\d{1,2}[.)]|\(?[a-zA-Z]\)|[QA]:)\s+", "", text)
    if _NOT_SPEECH.search(text) or any(ord(c) > 127 for c in text):
        return None, "not_speech"
    text = re.sub(r"(?<=\d)\s*%", " percent ", text.replace("&", " and "))
    if "%" in text:
        return None, "not_speech"
    spelled = _spell_numbers(text)
    if spelled is None:
        return None, "number_too_large"
    # Hyphens, slashes and every other mark separate words; apostrophes are
    # kept only inside a word (DON'T, O'CLOCK), not as quotation marks.
    text = re.sub(r"[^A-Za-z']+", " ", spelled).upper()
    words = [w.strip("'") for w in text.split()]
    words = [w for w in words if w]
    if len(words) < MIN_WORDS:
        return None, "too_short"
    if len(words) > MAX_WORDS:
        return None, "too_long"
    return " ".join(words), "ok"


def entry_drop_reason(entry: str, source: str = "") -> Optional[str]:
    """Why a whole fortune entry is unusable, or None if it may be used."""
    if "\b" in entry:
        return "overstrike"
    if _IRC_LINE.search(entry):
        return "irc_log"
    if _DICT_ENTRY.search(entry):
        return "dictionary"
    if source == "ascii-art" or _looks_like_art(entry):
        return "ascii_art"
    return None


def _looks_like_art(entry: str) -> bool:
    for line in entry.splitlines():
        body = line.strip()
        if body.startswith("--"):
            continue
        if _ART_RUN.search(body):
            return True
        if len(body) >= 8 and sum(c in _ART_CHARS for c in body) > 0.3 * len(body.replace(" ", "")):
            return True
    return False


def _indent(line: str) -> int:
    return len(line.expandtabs(8)) - len(line.expandtabs(8).lstrip())


def strip_attributions(entry: str) -> tuple[str, int]:
    """Remove attribution lines (stripped text starting with ``--``) and the
    lines that continue them (indented at least as deep). Returns the text
    left and the number of lines removed."""
    kept, removed, attr_indent = [], 0, None
    for line in entry.splitlines():
        if line.strip().startswith("--"):
            attr_indent, removed = _indent(line), removed + 1
            continue
        if attr_indent is not None and line.strip() and _indent(line) >= attr_indent:
            removed += 1
            continue
        attr_indent = None
        kept.append(line)
    return "\n".join(kept), removed


def split_sentences(text: str) -> list[str]:
    """Split the text of one fortune into raw sentences.

    Splits after ``.``, ``!`` or ``?`` followed by white space (not after a
    known abbreviation or a single initial) and after a colon that ends a
    line; joins the lines of each piece with spaces.
    """
    pieces, start = [], 0
    for match in _SENT_END.finditer(text):
        head = text[start:match.start()]
        if head.endswith(".") and _ends_in_abbreviation(head):
            continue
        pieces.append(head)
        start = match.end()
    pieces.append(text[start:])
    return [" ".join(p.split()) for p in pieces if p.strip()]


def _ends_in_abbreviation(head: str) -> bool:
    """True if the period ending ``head`` belongs to "Dr.", "e.g." or an initial."""
    words = head.split()
    token = words[-1].strip("(\"'").rstrip(".").lower() if words else ""
    if token in _ABBREV or "." in token:
        return True
    return len(token) == 1 and token.isalpha() and token not in ("a", "i")


def read_fortune_entries(directory: Path) -> Iterable[tuple[str, str]]:
    """Yield (file name, entry text) for every fortune file in ``directory``
    (skipping .dat/.u8 files and EXCLUDED_FILES), in sorted file order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(
            f"fortunes directory {directory} does not exist: run `make setup` "
            "(or `sudo apt-get install fortunes`)"
        )
    names = sorted(
        p.name for p in directory.iterdir()
        if p.is_file() and p.suffix not in (".dat", ".u8") and p.name not in EXCLUDED_FILES
    )
    if not names:
        raise DataError(f"no fortune files in {directory}: run `make setup` (or `sudo apt-get install fortunes`)")
    for name in names:
        raw = (directory / name).read_bytes().decode("utf-8", errors="replace")
        for entry in re.split(r"^%\s*$", raw, flags=re.M):
            if entry.strip():
                yield name, entry.strip("\n")


def sentences_from_entries(entries: Iterable[tuple[str, str]], stats: TextStats) -> list[str]:
    """Filter, split, normalise and deduplicate; counts go into ``stats``.
    Returns the kept sentences in first-seen order."""
    seen: set[str] = set()
    kept: list[str] = []
    for source, entry in entries:
        stats.entries_total += 1
        reason = entry_drop_reason(entry, source)
        if reason is not None:
            stats.entry_drops[reason] += 1
            continue
        stats.entries_kept += 1
        body, removed = strip_attributions(entry)
        stats.attribution_lines += removed
        for raw in split_sentences(body):
            stats.sentence_candidates += 1
            text, why = normalize_sentence(raw)
            if text is not None and text in seen:
                why = "duplicate"
            if why != "ok":
                stats.sentence_drops[why] += 1
                continue
            seen.add(text)
            kept.append(text)
    stats.sentences_kept = len(kept)
    return kept


def load_sentences(directory: Path | str = FORTUNES_DIR) -> tuple[list[str], TextStats]:
    """All usable sentences of the fortunes in ``directory`` and the stats."""
    stats = TextStats()
    entries = list(read_fortune_entries(Path(directory)))
    stats.files = sorted({name for name, _ in entries})
    return sentences_from_entries(entries, stats), stats
