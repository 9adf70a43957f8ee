"""clean: extract, normalize, filter and redact the crawl's pages and the read corpora into documents, each
rejected one kept with the filter, signal and threshold that removed it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.stage import Stage
from core.storage import Store
from orchestration.component import RunContext, StageComponent, StageInstance, last
from orchestration.stage_files import document_figures

if TYPE_CHECKING:
    from ingestion.readers import ReadConfig
    from orchestration.config import CleanConfig, PipelineConfig


def clean_stages(c: CleanConfig) -> list[Stage]:
    """Extraction, normalization and the configured filters, in the clean stage's order (decontamination,
    which needs the tasks' n-gram index, is inserted after normalization by the stage)."""
    from cleaning.extract import HtmlExtractor
    from cleaning.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        UrlBlocklistFilter,
    )
    from cleaning.langid import LanguageFilter
    from cleaning.normalize import TextNormalizer
    from cleaning.pii import PiiRedactor

    stages: list[Stage] = [HtmlExtractor(c.extract), TextNormalizer(c.normalize)]
    optional = [
        (UrlBlocklistFilter, c.url_blocklist),
        (LanguageFilter, c.language),
        (GopherRepetitionFilter, c.gopher_repetition),
        (GopherQualityFilter, c.gopher),
        (C4QualityFilter, c.c4),
        (FineWebQualityFilter, c.fineweb),
        (PiiRedactor, c.pii),
    ]
    return stages + [stage(config) for stage, config in optional if config is not None]


class Clean(StageComponent):
    name = "clean"
    produces = "documents"
    per_source = True

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.has_corpus

    def reads(self, cfg: PipelineConfig, before: list[StageInstance]) -> tuple[str, ...]:
        return last(before, "warc")

    def key_config(self, cfg: PipelineConfig) -> Any:
        return {"clean": cfg.clean, "read": cfg.read, "read_files": cfg.read.fingerprint()}

    def key_files(self, cfg: PipelineConfig) -> dict[str, list[str]]:
        blocklist = cfg.clean.url_blocklist
        if blocklist is None or blocklist.path is None:
            return {}
        return {"clean.url_blocklist.path": [str(blocklist.path)]}

    def preflight(self, cfg: PipelineConfig) -> list[str]:
        """The read inputs exist (their pattern matches), and Parquet ones hold ``read.text_field``."""
        try:
            return _parquet_column_problems(cfg.read, cfg.read.inputs())
        except (FileNotFoundError, ValueError) as e:  # its message names read.paths and the pattern
            return [str(e)]

    def figures(self, index: dict[str, Any], out: Store) -> dict[str, Any]:
        return document_figures(out, index)

    def build(self, ctx: RunContext, out: Store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
        from cleaning.decontaminate import Decontaminator
        from orchestration.executors import corpus_source, run_document_stage, warc_source
        from orchestration.progress import StageProgress
        from orchestration.task_ngrams import task_ngrams

        c = ctx.cfg.clean
        stages = clean_stages(c)
        if c.decontaminate is not None:
            stages.insert(2, Decontaminator(c.decontaminate, task_ngrams(ctx.console, c.decontaminate)))
        parts = [
            (Path(f["path"]).name.split(".")[0], warc_source(crawl.store.uri_of(f["path"])))
            for name in inputs
            for crawl in [ctx.outcome(name)]
            for f in crawl.index["files"]
        ]
        parts += [
            (f"read-{i:05d}", corpus_source(uri, ctx.cfg.read)) for i, uri in enumerate(ctx.cfg.read.inputs())
        ]
        with StageProgress(ctx.console, ctx.stage, "input files", total=len(parts)) as progress:
            return run_document_stage(
                "clean",
                stages,
                parts,
                out,
                cache_key=key,
                inputs=inputs,
                on_progress=progress.update,
                on_counts=progress.count,
                **ctx.task_resources("clean"),
            )


#: How many Parquet inputs the pre-flight opens to check their columns.
PARQUET_CHECKED = 64


def _parquet_column_problems(read: ReadConfig, inputs: list[str]) -> list[str]:
    """The Parquet inputs must hold ``read.text_field`` (their footers are read, no data; the first
    PARQUET_CHECKED of them, a second each at most on an object store): the stage would otherwise fail
    in its first task."""
    import pyarrow.parquet as pq

    from core.storage import open_input_file

    problems = []
    parquet = [uri for uri in inputs if uri.split("?")[0].endswith(".parquet")]
    for uri in parquet[:PARQUET_CHECKED]:
        with open_input_file(uri) as f:
            names = pq.ParquetFile(f).schema_arrow.names
        if read.text_field not in names:
            problems.append(
                f"read.text_field: {uri} has no column {read.text_field!r} (its columns: {', '.join(names)}); "
                "set read.text_field to the one holding the text"
            )
    return problems
