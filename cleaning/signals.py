"""Quality signals of one document, as the published filters define them (DataTrove's implementations of
Gopher, C4 and FineWeb are the reference; each function names the rule it follows).

Words come from ``cleaning.words.split_words`` (spaCy's English rules, as DataTrove splits them). The
n-gram repetition signals work on 64-bit word hashes in compiled loops instead of joined strings.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import cache

import numba
import numpy as np

from cleaning.words import count_sentences, reference_rules, split_words


@cache
def punctuation() -> frozenset[str]:
    """DataTrove's PUNCTUATION_SET: a word made only of these is a symbol, not a word."""
    rules = reference_rules()["datatrove"]
    return frozenset(rules["punctuation"]) | frozenset(rules["terminal_punctuation"])


@cache
def terminal_punctuation() -> tuple[str, ...]:
    """DataTrove's TERMINAL_PUNCTUATION: the characters FineWeb accepts at the end of a line."""
    return tuple(reference_rules()["datatrove"]["terminal_punctuation"])


# -- Gopher quality (Rae et al. 2021, appendix A; DataTrove GopherQualityFilter) -------------------------

GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_word_flags: dict[str, int] = {}  # word -> 1 (has a non-punctuation character) | 2 (has a letter)


def _flags(word: str) -> int:
    flags = _word_flags.get(word)
    if flags is None:
        symbols = punctuation()
        flags = (1 if any(ch not in symbols for ch in word) else 0) | (
            2 if any(ch.isalpha() for ch in word) else 0
        )
        if len(_word_flags) < 1 << 20:
            _word_flags[word] = flags
    return flags


def gopher_quality_signals(text: str) -> dict[str, float]:
    """All Gopher quality signals: non-symbol words, their mean length, '#' and ellipsis per word, bullet
    and ellipsis line shares, the share of words with a letter, distinct stop words (case-sensitive)."""
    words = split_words(text)
    n = len(words)
    non_symbol = alpha = chars = 0
    for word, count in Counter(words).items():  # each distinct word once
        flags = _flags(word)
        if flags & 1:
            non_symbol += count
            chars += count * len(word)
        if flags & 2:
            alpha += count
    lines = text.splitlines()
    n_lines = len(lines) or 1
    return {
        "words": float(non_symbol),
        "avg_word_length": chars / non_symbol if non_symbol else float("nan"),
        "hash_ratio": text.count("#") / n if n else float("inf"),
        "ellipsis_ratio": (text.count("...") + text.count("…")) / n if n else float("inf"),
        "bullet_lines_ratio": sum(s.lstrip().startswith(("•", "-")) for s in lines) / n_lines,
        "ellipsis_lines_ratio": sum(s.rstrip().endswith(("...", "…")) for s in lines) / n_lines,
        "alpha_words_ratio": alpha / n if n else 0.0,
        "stop_words": float(len(GOPHER_STOP_WORDS.intersection(words))),
    }


# -- Gopher repetition (Rae et al. 2021, table A1; DataTrove GopherRepetitionFilter) ---------------------

