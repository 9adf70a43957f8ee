"""Quality filters: keep/drop agreement with DataTrove 0.10.1 and docs/s on one core, per filter.

Documents: 5,000 pages of the Debian documentation packages (Python 3.11 docs, the Debian Handbook in
English and a sample of its translations, Rust std/core pages) extracted with trafilatura
(``benchmarks.common.debian_documents``). Each filter runs alone over all documents with its defaults,
DataTrove's ``filter(Document)`` one document at a time, lmforge's stage over Arrow batches of 1,000, both
in this process on one core, after a warm-up on other text (spaCy loaded, numba compiled); lmforge's word
memo starts empty for each filter. Also reported: how often lmforge's words equal DataTrove's
(spaCy's) for a whole document. Goals (issue 5): agreement >= 99%, speed >= 5x.

Needs the ``bench`` extra (DataTrove, spaCy) and the Debian packages (ENVIRONMENT.md).

    .venv/bin/python benchmarks/filters.py [--quick] [--docs 5000]
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
from datatrove.data import Document  # noqa: E402
from datatrove.pipeline import filters as dt  # noqa: E402
from datatrove.utils.text import split_into_words  # noqa: E402

from benchmarks.common import debian_documents, result, summary  # noqa: E402
from cleaning import filters as lm  # noqa: E402
from cleaning import signals, words  # noqa: E402
from core.schema import document_table  # noqa: E402
from core.stage import StageContext  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="1,000 documents")
parser.add_argument("--docs", type=int, default=5000)
args = parser.parse_args()
if args.quick:
    args.docs = 1000

FILTERS = {
    "gopher_quality": (lm.GopherQualityFilter(lm.GopherQualityConfig()), dt.GopherQualityFilter),
    "gopher_repetition": (lm.GopherRepetitionFilter(lm.GopherRepetitionConfig()), dt.GopherRepetitionFilter),
    "c4_quality": (lm.C4QualityFilter(lm.C4QualityConfig()), dt.C4QualityFilter),
    "fineweb_quality": (lm.FineWebQualityFilter(lm.FineWebQualityConfig()), dt.FineWebQualityFilter),
}


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
    docs = debian_documents(args.docs)
    texts = [t for _, t in docs]
    print(
        f"{len(texts)} documents, {sum(map(len, texts)) / len(texts):.0f} characters on average", flush=True
    )
    same_words = sum(words.split_words(t) == split_into_words(t) for t in texts) / len(texts)
    print(f"words identical to spaCy's for {same_words:.2%} of documents", flush=True)
    data = batches(texts)
    warm = batches(["Warm up. " * 200 + "the and of to " * 50 + "{x}\n\nrepeat repeat repeat"])
    results = []
    for name, (ours_stage, peer_cls) in FILTERS.items():
        run_ours(ours_stage, warm)
        kept_ours, t_ours = run_ours(ours_stage, data)
        kept_peer, reasons, t_peer = run_datatrove(peer_cls, texts)
        ids = {str(i) for i in range(len(texts))}
        agree = sum((i in kept_ours) == (i in kept_peer) for i in ids) / len(ids)
        results.append(
            result(
                f"filters.{name}",
                "docs/s",
                len(texts) / t_ours,
                f"DataTrove 0.10.1 {peer_cls.__name__}, one core",
                len(texts) / t_peer,
                5.0,
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
        results[-1]["ok"] = results[-1]["ok"] and results[-1]["agreement_ok"]
    summary("filters", results)


if __name__ == "__main__":
    main()
