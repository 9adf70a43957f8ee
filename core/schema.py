"""The document data contract shared by every stage (docs/ARCHITECTURE.md, "Data contracts").

A document batch is an Arrow record batch. Before extraction it carries ``html``; after, ``text``.
Rejected documents carry the document columns plus the reason they were removed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

#: Numeric quality signals attached to a document (word counts, ratios, scores).
META_TYPE = pa.map_(pa.string(), pa.float64())

#: The ``meta`` key of a document's quality tier (quality scoring's tiers; tokenize shards by it).
QUALITY_TIER = "quality.tier"

#: The ``meta`` key of a dedup survivor's cluster size (the copies of it the corpus held, itself
#: included): what FineWeb-2's rehydration upsamples by (``train.mixture.rehydrate``).
DEDUP_COPIES = "dedup.copies"

_COMMON = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("url", pa.string()),
    pa.field("source", pa.string()),
    pa.field("lang", pa.string()),
    pa.field("fetched_at", pa.timestamp("ms", tz="UTC")),
    pa.field("meta", META_TYPE),
]

#: Documents as they come out of ingestion: raw HTML bodies.
HTML_SCHEMA = pa.schema(_COMMON[:2] + [pa.field("html", pa.string())] + _COMMON[2:])

#: Documents after extraction: plain text.
DOCUMENT_SCHEMA = pa.schema(_COMMON[:2] + [pa.field("text", pa.string())] + _COMMON[2:])

#: Why a document was removed, appended to the document columns in every ``rejected/`` dataset.
REJECTION_FIELDS = [
    pa.field("stage", pa.string(), nullable=False),
    pa.field("filter", pa.string(), nullable=False),
    pa.field("signal", pa.string()),
    pa.field("value", pa.float64()),
    pa.field("threshold", pa.float64()),
    pa.field("duplicate_of", pa.string()),
]

REJECTED_SCHEMA = pa.schema(list(DOCUMENT_SCHEMA) + REJECTION_FIELDS)


def document_id(url: str, content: str | bytes) -> str:
    """Stable, content-derived id: the same page with the same bytes always gets the same id."""
    data = content.encode("utf-8") if isinstance(content, str) else content
    h = hashlib.sha256()
    h.update(url.encode("utf-8"))
    h.update(b"\0")
    h.update(data)
    return h.hexdigest()[:32]


def empty_meta() -> list[tuple[str, float]]:
    """A meta value with no signals (map columns are lists of key/value pairs in pyarrow)."""
    return []


def document_table(
    texts: list[str],
    *,
    ids: list[str] | None = None,
    urls: list[str | None] | None = None,
    meta: list[list[tuple[str, float]]] | None = None,
    source: str | None = None,
    lang: str | None = None,
) -> pa.Table:
    """Texts as a table in the document schema (ids ``d0``, ``d1``... unless given): for tests,
    benchmarks and users bringing text from elsewhere."""
    n = len(texts)
    return pa.table(
        {
            "id": ids if ids is not None else [f"d{i}" for i in range(n)],
            "url": urls if urls is not None else [None] * n,
            "text": texts,
            "source": [source] * n,
            "lang": [lang] * n,
            "fetched_at": [None] * n,
            "meta": meta if meta is not None else [[] for _ in range(n)],
        },
        schema=DOCUMENT_SCHEMA,
    )


def append_meta(batch: pa.RecordBatch, columns: dict[str, np.ndarray]) -> pa.RecordBatch:
    """The batch with ``columns`` (name -> one value per document) appended to each document's ``meta``,
    built from the map's offsets (no per-document Python objects)."""
    n, k = batch.num_rows, len(columns)
    if not k:
        return batch
    at = batch.schema.get_field_index("meta")
    meta = batch.column(at)
    raw = np.asarray(meta.offsets)  # a slice's offsets point into the whole of meta.keys / meta.items
    offsets = raw - raw[0]
    old, stored = int(offsets[-1]), len(meta.keys)
    new_offsets = offsets + np.arange(n + 1) * k
    fresh = np.zeros(old + n * k, bool)
    for j in range(k):
        fresh[new_offsets[1:] - k + j] = True
    order = np.empty(old + n * k, np.int64)
    order[~fresh] = raw[0] + np.arange(old)
    order[fresh] = stored + np.arange(n * k)
    names = list(columns)
    keys = pa.concat_arrays([meta.keys, pa.array(np.tile(np.array(names, object), n), pa.string())])
    values = np.column_stack([np.asarray(columns[name], np.float64) for name in names]).ravel()
    items = pa.concat_arrays([meta.items.cast(pa.float64()), pa.array(values, pa.float64())])
    merged = pa.MapArray.from_arrays(pa.array(new_offsets, pa.int32()), keys.take(order), items.take(order))
    return batch.set_column(at, "meta", merged.cast(batch.schema.field("meta").type))