_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(items equal to an earlier one, their characters)."""
    seen: set[str] = set()
    elements = chars = 0
    for item in items:
        if item in seen:
            elements += 1
            chars += len(item)
        else:
            seen.add(item)
    return elements, chars


_MIX = np.uint64(0x9E3779B97F4A7C15)


@numba.njit(cache=True, inline="always")
def _ngram_key(hashes: np.ndarray, i: int, n: int) -> np.uint64:
    """A 64-bit key of the n-gram of word hashes starting at word ``i``."""
    key = hashes[i]
    for k in range(1, n):
        key = key * _MIX + hashes[i + k]
    return key


@numba.njit(cache=True)
def _slots(m: int) -> int:
    cap = 16
    while cap < 2 * m + 2:
        cap <<= 1
    return cap


@numba.njit(cache=True)
def _top_ngram(hashes: np.ndarray, cum: np.ndarray, n: int) -> tuple[int, int]:
    """(count, characters of its words) of the most frequent n-gram; ties: the first to appear."""
    m = hashes.size - n + 1
    cap = _slots(m)
    table = np.zeros(cap, np.uint64)
    counts = np.zeros(cap, np.int64)  # 0: slot unused
    first = np.zeros(cap, np.int64)
    for i in range(m):
        key = _ngram_key(hashes, i, n)
        slot = np.int64(key & np.uint64(cap - 1))
        while counts[slot] and table[slot] != key:
            slot = (slot + 1) & (cap - 1)
        if counts[slot] == 0:
            table[slot] = key
            first[slot] = i
        counts[slot] += 1
    top, at = 0, 0
    for slot in range(cap):
        c = counts[slot]
        if c > top or (c == top and c and first[slot] < at):
            top, at = c, first[slot]
    return top, cum[at + n] - cum[at]


@numba.njit(cache=True)
def _repeated_chars(hashes: np.ndarray, cum: np.ndarray, n: int) -> int:
    """DataTrove's ``find_all_duplicate``: walk the n-grams; one seen before adds its characters and
    skips n words, a new one is remembered and the walk moves one word."""
    m = hashes.size - n + 1
    cap = _slots(m)
    table = np.zeros(cap, np.uint64)
    used = np.zeros(cap, np.bool_)
    repeated, idx = 0, 0
    while idx < m:
        key = _ngram_key(hashes, idx, n)
        slot = np.int64(key & np.uint64(cap - 1))
        found = False
        while used[slot]:
            if table[slot] == key:
                found = True
                break
            slot = (slot + 1) & (cap - 1)
        if found:
            repeated += cum[idx + n] - cum[idx]
            idx += n
        else:
            used[slot] = True
            table[slot] = key
            idx += 1
    return repeated


class RepetitionSignals:
    """Gopher repetition signals computed lazily in the reference's order (a filter stops at the first
    rule broken): duplicate paragraphs/lines and their characters, top n-gram and duplicate n-gram
    character fractions."""

    def __init__(self, text: str):
        self.text = text
        self._hashes: np.ndarray | None = None

    def paragraphs(self) -> tuple[float, float]:
        paragraphs = _PARAGRAPHS.split(self.text.strip())
        dup, chars = find_duplicates(paragraphs)
        return dup / len(paragraphs), chars / len(self.text)

    def lines(self) -> tuple[float, float]:
        lines = _LINES.split(self.text)
        dup, chars = find_duplicates(lines)
        return dup / len(lines), chars / len(self.text)

    def _prepare(self) -> None:
        if self._hashes is None:
            words = split_words(self.text)
            self._hashes = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
            lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
            self._cum = np.zeros(len(words) + 1, np.int64)
            np.cumsum(lengths, out=self._cum[1:])

    def top_ngram(self, n: int) -> float | None:
        """Characters of the most frequent n-gram (joined with spaces; ties: the first to appear) times
        its count, over the text's characters; None without any n-gram."""
        self._prepare()
        if self._hashes.size < n:
            return None
        top, chars = _top_ngram(self._hashes, self._cum, n)
        return float(top * (chars + n - 1)) / len(self.text)

    def duplicate_ngrams(self, n: int) -> float:
        """Characters of the repeated n-grams (greedy, non-overlapping) over the text's characters."""
        self._prepare()
        if self._hashes.size < n:
            return 0.0
        return _repeated_chars(self._hashes, self._cum, n) / len(self.text)


# -- C4 (Raffel et al. 2020; DataTrove C4QualityFilter) --------------------------------------------------

C4_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
C4_END_PUNCTUATION = (".", "?", "!", '"', "'")
C4_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)


def c4_lines(
    text: str,
    *,
    remove_citations: bool = True,
    terminal_punct: bool = True,
    min_words_per_line: int = 3,
    max_word_length: int = 1000,
    lorem_ipsum: bool = True,
    javascript: bool = True,
    curly_bracket: bool = True,
    policy: bool = True,
) -> tuple[str | None, list[str], int, Counter]:
    """C4's line rules: (the rule that drops the whole page or None, the kept lines, sentences in them,
    per-rule counts of removed lines)."""
    kept: list[str] = []
    sentences = 0
    removed: Counter = Counter()
    for line in text.splitlines():
        line = line.strip()
        words = line.split()
        if max_word_length != -1 and any(len(w) > max_word_length for w in words):
            removed["too_long_word"] += 1
            continue
        if remove_citations:
            line = C4_CITATION.sub("", line)
        if terminal_punct and (not line.endswith(C4_END_PUNCTUATION) or line.endswith("...")):
            removed["no_terminal_punct"] += 1
            continue
        if len(words) < min_words_per_line:
            removed["too_few_words"] += 1
            continue
        lower = line.lower()
        if lorem_ipsum and "lorem ipsum" in lower:
            return "lorem_ipsum", kept, sentences, removed
        if javascript and "javascript" in lower:
            removed["javascript"] += 1
            continue
        if curly_bracket and "{" in line:
            return "curly_bracket", kept, sentences, removed
        if policy and any(p in lower for p in C4_POLICY):
            removed["policy"] += 1
            continue
        sentences += count_sentences(split_words(line))
        kept.append(line)
    return None, kept, sentences, removed


# -- FineWeb (Penedo et al. 2024; DataTrove FineWebQualityFilter) ----------------------------------------


class FineWebSignals:
    """FineWeb's signals over the non-blank lines, computed lazily in the reference's order."""

    def __init__(self, text: str):
        self.text = text
        self.lines = [line for line in text.split("\n") if line.strip() != ""]

    def line_punct_ratio(self) -> float:
        ends = terminal_punctuation()
        return sum(1 for line in self.lines if line.endswith(ends)) / len(self.lines)

    def short_line_ratio(self, short_line_length: int) -> float:
        return sum(1 for line in self.lines if len(line) <= short_line_length) / len(self.lines)

    def char_dup_ratio(self) -> float:
        return find_duplicates(self.lines)[1] / len(self.text.replace("\n", ""))

    def list_ratio(self) -> float:
        return self.text.count("\n") / len(split_words(self.text))
