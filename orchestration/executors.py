"""Run stages on Ray: one task per input partition, outputs written atomically with completion markers."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ingestion.readers import ReadConfig, ReadReport, read_corpus, read_warc
from ingestion.schema import DOCUMENT_SCHEMA, REJECTED_SCHEMA
from orchestration.datasets import (
    Partition,
    atomic_write_bytes,
    dataset_files,
    index_digest,
    plan_partitions,
    write_index,
    write_parquet,
)
from orchestration.stage import Stage, StageContext, run_chain
from training.data.tokenize import (
    Prepared,
    TokenizeConfig,
    load_prepared,
    prepare_tokenizer,
    sequential_encoding,
    tokenize_partition,
    write_token_index,
)

#: A partition's document source: called in the task with the stage context (for reader counters).
Source = Callable[[StageContext], Iterable[pa.RecordBatch]]

DONE_DIR = "_done"
REJECTED_DIR = "rejected"


# Set by `lmforge submit` in the job's environment: the job already ships the repository as its working dir,
# and a driver inside a job may not pass a runtime_env of its own.
IN_JOB_ENV = "LMFORGE_IN_RAY_JOB"


def ensure_ray(
    address: str | None, num_cpus: int | None, object_store_memory_mb: int, dashboard: bool = True
) -> None:
    """Connect to a cluster, or start an embedded Ray with a capped object store and no dashboard."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        runtime_env = None
        if not os.environ.get(IN_JOB_ENV):
            # A driver outside a submitted job ships the repository so workers import the same code.
            repo = Path(__file__).resolve().parent.parent
            runtime_env = {"working_dir": str(repo), "excludes": [".venv/", "work/", ".git/", "*.warc.gz"]}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(
            num_cpus=num_cpus,
            object_store_memory=object_store_memory_mb * 2**20,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
        )


def warc_source(path: str) -> Source:
    def read(ctx: StageContext) -> Iterable[pa.RecordBatch]:
        return read_warc(path, counters=ctx.counters)

    return read


def corpus_source(uri: str, read: ReadConfig) -> Source:
    """A stored corpus (any format ``read_corpus`` knows) as a stage source; malformed records go to the
    stage counters (``malformed``)."""

    def read_all(ctx: StageContext) -> Iterable[pa.RecordBatch]:
        fields = {"text_field": read.text_field, "id_field": read.id_field, "url_field": read.url_field}
        return read_corpus(uri, read.batch_size, ReadReport(counters=ctx.counters), **fields)

    return read_all


@ray.remote(num_cpus=1)
def _document_task(
    stages: list[Stage], source: Source, out_dir: str, part: str, stage_name: str
) -> dict[str, Any]:
    ctx = StageContext(stage_name)
    out = Path(out_dir)
    kept = write_parquet(out / f"{part}.parquet", run_chain(stages, source(ctx), ctx), DOCUMENT_SCHEMA)
    rejected = write_parquet(out / REJECTED_DIR / f"{part}.parquet", ctx.rejected, REJECTED_SCHEMA)
    result = {"kept": kept, "rejected": rejected, "counters": dict(ctx.counters)}
    atomic_write_bytes(out / DONE_DIR / f"{part}.json", json.dumps(result).encode())
    return result


