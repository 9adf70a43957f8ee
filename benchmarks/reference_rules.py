"""Writes cleaning/data/reference_rules.json: the tokenization data of the filters' references, which
lmforge applies with the same algorithms (cleaning/words.py) instead of running the references.

- spaCy's English tokenizer rules (prefix, suffix and infix patterns, the URL pattern, the special cases)
  and its sentencizer's punctuation characters: DataTrove's English filters split words and sentences
  with ``spacy.blank("en")`` and its ``sentencizer``. spaCy is MIT-licensed (Copyright (C) 2016-2024
  ExplosionAI GmbH, 2016 spaCy GmbH, 2015 Matthew Honnibal).
- DataTrove's punctuation and terminal-punctuation sets (``datatrove.utils.text``), which its Gopher and
  FineWeb filters use. DataTrove is Apache-2.0-licensed (Copyright 2024 The HuggingFace Team).

Needs spaCy and DataTrove (the ``bench`` extra):  .venv/bin/python benchmarks/reference_rules.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(
    Path(__file__).resolve().parents[1]
)  # not benchmarks/, whose tokenize.py shadows the stdlib

import json  # noqa: E402
from importlib.metadata import version  # noqa: E402

import spacy  # noqa: E402
from datatrove.utils.text import PUNCTUATION, TERMINAL_PUNCTUATION  # noqa: E402
from spacy.pipeline.sentencizer import Sentencizer  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "cleaning" / "data" / "reference_rules.json"


def main() -> None:
    tokenizer = spacy.blank("en").tokenizer
    specials = {
        text: [piece[65] for piece in pieces]  # 65: the ORTH attribute id
        for text, pieces in sorted(tokenizer.rules.items())
        if not text.isspace()
    }
    rules = {
        "versions": {"spacy": spacy.__version__, "datatrove": version("datatrove")},
        "spacy_en": {
            "prefix": tokenizer.prefix_search.__self__.pattern,
            "suffix": tokenizer.suffix_search.__self__.pattern,
            "infix": tokenizer.infix_finditer.__self__.pattern,
            "url": tokenizer.url_match.__self__.pattern,
            "specials": specials,
            "sentence_punct": sorted(Sentencizer.default_punct_chars),
        },
        "datatrove": {"punctuation": PUNCTUATION, "terminal_punctuation": sorted(TERMINAL_PUNCTUATION)},
    }
    OUT.write_text(json.dumps(rules, ensure_ascii=False, indent=0, sort_keys=True) + "\n", encoding="utf-8")
    print(
        f"{OUT}: {len(specials)} special cases, spaCy {spacy.__version__}, DataTrove {version('datatrove')}"
    )


if __name__ == "__main__":
    main()
