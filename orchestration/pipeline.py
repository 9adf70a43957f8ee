"""The engine: plans, keys, verifies, runs (or resumes) and tracks the stages of a config's DAG, knowing none
of them by name (docs/ARCHITECTURE.md, "The engine"). The stages are components (orchestration/stages/).

Each stage writes a directory with an ``index.json`` whose ``cache_key`` hashes the stage's config, the
content of the files that config names, its inputs' digests and its code: its module's import closure
(orchestration/plan.py). A rerun skips stages whose key matches; a stage that died midway keeps its
completed tasks (and training its checkpoints) when its key is unchanged. A :class:`Selection` runs a
subset; :meth:`Pipeline.plan` says what a run would do, and why, without running it.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from dataclasses import replace
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape

from core.lock import WorkdirLocked, workdir_lock
from core.manifest import IntegrityError, index_digest, read_index, verify_files
from core.redact import redact
from core.storage import Store
from orchestration import report
from orchestration.component import PipelineResult, RunContext, StageInstance, StageOutcome
from orchestration.config import ConfigError, PipelineConfig
from orchestration.executors import REJECTED_DIR, ensure_ray
from orchestration.instances import output_path
from orchestration.plan import PARTS_FILE, PlanEntry, Selection, code_digests, decide, key_of
from orchestration.preflight import preflight
from orchestration.stage_files import KEY_FILE, key_of_output, tree_digest
from orchestration.stages import STAGES, dag

try:
    LMFORGE_VERSION = importlib.metadata.version("lmforge")
except importlib.metadata.PackageNotFoundError:  # running from a shipped working dir, not installed
    LMFORGE_VERSION = "0.1.0"

__all__ = ["Pipeline", "PipelineResult", "StageOutcome", "run_pipeline"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def cache_key(stage: str, config: Any, inputs: dict[str, str]) -> str:
    """Hash of a config and its inputs (the pipeline's ``lmforge.config_hash`` tag); stage keys hash
    their full parts (orchestration/plan.py)."""
    return key_of({"stage": stage, "config": _jsonable(config), "inputs": inputs})


class Pipeline:
    """Runs a validated ``PipelineConfig`` end to end on Ray, tracked in MLflow."""

    def __init__(self, config: PipelineConfig, console: Console | None = None):
        self.cfg = config
        self.console = console or Console(stderr=True)
        self.store = config.store
        self.workdir = self.store.local if self.store.local is not None else self.store.uri
        self.local = config.local_dir  # this machine's state of the run: all of it for a local work dir
        self._train_selected = False  # what the cluster's resources are checked for (set by run)
        self._on_cluster = False  # Ray started or connected and the resources checked, this run

    def run(self, until: str | None = None, selection: Selection | None = None) -> PipelineResult:
        """Run the selected stages (default: all of the config's, or those up to ``until``), reusing
        cached ones, then write the report from the stage manifests. The work dir is this run's alone
        while it runs (core/lock.py): a second run on it is refused, naming this one."""
        preflight(self.cfg)  # the files and services the config names, before the lock is taken
        selection = selection or Selection()
        if until is not None:
            selection = replace(selection, until=until)
        try:
            with workdir_lock(self.store):
                return self._run(selection)
        except WorkdirLocked as e:
            raise ConfigError(str(e)) from None

    def plan(self, selection: Selection | None = None) -> list[PlanEntry]:
        """What :meth:`run` would do with each stage, and why, without running anything (no Ray, no
        MLflow): a stage after one that would run is planned to run too, since its input changes."""
        preflight(self.cfg)
        return self._plan(selection or Selection())

    def _plan(self, selection: Selection) -> list[PlanEntry]:
        ctx = RunContext(self.cfg, self.store, self.local, self.console, PipelineResult(self.workdir, "", ""))
        self._walk(ctx, selection)
        return ctx.result.plan

    def _run(self, selection: Selection) -> PipelineResult:
        from orchestration.report_html import write_html_report
        from orchestration.tracking import Tracker, code_version

        cfg = self.cfg
        self.local.mkdir(parents=True, exist_ok=True)
        # The selection and the outputs it reads, before anything runs.
        missing = [e for e in self._plan(selection) if e.action == "missing"]  # ("blocked" follows)
        if missing:
            raise ConfigError("; ".join(f"stage {e.stage}: {e.reason}" for e in missing))
        # Ray starts (or is connected to) when the first stage runs: a run whose stages are all cached
        # reads their manifests, logs and reports without a cluster.
        self._on_cluster = False
        # With the default sqlite store, artifacts (models, reports) live beside it: in the work dir, or for
        # a remote work dir in its directory of the node cache.
        artifacts = None if cfg.tracking.uri else (self.local / "mlartifacts").as_uri()
        tracker = Tracker(cfg.tracking_uri, cfg.tracking.experiment, artifacts)
        config_hash = cache_key("pipeline", cfg, {})
        code = code_version(LMFORGE_VERSION)
        with tracker.pipeline_run(
            cfg.name, cfg.model_dump(mode="json"), {**code, "lmforge.config_hash": config_hash}
        ) as parent_id:
            result = PipelineResult(self.workdir, cfg.tracking_uri, parent_id)
            record = {"name": cfg.name, "mlflow_run_id": parent_id, "tracking_uri": redact(cfg.tracking_uri)}
            self.store.write_bytes(report.RUN_RECORD, json.dumps(record).encode())
            ctx = RunContext(cfg, self.store, self.local, self.console, result, tracker, code, config_hash)
            self._walk(ctx, selection)
            last = list(result.stages)
            result.report_path = report.write_report(self.store, last)
            tracker.log_artifact(result.report_path)
            tracker.log_artifact(result.report_path.with_suffix(".md"))
            page, figures = write_html_report(self.store, last)
            tracker.log_artifact(page)
            tracker.log_report_figures(figures)
        return result

    def _dag(self, selection: Selection) -> tuple[list[StageInstance], list[str], set[str]]:
        """The config's stage instances in order with what each reads (orchestration/stages.dag), and which
        of them ``selection`` runs (``selected``) or reads as they are (``needed`` adds those)."""
        nodes = dag(self.cfg)
        try:
            selected, needed = selection.resolve(
                [n.name for n in nodes], {n.name: n.reads for n in nodes}, [c.name for c in STAGES]
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return nodes, selected, set(needed)

    def _walk(self, ctx: RunContext, selection: Selection) -> None:
        nodes, selected, needed = self._dag(selection)
        self._train_selected = any(n.produces == "model" for n in nodes if n.name in selected)
        for node in nodes:
            if node.name in needed:
                here = replace(ctx, cfg=self.cfg.view(node.source), stage=node.name)
                ctx.result.stages[node.name] = self._stage(
                    here, node, node.name in selected, selection.forces(node.name)
                )

    # -- one stage ----------------------------------------------------------------------------------
    @staticmethod
    def _parts(ctx: RunContext, node: StageInstance, inputs: dict[str, StageOutcome]) -> dict[str, Any]:
        """What the stage's cache key hashes: its config (its source's view), the content of the files it
        names, its inputs' digests and its code (its module's import closure)."""
        component, cfg = node.component, ctx.cfg
        return {
            "stage": node.name,
            "config": _jsonable(component.key_config(cfg)),
            "files": {field: tree_digest(paths) for field, paths in component.key_files(cfg).items()},
            "inputs": {k: index_digest(v.index) for k, v in inputs.items() if v.index is not None},
            "code": code_digests([type(component).__module__]),
        }

    def _stage(self, ctx: RunContext, node: StageInstance, selected: bool, force: bool) -> StageOutcome:
        """Decide, then (without a tracker: a dry run) stop, or run or reuse the stage inside its nested
        MLflow run, logging its datasets in and out and what the component tracks."""
        name, out, tracker = node.name, self.store / output_path(node.name), ctx.tracker
        shown = escape(name)  # clean[web] is not console markup
        inputs = {d: ctx.result.stages[d] for d in node.reads}
        parts = self._parts(ctx, node, inputs)
        entry = decide(out, parts, inputs, selected, force)
        ctx.result.plan.append(entry)
        if tracker is None:
            index = read_index(out) if entry.action in ("cached", "use") else None
            missing = entry.action in ("missing", "blocked")
            return StageOutcome(name, out, index, entry.action in ("cached", "use"), 0.0, missing)
        if entry.action == "missing":
            raise ConfigError(f"stage {name}: {entry.reason}")
        start = time.perf_counter()
        config = _jsonable(node.component.key_config(ctx.cfg))
        with tracker.stage_run(name, config):
            index = read_index(out) if entry.action != "run" else None
            if entry.action == "use":
                self._usable(name, out, index)
                self.console.print(f"[dim]• {shown}: {escape(entry.reason)} ({out})[/dim]")
            cached = entry.action == "use" or (entry.action == "cached" and self._intact(name, out, index))
            if cached and entry.action == "cached":
                self.console.print(f"[dim]• {shown}: cached ({out})[/dim]")
            elif not cached:
                if entry.action == "cached":  # its output failed verification and was wiped
                    entry.action, entry.reason = "run", "its output failed verification"
                self._start_ray()
                if force:
                    out.rmtree()
                self._prepare(out, entry.key, config, parts)
                self.console.print(f"[bold cyan]▶ {shown}[/bold cyan] [dim]({escape(entry.reason)})[/dim]")
                index = node.component.build(ctx, out, entry.key, parts["inputs"])
                if index.get("counters", {}).get("documents_in") == 0:
                    self.console.print(
                        f"  [yellow]⚠ {shown}: no input documents, so its output is empty[/yellow]"
                    )
            tracker.log_counters(index.get("counters", {}))
            tracker.log_datasets(
                [tracker.dataset(k, v.out_dir, index_digest(v.index), v.index) for k, v in inputs.items()],
                [tracker.dataset(name, out, index_digest(index), index)],
            )
            tracker.set_tag("lmforge.cached", str(cached).lower())
            tracker.set_tag("lmforge.plan", f"{entry.action}: {entry.reason}")
            ctx.result.stages[name] = outcome = StageOutcome(
                name, out, index, cached, time.perf_counter() - start
            )
            node.component.track(ctx, {**index, "out_dir": out}, selected)
        if not cached:
            line = node.component.summary(index)
            self.console.print(
                f"  [green]✓ {shown}[/green] in {outcome.seconds:.1f}s" + (f" ({line})" if line else "")
            )
        return outcome

    def _start_ray(self) -> None:
        """Start the embedded Ray or connect to the cluster, once, before the first stage that runs; then
        check the stages' tasks and the training worker group against the cluster's resources."""
        if self._on_cluster:
            return
        import ray

        r = self.cfg.ray
        ensure_ray(r.address, r.num_cpus, r.object_store_memory_mb, r.dashboard, self.local)
        preflight(self.cfg, ray.cluster_resources(), train=self._train_selected)
        self._on_cluster = True

    def _intact(self, name: str, out: Store, index: dict[str, Any]) -> bool:
        """Whether a committed output still matches its manifests (sha256 per ``verify``); one that does
        not is wiped, so the stage is rebuilt from scratch instead of resumed."""
        try:
            self._verify(out, index)
        except IntegrityError as e:
            self.console.print(f"[yellow]• {escape(name)}: {e}; rebuilding the stage[/yellow]")
            out.rmtree()
            return False
        return True

    def _verify(self, out: Store, index: dict[str, Any]) -> None:
        """A stage output and its rejected set against their manifests (IntegrityError naming the file)."""
        verify_files(out, index, self.cfg.verify)
        if (rejected := read_index(out / REJECTED_DIR)) is not None:
            verify_files(out / REJECTED_DIR, rejected, self.cfg.verify)

    def _usable(self, name: str, out: Store, index: dict[str, Any]) -> None:
        """A stage used as it is (not selected) is verified as a cached one is; one that fails stops the run
        (it cannot be rebuilt without being selected), naming the file and what to run."""
        try:
            self._verify(out, index)
        except IntegrityError as e:
            raise ConfigError(
                f"stage {name} (not selected, used as it is): {e}; select it too (--from {name}) to rebuild it"
            ) from None

    @staticmethod
    def _prepare(out: Store, key: str, config: Any, parts: dict[str, Any]) -> None:
        """Keep a partial output made with the same key (completed tasks, checkpoints); wipe any other.
        The stage's config and its key's parts are written beside it."""
        if key_of_output(out) != key:
            out.rmtree()
        out.remove("index.json")
        out.write_bytes(KEY_FILE, key.encode())
        out.write_bytes(PARTS_FILE, json.dumps(parts, indent=2, default=str).encode())
        out.write_bytes(report.STAGE_CONFIG, json.dumps(config, indent=2, default=str).encode())


def run_pipeline(
    config: PipelineConfig,
    console: Console | None = None,
    until: str | None = None,
    selection: Selection | None = None,
) -> PipelineResult:
    """Run a pipeline config end to end (or the stages ``selection`` picks, or those up to ``until``)."""
    return Pipeline(config, console).run(until, selection)
