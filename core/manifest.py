"""The manifest of every stage output: ``index.json``, the commit point of a dataset directory.

One format for document datasets, token shards, models and evaluation outputs: format version, kind,
producer stage and its cache key, input digests, per-file row count, size and sha256, counters, and
whatever else the kind needs (a token dataset adds its tokenizer and splits). A directory without
``index.json`` is incomplete and gets rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from core.files import atomic_write_bytes, file_sha256
from core.storage import RecordError, Store, open_input_file

FORMAT_VERSION = 1
INDEX = "index.json"


class ManifestError(ValueError):
    """An index.json that cannot be used: unreadable, of another format version or of another kind."""


def write_index(
    out_dir: str | Path | Store,
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
    Store(out_dir).write_bytes(INDEX, json.dumps(index, indent=2).encode())
    return index


def read_index(out_dir: str | Path | Store, kind: str | None = None) -> dict[str, Any] | None:
    """The committed manifest of a stage output, or None if the output is incomplete.

    Raises ManifestError, naming the file, when it is unreadable, of another format version or (with
    ``kind``) of another kind.
    """
    store = Store(out_dir)
    path = store / INDEX  # shown in messages (credentials masked)
    try:
        index = store.read_object(INDEX)
    except RecordError as e:
        raise ManifestError(
            f"{path}: not a readable manifest ({e.reason}); delete {store} to rebuild it"
        ) from None
    if index is None:
        return None
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


def dataset_files(out_dir: str | Path | Store) -> tuple[dict[str, Any], list[Path]]:
    """A committed dataset's index and its Parquet files, in index order (URIs, as ``str``, for a dataset
    on a remote filesystem)."""
    index = read_index(out_dir)
    if index is None:
        raise FileNotFoundError(f"{out_dir}: no {INDEX}; the stage that writes it has not completed")
    store = Store(out_dir)
    named = [f["path"] for f in index["files"] if f["path"].endswith(".parquet")]
    if store.local is not None:
        return index, [store.local / name for name in named]
    return index, [store.uri_of(name) for name in named]


def source_files(out_dir: str | Path | Store) -> tuple[dict[str, Any], dict[str | None, list[Path]]]:
    """A documents dataset's index and its Parquet files by source: a dataset may hold several sources'
    (``index["sources"]``: source -> its files, as dedup across sources writes them); else they are all
    the one source None."""
    index, paths = dataset_files(out_dir)
    if "sources" not in index:
        return index, {None: paths}
    full = dict(zip([f["path"] for f in index["files"] if f["path"].endswith(".parquet")], paths))
    return index, {source: [full[name] for name in names] for source, names in index["sources"].items()}


def iter_parquet(out_dir: str | Path | Store, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    """Stream record batches of every Parquet file named in a committed index, in index order."""
    for path in dataset_files(out_dir)[1]:
        with open_input_file(path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size)


def read_table(out_dir: str | Path | Store) -> pa.Table:
    """A whole committed Parquet dataset as one table (small outputs and tests)."""
    tables = []
    for path in dataset_files(out_dir)[1]:
        with open_input_file(path) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables) if tables else pa.table({})


Verify = Literal["never", "first_open", "always"]
VERIFIED = ".verified.json"


class IntegrityError(ManifestError):
    """A file that no longer matches the manifest that lists it: missing, resized, other rows or bytes."""


def verify_files(out_dir: str | Path | Store, index: dict[str, Any], policy: Verify = "first_open") -> None:
    """Check every file a manifest lists against it, raising IntegrityError naming the first that differs.

    Always: the file exists, has the recorded size and (Parquet) the recorded row count. sha256 by
    ``policy``: ``always`` hashes every file; ``first_open`` hashes each file once and records its size,
    mtime and ctime in ``.verified.json`` beside the index, re-hashing only files whose stamp changed (a
    write always moves ctime, which no tool can set back, so restoring the mtime does not hide a change);
    ``never`` hashes nothing.
    """
    if (store := Store(out_dir)).local is None:
        _verify_remote(store, index, policy)
        return
    out_dir = store.local
    record_path = out_dir / VERIFIED
    record: dict[str, Any] = {}
    if policy == "first_open" and record_path.exists():
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            record = json.loads(record_path.read_text())
    changed = False
    for entry in index["files"]:
        path = out_dir / entry["path"]
        try:
            st = path.stat()
        except FileNotFoundError:
            raise IntegrityError(f"{path}: listed in {INDEX} but missing") from None
        if "bytes" in entry and st.st_size != entry["bytes"]:
            raise IntegrityError(
                f"{path}: {st.st_size} bytes, {INDEX} says {entry['bytes']}; the file was truncated or changed"
            )
        if path.suffix == ".parquet" and entry.get("rows") is not None:
            rows = _parquet_rows(path)
            if rows != entry["rows"]:
                raise IntegrityError(f"{path}: {rows} rows, {INDEX} says {entry['rows']}")
        if policy == "never":
            continue
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, entry["sha256"]]
        if policy == "first_open" and record.get(entry["path"]) == stamp:
            continue
        actual = file_sha256(path)
        if actual != entry["sha256"]:
            raise IntegrityError(
                f"{path}: sha256 {actual[:12]} differs from {INDEX}'s {entry['sha256'][:12]}; "
                "the file changed or is corrupt"
            )
        record[entry["path"]] = stamp
        changed = True
    if policy == "first_open" and changed:
        with contextlib.suppress(OSError):  # a read-only dataset is verified again next time
            atomic_write_bytes(record_path, json.dumps(record).encode())


def _verify_remote(store: Store, index: dict[str, Any], policy: Verify) -> None:
    """verify_files on a remote filesystem: one listing gives every size and mtime; ``first_open`` keeps
    (size, mtime, sha256) per file in ``.verified.json`` (an object store sets the mtime on every write)."""
    stats = store.stats()
    record = store.read_json(VERIFIED) if policy == "first_open" else {}
    changed = False
    for entry in index["files"]:
        name, where = entry["path"], store / entry["path"]  # where: shown in messages
        if name not in stats:
            raise IntegrityError(f"{where}: listed in {INDEX} but missing")
        size, mtime_ns = stats[name]
        if "bytes" in entry and size != entry["bytes"]:
            raise IntegrityError(
                f"{where}: {size} bytes, {INDEX} says {entry['bytes']}; the file was truncated or changed"
            )
        if name.endswith(".parquet") and entry.get("rows") is not None:
            with store.open_input(name) as f:
                rows = _parquet_rows(f, where)
            if rows != entry["rows"]:
                raise IntegrityError(f"{where}: {rows} rows, {INDEX} says {entry['rows']}")
        stamp = [size, mtime_ns, entry["sha256"]]
        if policy == "never" or (policy == "first_open" and record.get(name) == stamp):
            continue
        actual = store.sha256(name)
        if actual != entry["sha256"]:
            raise IntegrityError(
                f"{where}: sha256 {actual[:12]} differs from {INDEX}'s {entry['sha256'][:12]}; "
                "the file changed or is corrupt"
            )
        record[name], changed = stamp, True
    if policy == "first_open" and changed:
        with contextlib.suppress(OSError):
            store.write_bytes(VERIFIED, json.dumps(record).encode())


def _parquet_rows(path: Path | pa.NativeFile, name: str | Path | Store | None = None) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise IntegrityError(
            f"{name or path}: not a readable Parquet file ({e}); it was truncated or changed"
        ) from None
