"""Exact and MinHash-LSH deduplication as Ray tasks: no process ever holds every signature.

1. map, one task per input partition (row ranges, as for tokenization): shingle hashes, signatures, the
   LSH band keys and the exact-text hash of each document. It writes its documents' ids and lengths, its
   shingle hashes (and signatures) as memory-mappable arrays, and its (band, key, node) rows split into
   ``shards`` files by key, so each reduce task reads only its share. A node is
   ``partition << 32 | row``.
   Then one task per id-hash shard finds documents whose id an earlier one already has: they are
   removed (``duplicate_id``, the first in corpus order stays) and take no part in what follows.
2. reduce, one task per key shard: sort its rows by (band, key); documents sharing a bucket are candidate
   pairs, written split by the verify shard that owns each pair. Then verify, one task per pair shard:
   each pair once (a near duplicate shares most bands, so most key shards find it), exact-text buckets
   (band -1) are duplicates when all 128 bits of the text hash agree; others are verified by exact
   Jaccard of their shingle sets (or the signatures' estimate), read from the map outputs for just those
   nodes, by ``pread`` (a memory map would keep the pages it touched resident). It writes the verified
   edges, split by the shard that owns each node.
3. components, ``shards`` tasks a step: alternating large-star and small-star steps (Kiveris et al.,
   2014), each task owning the nodes of one hash shard and passing the new edges on by owner, until
   every component is a star around its smallest node (O(log^2 n) steps; a handful in practice).
4. decide, one task per root shard: the survivor of each component by the keep rule, the decisions for
   its removed members, and the cluster table rows (``clusters.parquet``: representative, size, members).
5. apply, one task per partition: writes kept documents and the removed ones with ``duplicate_of``
   (the survivor), ``value`` (best similarity in the cluster) and the filter that removed them
   (``exact_dedup`` when another member of the cluster has the same normalized text, else
   ``minhash_dedup``).

No task holds more than its shard of the signatures, bucket rows or graph; the driver only gathers the
cluster table, which is the stage's output. Every phase leaves completion markers: a killed stage
resumes from the finished tasks. The output depends on the documents and the config only (the partition
plan comes from the files and ``partition_mb``).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cleaning.dedup_phases import (
    CLUSTER_SCHEMA,
    EMPTY_COPIES,
    EMPTY_DECISIONS,
    DedupConfig,
    apply_decisions,
    best_similarity,
    candidate_pairs,
    decide_clusters,
    id_collisions,
    repeated_spans,
    root_shards,
    signatures,
    star_step,
    step_edges,
    verified_edges,
)
from core.files import save_npy, write_ipc, write_parquet
from core.manifest import dataset_files, write_index
from core.partitions import Partition, plan_partitions
from core.quarantine import Quarantine
from core.schema import DOCUMENT_SCHEMA, REJECTED_SCHEMA
from core.stage import StageContext
from core.storage import Store, read_arrow
from core.tasks import DONE_DIR, TaskId
from orchestration.executors import REJECTED_DIR, USER_ERRORS, run_tasks

WORK = "_work"
CLUSTERS = "clusters.parquet"
MAX_STAR_STEPS = 200

# Each task reads the committed files of earlier phases under out/_work and writes its own under
# staging/_work (the runner moves them into place): ``out`` is where it reads, ``staging`` where it writes.


def _shard_files(directory: Path, prefix: str, tables: list[pa.Table]) -> None:
    for shard, table in enumerate(tables):
        write_ipc(directory / f"{prefix}-{shard:04d}.arrow", table)


def _map_task(staging: Path, index: int, part: Partition, cfg: DedupConfig) -> dict[str, Any]:
    columns = ["id", "text"] + (["meta"] if cfg.keep_rule()[1] else [])
    poison: dict[int, str] = {}
    try:
        sig = signatures(part.batches(columns), index, cfg)
    except USER_ERRORS:
        raise
    except Exception:  # find the documents it raises on; the partition is deduplicated without them
        poison = _poison_rows(part.batches(columns), index, cfg, Quarantine("dedup", part.name))
        sig = signatures(_without(part.batches(columns), poison), index, cfg)
    work = staging / WORK
    write_ipc(work / "docs" / f"{part.name}.arrow", sig.docs)
    if sig.sigs is not None:
        save_npy(work / "shingles" / f"{part.name}.npy", sig.shingles)
        save_npy(work / "offsets" / f"{part.name}.npy", sig.offsets)
        save_npy(work / "sigs" / f"{part.name}.npy", sig.sigs)
    if sig.lines is not None:
        _shard_files(work / "lines", part.name, sig.line_shards(cfg.shards))
    _shard_files(work / "bands", part.name, sig.band_shards(cfg.shards))
    _shard_files(work / "ids", part.name, sig.id_shards(cfg.shards))
    return {
        "part": part.name,
        "index": index,
        "documents": sig.docs.num_rows + len(poison),
        "quarantined": {str(row): trace for row, trace in poison.items()},
    }


def _poison_rows(
    batches: Iterable[pa.RecordBatch], index: int, cfg: DedupConfig, quarantine: Quarantine
) -> dict[int, str]:
    """The partition rows ``signatures`` raises on, with their tracebacks: each batch is tried whole, one
    that raises one document at a time."""
    poison: dict[int, str] = {}
    row = 0
    for batch in batches:
        try:
            signatures([batch], index, cfg)
            quarantine.passed(batch.num_rows, retry=partial(signatures, [batch.slice(0, 1)], index, cfg))
        except USER_ERRORS:
            raise
        except Exception:
            for i in range(batch.num_rows):
                doc = batch.slice(i, 1)
                try:
                    signatures([doc], index, cfg)
                    quarantine.passed(retry=partial(signatures, [doc], index, cfg))
                except USER_ERRORS:
                    raise
                except Exception as e:
                    again = partial(signatures, [doc], index, cfg)
                    poison[row + i] = quarantine.crashed(doc.column("id")[0].as_py(), e, retry=again)
        row += batch.num_rows
    quarantine.finish()
    return poison


def _without(
    batches: Iterable[pa.RecordBatch],
    rows: dict[int, str],
    ctx: StageContext | None = None,
) -> Iterator[pa.RecordBatch]:
    """The batches without the given partition rows (the quarantined ones: every later phase numbers the
    rest); with a ``ctx`` they go to its rejected documents, the traceback as signal."""
    start = 0
    for batch in batches:
        mine = [r - start for r in rows if start <= r < start + batch.num_rows]
        if mine:
            drop = np.zeros(batch.num_rows, dtype=bool)
            drop[mine] = True
            if ctx is not None:
                for i in sorted(mine):
                    ctx.reject(batch.slice(i, 1), filter="quarantined", signal=rows[start + i])
                ctx.counters["quarantined"] += len(mine)
            yield batch.filter(pa.array(~drop))
        else:
            yield batch
        start += batch.num_rows


def _ids_task(staging: Path, shard: int, names: list[str], out: Store) -> dict[str, Any]:
    work = out / WORK
    rows = pa.concat_tables([read_arrow(work / "ids" / f"{name}-{shard:04d}.arrow") for name in names])
    arrays = _PartArrays(work, names)
    later = id_collisions(rows, arrays.doc_id)
    for index, name in enumerate(names):
        mine = later[(later >> 32) == index] & 0xFFFFFFFF
        write_ipc(staging / WORK / "idcollisions" / f"{name}-{shard:04d}.arrow", pa.table({"row": mine}))
    return {"part": f"ids-{shard:04d}", "collisions": int(later.size)}


def _removed_nodes(work: Store, kind: str, names: list[str], shards: int) -> np.ndarray:
    """The nodes of every ``kind/{partition}-{shard}.arrow`` row table (``idcollisions``: removed for an
    id an earlier document has; ``decisions``: removed as duplicates). Few: read whole by each task."""
    nodes = [
        (index << 32) | read_arrow(work / kind / f"{name}-{s:04d}.arrow").column("row").to_numpy()
        for index, name in enumerate(names)
        for s in range(shards)
    ]
    return np.concatenate(nodes) if nodes else np.empty(0, np.int64)


class _Npy:
    """Rows of a .npy file read by range (``pread`` on a local disk, a ranged GET on an object store): no
    memory map, so none of the file's pages stay resident in the task's process (a memory map faults in,
    and reads ahead, pages that count as its RSS)."""

    def __init__(self, where: Store):
        self.file = where.open_input()
        version = np.lib.format.read_magic(self.file)
        read_header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        self.shape, _, self.dtype = read_header(self.file)
        self.start = self.file.tell()
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def rows(self, start: int, stop: int) -> np.ndarray:
        data = self.file.read_at((stop - start) * self.row_bytes, self.start + start * self.row_bytes)
        return np.frombuffer(data, self.dtype).reshape((stop - start, *self.shape[1:]))

    def __enter__(self) -> _Npy:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


class _PartArrays:
    """The map phase's per-partition outputs, looked up for given nodes one partition at a time."""

    def __init__(self, work: Store, names: list[str]):
        self.work, self.names = work, names
        self._ids: dict[int, pa.ChunkedArray] = {}

    def doc_id(self, node: int) -> str:
        """A document's id (for the rare id-hash collisions)."""
        part = node >> 32
        if part not in self._ids:
            self._ids[part] = read_arrow(self.work / "docs" / f"{self.names[part]}.arrow").column("id")
        return self._ids[part][node & 0xFFFFFFFF].as_py()

    def _npy(self, kind: str, part: int) -> _Npy:
        return _Npy(self.work / kind / f"{self.names[part]}.npy")

    @staticmethod
    def _by_partition(nodes: np.ndarray) -> list[tuple[int, np.ndarray]]:
        part = nodes >> 32
        return [(int(p), nodes[part == p]) for p in np.unique(part)]

    def exact_hi(self, nodes: np.ndarray) -> dict[int, int]:
        """The high halves of the given documents' 128-bit text hashes."""
        found: dict[int, int] = {}
        for part, mine in self._by_partition(nodes):
            column = read_arrow(self.work / "docs" / f"{self.names[part]}.arrow").column("exact_hi")
            found.update(zip(mine.tolist(), column.take(pa.array(mine & 0xFFFFFFFF)).to_pylist()))
        return found

    def shingles(self, nodes: np.ndarray) -> dict[int, np.ndarray]:
        """The given documents' shingle hashes."""
        found: dict[int, np.ndarray] = {}
        for part, mine in self._by_partition(nodes):
            with self._npy("offsets", part) as offsets, self._npy("shingles", part) as shingles:
                for node in mine.tolist():
                    lo, hi = offsets.rows(node & 0xFFFFFFFF, (node & 0xFFFFFFFF) + 2).tolist()
                    found[node] = shingles.rows(lo, hi)
        return found

    def signatures(self, nodes: np.ndarray) -> dict[int, np.ndarray]:
        """The given documents' MinHash signatures."""
        found: dict[int, np.ndarray] = {}
        for part, mine in self._by_partition(nodes):
            with self._npy("sigs", part) as sigs:
                for node in mine.tolist():
                    found[node] = sigs.rows(node & 0xFFFFFFFF, (node & 0xFFFFFFFF) + 1)[0]
        return found