def run_partitions(
    out: Path,
    parts: list[str],
    submit: Callable[[str], ray.ObjectRef],
    on_progress: Callable[[int, int], None] | None = None,
    max_in_flight: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Results of every partition: read from its completion marker if a previous run finished it, else
    from a Ray task ``submit(part)`` (the task writes the marker); at most ``max_in_flight`` tasks run at
    once (default: as many as the cluster schedules). Progress is reported as tasks end."""
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for part in parts:
        marker = out / DONE_DIR / f"{part}.json"
        if marker.exists():
            results[part] = json.loads(marker.read_text())
        else:
            todo.append(part)
    if on_progress:
        on_progress(len(results), len(parts))
    pending: dict[ray.ObjectRef, str] = {}
    todo.reverse()
    while todo or pending:
        while todo and (max_in_flight is None or len(pending) < max_in_flight):
            part = todo.pop()
            pending[submit(part)] = part
        done, _ = ray.wait(list(pending), num_returns=1)
        results[pending.pop(done[0])] = ray.get(done[0])
        if on_progress:
            on_progress(len(results), len(parts))
    return results


def run_document_stage(
    stage_name: str,
    stages: list[Stage],
    partitions: list[tuple[str, Source]],
    out_dir: str | Path,
    *,
    cache_key: str,
    inputs: dict[str, str],
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Map a chain of stages over partitions as Ray tasks; skip partitions already completed.

    Writes the kept dataset's index (with the rejected dataset's index beside it under ``rejected/``)
    after checking that every input document is either kept or rejected.
    """
    out = Path(out_dir)
    sources = dict(partitions)
    results = run_partitions(
        out,
        list(sources),
        lambda part: _document_task.remote(stages, sources[part], str(out), part, stage_name),
        on_progress,
    )

    counters: Counter = Counter()
    for r in results.values():
        counters.update(r["counters"])
    kept = sum(r["kept"]["rows"] for r in results.values())
    rejected = sum(r["rejected"]["rows"] for r in results.values())
    docs_in = counters.get(f"{stages[0].name}.in", 0)
    if docs_in != kept + rejected:
        raise RuntimeError(
            f"stage {stage_name}: {docs_in} documents in but {kept} kept + {rejected} rejected; documents were lost"
        )
    counters.update({"documents_in": docs_in, "kept": kept, "rejected": rejected})
    write_index(
        out / REJECTED_DIR,
        stage=stage_name,
        cache_key=cache_key,
        files=[r["rejected"] for r in results.values()],
        schema=REJECTED_SCHEMA,
        inputs=inputs,
    )
    return write_index(
        out,
        stage=stage_name,
        cache_key=cache_key,
        files=[r["kept"] for r in results.values()],
        schema=DOCUMENT_SCHEMA,
        inputs=inputs,
        counters=dict(counters),
    )


# -- tokenization ---------------------------------------------------------------------------------------


def _column_reader(files: list[str], column: str) -> Callable[[], Iterable[str]]:
    def read() -> Iterable[str]:
        for path in files:
            for batch in pq.ParquetFile(path).iter_batches(columns=[column]):
                yield from batch.column(0).to_pylist()

    return read


@ray.remote(num_cpus=1)
def _prepare_tokenizer_task(files: list[str], out_dir: str, config: TokenizeConfig) -> Prepared:
    return prepare_tokenizer(_column_reader(files, "text"), _column_reader(files, "id"), out_dir, config)


@ray.remote(num_cpus=1)
def _tokenize_task(
    part: Partition, out_dir: str, prepared: Prepared, config: TokenizeConfig
) -> dict[str, Any]:
    sequential_encoding()  # one task, one CPU: parallelism comes from running partitions side by side
    return tokenize_partition(part.batches(["id", "text"]), out_dir, prepared, config, part.name)


def run_tokenize_stage(
    docs_dir: str | Path,
    out_dir: str | Path,
    config: TokenizeConfig,
    *,
    extra: dict[str, Any],
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Tokenizer pass in one task, then one task per partition; resumes from completed partitions.

    The partitions are planned from the input's row groups and the config alone, so the shards are the
    same whatever the number of workers.
    """
    docs, paths = dataset_files(docs_dir)
    files = [str(p) for p in paths]
    out = Path(out_dir)
    prepared = load_prepared(out)
    if prepared is None:
        shutil.rmtree(out / DONE_DIR, ignore_errors=True)  # partitions of another tokenizer are void
        prepared = ray.get(_prepare_tokenizer_task.remote(files, str(out), config))
    parts = plan_partitions(files, config.partition_mb)
    by_name = {p.name: p for p in parts}
    results = run_partitions(
        out,
        list(by_name),
        lambda name: _tokenize_task.remote(by_name[name], str(out), prepared, config),
        on_progress,
    )
    documents_in = docs["rows"]
    documents_out = sum(r["documents"] for r in results.values())
    if documents_in != documents_out:
        raise RuntimeError(f"tokenize: {documents_in} documents in but {documents_out} tokenized")
    return write_token_index(
        out, prepared, config, [results[p.name] for p in parts], index_digest(docs), extra
    )
