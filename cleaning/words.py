"""Word splitting that agrees with the references' without running their pipelines.

DataTrove's English filters split words with spaCy's tokenizer (``spacy.blank("en")``) and sentences
with spaCy's sentencizer. ``split_words`` applies the same rules (prefix, suffix and infix patterns, the
URL pattern and the special cases, read from ``data/reference_rules.json``, which
``benchmarks/reference_rules.py`` writes from spaCy and DataTrove) with spaCy's affix algorithm, to each
whitespace-separated chunk. Chunks repeat a lot in text (Zipf), so each distinct chunk is split once and
remembered; a plain word skips the rules altogether. ``count_sentences`` is the sentencizer's rule over
those words. On 5,000 real documents (benchmarks/filters.py) the words are identical to spaCy's for
99.7% of documents.
"""

from __future__ import annotations

import json
import re
import unicodedata
from functools import cache
from pathlib import Path

_RULES = Path(__file__).with_name("data") / "reference_rules.json"
_CACHE_LIMIT = 1 << 20  # distinct chunks remembered per process


class _EnglishRules:
    def __init__(self, rules: dict):
        self.prefix = re.compile(rules["prefix"]).search
        self.suffix = re.compile(rules["suffix"]).search
        self.infixes = re.compile(rules["infix"]).finditer
        self.url = re.compile(rules["url"]).match
        self.specials: dict[str, list[str]] = rules["specials"]
        self.sentence_punct = frozenset(rules["sentence_punct"])
        self.memo: dict[str, tuple[str, ...]] = {}
        self.longest = max(map(len, self.specials))  # a special case spans at most this many tokens

    def chunk(self, chunk: str) -> tuple[str, ...]:
        """The tokens of one whitespace-free chunk, as spaCy's ``Tokenizer._tokenize_affixes``."""
        if chunk in self.specials:
            return tuple(self.specials[chunk])
        prefixes: list[str] = []
        suffixes: list[str] = []
        string = self._split_affixes(chunk, prefixes, suffixes)
        tokens = prefixes
        if string:
            if string in self.specials:
                tokens.extend(self.specials[string])
            elif self.url(string):
                tokens.append(string)
            else:
                start = 0
                for match in self.infixes(string):
                    if match.start() == 0:  # an infix at the very start is no split
                        continue
                    if match.start() != start:
                        tokens.append(string[start : match.start()])
                    if match.start() != match.end():
                        tokens.append(string[match.start() : match.end()])
                    start = match.end()
                if string[start:]:
                    tokens.append(string[start:])
        tokens.extend(reversed(suffixes))
        return tuple(self._merge_specials(tokens)) if len(tokens) > 1 else tuple(tokens)

    def _merge_specials(self, tokens: list[str]) -> list[str]:
        """spaCy's last pass: a special case spread over several tokens (an emoticon like "):" after
        "f()" for instance) becomes the special case's tokens; leftmost, then longest, match first."""
        out: list[str] = []
        i = 0
        while i < len(tokens):
            joined, best = tokens[i], None
            for j in range(i + 1, min(len(tokens), i + self.longest)):
                joined += tokens[j]
                if joined in self.specials:
                    best = (j, joined)
            if best is None:
                out.append(tokens[i])
                i += 1
            else:
                out.extend(self.specials[best[1]])
                i = best[0] + 1
        return out

    def _split_affixes(self, string: str, prefixes: list[str], suffixes: list[str]) -> str:
        specials = self.specials
        last = -1
        while string and len(string) != last:
            if string in specials:
                break
            last = len(string)
            match = self.prefix(string)
            pre = match.end() - match.start() if match else 0
            if pre:
                minus_pre = string[pre:]
                if minus_pre and minus_pre in specials:
                    prefixes.append(string[:pre])
                    string = minus_pre
                    break
            match = self.suffix(string[pre:])
            suf = match.end() - match.start() if match else 0
            if suf:
                minus_suf = string[:-suf]
                if minus_suf and minus_suf in specials:
                    suffixes.append(string[-suf:])
                    string = minus_suf
                    break
            if pre and suf and pre + suf <= len(string):
                prefixes.append(string[:pre])
                suffixes.append(string[-suf:])
                string = string[pre:-suf]
            elif pre:
                prefixes.append(string[:pre])
                string = string[pre:]
            elif suf:
                suffixes.append(string[-suf:])
                string = string[:-suf]
            if string and string in specials:
                break
        return string


@cache
def reference_rules() -> dict:
    """The rules file: spaCy's English tokenizer and sentencizer data, DataTrove's punctuation sets."""
    return json.loads(_RULES.read_text(encoding="utf-8"))


@cache
def _english() -> _EnglishRules:
    return _EnglishRules(reference_rules()["spacy_en"])


@cache
def _is_punct(token: str) -> bool:
    """spaCy's ``is_punct``: every character is Unicode punctuation."""
    return all(unicodedata.category(ch).startswith("P") for ch in token)


def count_sentences(words: list[str]) -> int:
    """Sentences in a line split into ``words``, by spaCy's sentencizer rule: after a sentence-ending
    character, the next token that is neither punctuation nor such a character starts a sentence."""
    ends = _english().sentence_punct
    sentences, seen_end = 1, False
    for word in words:
        if word in ends:
            seen_end = True
        elif seen_end and not _is_punct(word):
            sentences += 1
            seen_end = False
    return sentences


def split_words(text: str) -> list[str]:
    """The words (and punctuation tokens) of ``text`` as spaCy's English tokenizer yields them, without
    whitespace tokens: what DataTrove's ``split_into_words`` returns for English."""
    rules = _english()
    memo = rules.memo
    words: list[str] = []
    for chunk in text.split():
        tokens = memo.get(chunk)
        if tokens is None:
            if chunk.isalpha() and chunk not in rules.specials:
                words.append(chunk)
                continue
            tokens = rules.chunk(chunk)
            if len(memo) < _CACHE_LIMIT:
                memo[chunk] = tokens
        words.extend(tokens)
    return words
