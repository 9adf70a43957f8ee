"""quality: score every document with the quality classifier on Ray tasks, one partition each, and keep by
threshold, by the corpus-wide top fraction, or all with quality tiers (cleaning/quality.py). Its output holds
each source's documents apart (``index["sources"]``), as tokenize reads them.

The top fraction is exact and never gathers the scores: a first pass writes the scored documents
(``scored/``, a dataset of its own: resumable, and its ``rejected/`` holds any document the first pass
quarantined, so it stays beside the output), the cut is found from their scores one partition at a time
(``top_cut``), and a second pass applies it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.manifest import index_digest, source_files
from core.storage import Store, open_input_file
from orchestration.component import RunContext, StageComponent, StageInstance, last
from orchestration.instances import split_instance
from orchestration.stage_files import REJECTED_DIR, document_figures

if TYPE_CHECKING:
    from cleaning.quality import Cut, QualityConfig
    from orchestration.config import PipelineConfig

#: The first pass's output (scored documents) under a top-fraction selection's output.
SCORED_DIR = "scored"
#: Bins of the report's score histograms over [0, 1].
BINS = 100


class Quality(StageComponent):
    name = "quality"
    produces = "documents"

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.quality is not None

    def reads(self, cfg: PipelineConfig, before: list[StageInstance]) -> tuple[str, ...]:
        return last(before, "classifier") + last(before, "documents")

    def key_config(self, cfg: PipelineConfig) -> Any:
        assert cfg.quality is not None
        return {"select": cfg.quality.select, "sources": cfg.quality.sources}

    def summary(self, index: dict[str, Any]) -> str:
        c = index.get("counters", {})
        cut = index.get("quality", {}).get("cut")
        at = f" at score >= {cut:.4f}" if cut is not None else ""
        return f"{c['documents_in']} in, {c['kept']} kept{at}, {c['rejected']} rejected"

    def figures(self, index: dict[str, Any], out: Store) -> dict[str, Any]:
        return {**document_figures(out, index), "quality": index.get("quality", {})}

    def build(self, ctx: RunContext, out: Store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
        from cleaning.quality import ONE_CORPUS
        from orchestration.executors import dataset_source, run_document_stage
        from orchestration.progress import StageProgress

        q = ctx.cfg.quality
        assert q is not None
        classifier, *documents = inputs
        found = ctx.outcome(classifier)
        digest = index_digest(found.index)
        parts = _partitions(ctx, documents)
        # the one corpus of a config without sources is source None (named corpus in quality.sources)
        named = {None if s == ONE_CORPUS and not ctx.cfg.sources else s for s in q.sources or []}
        scored_sources = named if q.sources is not None else {s for s, _, _ in parts}
        scored_parts = {part for source, part, _ in parts if source in scored_sources}
        by_source: dict[str, list[str]] = {}
        for source, part, _ in parts:
            by_source.setdefault(source or "", []).append(f"{part}.parquet")
        run = {
            "cache_key": key,
            "inputs": inputs,
            "extra": {"sources": by_source} if any(by_source) else None,
            **ctx.task_resources("quality"),
        }
        chain = _Chain(
            q, digest, found.store.uri_of(found.index["classifier"]["dir"]), found.index, scored_parts
        )
        sources = [(part, dataset_source(uri)) for _, part, uri in parts]
        s = q.select
        if s.top_fraction is None:
            select = {"threshold": s.threshold} if s.threshold is not None else {"tiers": s.tiers}
            with StageProgress(ctx.console, ctx.stage, "partitions", total=len(parts)) as progress:
                index = run_document_stage(
                    self.name, chain(select), sources, out, on_progress=progress.update, **run
                )
            cut = s.threshold
        else:
            index, cut = _top_fraction(ctx, self.name, chain, sources, out, run)
        index["quality"] = {
            "classifier_digest": digest,
            "select": s.model_dump(mode="json"),
            "cut": cut,
            "histograms": _histograms(out, by_source, scored_parts),
        }
        rows = {f["path"]: f["rows"] for f in index["files"]}
        for source, names in by_source.items():
            if source:  # each source's share of what was kept (the report's per-source funnel)
                index["counters"][f"kept.{source}"] = sum(rows.get(n, 0) for n in names)
        return _rewrite(out, index)


class _Chain:
    """Each partition's chain: the scorer (with a selection) for a scored source's, a pass-through for the
    others' (every chain starts with the quality stage, as run_document_stage counts documents in)."""

    def __init__(
        self, q: QualityConfig, digest: str, model_dir: str, classifier: dict[str, Any], scored: set[str]
    ):
        self.q, self.digest, self.model_dir, self.scored = q, digest, model_dir, scored
        self.load = _loader(classifier["classifier"], q.classifier.scoring_batch_size)

    def __call__(self, select: dict[str, Any], scored: bool = False) -> Any:
        """``scored``: the documents come scored (the top fraction's second pass) and are only cut."""
        from cleaning.quality import QualityScoreConfig, QualityScorer

        model = "" if scored else self.model_dir
        config = QualityScoreConfig(
            digest=self.digest, model_dir=model, batch_size=self.q.batch_size, **select
        )
        scoring = QualityScorer(config, self.load)
        passing = QualityScorer(QualityScoreConfig(digest=self.digest, passthrough=True))
        return lambda part: [scoring if part in self.scored else passing]


