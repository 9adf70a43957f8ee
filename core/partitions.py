"""Parallel work units over Parquet datasets: row ranges of files, planned from the files alone."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.storage import open_input_file


@dataclass(frozen=True)
class Partition:
    """Rows ``[start, stop)`` of one Parquet file (a local path or a filesystem URI): the unit of a
    parallel task."""

    name: str
    path: str
    start: int
    stop: int

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The partition's rows, reading only the row groups that hold them."""
        with open_input_file(self.path) as source:
            file = pq.ParquetFile(source)
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
        with open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        if not meta.num_rows:
            continue
        total = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        count = max(1, round(total / limit))
        bounds = [meta.num_rows * i // count for i in range(count + 1)]
        for lo, hi in zip(bounds, bounds[1:]):
            if hi > lo:
                parts.append(Partition(f"p{len(parts):05d}", str(path), lo, hi))
    return parts
