"""Stage interface: a typed frozen config plus a pure ``run(batches, ctx)`` over Arrow record batches.

Stages never import Ray, MLflow or DeepSpeed; executors in ``orchestration/`` decide where they run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from core.schema import REJECTED_SCHEMA, REJECTION_FIELDS


class StageConfig(BaseModel):
    """Base for stage configs: frozen, keyword-only, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def thresholds(self) -> dict[str, list[float]]:
        """The cuts of the stage's rules on the signals it writes to ``meta``, by meta key (none here)."""
        return {}


@dataclass
class StageContext:
    """What a running stage may touch: its task identity, counters and the rejected-documents sink."""

    stage: str
    rank: int = 0
    world_size: int = 1
    counters: Counter = field(default_factory=Counter)
    rejected: list[pa.RecordBatch] = field(default_factory=list)

    def reject(
        self,
        docs: pa.RecordBatch | pa.Table,
        *,
        filter: str,
        signal: str | None = None,
        values: Iterable[float] | None = None,
        threshold: float | None = None,
        duplicate_of: Iterable[str | None] | None = None,
    ) -> None:
        """Record removed documents with the reason; nothing leaves a stage without one."""
        n = docs.num_rows
        if n == 0:
            return
        reasons = {
            "stage": pa.array([self.stage] * n, pa.string()),
            "filter": pa.array([filter] * n, pa.string()),
            "signal": pa.array([signal] * n, pa.string()),
            "value": pa.array(list(values) if values is not None else [None] * n, pa.float64()),
            "threshold": pa.array([threshold] * n, pa.float64()),
            "duplicate_of": pa.array(
                list(duplicate_of) if duplicate_of is not None else [None] * n, pa.string()
            ),
        }
        columns = [docs.column(f.name) for f in REJECTED_SCHEMA if f.name not in reasons]
        columns += [reasons[f.name] for f in REJECTION_FIELDS]
        batch = pa.RecordBatch.from_arrays(
            [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns],
            schema=REJECTED_SCHEMA,
        )
        self.rejected.append(batch)
        self.counters[f"rejected.{filter}"] += n


class Stage(ABC):
    """One processing step over document batches."""

    name: ClassVar[str]

    def __init__(self, config: StageConfig):
        self.config = config

    @abstractmethod
    def run(self, batches: Iterable[pa.RecordBatch], ctx: StageContext) -> Iterator[pa.RecordBatch]:
        """Yield the kept documents; send removed ones to ``ctx.reject``."""


def run_chain(
    stages: list[Stage], batches: Iterable[pa.RecordBatch], ctx: StageContext
) -> Iterator[pa.RecordBatch]:
    """Compose stages lazily, counting documents in and out of each."""
    stream: Iterable[pa.RecordBatch] = batches
    for stage in stages:
        stream = _counted(stage.run(_counted(stream, ctx, f"{stage.name}.in"), ctx), ctx, f"{stage.name}.out")
    return iter(stream)


def _counted(batches: Iterable[pa.RecordBatch], ctx: StageContext, key: str) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        ctx.counters[key] += batch.num_rows
        yield batch
