"""Language ID accuracy on text whose language is known, and speed vs pycld2 when it is installed.

Ground truth: the Debian Reference in 9 translations (de, en, es, fr, it, ja, pt, zh-cn, zh-tw; package
debian-reference-*, plain-text editions). Paragraphs of 200+ characters; from the translations, the ones
still in English are left out (a paragraph that also appears in the English edition, or whose words are
10%+ English function words: untranslated text, which a correct model labels English), and so are
tables and listings (under half letters). zh-cn and zh-tw count as zh. Goal (issue 5): >= 97%.

    .venv/bin/python benchmarks/langid.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

from cleaning.langid import identify  # noqa: E402

ROOT = Path("/usr/share/debian-reference")
LANGS = ["de", "en", "es", "fr", "it", "ja", "pt", "zh-cn", "zh-tw"]
EN_FUNCTION_WORDS = set(
    [
        "the",
        "a",
        "an",
        "of",
        "to",
        "in",
        "and",
        "or",
        "is",
        "are",
        "was",
        "be",
        "for",
        "with",
        "on",
        "by",
        "from",
        "that",
        "this",
        "it",
        "as",
        "at",
        "not",
        "can",
        "you",
        "which",
    ]
)


def paragraphs() -> list[tuple[str, str]]:
    if not ROOT.is_dir():
        raise SystemExit("missing the Debian Reference: apt-get install debian-reference-{en,de,fr,...}")
    out = []
    for lang in LANGS:
        text = gzip.open(ROOT / f"debian-reference.{lang}.txt.gz", "rt", encoding="utf-8").read()
        paras = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text))
        out += [(lang, p) for p in paras if len(p) >= 200]
    english = {p for lang, p in out if lang == "en"}

    def english_share(p: str) -> float:
        words = re.findall(r"[A-Za-z]+", p.lower())
        return sum(w in EN_FUNCTION_WORDS for w in words) / max(len(p.split()), 1)

    def translated(lang: str, p: str) -> bool:
        return lang == "en" or (p not in english and english_share(p) < 0.1)

    return [(lang, p) for lang, p in out if translated(lang, p) and sum(c.isalpha() for c in p) >= len(p) / 2]


def main() -> None:
    data = paragraphs()
    truth = [lang.split("-")[0] for lang, _ in data]
    print(f"{len(data)} paragraphs: {dict(Counter(lang for lang, _ in data))}", flush=True)
    start = time.perf_counter()
    found = [identify(p)[0] for _, p in data]
    seconds = time.perf_counter() - start
    accuracy = sum(f == t for f, t in zip(found, truth)) / len(data)
    errors = Counter((t, f) for f, t in zip(found, truth) if f != t)
    line = {
        "bench": "langid",
        "unit": "accuracy",
        "ours": round(accuracy, 4),
        "goal": 0.97,
        "ok": accuracy >= 0.97,
        "paragraphs": len(data),
        "paragraphs_per_s": round(len(data) / seconds, 1),
        "per_language": {
            lang: round(sum(f == t for f, t in zip(found, truth) if t == lang) / truth.count(lang), 4)
            for lang in sorted(set(truth))
        },
        "top_errors": {f"{t}->{f}": n for (t, f), n in errors.most_common(5)},
    }
    try:
        import pycld2

        start = time.perf_counter()
        cld2 = [pycld2.detect(p)[2][0][1] for _, p in data]
        line["peer"] = "pycld2 (CLD2)"
        line["peer_value"] = round(sum(f.split("-")[0] == t for f, t in zip(cld2, truth)) / len(data), 4)
        line["peer_paragraphs_per_s"] = round(len(data) / (time.perf_counter() - start), 1)
    except ImportError:
        pass
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
