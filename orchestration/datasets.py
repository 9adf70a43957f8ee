"""Stage output directories: data files plus an ``index.json`` manifest that is the commit point.

A directory without ``index.json`` is incomplete and gets rebuilt. Each data file is written under a
temporary name and renamed, so a killed task never leaves a half-written file behind a final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = 1
INDEX = "index.json"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write then rename, so readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_ipc(path: str | Path, table: pa.Table) -> None:
    """An uncompressed Arrow IPC file holding the table as one record batch, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(table.num_rows, 1))
    os.replace(tmp, path)


def read_ipc(path: str | Path) -> pa.Table:
    """An Arrow IPC file, memory-mapped."""
    return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()


def write_parquet(path: str | Path, batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> dict[str, Any]:
    """Write batches to one Parquet file atomically; return its manifest entry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    rows = 0
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for batch in batches:
            if batch.num_rows:
                writer.write_batch(batch)
                rows += batch.num_rows
    os.replace(tmp, path)
    return file_entry(path, rows)


def file_entry(path: str | Path, rows: int) -> dict[str, Any]:
    """Manifest entry for one data file."""
    path = Path(path)
    return {"path": path.name, "rows": rows, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def write_index(
    out_dir: str | Path,
    *,
    stage: str,
    cache_key: str,
    files: list[dict[str, Any]],
    schema: pa.Schema | None = None,
    inputs: dict[str, str] | None = None,
    counters: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Commit a stage output by writing its manifest last."""
    index = {
        "format_version": FORMAT_VERSION,
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


def read_index(out_dir: str | Path) -> dict[str, Any] | None:
    """The committed manifest of a stage output, or None if the output is incomplete."""
    path = Path(out_dir) / INDEX
    if not path.exists():
        return None
    index = json.loads(path.read_text())
    if index.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {index.get('format_version')!r} is not {FORMAT_VERSION}; "
            "delete the directory to rebuild it with this lmforge version"
        )
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


@dataclass(frozen=True)
class Partition:
    """Rows ``[start, stop)`` of one Parquet file: the unit of a parallel task."""

    name: str
    path: str
    start: int
    stop: int

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The partition's rows, reading only the row groups that hold them."""
        file = pq.ParquetFile(self.path)
        row = 0  # file row of the next batch's first row
        for group in range(file.metadata.num_row_groups):
            rows = file.metadata.row_group(group).num_rows
            if row >= self.stop:
                break
            if row + rows <= self.start:
                row += rows
                continue
            for batch in file.iter_batches(row_groups=[group], columns=columns):
                lo, hi = max(self.start - row, 0), min(self.stop - row, batch.num_rows)
                if lo < hi:
                    yield batch.slice(lo, hi - lo)
                row += batch.num_rows


def plan_partitions(files: Iterable[str | Path], partition_mb: float) -> list[Partition]:
    """Cut Parquet files into row ranges of about ``partition_mb`` of (uncompressed) data each.

    The plan depends on the files and ``partition_mb`` only, so the output does too.
    """
    limit = partition_mb * 2**20
    parts: list[Partition] = []
    for path in files:
        meta = pq.ParquetFile(path).metadata
        if not meta.num_rows:
            continue
        total = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        count = max(1, round(total / limit))
        bounds = [meta.num_rows * i // count for i in range(count + 1)]
        for lo, hi in zip(bounds, bounds[1:]):
            if hi > lo:
                parts.append(Partition(f"p{len(parts):05d}", str(path), lo, hi))
    return parts
