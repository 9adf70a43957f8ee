"""The stage component contract (docs/ARCHITECTURE.md, "Stages").

A pipeline stage is one module of ``orchestration/stages/`` holding one :class:`StageComponent`: its name,
when a config has it, the stages it reads, the part of the config its cache key hashes, the files whose
content keys it, how it builds its output (through the task runner and executors), and what it logs to
MLflow once its output exists. The engine (orchestration/pipeline.py) plans, keys, verifies, runs and
tracks the datasets in and out of any component the same way and knows none by name.

A stage's code, in its cache key, is its module's import closure (orchestration/plan.py): a stage module
imports what it runs and nothing of the other stages, so editing one stage's code reruns that stage and
what follows it, never what comes before. This module is in every stage's closure: it imports nothing of
lmforge at run time but the core layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from core.storage import Store
from orchestration.instances import instance_name

if TYPE_CHECKING:
    from rich.console import Console

    from orchestration.config import PipelineConfig
    from orchestration.plan import PlanEntry
    from orchestration.tracking import Tracker


@dataclass
class StageOutcome:
    """What one stage produced in this run."""

    name: str
    store: Store
    index: dict[str, Any] | None  # None in a dry run, for a stage that would run
    cached: bool
    seconds: float
    missing: bool = False  # in a dry run: not selected, and never run

    @property
    def out_dir(self) -> Path | str:
        """The output directory: a local path, or the URI of a remote one."""
        return self.store.local if self.store.local is not None else self.store.uri


@dataclass
class PipelineResult:
    """Outputs of a whole run, for the CLI summary and for tests."""

    workdir: Path | str  # a local path, or a remote work dir's URI
    tracking_uri: str
    parent_run_id: str
    stages: dict[str, StageOutcome] = field(default_factory=dict)
    model_id: str | None = None
    model_version: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    report_path: Path | None = None
    finetuned_model_id: str | None = None
    finetuned_model_version: str | None = None
    plan: list[PlanEntry] = field(default_factory=list)


@dataclass
class RunContext:
    """What a stage sees of the run: the config, the work dir, this machine's state of the run (``local``),
    the console, the tracker (None in a dry run), the run's result so far (the other stages' outcomes, the
    logged models), the code version tags and the config's hash."""

    cfg: PipelineConfig
    store: Store
    local: Path
    console: Console
    result: PipelineResult
    tracker: Tracker | None = None
    code: dict[str, str] = field(default_factory=dict)
    config_hash: str = ""
    #: The stage instance being built (``clean[web]``); ``cfg`` is then its source's view of the config
    #: (PipelineConfig.view).
    stage: str = ""

    def outcome(self, stage: str) -> StageOutcome:
        return self.result.stages[stage]

    def task_resources(self, stage: str) -> dict[str, Any]:
        """``ray.resources.<stage>`` as the task runner's Ray options and in-flight cap."""
        r = self.cfg.ray.tasks(stage)
        return {"options": r.ray_options(), "max_in_flight": r.max_in_flight}


class StageComponent:
    """One pipeline stage. Subclasses set ``name`` and ``produces`` and implement :meth:`key_config` and
    :meth:`build`; the rest has defaults."""

    #: The stage's name: its output directory, its ``--only``/``--from`` name, its MLflow run's name.
    name: ClassVar[str]
    #: What its output is (``index.json``'s kind): stages read their inputs by kind (:func:`last`).
    produces: ClassVar[str]
    #: One instance per source (``clean[web]``, ``clean[docs]``), each seeing its source's view of the
    #: config; else one instance reading every source's outputs (a pooled stage: tokenize, train).
    per_source: ClassVar[bool] = False

    def enabled(self, cfg: PipelineConfig) -> bool:
        """Whether the config's DAG has this stage."""
        return True

    def reads(self, cfg: PipelineConfig, before: list[StageInstance]) -> tuple[str, ...]:
        """The stage instances whose outputs it reads, among those ``before`` it (a per-source stage sees
        its own source's only)."""
        return ()

    def key_config(self, cfg: PipelineConfig) -> Any:
        """The part of the config its output depends on (in its cache key)."""
        raise NotImplementedError

    def key_files(self, cfg: PipelineConfig) -> dict[str, list[str]]:
        """Config field -> the files or directories it names whose content the output depends on."""
        return {}

    def preflight(self, cfg: PipelineConfig) -> list[str]:
        """Problems with the files the stage's config names, each naming the field, the value and the fix,
        found before any stage runs (``lmforge validate`` and ``lmforge run``)."""
        return []

    def build(self, ctx: RunContext, out: Store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
        """Write the output under ``out`` and return its committed index (core/manifest.py).
        ``inputs``: the digest of each stage it reads; their outcomes are ``ctx.outcome(name)``."""
        raise NotImplementedError

    def summary(self, index: dict[str, Any]) -> str:
        """Its one-line result for the console and the run's summary table (default: documents in, kept
        and rejected, for a stage that counts all three)."""
        c = index.get("counters", {})
        if {"documents_in", "kept", "rejected"} <= c.keys():
            return f"{c['documents_in']} in, {c['kept']} kept, {c['rejected']} rejected"
        return ""

    def figures(self, index: dict[str, Any], out: Store) -> dict[str, Any]:
        """Its section of the data-quality report (report.json, report.md): by default its counters. The
        checks across stages (in = kept + rejected, the ids each passes on) are the report's."""
        return dict(index.get("counters", {}))

    def track(self, ctx: RunContext, index: dict[str, Any], selected: bool) -> None:
        """Log what the output adds to MLflow (models, metrics, lineage) once it exists, built or cached
        (``index['out_dir']`` is its Store); ``selected``: the run selected it (not only read it)."""


@dataclass(frozen=True)
class StageInstance:
    """A stage of one config's DAG: its component, its source (None: the one corpus, or pooled) and the
    instances it reads. Its name is the component's, with the source in brackets: ``clean[web]``."""

    component: StageComponent
    source: str | None = None
    reads: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return instance_name(self.component.name, self.source)

    @property
    def produces(self) -> str:
        return self.component.produces


def last(before: list[StageInstance], kind: str) -> tuple[str, ...]:
    """The outputs of ``kind`` a stage reads: the last instance in ``before`` producing it, or after
    per-source chains, the last one of each source (in source order) unless a pooled stage producing
    ``kind`` comes after them (empty when none does)."""
    current: dict[str | None, str] = {}
    for instance in before:
        if instance.produces == kind:
            if instance.source is None:
                current = {}
            current[instance.source] = instance.name
    return tuple(current.values())
