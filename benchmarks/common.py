"""Shared helpers of the benchmark scripts: timing, the result line, a real offline text corpus."""

from __future__ import annotations

import json
import pkgutil
import pydoc
import statistics
import time
import warnings
from collections.abc import Callable


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def result(bench: str, unit: str, ours: float, peer: str, peer_value: float, goal: float, **extra) -> dict:
    """One benchmark result: the ratio and ``ok`` are computed from the measured values."""
    ratio = ours / peer_value
    line = {
        "bench": bench,
        "unit": unit,
        "ours": round(ours, 3),
        "peer": peer,
        "peer_value": round(peer_value, 3),
        "ratio": round(ratio, 3),
        "goal": goal,
        "ok": ratio >= goal,
        **extra,
    }
    print(json.dumps(line), flush=True)
    return line


def summary(bench: str, results: list[dict]) -> None:
    print(json.dumps({"bench": bench, "ok": all(r["ok"] for r in results), "results": results}), flush=True)


def pydoc_texts(min_chars: int, doc_chars: int = 4000) -> list[str]:
    """Real English technical text: the plain-text pydoc of installed modules, cut into documents of about
    ``doc_chars`` at line boundaries, repeated (with a suffix) until ``min_chars`` is reached."""
    pages = []
    skip = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip", "venv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
            if info.name.startswith("_") or info.name.startswith(skip) or info.ispkg:
                continue
            try:
                module = __import__(info.name)
                pages.append(pydoc.render_doc(module, renderer=pydoc.plaintext))
            except Exception:  # modules that fail to import or render on this platform
                continue
            if sum(map(len, pages)) > min_chars:
                break
    docs, current = [], []
    for page in pages:
        size = 0
        for line in page.splitlines():
            current.append(line)
            size += len(line) + 1
            if size >= doc_chars:
                docs.append("\n".join(current))
                current, size = [], 0
        if current:
            docs.append("\n".join(current))
            current = []
    out, copy = list(docs), 1
    while sum(map(len, out)) < min_chars:
        out.extend(f"{d}\n(copy {copy})" for d in docs)
        copy += 1
    return out


def documents_table(texts: list[str], source: str = "pydoc", ids: list[str] | None = None):
    """Texts as a table in lmforge's document schema (ids ``doc-00000000``... unless given)."""
    import pyarrow as pa

    from ingestion.schema import DOCUMENT_SCHEMA

    n = len(texts)
    return pa.table(
        {
            "id": ids if ids is not None else [f"doc-{i:08d}" for i in range(n)],
            "url": [None] * n,
            "text": texts,
            "source": [source] * n,
            "lang": ["en"] * n,
            "fetched_at": [None] * n,
            "meta": [[] for _ in range(n)],
        },
        schema=DOCUMENT_SCHEMA,
    )