def _cc_dir(root: Path | Store, step: int) -> Path | Store:
    return root / WORK / "cc" / f"{step:03d}"


def _reduce_task(staging: Path, shard: int, names: list[str], out: Store, cfg: DedupConfig) -> dict[str, Any]:
    work = out / WORK
    rows = pa.concat_tables([read_arrow(work / "bands" / f"{name}-{shard:04d}.arrow") for name in names])
    collided = _removed_nodes(work, "idcollisions", names, cfg.shards)  # they take no part in similarity
    rows = rows.filter(pa.array(~np.isin(rows.column("node").to_numpy(), collided)))
    pairs = candidate_pairs(rows, cfg, cfg.shards)
    _shard_files(staging / WORK / "pairs", f"{shard:04d}", pairs)
    return {"part": f"reduce-{shard:04d}", "bucket_pairs": sum(t.num_rows for t in pairs)}


def _verify_task(staging: Path, shard: int, names: list[str], out: Store, cfg: DedupConfig) -> dict[str, Any]:
    work = out / WORK
    pairs = pa.concat_tables(
        [read_arrow(work / "pairs" / f"{src:04d}-{shard:04d}.arrow") for src in range(cfg.shards)]
    )
    arrays = _PartArrays(work, names)
    edges, candidates = verified_edges(pairs, cfg, arrays.exact_hi, arrays.shingles, arrays.signatures)
    a, b = edges.column("a").to_numpy(), edges.column("b").to_numpy()
    sim = edges.column("similarity").to_numpy()
    _shard_files(_cc_dir(staging, 0), f"{shard:04d}", step_edges(0, a, b, cfg.shards, sim))
    return {"part": f"verify-{shard:04d}", "candidate_pairs": candidates, "edges": edges.num_rows}


