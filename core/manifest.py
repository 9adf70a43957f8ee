"""The manifest of every stage output: ``index.json``, the commit point of a dataset directory.

One format for document datasets, token shards, models and evaluation outputs: format version, kind,
producer stage and its cache key, input digests, per-file row count, size and sha256, counters, and
whatever else the kind needs (a token dataset adds its tokenizer and splits). A directory without
``index.json`` is incomplete and gets rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from core.files import atomic_write_bytes

FORMAT_VERSION = 1
INDEX = "index.json"


class ManifestError(ValueError):
    """An index.json that cannot be used: unreadable, of another format version or of another kind."""


def write_index(
    out_dir: str | Path,
    *,
    stage: str,
    cache_key: str,
    files: list[dict[str, Any]],
    kind: str = "documents",
    schema: pa.Schema | None = None,
    inputs: dict[str, str] | None = None,
    counters: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Commit a stage output by writing its manifest last; returns the manifest."""
    index = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "stage": stage,
        "cache_key": cache_key,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "schema": schema.to_string(show_schema_metadata=False) if schema is not None else None,
        "inputs": inputs or {},
        "files": sorted(files, key=lambda f: f["path"]),
        "rows": sum(f.get("rows", 0) for f in files),
        "counters": dict(sorted((counters or {}).items())),
        **(extra or {}),
    }
    atomic_write_bytes(Path(out_dir) / INDEX, json.dumps(index, indent=2).encode())
    return index


def read_index(out_dir: str | Path, kind: str | None = None) -> dict[str, Any] | None:
    """The committed manifest of a stage output, or None if the output is incomplete.

    Raises ManifestError, naming the file, when it is unreadable, of another format version or (with
    ``kind``) of another kind.
    """
    path = Path(out_dir) / INDEX
    if not path.exists():
        return None
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(
            f"{path}: not a readable manifest ({e}); delete {out_dir} to rebuild it"
        ) from None
    found = f"kind={index.get('kind')!r} format_version={index.get('format_version')!r}"
    if index.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: {found}, this lmforge reads format_version {FORMAT_VERSION}; "
            "delete the directory to rebuild it with this lmforge version"
        )
    if kind is not None and index.get("kind") != kind:
        raise ManifestError(f"{path}: expected a {kind!r} manifest, found {found}")
    return index


def index_digest(index: dict[str, Any]) -> str:
    """Digest of a stage output: the hash over its files' hashes (stable across re-runs of equal data)."""
    h = hashlib.sha256()
    for f in index["files"]:
        h.update(f"{f['path']}:{f['sha256']}\n".encode())
    return h.hexdigest()[:16]


def dataset_files(out_dir: str | Path) -> tuple[dict[str, Any], list[Path]]:
    """A committed dataset's index and its Parquet files, in index order."""
    index = read_index(out_dir)
    if index is None:
        raise FileNotFoundError(f"{out_dir}: no {INDEX}; the stage that writes it has not completed")
    return index, [Path(out_dir) / f["path"] for f in index["files"] if f["path"].endswith(".parquet")]


def iter_parquet(out_dir: str | Path, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """Stream record batches of every Parquet file named in a committed index, in index order."""
    for path in dataset_files(out_dir)[1]:
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size)


def read_table(out_dir: str | Path) -> pa.Table:
    """A whole committed Parquet dataset as one table (small outputs and tests)."""
    tables = [pq.read_table(path) for path in dataset_files(out_dir)[1]]
    return pa.concat_tables(tables) if tables else pa.table({})
