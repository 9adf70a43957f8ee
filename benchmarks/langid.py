"""Language ID accuracy on text whose language is known, and speed vs pycld2 when it is installed.

Ground truth: the Debian Reference in 9 translations (de, en, es, fr, it, ja, pt, zh-cn, zh-tw; package
debian-reference-*, plain-text editions). Paragraphs of 200+ characters; from the translations, the ones
still in English are left out (a paragraph that also appears in the English edition, or whose words are
10%+ English function words: untranslated text, which a correct model labels English), and so are
tables and listings (under half letters). zh-cn and zh-tw count as zh. Goal (issue 5): >= 97%.
``--smoke`` takes 10 paragraphs per language from coreutils' gettext catalogs instead (its messages and
their translations, installed with coreutils), so it needs no documentation package.

    .venv/bin/python benchmarks/langid.py [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

from benchmarks.common import installed, not_installed, skipped  # noqa: E402
from cleaning.langid import identify  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument(
    "--smoke", action="store_true", help="seconds: 10 paragraphs per language, from coreutils"
)
args = parser.parse_args()

ROOT = Path("/usr/share/debian-reference")
CATALOGS = Path("/usr/share/locale")
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


def reference_texts() -> dict[str, str]:
    """Each language's Debian Reference, whole."""
    if not ROOT.is_dir():
        raise SystemExit("missing the Debian Reference: apt-get install debian-reference-{en,de,fr,...}")
    return {
        lang: gzip.open(ROOT / f"debian-reference.{lang}.txt.gz", "rt", encoding="utf-8").read()
        for lang in LANGS
    }


def catalog_texts() -> dict[str, str] | None:
    """Each language's translations of coreutils' messages (English: the messages themselves), one
    paragraph per message; None where a catalog is missing."""
    import gettext

    texts = {}
    for lang in LANGS:
        source = {"en": "de", "zh-cn": "zh_CN", "zh-tw": "zh_TW"}.get(lang, lang)
        path = CATALOGS / source / "LC_MESSAGES" / "coreutils.mo"
        if not path.is_file():
            return None
        with path.open("rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog
        messages = [
            k if lang == "en" else v for k, v in catalog.items() if isinstance(k, str) and k and v != k
        ]
        texts[lang] = "\n\n".join(messages)
    return texts


def paragraphs(texts: dict[str, str], per_language: int | None = None) -> list[tuple[str, str]]:
    """Paragraphs of 200+ characters of each language's text, the translations' untranslated ones, tables
    and listings left out; the first ``per_language`` of each if given."""
    out = []
    for lang, text in texts.items():
        paras = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text))
        out += [(lang, p) for p in paras if len(p) >= 200]
    english = {p for lang, p in out if lang == "en"}

    def english_share(p: str) -> float:
        words = re.findall(r"[A-Za-z]+", p.lower())
        return sum(w in EN_FUNCTION_WORDS for w in words) / max(len(p.split()), 1)

    def translated(lang: str, p: str) -> bool:
        return lang == "en" or (p not in english and english_share(p) < 0.1)

    kept = [(lang, p) for lang, p in out if translated(lang, p) and sum(c.isalpha() for c in p) >= len(p) / 2]
    if per_language is None:
        return kept
    return [(lang, p) for lang in texts for p in [p for g, p in kept if g == lang][:per_language]]


def main() -> None:
    if args.smoke:
        texts = catalog_texts()
        if texts is None:
            skipped("langid", f"no coreutils gettext catalogs under {CATALOGS} in {', '.join(LANGS)}")
            return
        data = paragraphs(texts, per_language=10)
    else:
        data = paragraphs(reference_texts())
    truth = [lang.split("-")[0] for lang, _ in data]
    print(f"{len(data)} paragraphs: {dict(Counter(lang for lang, _ in data))}", flush=True)
    start = time.perf_counter()
    found = [identify(p)[0] for _, p in data]
    seconds = time.perf_counter() - start
    accuracy = sum(f == t for f, t in zip(found, truth)) / len(data)
    errors = Counter((t, f) for f, t in zip(found, truth) if f != t)
    peer, peer_value, peer_speed = "pycld2 (CLD2)", None, None
    if installed("pycld2"):
        import pycld2

        start = time.perf_counter()
        cld2 = [pycld2.detect(p)[2][0][1] for _, p in data]
        peer_speed = round(len(data) / (time.perf_counter() - start), 1)
        peer_value = round(sum(f.split("-")[0] == t for f, t in zip(cld2, truth)) / len(data), 4)
    else:
        peer = not_installed(peer)
    line = {
        "bench": "langid",
        "unit": "accuracy",
        "ours": round(accuracy, 4),
        "peer": peer,
        "peer_value": peer_value,
        "ratio": None if peer_value is None else round(accuracy / peer_value, 4),
        "goal": 0.97,
        "ok": accuracy >= 0.97,
        "paragraphs": len(data),
        "paragraphs_per_s": round(len(data) / seconds, 1),
        "per_language": {
            lang: round(sum(f == t for f, t in zip(found, truth) if t == lang) / truth.count(lang), 4)
            for lang in sorted(set(truth))
        },
        "top_errors": {f"{t}->{f}": n for (t, f), n in errors.most_common(5)},
        "peer_paragraphs_per_s": peer_speed,
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
