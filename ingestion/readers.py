"""Readers that turn stored corpora into document batches (``HTML_SCHEMA``)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pyarrow as pa
from warcio.archiveiterator import ArchiveIterator

from ingestion.schema import HTML_SCHEMA, document_id

_META_CHARSET = re.compile(rb"""<meta[^>]+charset=["']?([A-Za-z0-9_\-]+)""", re.IGNORECASE)


def decode_html(body: bytes, content_type: str) -> str:
    """Decode with the declared charset (HTTP header, then <meta>), falling back to UTF-8 then cp1252."""
    candidates = []
    if "charset=" in content_type.lower():
        candidates.append(content_type.lower().split("charset=")[-1].split(";")[0].strip(" \"'"))
    if m := _META_CHARSET.search(body[:4096]):
        candidates.append(m.group(1).decode("ascii").lower())
    candidates += ["utf-8", "cp1252"]
    for charset in candidates:
        try:
            return body.decode(charset)
        except (LookupError, UnicodeDecodeError):
            continue
    return body.decode("utf-8", errors="replace")


def read_warc(
    path: str | Path, batch_size: int = 256, counters: Counter | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream HTML responses (status 200) from a WARC/WARC.gz file as document batches."""
    counters = counters if counters is not None else Counter()
    rows: dict[str, list] = {f.name: [] for f in HTML_SCHEMA}
    source = Path(path).name
    with open(path, "rb") as stream:
        for record in ArchiveIterator(stream):
            if record.rec_type != "response":
                continue
            counters["warc.responses"] += 1
            status = record.http_headers.get_statuscode() if record.http_headers else None
            if status != "200":
                counters["warc.skipped_status"] += 1
                continue
            url = record.rec_headers.get_header("WARC-Target-URI")
            body = record.content_stream().read()
            ctype = record.http_headers.get_header("Content-Type") or ""
            fetched = record.rec_headers.get_header("WARC-Date")
            rows["id"].append(document_id(url, body))
            rows["url"].append(url)
            rows["html"].append(decode_html(body, ctype))
            rows["source"].append(source)
            rows["lang"].append(None)
            rows["fetched_at"].append(
                datetime.fromisoformat(fetched.replace("Z", "+00:00")) if fetched else None
            )
            rows["meta"].append([("http_bytes", float(len(body)))])
            if len(rows["id"]) >= batch_size:
                yield pa.RecordBatch.from_pydict(rows, schema=HTML_SCHEMA)
                rows = {k: [] for k in rows}
    if rows["id"]:
        yield pa.RecordBatch.from_pydict(rows, schema=HTML_SCHEMA)


def find_html(path: str | Path, doc_id: str) -> str | None:
    """The raw HTML of document ``doc_id`` in a WARC file (its ``source``): every document downstream
    keeps its id and source, so a cleaned or rejected text leads back to the page it came from."""
    for batch in read_warc(path):
        ids = batch.column("id").to_pylist()
        if doc_id in ids:
            return batch.column("html")[ids.index(doc_id)].as_py()
    return None
