"""Writes cleaning/data/reference_rules.json: the tokenization data of the filters' references, which
lmforge applies with the same algorithms (cleaning/words.py) instead of running the references.

- spaCy's English tokenizer rules (prefix, suffix and infix patterns, the URL pattern, the special cases)
  and its sentencizer's punctuation characters: DataTrove's English filters split words and sentences
  with ``spacy.blank("en")`` and its ``sentencizer``. spaCy is MIT-licensed (Copyright (C) 2016-2024
  ExplosionAI GmbH, 2016 spaCy GmbH, 2015 Matthew Honnibal).
- DataTrove's punctuation and terminal-punctuation sets (``datatrove.utils.text``), which its Gopher and
  FineWeb filters use. DataTrove is Apache-2.0-licensed (Copyright 2024 The HuggingFace Team).

Needs spaCy and DataTrove (the ``bench`` extra):  .venv/bin/python benchmarks/reference_rules.py
``--smoke`` writes to a temporary file instead and prints one JSON line last: whether the rules equal the
shipped file's (``ok``), or "skipped" without spaCy or DataTrove.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(
    Path(__file__).resolve().parents[1]
)  # not benchmarks/, whose tokenize.py shadows the stdlib

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from importlib.metadata import version  # noqa: E402

from benchmarks.common import installed, skipped  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "cleaning" / "data" / "reference_rules.json"

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument(
    "--smoke", action="store_true", help="write to a temporary file and compare it with the shipped one"
)
args = parser.parse_args()


def rules() -> dict:
    import spacy
    from datatrove.utils.text import PUNCTUATION, TERMINAL_PUNCTUATION
    from spacy.pipeline.sentencizer import Sentencizer

    tokenizer = spacy.blank("en").tokenizer
    specials = {
        text: [piece[65] for piece in pieces]  # 65: the ORTH attribute id
        for text, pieces in sorted(tokenizer.rules.items())
        if not text.isspace()
    }
    return {
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


def main() -> None:
    missing = [m for m in ("spacy", "datatrove") if not installed(m)]
    if missing:
        reason = f"needs {' and '.join(missing)}: .venv/bin/pip install -e '.[bench]'"
        if args.smoke:
            skipped("reference_rules", reason)
            return
        raise SystemExit(reason)
    data = rules()
    text = json.dumps(data, ensure_ascii=False, indent=0, sort_keys=True) + "\n"
    specials, versions = len(data["spacy_en"]["specials"]), data["versions"]
    with tempfile.TemporaryDirectory(prefix="lmf-rules-") as tmp:
        out = Path(tmp) / OUT.name if args.smoke else OUT
        out.write_text(text, encoding="utf-8")
        print(
            f"{out}: {specials} special cases, spaCy {versions['spacy']}, DataTrove {versions['datatrove']}"
        )
        if args.smoke:
            same = json.loads(out.read_text(encoding="utf-8")) == json.loads(OUT.read_text(encoding="utf-8"))
            print(json.dumps({"bench": "reference_rules", "same_as_shipped": same, "ok": same}))


if __name__ == "__main__":
    main()
