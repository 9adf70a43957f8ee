"""The pipeline DAG: crawl -> clean -> dedup -> tokenize -> train -> evaluate, then labeled -> finetune,
with a stage cache.

Each stage writes a directory with an ``index.json`` whose ``cache_key`` hashes the stage's config, the
content of the files that config names, its inputs' digests and the source of the code that computes it
(orchestration/plan.py). A re-run skips stages whose key matches; a stage that died midway keeps its
completed tasks (and training its checkpoints) when its key is unchanged. A :class:`Selection` runs a
subset; :meth:`Pipeline.plan` says what a run would do, and why, without running it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from pydantic import BaseModel
from rich.console import Console

from cleaning.decontaminate import DecontaminateConfig, Decontaminator, NgramIndex
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
from core.files import file_entry, file_sha256
from core.lock import WorkdirLocked, workdir_lock
from core.manifest import IntegrityError, index_digest, read_index, verify_files, write_index
from core.redact import redact
from core.stage import Stage
from core.storage import Store, local_copy, local_file, node_dir
from evaluation.tasks import resolve_task, task_metric_names
from ingestion.demo_site import DemoSiteServer, build_demo_site
from orchestration import report
from orchestration.config import CleanConfig, ConfigError, PipelineConfig
from orchestration.crawl import run_crawl
from orchestration.dedup import run_dedup_stage
from orchestration.executors import (
    REJECTED_DIR,
    corpus_source,
    ensure_ray,
    run_document_stage,
    run_tokenize_stage,
    warc_source,
)
from orchestration.plan import (
    PARTS_FILE,
    PlanEntry,
    Selection,
    changes,
    code_digests,
    key_of,
    read_parts,
    summarize,
)
from orchestration.preflight import preflight
from orchestration.progress import StageProgress
from orchestration.report_html import write_html_report
from orchestration.run_metrics import RunMetricsLogger
from training.labeled import resolve_path

if TYPE_CHECKING:  # MLflow, Ray Train, torch and transformers load where a run tracks, trains or scores
    from orchestration.tracking import Tracker

try:
    LMFORGE_VERSION = importlib.metadata.version("lmforge")
except importlib.metadata.PackageNotFoundError:  # running from a shipped working dir, not installed
    LMFORGE_VERSION = "0.1.0"

_KEY_FILE = ".cache_key"
#: The MLflow LoggedModel type of each pretraining objective's model.
MODEL_TYPES = {"causal_lm": "causal-lm", "masked_lm": "masked-lm", "span_corruption": "seq2seq-lm"}


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


#: The modules whose import closure is each stage's code (pipeline.py itself, the glue that calls them,
#: is left out: it imports every stage, so any change to it would rerun all of them).
STAGE_CODE = {
    "crawl": ("orchestration.crawl", "ingestion.demo_site"),
    "clean": (
        "orchestration.executors",
        *(f"cleaning.{m}" for m in ("extract", "normalize", "filters", "langid", "pii", "decontaminate")),
        "evaluation.tasks",
    ),
    "dedup": ("orchestration.dedup",),
    "tokenize": ("orchestration.executors",),
    "train": ("orchestration.training_launch", "training.trainer"),
    "evaluate": ("evaluation.perplexity",),
    "labeled": ("training.labeled",),
    "finetune": ("orchestration.training_launch", "training.finetune", "evaluation.finetuned"),
}


@dataclass
class StageSpec:
    """One stage of a config's DAG: what its key hashes and how to build it."""

    name: str
    config: Any
    deps: tuple[str, ...]
    build: Callable[[Store, str, dict[str, str]], dict[str, Any]]
    files: dict[str, str] = field(default_factory=dict)  # config field -> content digest of its file
    after: Callable[[dict[str, Any]], None] | None = None


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
    plan: list[PlanEntry] = field(default_factory=list)


def clean_stages(c: CleanConfig) -> list[Stage]:
    """Extraction, normalization and the configured filters, in the clean stage's order (decontamination,
    which needs the tasks' n-gram index, is inserted after normalization by the pipeline)."""
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