def _star_task(staging: Path, step: int, shard: int, out: Store, shards: int) -> dict[str, Any]:
    """One components step for the nodes of ``shard``; step 0 also records each node's best similarity."""
    edges = pa.concat_tables(
        [read_arrow(_cc_dir(out, step) / f"{src:04d}-{shard:04d}.arrow") for src in range(shards)]
    )
    # Step 0 writes each node's best similarity; the converging step (0 or a later one) reads it.
    best = (staging if step == 0 else out) / WORK / "cc" / "best" / f"{shard:04d}.arrow"
    if step == 0:
        write_ipc(best, best_similarity(edges))
    result = star_step(step, edges, lambda: read_arrow(best))
    if result.labels is not None:
        _shard_files(_cc_dir(staging, step), f"labels-{shard:04d}", root_shards(result.labels, shards))
    _shard_files(_cc_dir(staging, step + 1), f"{shard:04d}", step_edges(step + 1, result.x, result.y, shards))
    return {"part": f"cc{step:03d}-{shard:04d}", "edges": edges.num_rows, "converged": result.converged}


def _node_info(
    work: Store, names: list[str], node: np.ndarray, cfg: DedupConfig
) -> dict[int, dict[str, Any]]:
    """The ids, lengths, exact hashes (and scores) of the given nodes, read partition by partition."""
    columns = ["id", "length", "exact", "exact_hi"] + (["score"] if cfg.keep_rule()[1] else [])
    part_of = node >> 32
    info: dict[int, dict[str, Any]] = {}
    for index in np.unique(part_of).tolist():
        mine = node[part_of == index]
        table = read_arrow(work / "docs" / f"{names[index]}.arrow").select(columns)
        info.update(zip(mine.tolist(), table.take(pa.array(mine & 0xFFFFFFFF)).to_pylist()))
    return info


