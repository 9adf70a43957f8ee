"""dedup: exact, MinHash near-duplicate and repeated-line removal over the documents (orchestration/dedup.py
runs its phases as Ray tasks)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.storage import Store
from orchestration.component import RunContext, StageComponent, StageInstance, last
from orchestration.stage_files import document_figures

if TYPE_CHECKING:
    from orchestration.config import PipelineConfig


class Dedup(StageComponent):
    name = "dedup"
    produces = "documents"
    per_source = True

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.has_corpus and bool(cfg.dedup.exact or cfg.dedup.minhash)

    def reads(self, cfg: PipelineConfig, before: list[StageInstance]) -> tuple[str, ...]:
        return last(before, "documents")

    def key_config(self, cfg: PipelineConfig) -> Any:
        return cfg.dedup

    def figures(self, index: dict[str, Any], out: Store) -> dict[str, Any]:
        return document_figures(out, index)

    def build(self, ctx: RunContext, out: Store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
        from orchestration.dedup import run_dedup_stage
        from orchestration.progress import StageProgress

        (docs,) = inputs
        with StageProgress(ctx.console, ctx.stage, "tasks") as progress:
            return run_dedup_stage(
                ctx.outcome(docs).store,
                out,
                ctx.cfg.dedup,
                cache_key=key,
                inputs=inputs,
                on_progress=lambda phase, done, total: progress.update(done, total, phase),
                **ctx.task_resources("dedup"),
            )
