"""Quality filters: keep/drop agreement with DataTrove 0.10.1 and docs/s on one core, per filter.

Documents: 5,000 pages of the Debian documentation packages (Python 3.11 docs, the Debian Handbook in
English and a sample of its translations, Rust std/core pages) extracted with trafilatura
(``benchmarks.common.debian_documents``). Each filter runs alone over all documents with its defaults,
DataTrove's ``filter(Document)`` one document at a time, lmforge's stage over Arrow batches of 1,000, both
in this process on one core, after a warm-up on other text (spaCy loaded, numba compiled); lmforge's word
memo starts empty for each filter. Also reported: how often lmforge's words equal DataTrove's
(spaCy's) for a whole document. Goals (issue 5): agreement >= 99%, speed >= 5x.

Needs the ``bench`` extra (DataTrove, spaCy) and the Debian packages (ENVIRONMENT.md). ``--smoke`` needs
neither: about 40 pydoc documents and a few made to fail the filters, DataTrove's side only if installed.

    .venv/bin/python benchmarks/filters.py [--quick | --smoke] [--docs 5000]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402

import pyarrow as pa  # noqa: E402

from benchmarks.common import (  # noqa: E402
    debian_documents,
    installed,
    not_installed,
    pydoc_texts,
    result,
    summary,
)
from cleaning import filters as lm  # noqa: E402
from cleaning import signals, words  # noqa: E402
from core.schema import document_table  # noqa: E402
from core.stage import StageContext  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="1,000 documents")
parser.add_argument("--docs", type=int, default=5000)
parser.add_argument("--smoke", action="store_true", help="seconds: ~50 pydoc and made-up documents")
args = parser.parse_args()
if args.quick:
    args.docs = 1000
HAS_PEER = installed("datatrove")
if HAS_PEER:
    from datatrove.data import Document
    from datatrove.pipeline import filters as dt
    from datatrove.utils.text import split_into_words
elif not args.smoke:
    raise SystemExit("needs DataTrove and spaCy: .venv/bin/pip install -e '.[bench]'")

FILTERS = {  # ours, and the name of DataTrove's filter
    "gopher_quality": (lm.GopherQualityFilter(lm.GopherQualityConfig()), "GopherQualityFilter"),
    "gopher_repetition": (lm.GopherRepetitionFilter(lm.GopherRepetitionConfig()), "GopherRepetitionFilter"),
    "c4_quality": (lm.C4QualityFilter(lm.C4QualityConfig()), "C4QualityFilter"),
    "fineweb_quality": (lm.FineWebQualityFilter(lm.FineWebQualityConfig()), "FineWebQualityFilter"),
}


def smoke_texts() -> list[str]:
    """Pydoc documents, and some that each filter should drop: too short, repeated lines and n-grams,
    bullet lists, ellipses, no terminal punctuation, a lorem-ipsum page."""
    texts = pydoc_texts(80_000, doc_chars=2000)[:40]
    texts += [
        "Too short.",
        "Buy cheap watches now!\n" * 40,
        "the best the best the best deal of the year " * 30,
        "\n".join(f"- item {i} of the list" for i in range(60)),
        "\n".join(f"And then it went on {i}..." for i in range(60)),
        "\n".join("a line that never ends its sentence with punctuation" for _ in range(40)),
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 20 + "Click here. Cookie policy.",
        "{" + "x: 1, " * 200 + "}",
    ]
    return texts


def batches(texts: list[str], size: int = 1000) -> list[pa.RecordBatch]:
    return document_table(texts, ids=[str(i) for i in range(len(texts))], source="debian").to_batches(size)


def run_ours(stage, data: list[pa.RecordBatch]) -> tuple[set[str], float]:
    words._english().memo.clear()
    signals._word_flags.clear()
    ctx = StageContext("bench")
    start = time.perf_counter()
    kept = {i for b in stage.run(data, ctx) for i in b.column("id").to_pylist()}
    return kept, time.perf_counter() - start


def run_datatrove(cls, texts: list[str]) -> tuple[set[str], Counter, float]:
    flt = cls()
    flt.filter(Document(text="Warm up the tokenizer. It loads spaCy once.", id="w"))
    kept, reasons = set(), Counter()
    start = time.perf_counter()
    for i, text in enumerate(texts):
        verdict = flt.filter(Document(text=text, id=str(i)))
        if verdict is True:
            kept.add(str(i))
        else:
            reasons[verdict[1] if isinstance(verdict, tuple) else "dropped"] += 1
    return kept, reasons, time.perf_counter() - start


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    texts = smoke_texts() if args.smoke else [t for _, t in debian_documents(args.docs)]
    print(
        f"{len(texts)} documents, {sum(map(len, texts)) / len(texts):.0f} characters on average", flush=True
    )
    same_words = None
    if HAS_PEER:
        same_words = sum(words.split_words(t) == split_into_words(t) for t in texts) / len(texts)
        print(f"words identical to spaCy's for {same_words:.2%} of documents", flush=True)
    data = batches(texts)
    warm = batches(["Warm up. " * 200 + "the and of to " * 50 + "{x}\n\nrepeat repeat repeat"])
    results = []
    for name, (ours_stage, peer_name) in FILTERS.items():
        run_ours(ours_stage, warm)
        kept_ours, t_ours = run_ours(ours_stage, data)
        peer = f"DataTrove 0.10.1 {peer_name}, one core"
        if not HAS_PEER:
            results.append(
                result(
                    f"filters.{name}",
                    "docs/s",
                    len(texts) / t_ours,
                    not_installed(peer),
                    None,
                    5.0,
                    documents=len(texts),
                    kept_ours=len(kept_ours),
                )
            )
            continue
        kept_peer, reasons, t_peer = run_datatrove(getattr(dt, peer_name), texts)
        ids = {str(i) for i in range(len(texts))}
        agree = sum((i in kept_ours) == (i in kept_peer) for i in ids) / len(ids)
        results.append(
            result(
                f"filters.{name}",
                "docs/s",
                len(texts) / t_ours,
                peer,
                len(texts) / t_peer,
                5.0,
                other_goals_met=agree >= 0.99,
                documents=len(texts),
                kept_ours=len(kept_ours),
                kept_datatrove=len(kept_peer),
                agreement=round(agree, 4),
                agreement_goal=0.99,
                agreement_ok=agree >= 0.99,
                datatrove_reasons=dict(reasons.most_common(6)),
                words_identical_share=round(same_words, 4),
            )
        )
    summary("filters", results)


if __name__ == "__main__":
    main()