def _decide_task(
    staging: Path,
    shard: int,
    step: int,
    names: list[str],
    out: Store,
    cfg: DedupConfig,
    priority: list[int] | None = None,
) -> dict[str, Any]:
    labels = pa.concat_tables(
        [read_arrow(_cc_dir(out, step) / f"labels-{src:04d}-{shard:04d}.arrow") for src in range(cfg.shards)]
    )
    info = _node_info(out / WORK, names, labels.column("node").to_numpy(), cfg)
    clusters = decide_clusters(labels, info, cfg, priority)
    for index, name in enumerate(names):
        table = clusters.decisions.get(index, EMPTY_DECISIONS.empty_table())
        write_ipc(staging / WORK / "decisions" / f"{name}-{shard:04d}.arrow", table)
        table = clusters.copies.get(index, EMPTY_COPIES.empty_table())
        write_ipc(staging / WORK / "copies" / f"{name}-{shard:04d}.arrow", table)
    write_ipc(staging / WORK / "clusters" / f"{shard:04d}.arrow", clusters.table)
    return {"part": f"decide-{shard:04d}", "clusters": clusters.table.num_rows, "removed": clusters.removed}


def _lines_task(staging: Path, shard: int, names: list[str], out: Store, shards: int) -> dict[str, Any]:
    work = out / WORK
    removed = np.concatenate(
        [_removed_nodes(work, kind, names, shards) for kind in ("decisions", "idcollisions")]
    )
    rows = pa.concat_tables([read_arrow(work / "lines" / f"{name}-{shard:04d}.arrow") for name in names])
    cut_node, cut_span, spans = repeated_spans(rows, removed)
    for index, name in enumerate(names):
        mine = (cut_node >> 32) == index
        table = pa.table({"row": cut_node[mine] & 0xFFFFFFFF, "span": cut_span[mine]})
        write_ipc(staging / WORK / "linecuts" / f"{name}-{shard:04d}.arrow", table)
    return {"part": f"lines-{shard:04d}", "spans": spans, "cut": int(cut_node.size)}


