"""tokenize: fit (or load) the tokenizer in one task, then encode each partition of the documents into token
shards in its own task; the shards and their index are the same whatever the number of workers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from core.files import write_parquet
from core.manifest import source_files, write_index
from core.partitions import Partition, plan_partitions
from core.quarantine import Quarantine
from core.schema import REJECTED_SCHEMA
from core.stage import StageContext
from core.storage import Store, open_input_file
from core.tasks import DONE_DIR, TaskId
from orchestration.component import RunContext, StageComponent, StageInstance, last
from orchestration.executors import REJECTED_DIR, count, run_tasks
from orchestration.instances import split_instance
from training.data.tokenize import (
    Prepared,
    TokenizeConfig,
    load_prepared,
    prepare_tokenizer,
    sequential_encoding,
    tokenize_partition,
    validation_warning,
    write_token_index,
)

if TYPE_CHECKING:
    from orchestration.config import PipelineConfig


class Tokenize(StageComponent):
    name = "tokenize"
    produces = "tokens"

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.has_corpus

    def reads(self, cfg: PipelineConfig, before: list[StageInstance]) -> tuple[str, ...]:
        return last(before, "documents")

    def key_config(self, cfg: PipelineConfig) -> Any:
        return cfg.tokenize

    def key_files(self, cfg: PipelineConfig) -> dict[str, list[str]]:
        path = cfg.tokenize.tokenizer.path
        return {"tokenize.tokenizer.path": [str(path)]} if path is not None else {}

    def preflight(self, cfg: PipelineConfig) -> list[str]:
        tokenizer = cfg.tokenize.tokenizer.path
        if tokenizer is None:
            return []
        path = Path(tokenizer)
        if (path / "tokenizer.json" if path.is_dir() else path).is_file():
            return []
        return [
            f"tokenize.tokenizer.path: {tokenizer!r} is neither a tokenizer.json file nor a directory "
            "holding one; point it at an existing tokenizer or remove it to train one"
        ]

    def summary(self, index: dict[str, Any]) -> str:
        c = index.get("counters", {})
        return f"{c['tokens']} tokens, {c['documents']} documents, vocab {c['vocab_size']}"

    def build(self, ctx: RunContext, out: Store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
        """One tokenizer for every source's documents; each source's shards apart (``web-p00000``...)."""
        from orchestration.progress import StageProgress

        docs = {split_instance(name)[1]: ctx.outcome(name) for name in inputs}
        total = sum(d.index["rows"] for d in docs.values())
        with StageProgress(ctx.console, "tokenize", "documents", total=total) as progress:
            index = run_tokenize_stage(
                {source: d.store for source, d in docs.items()},
                out,
                ctx.cfg.tokenize,
                cache_key=key,
                inputs=inputs,
                on_counts=progress.count,
                **ctx.task_resources("tokenize"),
            )
        if (warning := validation_warning(index)) is not None:
            ctx.console.print(f"  [yellow]⚠ tokenize: {warning}[/yellow]")
        return index


def _column_reader(files: list[str], column: str) -> Callable[[], Iterable[str]]:
    def read() -> Iterable[str]:
        for path in files:
            with open_input_file(path) as f:
                for batch in pq.ParquetFile(f).iter_batches(columns=[column]):
                    yield from batch.column(0).to_pylist()

    return read


def _prepare_tokenizer_task(
    staging: Path, by_source: dict[str | None, list[str]], config: TokenizeConfig
) -> dict[str, Any]:
    files = [f for fs in by_source.values() for f in fs]
    texts, ids = _column_reader(files, "text"), _column_reader(files, "id")
    groups = {s: _column_reader(fs, "id") for s, fs in by_source.items() if s is not None}
    return prepare_tokenizer(
        texts, ids, staging, config, _column_bytes(files, "text"), groups or None
    ).__dict__


def _column_bytes(files: list[str], column: str) -> int:
    """A column's uncompressed size from the Parquet footers (no data read)."""
    total = 0
    for path in files:
        with open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        index = meta.schema.to_arrow_schema().get_field_index(column)
        total += sum(
            meta.row_group(g).column(index).total_uncompressed_size for g in range(meta.num_row_groups)
        )
    return total


