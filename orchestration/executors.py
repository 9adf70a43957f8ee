"""Run stages on Ray: one task per input partition, outputs written atomically with completion markers."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from core.files import write_parquet
from core.manifest import ManifestError, write_index
from core.quarantine import FAULT_RETRIES, InfrastructureFault, Quarantine
from core.schema import DOCUMENT_SCHEMA, REJECTED_SCHEMA, document_id, document_table
from core.stage import Stage, StageContext, run_chain
from core.storage import Store, open_input_file
from core.tasks import DONE_DIR, STAGING_DIR, TaskFn, TaskId, read_marker, run_task
from ingestion.readers import (
    CorruptInputError,
    Malformed,
    ReadConfig,
    ReadReport,
    decode_utf8,
    read_corpus,
    read_warc,
)
from orchestration.stage_files import REJECTED_DIR

# Set by `lmforge submit` in the job's environment: the job already ships the repository as its working dir,
# and a driver inside a job may not pass a runtime_env of its own.
IN_JOB_ENV = "LMFORGE_IN_RAY_JOB"


#: Longest Ray temp dir kept under the work dir: Ray's Unix sockets live below it, and a socket path may
#: not exceed 107 bytes. The longest is TEMP/session_YYYY-MM-DD_HH-MM-SS_ffffff_PID/sockets/plasma_store:
#: 64 bytes past TEMP with a 7-digit pid (Linux's largest pid_max).
_MAX_RAY_TEMP = 43


def ensure_ray(
    address: str | None,
    num_cpus: int | None,
    object_store_memory_mb: int,
    dashboard: bool = True,
    workdir: Path | None = None,
) -> None:
    """Connect to a cluster, or start an embedded Ray with a capped object store and no dashboard.

    An embedded Ray keeps its session files (and its workers' temporary files) under ``workdir/.ray``
    when that path is short enough for Ray's sockets, else in a private temporary directory that is
    removed when the process exits: nothing is left behind in /tmp.
    """
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
        return
    temp = _embedded_temp_dir(workdir)
    (temp / "tmp").mkdir(parents=True, exist_ok=True)
    _private_auth_token(temp)
    # Ray's own processes and its workers inherit this: their temporary files (multiprocessing's pymp-*
    # directories...) stay with the session files.
    os.environ["TMPDIR"] = str(temp / "tmp")
    # One node, started and stopped by this run: nothing drains it, so Ray Train's preemption watcher (an
    # actor process per training run, polling every 5 s, with error lines at shutdown) has nothing to watch.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=object_store_memory_mb * 2**20,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        _temp_dir=str(temp),
    )
    # Whatever in the run looks for "the" cluster later finds this one, never a guess among the machine's
    # Ray instances (another user's, another run's: "ConnectionError: Found multiple active Ray instances"
    # from Ray Train's placement-group cleaner). This process: RAY_ADDRESS. Ray's own processes, started
    # with TMPDIR above, read the address file Ray keeps in the default temp dir (TMPDIR/ray).
    address = ray.get_runtime_context().gcs_address
    os.environ["RAY_ADDRESS"] = address
    (temp / "tmp" / "ray").mkdir(exist_ok=True)
    (temp / "tmp" / "ray" / "ray_current_cluster").write_text(address)


def _private_auth_token(temp: Path) -> None:
    """Give the embedded cluster a token of its own, readable by this user only and removed at exit.

    Ray 2.60 turns token authentication on for a new local cluster and keeps the token in
    ``~/.ray/auth_token`` (mode 0644: any local user could read it and submit work). Ray's processes and
    this driver read the token from ``RAY_AUTH_TOKEN_PATH``; they inherit the environment set here.
    """
    path = temp / f"auth_token-{os.getpid()}"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the path
    # The token mode and the token are cached when ray is imported: read them again.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    atexit.register(_remove_after_shutdown, path)


def _embedded_temp_dir(workdir: Path | None) -> Path:
    if workdir is not None and len(str(workdir.resolve() / ".ray")) <= _MAX_RAY_TEMP:
        return workdir.resolve() / ".ray"
    temp = Path(tempfile.mkdtemp(prefix="lmforge-ray-"))
    atexit.register(_remove_after_shutdown, temp)
    return temp


def _remove_after_shutdown(path: Path) -> None:
    if ray.is_initialized():
        ray.shutdown()
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Source:
    """A partition's documents, read inside its task: a crawl WARC file, or a stored corpus in any format
    ``read_corpus`` knows (with ``read``). ``origin`` ('crawl' or 'read') is counted in the stage's
    ``documents_in.<origin>``; reader counters (``malformed``...) go to the stage counters."""

    origin: str
    uri: str
    read: ReadConfig | None = None

    def batches(self, ctx: StageContext) -> Iterable[pa.RecordBatch]:
        if self.origin == "dataset":
            return _dataset_batches(self.uri)
        report = ReadReport(counters=ctx.counters, sink=partial(reject_malformed, ctx))
        if self.read is None:
            return read_warc(self.uri, report=report)
        r = self.read
        fields = {"text_field": r.text_field, "id_field": r.id_field, "url_field": r.url_field}
        return read_corpus(self.uri, r.batch_size, report, **fields)


def reject_malformed(ctx: StageContext, record: Malformed) -> None:
    """A record no document could be made of, into the rejected dataset: its raw bytes (a prefix) as the
    text, its place (``file#line 6``) as the URL, an id from both, the error as the signal."""
    text, _ = decode_utf8(record.raw)
    place = f"{record.source}#{record.where}"  # e.g. dump.jsonl#line 6
    doc = document_table([text], ids=[document_id(place, record.raw)], urls=[place], source=record.source)
    ctx.reject(doc, filter="malformed", signal=record.error)


def warc_source(path: str) -> Source:
    """A WARC file of the crawl as a stage source."""
    return Source("crawl", path)


def corpus_source(uri: str, read: ReadConfig) -> Source:
    """A stored corpus as a stage source."""
    return Source("read", uri, read)


def dataset_source(uri: str) -> Source:
    """A Parquet file of a committed documents dataset (another stage's output) as a stage source."""
    return Source("dataset", uri)


def _dataset_batches(uri: str, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
    with open_input_file(uri) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size):
            yield batch.cast(DOCUMENT_SCHEMA) if batch.schema != DOCUMENT_SCHEMA else batch


#: Errors a task raises about a user's input (they name the file or field and the fix), re-raised as
#: they are instead of inside a Ray traceback.
USER_ERRORS = (CorruptInputError, ManifestError, FileNotFoundError)


def document_task(
    staging: Path, stages: list[Stage], source: Source, part: str, stage_name: str
) -> dict[str, Any]:
    """One partition through a chain of stages: kept documents and rejected ones, each with the reason.

    A document that makes a stage raise is quarantined, not retried forever and not dropped: the partition
    is run again one document at a time, and each document that raises goes to the rejected dataset
    (``filter: quarantined``, the traceback as its ``signal``). Errors about the input files themselves
    (USER_ERRORS) still stop the stage.
    """
    ctx = StageContext(stage_name)
    kept_path = staging / f"{part}.parquet"
    try:
        kept = write_parquet(
            kept_path, run_chain(stages, _counting(source.batches(ctx)), ctx), DOCUMENT_SCHEMA
        )
    except USER_ERRORS:
        raise
    except Exception:
        ctx = StageContext(stage_name)
        restart_count()
        kept = write_parquet(
            kept_path, _isolating(stages, _counting(source.batches(ctx)), ctx, part), DOCUMENT_SCHEMA
        )
    rejected = write_parquet(staging / REJECTED_DIR / f"{part}.parquet", ctx.rejected, REJECTED_SCHEMA)
    return {"kept": kept, "rejected": rejected, "counters": dict(ctx.counters)}


def _counting(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """The batches as they are, each counted as documents read (the progress bar's documents)."""
    for batch in batches:
        count(documents=batch.num_rows)
        yield batch


def _isolating(
    stages: list[Stage], batches: Iterable[pa.RecordBatch], ctx: StageContext, part: str
) -> Iterable[pa.RecordBatch]:
    """The chain over one document at a time; a document it raises on is quarantined with the traceback,
    unless the machine is at fault (core/quarantine.py): the last document that went through is run again
    to tell."""
    quarantine = Quarantine(ctx.stage, part)

    def again(doc: pa.RecordBatch) -> Callable[[], object]:
        return lambda: list(run_chain(stages, [doc], StageContext(ctx.stage, ctx.rank, ctx.world_size)))

    for batch in batches:
        for i in range(batch.num_rows):
            doc = batch.slice(i, 1)
            one = StageContext(ctx.stage, ctx.rank, ctx.world_size)
            try:
                out = list(run_chain(stages, [doc], one))
            except USER_ERRORS:
                raise
            except Exception as e:
                trace = quarantine.crashed(doc.column("id")[0].as_py(), e, retry=again(doc))
                ctx.counters[f"{stages[0].name}.in"] += 1
                ctx.counters["quarantined"] += 1
                if "html" in doc.schema.names:  # before extraction: its raw HTML is what is kept
                    doc = doc.rename_columns(["text" if n == "html" else n for n in doc.schema.names])
                ctx.reject(doc, filter="quarantined", signal=trace)
                continue
            quarantine.passed(retry=again(doc))
            ctx.counters.update(one.counters)
            ctx.rejected += one.rejected
            yield from out
    quarantine.finish()


#: How often a running task sends what it has done so far (documents, tokens) to the driver.
REPORT_EVERY_S = 0.5


@ray.remote(num_cpus=0)
class _Tally:
    """The latest counts of each running task, per run_tasks call, for the driver's progress."""

    def __init__(self) -> None:
        self.live: dict[str, dict[str, dict[str, int]]] = {}

    def put(self, scope: str, task: str, counts: dict[str, int]) -> None:
        self.live.setdefault(scope, {})[task] = counts

    def read(self, scope: str) -> dict[str, dict[str, int]]:
        return self.live.get(scope, {})

    def drop(self, scope: str) -> None:
        self.live.pop(scope, None)


_TALLY: tuple[str, Any] | None = None  # (Ray job id, the driver's tally actor)


def _tally() -> Any:
    """This driver's tally actor (one per Ray job: a new ray.init gets a new one)."""
    global _TALLY
    job = ray.get_runtime_context().get_job_id()
    if _TALLY is None or _TALLY[0] != job:
        _TALLY = (job, _Tally.remote())
    return _TALLY[1]


class _TaskCounts:
    """What the task running in this worker has done so far, sent to the tally at most every
    REPORT_EVERY_S (fire and forget); its total goes into the task's result (_on_node)."""

    def __init__(self, tally: Any, scope: str, task: str):
        self.tally, self.scope, self.task = tally, scope, task
        self.counts: Counter[str] = Counter()
        self._sent = time.monotonic()

    def add(self, counts: dict[str, int]) -> None:
        self.counts.update(counts)
        if time.monotonic() - self._sent >= REPORT_EVERY_S:
            self._sent = time.monotonic()
            self.tally.put.remote(self.scope, self.task, dict(self.counts))


_COUNTS: _TaskCounts | None = None  # the running task's, in a worker (one task at a time)


def count(**counts: int) -> None:
    """Add to what the running task has done (documents, tokens), for the driver's progress bar. Outside
    a task that reports, it does nothing."""
    if _COUNTS is not None:
        _COUNTS.add(counts)


def restart_count() -> None:
    """The running task starts over (a partition run again one document at a time): its counts restart."""
    if _COUNTS is not None:
        _COUNTS.counts.clear()


@ray.remote(num_cpus=1, max_retries=FAULT_RETRIES, retry_exceptions=[InfrastructureFault])
def _remote_task(
    fn: TaskFn, task: TaskId, root: str, markers: str, args: tuple, tally: tuple[Any, str] | None = None
) -> dict[str, Any]:
    # Ray ships this function by value (the module's name holds the remote wrapper), so the module's
    # globals are set in a function it ships by reference.
    return _run_counted(fn, task, root, markers, args, tally)


def _run_counted(
    fn: TaskFn, task: TaskId, root: str, markers: str, args: tuple, tally: tuple[Any, str] | None
) -> dict[str, Any]:
    global _COUNTS
    _COUNTS = _TaskCounts(tally[0], tally[1], task.name) if tally is not None else None
    try:
        return run_task(
            partial(_on_node, fn, ray.get_runtime_context().get_node_id()), task, root, markers, *args
        )
    finally:
        _COUNTS = None


def _on_node(fn: TaskFn, node: str, staging: Path, *args: Any) -> dict[str, Any]:
    """``fn``'s result with the Ray node that ran it and what it counted (in the task's marker)."""
    result = fn(staging, *args)
    if isinstance(result, dict):
        result["node"] = node
        if _COUNTS is not None:
            result["counted"] = dict(_COUNTS.counts)
    return result


def run_tasks(
    root: str | Path | Store,
    tasks: list[TaskId],
    plan: Callable[[TaskId], tuple[TaskFn, tuple]],
    on_progress: Callable[[int, int], None] | None = None,
    max_in_flight: int | None = None,
    markers: str | Path | Store | None = None,
    options: dict[str, Any] | None = None,
    on_counts: Callable[[dict[str, int]], None] | None = None,
) -> dict[TaskId, dict[str, Any]]:
    """Results of every task: read from its completion marker if a previous run finished it, else from
    running ``fn(staging, *args)`` for ``(fn, args) = plan(task)`` as a Ray task (with Ray ``options``:
    num_cpus, num_gpus, memory), committed under ``root`` by the runner (core/tasks.py), marker in
    ``markers`` (default ``root/_done``). At most ``max_in_flight`` tasks are submitted at once (default:
    twice the cluster's CPUs), so a stage of many partitions never queues them all. Progress is reported
    as tasks end (``on_progress(done, total)``) and, with ``on_counts``, every REPORT_EVERY_S with what
    the tasks have ``count()``-ed so far: the finished tasks' totals and the running ones' latest reports."""
    root = Store(root)
    markers = Store(markers) if markers is not None else root / DONE_DIR
    if max_in_flight is None:
        max_in_flight = max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    remote = _remote_task.options(**options) if options else _remote_task
    finished = {task: read_marker(markers, task) for task in tasks}
    results: dict[TaskId, dict[str, Any]] = {t: r for t, r in finished.items() if r is not None}
    todo = [t for t in tasks if t not in results]
    if on_progress:
        on_progress(len(results), len(tasks))
    tally = (_tally(), uuid.uuid4().hex) if on_counts else None
    if on_counts:
        on_counts(_counted(results, set(), {}))
    pending: dict[ray.ObjectRef, TaskId] = {}
    todo.reverse()
    try:
        while todo or pending:
            while todo and len(pending) < max_in_flight:
                task = todo.pop()
                fn, args = plan(task)
                pending[remote.remote(fn, task, root.uri, markers.uri, args, tally)] = task
            done, _ = ray.wait(list(pending), num_returns=1, timeout=REPORT_EVERY_S if tally else None)
            if done:
                results[pending.pop(done[0])] = _result(done[0])
            if tally:  # first the counts, then the task count: a line printed at the end has both
                live = ray.get(tally[0].read.remote(tally[1]))
                on_counts(_counted(results, {t.name for t in pending.values()}, live))
            if done and on_progress:
                on_progress(len(results), len(tasks))
    finally:
        if tally:
            tally[0].drop.remote(tally[1])
    if root.local is not None:
        shutil.rmtree(root.local / STAGING_DIR, ignore_errors=True)  # what killed tasks left
    return results


def _result(ref: ray.ObjectRef) -> dict[str, Any]:
    """A finished task's result. A user error names the file and the fix, a fault its cause (after Ray's
    retries): either is raised as it is, not wrapped in Ray's traceback."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, (*USER_ERRORS, InfrastructureFault)):
            raise e.cause from None
        raise


def _counted(
    results: dict[TaskId, dict[str, Any]], running: set[str], live: dict[str, dict[str, int]]
) -> dict[str, int]:
    """The finished tasks' counts (in their results) plus the running tasks' latest reports."""
    total: Counter[str] = Counter()
    for result in results.values():
        total.update(result.get("counted", {}))
    for name in running:
        total.update(live.get(name, {}))
    return dict(total)


def run_document_stage(
    stage_name: str,
    stages: list[Stage] | Callable[[str], list[Stage]],
    partitions: list[tuple[str, Source]],
    out_dir: str | Path,
    *,
    cache_key: str,
    inputs: dict[str, str],
    on_progress: Callable[[int, int], None] | None = None,
    options: dict[str, Any] | None = None,
    max_in_flight: int | None = None,
    on_counts: Callable[[dict[str, int]], None] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Map a chain of stages (or each partition's, ``stages(part)``, all starting with the same stage)
    over partitions as Ray tasks; skip partitions already completed. With ``on_counts``, the documents
    read so far are reported as the tasks run; ``extra`` goes to the index.

    Writes the kept dataset's index (with the rejected dataset's index beside it under ``rejected/``)
    after checking that every input document is either kept or rejected.
    """
    out = Store(out_dir)
    sources = dict(partitions)
    chain = stages if callable(stages) else (lambda part: stages)
    results = run_tasks(
        out,
        [TaskId(part=part) for part in sources],
        lambda task: (document_task, (chain(task.part), sources[task.part], task.part, stage_name)),
        on_progress,
        max_in_flight,
        options=options,
        on_counts=on_counts,
    )
    first = chain(partitions[0][0])[0].name if partitions else ""
    counters = _document_counters(stage_name, first, results, {p: s.origin for p, s in partitions})
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
        counters=counters,
        extra=extra,
    )


def _document_counters(
    stage_name: str, first: str, results: dict[TaskId, dict[str, Any]], origins: dict[str, str]
) -> dict[str, int]:
    """A document stage's counters summed over its tasks, with documents in (by origin), kept and rejected,
    after checking that every document in was kept or rejected (``first``: the chain's first stage)."""
    counters: Counter = Counter()
    for task, r in results.items():
        counters.update(r["counters"])
        read = r["counters"].get(f"{first}.in", 0) + r["counters"].get("malformed", 0)
        counters[f"documents_in.{origins[task.part]}"] += read
    kept = sum(r["kept"]["rows"] for r in results.values())
    rejected = sum(r["rejected"]["rows"] for r in results.values())
    # Records the readers could not make documents of are in the rejected dataset too.
    docs_in = counters.get(f"{first}.in", 0) + counters.get("malformed", 0)
    if docs_in != kept + rejected:
        raise RuntimeError(
            f"stage {stage_name}: {docs_in} documents in but {kept} kept + {rejected} rejected; documents were lost"
        )
    counters.update({"documents_in": docs_in, "kept": kept, "rejected": rejected})
    return dict(counters)