def _line_cuts(work: Store, name: str, shards: int) -> dict[int, list[int]]:
    """{row: spans to cut} of one partition."""
    cuts: dict[int, list[int]] = {}
    for shard in range(shards):
        table = read_arrow(work / "linecuts" / f"{name}-{shard:04d}.arrow")
        for row, span in zip(table.column("row").to_pylist(), table.column("span").to_pylist()):
            cuts.setdefault(row, []).append(span)
    return cuts


def _apply_task(
    staging: Path, part: Partition, out: Store, cfg: DedupConfig, quarantined: dict[str, str]
) -> dict[str, Any]:
    work = out / WORK
    decisions = pa.concat_tables(
        [read_arrow(work / "decisions" / f"{part.name}-{shard:04d}.arrow") for shard in range(cfg.shards)]
    ).to_pydict()
    removed = dict(
        zip(decisions["row"], zip(decisions["duplicate_of"], decisions["value"], decisions["filter"]))
    )
    ids = read_arrow(work / "docs" / f"{part.name}.arrow").column("id")
    for shard in range(cfg.shards):
        for row in (
            read_arrow(work / "idcollisions" / f"{part.name}-{shard:04d}.arrow").column("row").to_pylist()
        ):
            removed[row] = (ids[row].as_py(), None, "duplicate_id")  # the kept document has the same id
    cuts = _line_cuts(work, part.name, cfg.shards) if cfg.lines else {}
    ctx = StageContext("dedup")
    batches = _without(part.batches(), {int(row): trace for row, trace in quarantined.items()}, ctx)
    copies = pa.concat_tables(
        [read_arrow(work / "copies" / f"{part.name}-{shard:04d}.arrow") for shard in range(cfg.shards)]
    )
    sizes = dict(zip(copies.column("row").to_pylist(), copies.column("copies").to_pylist()))
    kept_batches = apply_decisions(batches, removed, cuts, cfg, ctx, sizes)
    kept = write_parquet(staging / f"{part.name}.parquet", kept_batches, DOCUMENT_SCHEMA)
    rejected = write_parquet(staging / REJECTED_DIR / f"{part.name}.parquet", ctx.rejected, REJECTED_SCHEMA)
    return {"part": part.name, "kept": kept, "rejected": rejected, "counters": dict(ctx.counters)}


class _Phases:
    """Runs the phases of one dedup stage as Ray tasks, markers under ``out/_work/_done``."""

    def __init__(
        self,
        out: Store,
        cfg: DedupConfig,
        on_progress: Callable[[str, int, int], None] | None,
        options: dict[str, Any] | None = None,
        max_in_flight: int | None = None,
    ):
        self.out, self.cfg, self.on_progress = out, cfg, on_progress
        self.options, self.max_in_flight = options, max_in_flight or cfg.workers

    def run(self, label: str, tasks: list[TaskId], plan: Callable[[TaskId], tuple]) -> dict[TaskId, dict]:
        progress = None
        if self.on_progress is not None:
            progress = lambda done, total: self.on_progress(label, done, total)  # noqa: E731
        return run_tasks(
            self.out, tasks, plan, progress, self.max_in_flight, self.out / WORK / DONE_DIR, self.options
        )

    def shard_tasks(self, phase: str, step: int | None = None) -> list[TaskId]:
        return [TaskId(phase, step=step, shard=s) for s in range(self.cfg.shards)]

    def components(self) -> int:
        """Large-star / small-star rounds until every component is a star; returns the last step."""
        step = 0
        while True:
            stars = self.run(
                f"components (step {step + 1})",
                self.shard_tasks("cc", step),
                lambda t: (_star_task, (t.step, t.shard, self.out, self.cfg.shards)),
            )
            if step % 2 == 0 and all(r["converged"] for r in stars.values()):
                return step
            step += 1
            if step > MAX_STAR_STEPS:
                raise RuntimeError(f"dedup components did not converge in {MAX_STAR_STEPS} steps")


