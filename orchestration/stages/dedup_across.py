"""dedup_across: exact and near-duplicate removal across sources, after each source's own dedup: the copy of
the first source in ``dedup_across.order`` survives (orchestration/dedup.py, over every source's documents).
Its output holds each source's kept documents apart (``index["sources"]``), so tokenize still writes
shards per source."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.storage import Store
from orchestration.component import RunContext, StageComponent, StageInstance, last
from orchestration.instances import split_instance
from orchestration.stage_files import document_figures

if TYPE_CHECKING:
    from orchestration.config import PipelineConfig


class DedupAcross(StageComponent):
    name = "dedup_across"
    produces = "documents"

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.dedup_across is not None and len(cfg.sources) > 1

    def reads(self, cfg: PipelineConfig, before: list[StageInstance]) -> tuple[str, ...]:
        return last(before, "documents")

    def key_config(self, cfg: PipelineConfig) -> Any:
        return {"dedup": cfg.dedup, "order": cfg.source_order()}

    def figures(self, index: dict[str, Any], out: Store) -> dict[str, Any]:
        return document_figures(out, index)

    def build(self, ctx: RunContext, out: Store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
        from orchestration.dedup import run_dedup_stage
        from orchestration.progress import StageProgress

        of_source = {split_instance(name)[1]: name for name in inputs}
        ranked = {source: ctx.outcome(of_source[source]).store for source in ctx.cfg.source_order()}
        with StageProgress(ctx.console, ctx.stage, "tasks") as progress:
            return run_dedup_stage(
                ranked,
                out,
                ctx.cfg.dedup,
                cache_key=key,
                inputs=inputs,
                on_progress=lambda phase, done, total: progress.update(done, total, phase),
                **ctx.task_resources("dedup"),
            )