def _tokenize_task(
    staging: Path, part: Partition, out_dir: str, prepared: Prepared, config: TokenizeConfig
) -> dict[str, Any]:
    sequential_encoding()  # one task, one CPU: parallelism comes from running partitions side by side
    tokenizer = Tokenizer.from_str(Store(out_dir).read_text(prepared.path))
    quarantine = Quarantine("tokenize", part.name)
    result = tokenize_partition(
        part.batches(["id", "text", "meta"]),
        staging,
        prepared,
        config,
        part.name,
        tokenizer,
        quarantine,
        on_chunk=lambda documents, tokens: count(documents=documents, tokens=tokens),
    )
    ctx = StageContext("tokenize")
    if quarantine.traces:  # the whole documents, as they came in, with the traceback as the signal
        wanted = pa.array(list(quarantine.traces), pa.string())
        for batch in part.batches():
            docs = batch.filter(pc.is_in(batch.column("id"), value_set=wanted))
            for i, doc_id in enumerate(docs.column("id").to_pylist()):
                ctx.reject(docs.slice(i, 1), filter="quarantined", signal=quarantine.traces[doc_id])
    rejected = staging / REJECTED_DIR / f"{part.name}.parquet"
    return result | {
        "rejected": write_parquet(rejected, ctx.rejected, REJECTED_SCHEMA),
        "quarantined": len(quarantine.traces),
    }


def _inputs(sources: dict[str | None, Any]) -> tuple[int, dict[str | None, list[str]]]:
    """The documents in, and each source's Parquet files (a dataset may hold several sources: dedup
    across them writes one)."""
    documents_in, by_source = 0, {}
    for source, where in sources.items():
        docs, held = source_files(where)
        documents_in += docs["rows"]
        for name, paths in held.items():
            by_source[name if name is not None else source] = [str(p) for p in paths]
    return documents_in, by_source


def _partitions(
    by_source: dict[str | None, list[str]], partition_mb: float
) -> tuple[dict[TaskId, Partition], dict[TaskId, str]]:
    """Each source's partitions, named after it (``web-p00000``), and the source of each task."""
    parts: dict[TaskId, Partition] = {}
    source_of: dict[TaskId, str] = {}
    for source, files in by_source.items():
        for part in plan_partitions(files, partition_mb):
            if source is not None:
                part = replace(part, name=f"{source}-{part.name}")
                source_of[TaskId(part=part.name)] = source
            parts[TaskId(part=part.name)] = part
    return parts, source_of


def run_tokenize_stage(
    docs_dir: str | Path | Store | dict[str | None, str | Path | Store],
    out_dir: str | Path,
    config: TokenizeConfig,
    *,
    cache_key: str = "",
    inputs: dict[str, str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    options: dict[str, Any] | None = None,
    max_in_flight: int | None = None,
    on_counts: Callable[[dict[str, int]], None] | None = None,
) -> dict[str, Any]:
    """Tokenizer pass in one task, then one task per partition; resumes from completed partitions. With
    ``on_counts``, the documents and tokens written so far are reported as the partitions' tasks run.

    ``docs_dir``: a documents dataset, or source -> documents dataset: the tokenizer is fitted on all of
    them (in that order), each source's partitions are named after it (``web-p00000``) and their shards
    carry its name. The partitions are planned from the inputs' row groups and the config alone, so the
    shards are the same whatever the number of workers.
    """
    documents_in, by_source = _inputs(docs_dir if isinstance(docs_dir, dict) else {None: docs_dir})
    out = Store(out_dir)
    if load_prepared(out) is None:
        out.rmtree(DONE_DIR)  # partitions of another tokenizer are void
    pass_ = TaskId("tokenizer")
    result = run_tasks(
        out, [pass_], lambda _: (_prepare_tokenizer_task, (by_source, config)), options=options
    )
    prepared = Prepared.from_result(result[pass_])
    parts, source_of = _partitions(by_source, config.partition_mb)
    results = run_tasks(
        out,
        list(parts),
        lambda task: (_tokenize_task, (parts[task], out.uri, prepared, config)),
        on_progress,
        max_in_flight,
        options=options,
        on_counts=on_counts,
    )
    for task, source in source_of.items():
        for split in results[task]["shards"].values():
            for shard in split:
                shard["source"] = source
    return _commit(out, [results[t] for t in parts], documents_in, prepared, config, cache_key, inputs)


def _commit(
    out: Store,
    results: list[dict[str, Any]],
    documents_in: int,
    prepared: Prepared,
    config: TokenizeConfig,
    cache_key: str,
    inputs: dict[str, str] | None,
) -> dict[str, Any]:
    """Check that every document was tokenized or quarantined, then write both manifests."""
    documents_out = sum(r["documents"] for r in results)
    quarantined = sum(r.get("quarantined", 0) for r in results)
    if documents_in != documents_out + quarantined:
        raise RuntimeError(
            f"tokenize: {documents_in} documents in but {documents_out} tokenized and {quarantined} quarantined"
        )
    write_index(
        out / REJECTED_DIR,
        stage="tokenize",
        cache_key=cache_key,
        files=[r["rejected"] for r in results if "rejected" in r],
        schema=REJECTED_SCHEMA,
        inputs=inputs,
    )
    return write_token_index(
        out, prepared, config, results, cache_key=cache_key, inputs=inputs, quarantined=quarantined
    )