def _partitions(
    sources: dict[str | None, Any], partition_mb: float
) -> tuple[list[Partition], list[int], int]:
    """The partitions of every source's documents (named after their source, ``web-p00000``), each one's
    source rank, and the documents in."""
    parts, priority, documents = [], [], 0
    for rank, (source, where) in enumerate(sources.items()):
        docs_index, files = dataset_files(where)
        documents += sum(f.get("rows", 0) for f in docs_index["files"] if f["path"].endswith(".parquet"))
        for part in plan_partitions(files, partition_mb):
            parts.append(part if source is None else replace(part, name=f"{source}-{part.name}"))
            priority.append(rank)
    return parts, priority, documents


def run_dedup_stage(
    docs_dir: str | Path | Store | dict[str, str | Path | Store],
    out_dir: str | Path,
    cfg: DedupConfig,
    *,
    cache_key: str,
    inputs: dict[str, str],
    on_progress: Callable[[str, int, int], None] | None = None,
    options: dict[str, Any] | None = None,
    max_in_flight: int | None = None,
) -> dict[str, Any]:
    """Deduplicate the documents of ``docs_dir`` into ``out_dir`` (kept, ``rejected/``, index); tasks with
    Ray ``options``, at most ``max_in_flight`` (default ``cfg.workers``) at once.

    ``docs_dir`` may be source -> documents dataset (dedup across sources): their partitions are named
    after their source (``web-p00000``), a cluster's survivor is the copy of the first source in that
    order (then the keep rule), and the index lists each source's files (``sources``)."""
    sources = docs_dir if isinstance(docs_dir, dict) else {None: docs_dir}
    parts, priority, documents = _partitions(sources, cfg.partition_mb)
    # The shard count follows the corpus (and memory_mb), so a shard task's peak does not.
    cfg = cfg.model_copy(update={"shards": cfg.shards_for(documents)})
    out = Store(out_dir)
    names = [p.name for p in parts]
    ranked = priority if len(sources) > 1 else None
    index_of = {p.name: i for i, p in enumerate(parts)}
    by_name = {p.name: p for p in parts}
    phases = _Phases(out, cfg, on_progress, options, max_in_flight)
    if not parts:  # nothing came through clean: an empty output, not a failed shuffle
        return _commit(out, [], 0, Counter(), cfg, cache_key, inputs)

    maps = phases.run(
        "signatures",
        [TaskId("map", part=n) for n in names],
        lambda t: (_map_task, (index_of[t.part], by_name[t.part], cfg)),
    )
    counters = _cluster(phases, names, out, cfg, ranked)
    if cfg.lines:
        spans = phases.run(
            "line spans",
            phases.shard_tasks("lines"),
            lambda t: (_lines_task, (t.shard, names, out, cfg.shards)),
        )
        counters["line_spans"] = sum(r["spans"] for r in spans.values())
        counters["line_spans_cut"] = sum(r["cut"] for r in spans.values())
    applied = phases.run(
        "write",
        [TaskId("apply", part=n) for n in names],
        lambda t: (
            _apply_task,
            (by_name[t.part], out, cfg, maps[TaskId("map", part=t.part)].get("quarantined", {})),
        ),
    )
    results = [applied[TaskId("apply", part=n)] for n in names]
    docs_in = sum(m["documents"] for m in maps.values())
    by_source = None
    if None not in sources:  # each partition's source by its rank, not by its name's prefix
        names_of = list(sources)
        by_source = {s: [r for r, rank in zip(results, priority) if names_of[rank] == s] for s in sources}
    return _commit(out, results, docs_in, counters, cfg, cache_key, inputs, by_source)