class Pipeline:
    """Runs a validated ``PipelineConfig`` end to end on Ray, tracked in MLflow."""

    def __init__(self, config: PipelineConfig, console: Console | None = None):
        self.cfg = config
        self.console = console or Console(stderr=True)
        self.store = config.store
        self.workdir = self.store.local if self.store.local is not None else self.store.uri
        self.local = config.local_dir  # this machine's state of the run: all of it for a local work dir
        self._code: dict[str, str] = {}
        self._train_selected = False  # what the resources check covers (set by run)
        self._on_cluster = False  # Ray started or connected and the resources checked, this run

    # -- stage bookkeeping --------------------------------------------------------------------------
    def _decide(
        self, spec: StageSpec, inputs: dict[str, StageOutcome], selected: bool, force: bool
    ) -> tuple[PlanEntry, dict[str, Any]]:
        """What this run does with a stage and why, from its output on disk and its new key parts."""
        out = self.store / spec.name
        pending = [k for k, v in inputs.items() if v.index is None]
        absent = [k for k, v in inputs.items() if v.missing]
        parts = {
            "stage": spec.name,
            "config": _jsonable(spec.config),
            "files": spec.files,
            "inputs": {k: index_digest(v.index) for k, v in inputs.items() if v.index is not None},
            "code": code_digests(STAGE_CODE[spec.name]),
        }
        key = key_of(parts)
        index = read_index(out)
        found = changes(read_parts(out), parts) if index is not None and index.get("cache_key") != key else []
        if not selected:
            if index is None:
                return PlanEntry(
                    spec.name, "missing",
                    f"not selected and {out} holds no finished output; run it first (widen --only/--from)",
                ), parts  # fmt: skip
            if pending:
                reason = f"not selected: used as it is, though {_inputs(pending)} rebuilt"
            elif found:
                reason = f"not selected: used as it is, stale ({summarize(found)} changed since it ran)"
            else:
                reason = "not selected: used as it is (up to date)"
            return PlanEntry(spec.name, "use", reason, key, found), parts
        if absent:
            return PlanEntry(spec.name, "blocked", f"{_inputs(absent)} missing", key), parts
        if force:
            return PlanEntry(spec.name, "run", "forced (--force)", key), parts
        if pending:
            return PlanEntry(spec.name, "run", f"{_inputs(pending)} rebuilt first", key), parts
        if index is not None and index.get("cache_key") == key:
            return PlanEntry(spec.name, "cached", "unchanged", key), parts
        if index is None:
            if _key_of(out) == key:
                reason = "resumes an interrupted run (its finished tasks are kept)"
            else:
                reason = "no finished output yet"
            return PlanEntry(spec.name, "run", reason, key), parts
        return PlanEntry(spec.name, "run", f"changed: {summarize(found)}", key, found), parts

    def _stage(
        self,
        spec: StageSpec,
        inputs: dict[str, StageOutcome],
        tracker: Tracker | None,
        result: PipelineResult,
        selected: bool = True,
        force: bool = False,
    ) -> StageOutcome:
        """Decide, then (without a tracker: a dry run) stop, or run or reuse the stage inside its nested
        MLflow run; ``after`` logs extra lineage there."""
        name, out = spec.name, self.store / spec.name
        entry, parts = self._decide(spec, inputs, selected, force)
        result.plan.append(entry)
        if tracker is None:
            index = read_index(out) if entry.action in ("cached", "use") else None
            missing = entry.action in ("missing", "blocked")
            return StageOutcome(name, out, index, entry.action in ("cached", "use"), 0.0, missing)
        if entry.action == "missing":
            raise ConfigError(f"stage {name}: {entry.reason}")
        input_digests = parts["inputs"]
        start = time.perf_counter()
        with tracker.stage_run(name, _jsonable(spec.config)):
            index = read_index(out) if entry.action != "run" else None
            if entry.action == "use":
                self._usable(name, out, index)
            cached = entry.action == "use" or (entry.action == "cached" and self._intact(name, out, index))
            if entry.action == "use":
                self.console.print(f"[dim]• {name}: {entry.reason} ({out})[/dim]")
            elif cached:
                self.console.print(f"[dim]• {name}: cached ({out})[/dim]")
            else:
                if entry.action == "cached":  # its output failed verification and was wiped
                    entry.action, entry.reason = "run", "its output failed verification"
                if force:
                    out.rmtree()
                self._start_ray()
                self._prepare(out, entry.key, _jsonable(spec.config), parts)
                self.console.print(f"[bold cyan]▶ {name}[/bold cyan] [dim]({entry.reason})[/dim]")
                index = spec.build(out, entry.key, input_digests)
                if index.get("counters", {}).get("documents_in") == 0:
                    self.console.print(
                        f"  [yellow]⚠ {name}: no input documents, so its output is empty[/yellow]"
                    )
            seconds = time.perf_counter() - start
            tracker.log_counters(index.get("counters", {}))
            tracker.log_datasets(
                [tracker.dataset(k, v.out_dir, index_digest(v.index), v.index) for k, v in inputs.items()],
                [tracker.dataset(name, out, index_digest(index), index)],
            )
            tracker.set_tag("lmforge.cached", str(cached).lower())
            tracker.set_tag("lmforge.plan", f"{entry.action}: {entry.reason}")
            if spec.after is not None:
                spec.after({**index, "out_dir": out})  # the stage's Store
        outcome = StageOutcome(name, out, index, cached, seconds)
        if not cached:
            self.console.print(f"  [green]✓ {name}[/green] in {seconds:.1f}s {report.stage_line(index)}")
        return outcome

    def _start_ray(self) -> None:
        """Start the embedded Ray or connect to the cluster, once, before the first stage that runs; then
        check the stages' tasks and the training worker group against the cluster's resources."""
        if self._on_cluster:
            return
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
            self.console.print(f"[yellow]• {name}: {e}; rebuilding the stage[/yellow]")
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
        if _key_of(out) != key:
            out.rmtree()
        out.remove("index.json")
        out.write_bytes(_KEY_FILE, key.encode())
        out.write_bytes(PARTS_FILE, json.dumps(parts, indent=2, default=str).encode())
        out.write_bytes(report.STAGE_CONFIG, json.dumps(config, indent=2, default=str).encode())

    # -- stages -------------------------------------------------------------------------------------
    def _crawl(self, out: Store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
        """The crawl runs on this machine's disk (its frontiers are SQLite files): in the work dir, or for
        a remote one in a directory of the node cache, uploaded when the crawl ends."""
        cfg = self.cfg
        work = _scratch(out, key)
        with contextlib.ExitStack() as stack:
            crawl_cfg = cfg.crawl
            server = None
            if cfg.demo_site is not None:
                site_args = cfg.demo_site.model_dump(exclude={"port"})
                site = build_demo_site(self.local / "site", seed=cfg.seed, **site_args)
                try:
                    server = stack.enter_context(DemoSiteServer(site.root, port=cfg.demo_site.port))
                except OSError as e:
                    raise ConfigError(
                        f"demo_site.port: cannot serve the demo site on 127.0.0.1:{cfg.demo_site.port} ({e}); "
                        "set demo_site.port to a free port (0: any, at the price of other document ids)"
                    ) from None
                crawl_cfg = crawl_cfg.model_copy(update={"seeds": [server.url, *crawl_cfg.seeds]})
                self.console.print(f"  serving {len(site.pages)} demo pages at {server.url}")
            with StageProgress(self.console, "crawl", "pages", total=crawl_cfg.max_pages) as progress:
                files, counters = run_crawl(
                    crawl_cfg, work, on_progress=progress.update, on_this_node=out.local is None
                )
            if server is not None:
                counters["demo_pages_served"] = sum(
                    1 for path, status in server.served if status == 200 and path != "/robots.txt"
                )
        out.upload(work)
        return write_index(
            out, stage="crawl", kind="warc", cache_key=key, files=files, inputs=inputs, counters=counters
        )

    def _task_ngrams(self, cfg: DecontaminateConfig) -> NgramIndex:
        """The n-grams of every request (context + continuation) of the tasks to decontaminate against."""
        names = cfg.tasks or []  # the config filled them from evaluate.tasks when unset
        index = NgramIndex(cfg.n)
        for name in names:
            task = resolve_task(name)
            index.add(task.name, (c + x for e in task.load() for c, x in e.requests()))
        self.console.print(f"  decontaminating against {len(index)} {cfg.n}-grams of {', '.join(names)}")
        return index

    def _clean(
        self, crawl: StageOutcome | None, out: Store, key: str, inputs: dict[str, str]
    ) -> dict[str, Any]:
        c = self.cfg.clean
        stages = clean_stages(c)
        if c.decontaminate is not None:
            stages.insert(2, Decontaminator(c.decontaminate, self._task_ngrams(c.decontaminate)))
        parts = [
            (Path(f["path"]).name.split(".")[0], warc_source(crawl.store.uri_of(f["path"])))
            for f in (crawl.index["files"] if crawl is not None else [])
        ]
        parts += [
            (f"read-{i:05d}", corpus_source(uri, self.cfg.read))
            for i, uri in enumerate(self.cfg.read.inputs())
        ]
        with StageProgress(self.console, "clean", "input files", total=len(parts)) as progress:
            return run_document_stage(
                "clean",
                stages,
                parts,
                out,
                cache_key=key,
                inputs=inputs,
                on_progress=progress.update,
                on_counts=progress.count,
                **self._task_resources("clean"),
            )

    def _task_resources(self, stage: str) -> dict[str, Any]:
        """``ray.resources.<stage>`` as run_tasks' Ray options and in-flight cap."""
        r = self.cfg.ray.tasks(stage)
        return {"options": r.ray_options(), "max_in_flight": r.max_in_flight}

    def _dedup(self, clean: StageOutcome, out: Store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
        with StageProgress(self.console, "dedup", "tasks") as progress:
            return run_dedup_stage(
                clean.store,
                out,
                self.cfg.dedup,
                cache_key=key,
                inputs=inputs,
                on_progress=lambda phase, done, total: progress.update(done, total, phase),
                **self._task_resources("dedup"),
            )

    def _tokenize(self, docs: StageOutcome, out: Store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
        with StageProgress(self.console, "tokenize", "documents", total=docs.index["rows"]) as progress:
            return run_tokenize_stage(
                docs.store,
                out,
                self.cfg.tokenize,
                cache_key=key,
                inputs=inputs,
                on_counts=progress.count,
                **self._task_resources("tokenize"),
            )

    def _train(
        self, tokens: StageOutcome, out: Store, key: str, inputs: dict[str, str], tracker: Tracker
    ) -> dict[str, Any]:
        cfg = self.cfg.train
        logger = RunMetricsLogger(tracker.tracking_uri, tracker.active_run_id())
        self.console.print(
            f"  {cfg.num_workers} worker(s), ZeRO-{cfg.zero_stage}, {cfg.precision}, {cfg.steps} steps, "
            f"{cfg.tokens_per_step} tokens/step",
            highlight=False,
        )
        from orchestration.training_launch import launch_training

        summary = launch_training(
            cfg,
            tokens.store,
            out,
            run_name=f"{self.cfg.name}-{key}",
            metrics_logger=logger,
            console=self.console,
        )
        files = _model_files(out)
        losses = summary["losses"]
        counters = {
            "steps": summary["steps"],
            "tokens_seen": summary["tokens_seen"],
            "first_loss": losses[0],
            "final_loss": losses[-1],
        }
        return write_index(
            out,
            stage="train",
            kind="model",
            cache_key=key,
            files=files,
            inputs=inputs,
            counters=counters,
            extra={"summary": summary},
        )

    def _evaluate(
        self, tokens: StageOutcome, train: StageOutcome, out: Store, key: str, inputs: dict[str, str]
    ) -> dict[str, Any]:
        task = ray.remote(_evaluate_on_node).options(**self.cfg.ray.tasks("evaluate").ray_options())
        metrics = ray.get(
            task.remote(
                train.store / "model",
                tokens.store,
                self.cfg.evaluate,
                self.cfg.train.seq_len,
                self.cfg.train.objective,
                self.cfg.train.masking,
                self.cfg.train.span_corruption,
            )
        )
        files = [_write_file(out, "metrics.json", json.dumps(metrics, indent=2).encode())]
        counters = {k: v for k, v in metrics.items() if k != "tasks"}
        for name, task in metrics.get("tasks", {}).items():
            counters |= task_metric_names(name, task["metrics"])
        return write_index(
            out,
            stage="evaluate",
            kind="metrics",
            cache_key=key,
            files=files,
            inputs=inputs,
            counters=counters,
        )

    # -- run ----------------------------------------------------------------------------------------
    def run(self, until: str | None = None, selection: Selection | None = None) -> PipelineResult:
        """Run the selected stages (default: all of the config's, or those up to ``until``), reusing
        cached ones, then write the report from the stage manifests. The work dir is this run's alone
        while it runs (core/lock.py): a second run on it is refused, naming this one."""
        preflight(self.cfg)  # the files and services the config names, before the lock is taken
        try:
            with workdir_lock(self.store):
                return self._run(until, selection)
        except WorkdirLocked as e:
            raise ConfigError(str(e)) from None

    def _run(self, until: str | None, selection: Selection | None) -> PipelineResult:
        selection = selection or Selection()
        if until is not None:
            selection = replace(selection, until=until)
        cfg = self.cfg
        self.local.mkdir(parents=True, exist_ok=True)
        # The selection and the outputs it reads, before Ray starts.
        missing = [e for e in self._plan(selection) if e.action == "missing"]  # ("blocked" follows)
        if missing:
            raise ConfigError("; ".join(f"stage {e.stage}: {e.reason}" for e in missing))
        # Ray starts (or is connected to) when the first stage runs: a run whose stages are all cached
        # reads their manifests, logs and reports without a cluster.
        self._on_cluster = False
        # With the default sqlite store, artifacts (models, reports) live beside it: in the work dir, or for
        # a remote work dir in its directory of the node cache.
        from orchestration.tracking import Tracker, code_version

        artifacts = None if cfg.tracking.uri else (self.local / "mlartifacts").as_uri()
        tracker = Tracker(cfg.tracking_uri, cfg.tracking.experiment, artifacts)
        config_hash = cache_key("pipeline", cfg, {})
        self._code = code_version(LMFORGE_VERSION)
        tags = {**self._code, "lmforge.config_hash": config_hash}
        with tracker.pipeline_run(cfg.name, cfg.model_dump(mode="json"), tags) as parent_id:
            result = PipelineResult(self.workdir, cfg.tracking_uri, parent_id)
            record = {"name": cfg.name, "mlflow_run_id": parent_id, "tracking_uri": redact(cfg.tracking_uri)}
            self.store.write_bytes(report.RUN_RECORD, json.dumps(record).encode())
            specs, selected, needed = self._specs(result, tracker, selection, config_hash)
            self._train_selected = "train" in selected
            self._walk(result, tracker, specs, selected, needed, selection.force)
            if "evaluate" in selected:
                self._aliases(result, tracker)
            last = list(result.stages)
            result.report_path = report.write_report(self.store, last)
            tracker.log_artifact(result.report_path)
            tracker.log_artifact(result.report_path.with_suffix(".md"))
            page, figures = write_html_report(self.store, last)
            tracker.log_artifact(page)
            tracker.log_report_figures(figures)
        return result

    def plan(self, selection: Selection | None = None) -> list[PlanEntry]:
        """What :meth:`run` would do with each stage, and why, without running anything (no Ray, no
        MLflow): a stage after one that would run is planned to run too, since its input changes."""
        preflight(self.cfg)
        return self._plan(selection)

    def _plan(self, selection: Selection | None) -> list[PlanEntry]:
        """:meth:`plan` without the pre-flight (``run`` has made it before taking the lock)."""
        result = PipelineResult(self.workdir, self.cfg.tracking_uri, "")
        specs, selected, needed = self._specs(result, None, selection or Selection())
        self._walk(result, None, specs, selected, needed, selection.force if selection else ())
        return result.plan

    def _walk(
        self,
        result: PipelineResult,
        tracker: Tracker | None,
        specs: list[StageSpec],
        selected: list[str],
        needed: list[str],
        force: tuple[str, ...],
    ) -> None:
        for spec in specs:
            if spec.name in needed:
                inputs = {d: result.stages[d] for d in spec.deps}
                result.stages[spec.name] = self._stage(
                    spec, inputs, tracker, result, spec.name in selected, spec.name in force
                )

    def _specs(
        self,
        result: PipelineResult,
        tracker: Tracker | None,
        selection: Selection,
        config_hash: str = "",
    ) -> tuple[list[StageSpec], list[str], list[str]]:
        """The config's stages in order (crawl only with seeds or the demo site, dedup only when
        enabled, fine-tuning last or alone), and which of them ``selection`` runs or reads."""
        cfg, s = self.cfg, result.stages
        specs: list[StageSpec] = []
        if cfg.has_corpus:
            crawls = cfg.demo_site is not None or bool(cfg.crawl.seeds) or cfg.crawl.seeds_file is not None
            if crawls:
                specs.append(
                    StageSpec(
                        "crawl",
                        {"crawl": cfg.crawl, "demo_site": cfg.demo_site, "seed": cfg.seed},
                        (),
                        self._crawl,
                        files=_file_digests({"crawl.seeds_file": cfg.crawl.seeds_file}),
                    )
                )
            blocklist = cfg.clean.url_blocklist
            specs.append(
                StageSpec(
                    "clean",
                    {"clean": cfg.clean, "read": cfg.read, "read_files": cfg.read.fingerprint()},
                    ("crawl",) if crawls else (),
                    lambda o, k, i: self._clean(s.get("crawl"), o, k, i),
                    files=_file_digests({"clean.url_blocklist.path": blocklist and blocklist.path}),
                )
            )
            docs = "clean"
            if cfg.dedup.exact or cfg.dedup.minhash:
                specs.append(
                    StageSpec(
                        "dedup", cfg.dedup, ("clean",), lambda o, k, i: self._dedup(s["clean"], o, k, i)
                    )
                )
                docs = "dedup"
            specs += [
                StageSpec(
                    "tokenize",
                    cfg.tokenize,
                    (docs,),
                    lambda o, k, i: self._tokenize(s[docs], o, k, i),
                    files=_file_digests({"tokenize.tokenizer.path": cfg.tokenize.tokenizer.path}),
                ),
                StageSpec(
                    "train",
                    cfg.train,
                    ("tokenize",),
                    lambda o, k, i: self._train(s["tokenize"], o, k, i, tracker),
                    files=_file_digests({"train.init_from": cfg.train.init_from}),
                    after=lambda index: self._log_model(result, s["tokenize"], tracker, config_hash, index),
                ),
                StageSpec(
                    "evaluate",
                    {"evaluate": cfg.evaluate, "seq_len": cfg.train.seq_len, **self._objective_key()},
                    ("train", "tokenize"),
                    lambda o, k, i: self._evaluate(s["tokenize"], s["train"], o, k, i),
                    after=lambda index: self._log_eval(result, tracker, index),
                ),
            ]
        if cfg.finetune is not None:
            specs += self._finetune_specs(result, tracker)
        order = [spec.name for spec in specs]
        try:
            selected, needed = selection.resolve(order, {x.name: x.deps for x in specs}, report.STAGES)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return specs, selected, needed

    def _aliases(self, result: PipelineResult, tracker: Tracker) -> None:
        """The new registered version gets the default alias, and each promotion alias whose rule passes."""
        cfg = self.cfg.tracking
        if not (cfg.registered_model and result.model_version):
            return
        if cfg.alias:
            tracker.set_alias(cfg.registered_model, cfg.alias, result.model_version)
        for rule in cfg.promote:
            value = result.metrics.get(rule.metric)
            bound = f"> {rule.above}" if rule.above is not None else f"< {rule.below}"
            if value is None:
                verdict = f"not promoted to @{rule.alias}: {rule.metric} was not computed"
            elif rule.passes(value):
                tracker.set_alias(cfg.registered_model, rule.alias, result.model_version)
                verdict = f"promoted to @{rule.alias}: {rule.metric} = {value:.4g} {bound}"
            else:
                verdict = f"not promoted to @{rule.alias}: {rule.metric} = {value:.4g}, needs {bound}"
            tracker.tag_version(
                cfg.registered_model, result.model_version, f"lmforge.promotion.{rule.alias}", verdict
            )
            self.console.print(f"[bold]model[/bold] {cfg.registered_model}/{result.model_version} {verdict}")

    def _log_model(
        self,
        result: PipelineResult,
        tokens: StageOutcome,
        tracker: Tracker,
        config_hash: str,
        index: dict[str, Any],
    ) -> None:
        """Log (and register) the trained model in MLflow once; a cached stage reuses the logged model
        wherever this store holds it (a work dir copied with its store, or reached by another URI, logs
        and registers nothing new: a stage that did not run adds no model version)."""
        cfg, out = self.cfg, index["out_dir"]
        record = out.read_json(report.MODEL_RECORD)
        if record.get("model_id") and tracker.find_model(record["model_id"]):
            result.model_id, result.model_version = record["model_id"], record["version"]
            return
        model_tags = {
            "lmforge.shards_digest": index_digest(tokens.index),
            "lmforge.tokenizer_id": tokens.index["tokenizer"]["id"],
            "lmforge.config_hash": config_hash,
            **self._code,
            "lmforge.train_cache_key": index["cache_key"],
        }
        for step, where in _checkpoints(out):
            tracker.log_checkpoint(f"{cfg.name}-checkpoint", step, where, model_tags)
        result.model_id, result.model_version = tracker.log_model(
            local_copy(out, "model"),
            f"{cfg.name}-model",
            {"train": cfg.train.model_dump(mode="json")},
            model_tags,
            step=cfg.train.steps,
            register_as=cfg.tracking.registered_model,
            model_type=MODEL_TYPES[cfg.train.objective],
        )
        record = {
            "tracking_uri": redact(tracker.tracking_uri),
            "model_id": result.model_id,
            "version": result.model_version,
        }
        out.write_bytes(report.MODEL_RECORD, json.dumps(record).encode())

    def _objective_key(self) -> dict[str, Any]:
        """What of the training objective the evaluation depends on (none of it for causal LMs, whose
        cached evaluations stay valid)."""
        train = self.cfg.train
        if train.objective == "causal_lm":
            return {}
        return {
            "objective": train.objective,
            "masking": train.masking,
            "span_corruption": train.span_corruption,
        }

    def _log_eval(self, result: PipelineResult, tracker: Tracker, index: dict[str, Any]) -> None:
        """The evaluation's metrics against the logged model: the held-out ones with the token shards as
        their dataset, each task's with the task's data (by its digest)."""
        tokens = result.stages["tokenize"]
        tokens_dataset = tracker.dataset("tokens", tokens.out_dir, index_digest(tokens.index), tokens.index)
        metrics = index["out_dir"].read_json("metrics.json")
        tasks = metrics.pop("tasks", {})
        # A rerun served from the cache has logged these against this model already: log only what
        # the model lacks (all of it after a fresh evaluation, the rest after an interrupted one).
        logged = tracker.model_metric_keys(result.model_id)
        result.metrics = {f"val_{k}": v for k, v in metrics.items() if k not in ("tokens", "bytes")}
        fresh = {k: v for k, v in result.metrics.items() if k not in logged}
        tracker.log_model_metrics(fresh, result.model_id, tokens_dataset)
        for name, task in tasks.items():
            dataset = tracker.dataset(name, task["source"], task["digest"][:16])
            tracker.log_datasets([dataset], [])
            scores = task_metric_names(name, task["metrics"])
            tracker.log_model_metrics(
                {k: v for k, v in scores.items() if k not in logged}, result.model_id, dataset
            )
            result.metrics |= scores

    # -- fine-tuning --------------------------------------------------------------------------------
    def _finetune_specs(self, result: PipelineResult, tracker: Tracker | None) -> list[StageSpec]:
        """The labeled stage (keyed by the labeled files' content) and the fine-tuning stage (keyed by
        its base model: ``init_from``'s content, or the train stage's output)."""
        ft, s = self.cfg.finetune, result.stages
        sources = [ft.data.path] if ft.data.path else list(ft.data.splits.values())
        files = {"finetune.data": _tree_digest(sources)}
        if ft.init_from:
            files["finetune.init_from"] = _tree_digest([ft.init_from])
        return [
            StageSpec(
                "labeled",
                {"data": ft.data, "task": ft.task},
                (),
                self._labeled,
                files={"finetune.data": files["finetune.data"]},
            ),
            StageSpec(
                "finetune",
                {"finetune": ft},
                ("labeled",) if ft.init_from else ("labeled", "train"),
                lambda o, k, i: self._finetune(s["labeled"], o, k, i, tracker, result),
                files={k: v for k, v in files.items() if k == "finetune.init_from"},
                after=lambda index: self._log_finetuned(result, s["labeled"], tracker, index),
            ),
        ]

    def _labeled(self, out: Store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
        """The labeled examples, split, as one Parquet file per split: their own manifest and dataset."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from training.labeled import label_names, load_labeled

        ft = self.cfg.finetune
        tables, features, rejected = load_labeled(ft.data, ft.task)
        names = label_names(ft.data, tables["train"], features, ft.task)
        files, counters = [], {}
        for split, table in tables.items():
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            files.append(_write_file(out, f"{split}.parquet", sink.getvalue().to_pybytes(), table.num_rows))
            counters[f"examples.{split}"] = table.num_rows
        # The rows left out, with the reason: in = kept + rejected, as for documents.
        sink = pa.BufferOutputStream()
        pq.write_table(rejected, sink)
        reject_file = _write_file(
            out / REJECTED_DIR, "rows.parquet", sink.getvalue().to_pybytes(), rejected.num_rows
        )
        write_index(out / REJECTED_DIR, stage="labeled", kind="rejected", cache_key=key, files=[reject_file],
                    schema=rejected.schema)  # fmt: skip
        kept = sum(t.num_rows for t in tables.values())
        counters |= {"examples_in": kept + rejected.num_rows, "kept": kept, "rejected": rejected.num_rows}
        for reason in rejected.column("reason").to_pylist():
            counters[f"rejected.{reason}"] = counters.get(f"rejected.{reason}", 0) + 1
        left_out = f" ({rejected.num_rows} rows left out: no text or no label)" if rejected.num_rows else ""
        self.console.print(
            f"  {', '.join(f'{t.num_rows} {s}' for s, t in tables.items())} examples{left_out}",
            highlight=False,
        )
        return write_index(
            out,
            stage="labeled",
            kind="labeled",
            cache_key=key,
            files=files,
            schema=tables["train"].schema,
            inputs=inputs,
            counters=counters,
            extra={"label_names": names, "task": ft.task},
        )

    def _finetune_config(self, labeled: StageOutcome, base: str):
        """The run's fine-tuning config reading the labeled stage's splits from the base model ``base``."""
        ft = self.cfg.finetune
        splits = {
            f["path"].removesuffix(".parquet"): labeled.store.uri_of(f["path"])
            for f in labeled.index["files"]
        }
        data = ft.data.model_copy(
            update={"path": None, "splits": splits, "label_names": labeled.index["label_names"] or None}
        )
        base = base if "://" in base else str(Path(base).resolve())
        return ft.model_copy(update={"init_from": base, "data": data})

    def _finetune(
        self,
        labeled: StageOutcome,
        out: Store,
        key: str,
        inputs: dict[str, str],
        tracker: Tracker,
        result: PipelineResult,
    ) -> dict[str, Any]:
        base = self.cfg.finetune.init_from or result.stages["train"].store.uri_of("model")
        ft = self._finetune_config(labeled, base)
        self.console.print(
            f"  {ft.task} from {base}, {ft.num_workers} worker(s), ZeRO-{ft.zero_stage}, {ft.steps} steps",
            highlight=False,
        )
        from orchestration.training_launch import launch_finetuning

        logger = RunMetricsLogger(tracker.tracking_uri, tracker.active_run_id())
        summary = launch_finetuning(
            ft, out, run_name=f"{self.cfg.name}-finetune-{key}", metrics_logger=logger, console=self.console
        )
        evaluate = ray.remote(_evaluate_finetuned_on_node)
        metrics = ray.get(evaluate.options(**self.cfg.ray.tasks("finetune").ray_options()).remote(out, ft))
        files = _model_files(out)
        files.append(_write_file(out, "metrics.json", json.dumps(metrics, indent=2).encode()))
        counters = {
            "steps": summary["steps"],
            "first_loss": summary["losses"][0],
            "final_loss": summary["losses"][-1],
        }
        counters |= {f"{split}_{k}": v for split, m in metrics.items() for k, v in _numbers(m).items()}
        return write_index(
            out, stage="finetune", kind="model", cache_key=key, files=files, inputs=inputs, counters=counters,
            extra={"summary": summary, "base_model": base},
        )  # fmt: skip

    def _log_finetuned(
        self, result: PipelineResult, labeled: StageOutcome, tracker: Tracker, index: dict[str, Any]
    ) -> None:
        """The fine-tuned model as a LoggedModel whose lineage names its base and the labeled data's digest;
        its metrics per split against that dataset, the confusion matrices as tables and figures."""
        out, ft = index["out_dir"], self.cfg.finetune
        record = out.read_json(report.MODEL_RECORD)
        if record.get("model_id") and tracker.find_model(record["model_id"]):
            result.finetuned_model_id = record["model_id"]
            return
        labeled_digest = index_digest(labeled.index)
        tags = {
            **self._code,
            "lmforge.labeled_digest": labeled_digest,
            "lmforge.finetune_cache_key": index["cache_key"],
        }
        if ft.init_from:
            tags["lmforge.base_model_path"] = str(Path(ft.init_from).resolve())
            tags["lmforge.base_model_digest"] = _tree_digest([ft.init_from])
        else:
            tags["lmforge.base_model_id"] = result.model_id or ""
            if result.model_version:
                tags["lmforge.base_model_version"] = (
                    f"{self.cfg.tracking.registered_model}/{result.model_version}"
                )
        model_type = "seq2seq-lm" if ft.task == "seq2seq" else "sequence-classification"
        model_id, _ = tracker.log_model(
            local_copy(out, "model"), f"{self.cfg.name}-finetuned", {"finetune": ft.model_dump(mode="json")},
            tags, step=ft.steps, register_as=None, model_type=model_type,
        )  # fmt: skip
        result.finetuned_model_id = model_id
        dataset = tracker.dataset("labeled", labeled.out_dir, labeled_digest, labeled.index)
        metrics = out.read_json("metrics.json")
        for split, m in metrics.items():
            tracker.log_model_metrics({f"{split}_{k}": v for k, v in _numbers(m).items()}, model_id, dataset)
            if "confusion_matrix" in m:
                tracker.log_confusion_matrix(
                    m["confusion_matrix"], m.get("label_names", []), f"finetune/{split}_confusion"
                )
        record = {"tracking_uri": redact(tracker.tracking_uri), "model_id": model_id}
        out.write_bytes(report.MODEL_RECORD, json.dumps(record).encode())


def _key_of(out: Store) -> str | None:
    """The key of the run that last prepared a stage output (finished or not), if any."""
    try:
        return out.read_text(_KEY_FILE)
    except (FileNotFoundError, NotADirectoryError):
        return None


def _scratch(out: Store, key: str) -> Path:
    """This machine's directory for a stage that works on a local disk: the output itself, or for a remote
    one a node-cache directory, kept for a resumed run of the same key and emptied for any other."""
    if out.local is not None:
        return out.local
    work = node_dir(out, "stages")
    if not (work / _KEY_FILE).is_file() or (work / _KEY_FILE).read_text() != key:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / _KEY_FILE).write_text(key)
    return work


def _write_file(out: Store, name: str, data: bytes, rows: int = 0) -> dict[str, Any]:
    """Write one small file of a stage output; its manifest entry."""
    out.write_bytes(name, data)
    return {"path": name, "rows": rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _model_files(out: Store) -> list[dict[str, Any]]:
    """The manifest entries of the exported model under ``out/model`` (read from a local copy)."""
    model_dir = local_copy(out, "model")
    return [
        {**file_entry(p, 0), "path": f"model/{p.name}"} for p in sorted(model_dir.iterdir()) if p.is_file()
    ]


def _checkpoints(out: Store) -> list[tuple[int, Path | str]]:
    """(step, where) of each checkpoint of a training output: DeepSpeed's directories in a local work
    dir; in a remote one, those Ray Train uploaded (training/engine.py's ``step<N>`` names)."""
    if out.local is not None:
        found = [p for p in (out.local / "checkpoints").glob("step*") if p.is_dir()]
        return sorted((int(p.name[4:]), p) for p in found if p.name[4:].isdigit())
    dirs = {
        "/".join(parts[: i + 1])
        for parts in (name.split("/") for name in out.files("ray_train"))
        for i, part in enumerate(parts[:-1])
        if part.startswith("step") and part[4:].isdigit()
    }
    return sorted((int(d.rsplit("/", 1)[-1][4:]), out.uri_of(d)) for d in dirs)


def _evaluate_on_node(model: Store, tokens: Store, *args: Any) -> dict[str, Any]:
    """evaluate_model_dir on local copies of the model and the token shards (themselves when local)."""
    from evaluation.perplexity import evaluate_model_dir

    return evaluate_model_dir(str(local_copy(model)), str(local_copy(tokens)), *args)


def _evaluate_finetuned_on_node(out: Store, ft: Any) -> dict[str, Any]:
    """evaluate_finetuned on local copies of the fine-tuned model and of the labeled splits."""
    from evaluation.finetuned import evaluate_finetuned

    data = ft.data.model_copy(update={"splits": {k: str(local_file(v)) for k, v in ft.data.splits.items()}})
    return evaluate_finetuned(str(local_copy(out, "model")), ft.model_copy(update={"data": data}))


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _inputs(names: list[str]) -> str:
    return f"its input {names[0]} is" if len(names) == 1 else f"its inputs {' and '.join(names)} are"


def _file_digests(fields: dict[str, Any]) -> dict[str, str]:
    """The content digest of each file or directory a config field names (unset fields left out)."""
    return {name: _tree_digest([str(path)]) for name, path in fields.items() if path is not None}


def _tree_digest(paths: list[str]) -> str:
    """sha256 over the files under ``paths`` (names and contents): keys a stage by what the files hold."""
    h = hashlib.sha256()
    for root in paths:
        root_path = resolve_path(root)
        files = sorted(f for f in root_path.rglob("*") if f.is_file()) if root_path.is_dir() else [root_path]
        for f in files:
            h.update(
                f"{f.relative_to(root_path) if root_path.is_dir() else f.name}\0{file_sha256(f)}\n".encode()
            )
    return h.hexdigest()[:16]


def run_pipeline(
    config: PipelineConfig,
    console: Console | None = None,
    until: str | None = None,
    selection: Selection | None = None,
) -> PipelineResult:
    """Run a pipeline config end to end (or the stages ``selection`` picks, or those up to ``until``)."""
    return Pipeline(config, console).run(until, selection)
