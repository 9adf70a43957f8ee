"""HTML to main text with trafilatura, with a plain-text fallback for pages it returns nothing for."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import lxml.html
import pyarrow as pa
import pyarrow.compute as pc
import trafilatura
from pydantic import Field

from core.schema import DOCUMENT_SCHEMA
from core.stage import Stage, StageConfig, StageContext


class HtmlExtractorConfig(StageConfig):
    """trafilatura options (defaults follow trafilatura's own)."""

    include_tables: bool = Field(True, description="Keep text inside <table>.")
    include_links: bool = Field(False, description="Keep link targets in the text.")
    include_comments: bool = Field(False, description="Keep the comment section of pages.")
    favor_precision: bool = Field(False, description="Prefer less text with less boilerplate.")
    fallback: bool = Field(True, description="Use the page's visible text when trafilatura finds nothing.")


class HtmlExtractor(Stage):
    """Turns ``html`` documents into ``text`` documents; pages with no text are rejected. Batches that
    already carry text pass through unchanged."""

    name = "extract"
    config: HtmlExtractorConfig

    def run(self, batches: Iterable[pa.RecordBatch], ctx: StageContext) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            if "html" not in batch.schema.names:  # already text (WET, JSONL, Parquet, .txt files)
                yield batch
                continue
            texts = [self._extract(html, ctx) for html in batch.column("html").to_pylist()]
            empty = pa.array([not t for t in texts])
            columns = {f.name: batch.column(f.name) for f in DOCUMENT_SCHEMA if f.name != "text"}
            docs = pa.RecordBatch.from_pydict(
                {**columns, "text": pa.array(texts, pa.string())}, schema=DOCUMENT_SCHEMA
            )
            rejected = docs.filter(empty)
            ctx.reject(
                rejected,
                filter="extract_empty",
                signal="chars",
                values=[0.0] * rejected.num_rows,
                threshold=1.0,
            )
            yield docs.filter(pc.invert(empty))

    def _extract(self, html: str | None, ctx: StageContext) -> str:
        if not html:
            return ""
        cfg = self.config
        text = trafilatura.extract(
            html,
            include_tables=cfg.include_tables,
            include_links=cfg.include_links,
            include_comments=cfg.include_comments,
            favor_precision=cfg.favor_precision,
            deduplicate=False,
        )
        if text:
            return text
        if not cfg.fallback:
            return ""
        ctx.counters["extract.fallback"] += 1
        try:
            return lxml.html.fromstring(html).text_content()
        except (lxml.etree.ParserError, ValueError):
            return ""