def _cluster(
    phases: _Phases, names: list[str], out: Store, cfg: DedupConfig, priority: list[int] | None = None
) -> Counter:
    """The shuffle phases after the signatures: document ids, candidate pairs, their verification, the
    connected components and the clusters they decide; their counters."""
    collisions = phases.run(
        "document ids", phases.shard_tasks("ids"), lambda t: (_ids_task, (t.shard, names, out))
    )
    phases.run(
        "candidate pairs", phases.shard_tasks("reduce"), lambda t: (_reduce_task, (t.shard, names, out, cfg))
    )
    verified = phases.run(
        "verify pairs", phases.shard_tasks("verify"), lambda t: (_verify_task, (t.shard, names, out, cfg))
    )
    counters: Counter = Counter()
    counters["shards"] = cfg.shards
    counters["id_collisions"] = sum(r["collisions"] for r in collisions.values())
    counters["candidate_pairs"] = sum(r["candidate_pairs"] for r in verified.values())
    counters["edges"] = sum(r["edges"] for r in verified.values())
    step = phases.components()
    counters["components_steps"] = step + 1
    decided = phases.run(
        "clusters",
        phases.shard_tasks("decide"),
        lambda t: (_decide_task, (t.shard, step, names, out, cfg, priority)),
    )
    counters["clusters"] = sum(r["clusters"] for r in decided.values())
    return counters


def _commit(
    out: Store,
    results: list[dict[str, Any]],
    docs_in: int,
    counters: Counter,
    cfg: DedupConfig,
    cache_key: str,
    inputs: dict[str, str],
    by_source: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Check that every document is kept or removed, write the cluster table and both manifests (with
    ``by_source``, each source's kept files and counts)."""
    for r in results:
        counters.update(r["counters"])
    extra: dict[str, Any] = {}
    if by_source is not None:
        extra["sources"] = {s: [r["kept"]["path"] for r in rs] for s, rs in by_source.items()}
        for s, rs in by_source.items():
            counters[f"kept.{s}"] = sum(r["kept"]["rows"] for r in rs)
            counters[f"rejected.{s}"] = sum(r["rejected"]["rows"] for r in rs)
    kept = sum(r["kept"]["rows"] for r in results)
    rejected = sum(r["rejected"]["rows"] for r in results)
    if docs_in != kept + rejected:
        raise RuntimeError(f"dedup: {docs_in} documents in but {kept} kept + {rejected} removed")
    counters.update({"documents_in": docs_in, "kept": kept, "rejected": rejected})
    write_index(
        out / REJECTED_DIR,
        stage="dedup",
        cache_key=cache_key,
        files=[r["rejected"] for r in results],
        schema=REJECTED_SCHEMA,
        inputs=inputs,
    )
    files = [out / WORK / "clusters" / f"{s:04d}.arrow" for s in range(cfg.shards)]
    clusters = pa.concat_tables(
        [read_arrow(f) for f in files if f.exists()] or [CLUSTER_SCHEMA.empty_table()]
    )
    clusters = clusters.sort_by([("size", "descending"), ("representative", "ascending")])
    with tempfile.TemporaryDirectory(prefix="lmforge-") as tmp:  # for the quality report
        write_parquet(Path(tmp) / CLUSTERS, clusters.to_batches(), clusters.schema)
        out.put(Path(tmp) / CLUSTERS, CLUSTERS)
    return write_index(
        out,
        stage="dedup",
        cache_key=cache_key,
        files=[r["kept"] for r in results],
        schema=DOCUMENT_SCHEMA,
        inputs=inputs,
        counters=dict(counters),
        extra={"clusters": {"path": CLUSTERS, "rows": clusters.num_rows}, **extra},
    )