def _top_fraction(
    ctx: RunContext, name: str, chain: _Chain, sources: list[tuple[str, Any]], out: Store, run: dict[str, Any]
) -> tuple[dict[str, Any], float]:
    """Score every partition into ``scored/``, find the cut keeping the top fraction of the scored sources'
    documents (one partition's scores in memory at a time), then cut: the output's index and the score."""
    from cleaning.quality import top_cut
    from orchestration.executors import dataset_source, run_document_stage
    from orchestration.progress import StageProgress

    fraction = chain.q.select.top_fraction
    assert fraction is not None
    scored = out / SCORED_DIR
    with StageProgress(ctx.console, ctx.stage, "partitions scored", total=len(sources)) as progress:
        run_document_stage(name, chain({}), sources, scored, on_progress=progress.update, **run)
    ranked = [scored.uri_of(f"{part}.parquet") for part in sorted(chain.scored)]
    total = sum(_rows(uri) for uri in ranked)
    k = max(1, round(fraction * total))
    cut: Cut = top_cut(lambda with_ids: _scores(ranked, with_ids), k)
    ties = f" (ties at it: ids up to {cut.last_id})" if cut.last_id else ""
    ctx.console.print(
        f"  top {fraction:.1%} of {total:,} scored documents: {k:,}, score >= {cut.score:.6f}{ties}"
    )
    again = [(part, dataset_source(scored.uri_of(f"{part}.parquet"))) for part, _ in sources]
    with StageProgress(ctx.console, ctx.stage, "partitions cut", total=len(sources)) as progress:
        index = run_document_stage(
            name, chain({"cut": cut}, scored=True), again, out, on_progress=progress.update, **run
        )
    return index, cut.score


def _loader(classifier: dict[str, Any], batch_size: int) -> Any:
    """How a task loads the classifier it scores with (a function Ray can send): fastText's, or a
    fine-tuned encoder's at the sequence length it was trained with."""
    import functools

    if classifier["kind"] == "encoder":
        from evaluation.quality_encoder import encoder_scorer

        return functools.partial(encoder_scorer, seq_len=classifier["seq_len"], batch_size=batch_size)
    from cleaning.quality import fasttext_scorer

    return fasttext_scorer


def _partitions(ctx: RunContext, documents: list[str]) -> list[tuple[str | None, str, str]]:
    """(source, partition name, file URI) of every documents file read, in input order."""
    out = []
    for name in documents:
        of = split_instance(name)[1]
        _, by_source = source_files(ctx.outcome(name).store)
        for source, paths in by_source.items():
            source = source if source is not None else of
            for path in paths:
                stem = Path(str(path)).name.split(".")[0]
                out.append((source, f"{source}-{stem}" if source else stem, str(path)))
    return out


def _rows(uri: str) -> int:
    import pyarrow.parquet as pq

    with open_input_file(uri) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _scores(uris: list[str], with_ids: bool):
    """(scores, ids or None) of each scored partition, one at a time (the id and meta columns only)."""
    import pyarrow.parquet as pq

    from cleaning.quality import scores_of

    for uri in uris:
        with open_input_file(uri) as f:
            table = pq.read_table(f, columns=["id", "meta"] if with_ids else ["meta"])
        yield scores_of(table), table.column("id").to_pylist() if with_ids else None


def _histograms(
    out: Store, by_source: dict[str, list[str]], scored_parts: set[str]
) -> dict[str, dict[str, list[int]]]:
    """Each scored source's score histogram (BINS bins over [0, 1]) of its kept and rejected documents."""
    import pyarrow.parquet as pq

    from cleaning.quality import scores_of

    histograms: dict[str, dict[str, list[int]]] = {}
    for source, names in by_source.items():
        counts = {"kept": np.zeros(BINS, np.int64), "rejected": np.zeros(BINS, np.int64)}
        for name in names:
            if name.removesuffix(".parquet") not in scored_parts:
                continue
            for side, rel in (("kept", name), ("rejected", f"{REJECTED_DIR}/{name}")):
                if not out.is_file(rel):
                    continue
                with open_input_file(out.uri_of(rel)) as f:
                    scores = scores_of(pq.read_table(f, columns=["meta"]))
                counts[side] += np.histogram(np.clip(scores, 0, 1), bins=BINS, range=(0, 1))[0]
        if any(c.any() for c in counts.values()):
            histograms[source or "corpus"] = {side: c.tolist() for side, c in counts.items()}
    return histograms


def _rewrite(out: Store, index: dict[str, Any]) -> dict[str, Any]:
    import json

    from core.manifest import INDEX

    out.write_bytes(INDEX, json.dumps(index, indent=2).encode())
    return index
