"""Exact and MinHash-LSH deduplication as Ray tasks: no process ever holds every signature.

1. map, one task per input partition (row ranges, as for tokenization): shingle hashes, signatures, the
   LSH band keys and the exact-text hash of each document. It writes its documents' ids and lengths, its
   shingle hashes (and signatures) as memory-mappable arrays, and its (band, key, node) rows split into
   ``shards`` files by key, so each reduce task reads only its share. A node is
   ``partition << 32 | row``.
2. reduce, one task per key shard: sort its rows by (band, key); documents sharing a bucket are candidate
   pairs; exact-text buckets (band -1) are duplicates when all 128 bits of the text hash agree; others are
   verified by exact Jaccard of their shingle sets (or the signatures' estimate), read from the map
   outputs for just those nodes. It writes the verified edges, split by the shard that owns each node.
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

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from cleaning.dedup import (
    Similarity,
    band_keys,
    bucket_pairs,
    cut_spans,
    large_star,
    line_spans,
    meta_scores,
    node_shard,
    run_starts,
    small_star,
    survivor_rank,
    text_hash,
)
from cleaning.minhash import MinHasher
from ingestion.schema import DOCUMENT_SCHEMA, REJECTED_SCHEMA
from orchestration.config import DedupConfig
from orchestration.datasets import (
    Partition,
    atomic_write_bytes,
    dataset_files,
    plan_partitions,
    read_ipc,
    write_index,
    write_ipc,
    write_parquet,
)
from orchestration.executors import DONE_DIR, REJECTED_DIR, run_partitions
from orchestration.stage import StageContext

WORK = "_work"
CLUSTERS = "clusters.parquet"
EXACT_BAND = -1
MAX_STAR_STEPS = 200


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def _write_line_spans(work: Path, name: str, node: np.ndarray, texts: list[str], cfg: DedupConfig) -> None:
    """The (hash, node, span) rows of every line span of the partition, split by hash into shards."""
    hashes, nodes, spans = [], [], []
    for doc, text in zip(node.tolist(), texts):
        h, first = line_spans(text, cfg.lines.span, cfg.lines.normalize)
        hashes.extend(h)
        nodes.extend([doc] * len(h))
        spans.extend(first)
    table = pa.table(
        {
            "hash": pa.array(hashes, pa.uint64()),
            "node": pa.array(nodes, pa.int64()),
            "span": pa.array(spans, pa.int32()),
        }
    )
    shard_of = table.column("hash").to_numpy() % np.uint64(cfg.shards)
    for shard in range(cfg.shards):
        write_ipc(work / "lines" / f"{name}-{shard:04d}.arrow", table.filter(pa.array(shard_of == shard)))


@ray.remote(num_cpus=1)
def _map_task(index: int, part: Partition, work: str, cfg: DedupConfig) -> dict[str, Any]:
    work_dir = Path(work)
    ids, texts, scores = [], [], []
    score_key = _keep(cfg)[1]
    for batch in part.batches(["id", "text"] + (["meta"] if score_key else [])):
        ids.extend(batch.column("id").to_pylist())
        texts.extend(batch.column("text").to_pylist())
        if score_key:
            scores.extend(meta_scores(batch.column("meta"), score_key))
    n = len(ids)
    node = (np.int64(index) << np.int64(32)) | np.arange(n, dtype=np.int64)
    normal = cfg.exact is None or cfg.exact.normalize
    # A 128-bit hash of the (normalized) text: the low half buckets, the high half confirms.
    digests = [text_hash(t, normal) for t in texts]
    exact = np.array([int.from_bytes(d[:8], "little") for d in digests], dtype=np.uint64)
    exact_hi = np.array([int.from_bytes(d[8:], "little") for d in digests], dtype=np.uint64)
    write_ipc(
        work_dir / "docs" / f"{part.name}.arrow",
        pa.table(
            {"id": ids, "length": [len(t) for t in texts], "exact": exact, "exact_hi": exact_hi}
            | ({"score": pa.array(scores, pa.float64())} if score_key else {})
        ),
    )
    band_col, key_col, node_col = [], [], []
    if cfg.exact:
        band_col.append(np.full(n, EXACT_BAND, dtype=np.int16))
        key_col.append(exact)
        node_col.append(node)
    if cfg.minhash:
        m = cfg.minhash
        hasher = MinHasher(m.num_perm, m.seed, m.ngram, m.shingle_hash)
        flat, counts = hasher.shingle_hashes(texts)
        sigs = hasher.minimums(flat, counts)
        _save_npy(work_dir / "shingles" / f"{part.name}.npy", flat)
        _save_npy(work_dir / "offsets" / f"{part.name}.npy", np.r_[0, np.cumsum(counts)])
        _save_npy(work_dir / "sigs" / f"{part.name}.npy", sigs)
        bands, rows = m.banding()
        keys = band_keys(sigs, bands, rows)
        band_col.append(np.repeat(np.arange(bands, dtype=np.int16), n))
        key_col.append(keys.T.ravel())
        node_col.append(np.tile(node, bands))
    if cfg.lines:
        _write_line_spans(work_dir, part.name, node, texts, cfg)
    band, key, nodes = (np.concatenate(c) if c else np.empty(0) for c in (band_col, key_col, node_col))
    shard_of = (key % np.uint64(cfg.shards)).astype(np.int64) if key.size else np.empty(0, np.int64)
    for shard in range(cfg.shards):
        mask = shard_of == shard
        table = pa.table(
            {
                "band": band[mask].astype(np.int16),
                "key": key[mask].astype(np.uint64),
                "node": nodes[mask].astype(np.int64),
            }
        )
        write_ipc(work_dir / "bands" / f"{part.name}-{shard:04d}.arrow", table)
    result = {"part": part.name, "index": index, "documents": n}
    atomic_write_bytes(work_dir / DONE_DIR / f"map-{part.name}.json", json.dumps(result).encode())
    return result


class _PartArrays:
    """Lazily memory-mapped per-partition arrays of the map phase, addressed by node."""

    def __init__(self, work: Path, names: list[str]):
        self.work, self.names = work, names
        self._cache: dict[tuple[str, int], np.ndarray] = {}

    def _array(self, kind: str, part: int) -> np.ndarray:
        if (kind, part) not in self._cache:
            self._cache[(kind, part)] = np.load(self.work / kind / f"{self.names[part]}.npy", mmap_mode="r")
        return self._cache[(kind, part)]

    def exact_hi(self, node: int) -> int:
        """The high half of a document's 128-bit text hash."""
        key = ("exact_hi", node >> 32)
        if key not in self._cache:
            docs = read_ipc(self.work / "docs" / f"{self.names[node >> 32]}.arrow")
            self._cache[key] = docs.column("exact_hi").to_numpy()
        return int(self._cache[key][node & 0xFFFFFFFF])

    def shingles(self, node: int) -> np.ndarray:
        part, row = node >> 32, node & 0xFFFFFFFF
        offsets = self._array("offsets", part)
        return np.asarray(self._array("shingles", part)[offsets[row] : offsets[row + 1]])

    def signature(self, node: int) -> np.ndarray:
        return np.asarray(self._array("sigs", node >> 32)[node & 0xFFFFFFFF])


def _write_edges(
    work: Path, step: int, src: int, x: np.ndarray, y: np.ndarray, shards: int, sim: np.ndarray | None = None
) -> None:
    """The edges (x, y) as input of components step ``step``, one file per owner shard: both directions
    for a large-star step (even), (larger, smaller) for a small-star step (odd)."""
    loop = x == y
    x, y = x[~loop], y[~loop]
    if step % 2 == 0:
        u, v = np.r_[x, y], np.r_[y, x]
        sim = None if sim is None else np.r_[sim[~loop], sim[~loop]]
    else:
        u, v = np.maximum(x, y), np.minimum(x, y)
    owner = node_shard(u, shards)
    for dst in range(shards):
        mine = owner == dst
        columns = {"u": u[mine], "v": v[mine]}
        if sim is not None:
            columns["similarity"] = sim[mine]
        write_ipc(work / "cc" / f"{step:03d}" / f"{src:04d}-{dst:04d}.arrow", pa.table(columns))


@ray.remote(num_cpus=1)
def _reduce_task(shard: int, names: list[str], work: str, cfg: DedupConfig) -> dict[str, Any]:
    work_dir = Path(work)
    tables = [read_ipc(work_dir / "bands" / f"{name}-{shard:04d}.arrow") for name in names]
    rows = pa.concat_tables(tables)
    band = rows.column("band").to_numpy()
    key, node = rows.column("key").to_numpy(), rows.column("node").to_numpy()
    exact = band == EXACT_BAND
    edges: dict[tuple[int, int], float] = {}
    arrays = _PartArrays(work_dir, names)
    for a, b in bucket_pairs(band[exact], key[exact], node[exact], max_bucket=0):
        if arrays.exact_hi(a) == arrays.exact_hi(b):  # all 128 bits agree
            edges[(a, b)] = 1.0
    candidates = 0
    if cfg.minhash:
        m = cfg.minhash
        similarity = Similarity(m.verify, arrays.shingles, arrays.signature)
        near = ~exact
        for a, b in sorted(bucket_pairs(band[near], key[near], node[near])):
            candidates += 1
            if (a, b) not in edges and (sim := similarity(a, b)) >= similarity.threshold(m):
                edges[(a, b)] = sim
    pairs = sorted(edges)
    a = np.array([p[0] for p in pairs], dtype=np.int64)
    b = np.array([p[1] for p in pairs], dtype=np.int64)
    _write_edges(work_dir, 0, shard, a, b, cfg.shards, np.array([edges[p] for p in pairs], np.float64))
    result = {"part": f"reduce-{shard:04d}", "candidate_pairs": candidates, "edges": len(pairs)}
    atomic_write_bytes(work_dir / DONE_DIR / f"reduce-{shard:04d}.json", json.dumps(result).encode())
    return result


@ray.remote(num_cpus=1)
def _star_task(step: int, shard: int, work: str, shards: int) -> dict[str, Any]:
    """One components step for the nodes of ``shard``: large-star on even steps, small-star on odd ones.

    Step 0 also records each node's best similarity to a neighbour. A large-star step whose nodes are
    already stars around their minima writes their labels (node, root, best similarity) by root shard:
    when every shard of a step says so, those are the components."""
    cc = Path(work) / "cc"
    edges = pa.concat_tables(
        [read_ipc(cc / f"{step:03d}" / f"{src:04d}-{shard:04d}.arrow") for src in range(shards)]
    )
    u, v = edges.column("u").to_numpy(), edges.column("v").to_numpy()
    result: dict[str, Any] = {"part": f"cc{step:03d}-{shard:04d}", "edges": int(u.size), "converged": False}
    if step == 0:
        order = np.argsort(u, kind="stable")
        nodes = u[order]
        starts = run_starts(nodes)
        best = np.maximum.reduceat(edges.column("similarity").to_numpy()[order], starts) if nodes.size else []
        write_ipc(
            cc / "best" / f"{shard:04d}.arrow",
            pa.table({"node": nodes[starts], "best": pa.array(best, pa.float64())}),
        )
    if step % 2 == 0:
        (x, y), labels, converged = large_star(u, v)
        if converged:
            best = read_ipc(cc / "best" / f"{shard:04d}.arrow")
            if not np.array_equal(best.column("node").to_numpy(), labels[:, 0]):
                raise RuntimeError(f"dedup components: shard {shard} lost nodes at step {step}")
            owner = node_shard(labels[:, 1], shards)
            for dst in range(shards):
                mine = owner == dst
                table = pa.table(
                    {
                        "node": labels[mine, 0],
                        "root": labels[mine, 1],
                        "best": best.column("best").filter(pa.array(mine)),
                    }
                )
                write_ipc(cc / f"{step:03d}" / f"labels-{shard:04d}-{dst:04d}.arrow", table)
        result["converged"] = converged
    else:
        x, y = small_star(u, v)
    _write_edges(cc.parent, step + 1, shard, x, y, shards)
    atomic_write_bytes(Path(work) / DONE_DIR / f"{result['part']}.json", json.dumps(result).encode())
    return result


@ray.remote(num_cpus=1)
def _decide_task(shard: int, step: int, names: list[str], work: str, cfg: DedupConfig) -> dict[str, Any]:
    """The survivor of every component whose root ``shard`` owns, by the keep rule; per-partition
    decisions for the removed members, and the cluster table rows."""
    work_dir = Path(work)
    cc = work_dir / "cc" / f"{step:03d}"
    labels = pa.concat_tables(
        [read_ipc(cc / f"labels-{src:04d}-{shard:04d}.arrow") for src in range(cfg.shards)]
    )
    labels = labels.sort_by([("root", "ascending"), ("node", "ascending")])
    node, root = labels.column("node").to_numpy(), labels.column("root").to_numpy()
    best = labels.column("best").to_numpy()
    # The ids, lengths, exact hashes (and scores) of this shard's nodes, read partition by partition.
    part_of = node >> 32
    keep, score_key = _keep(cfg)
    columns = ["id", "length", "exact", "exact_hi"] + (["score"] if score_key else [])
    info: dict[int, tuple] = {}
    for index in np.unique(part_of).tolist():
        mine = node[part_of == index]
        table = read_ipc(work_dir / "docs" / f"{names[index]}.arrow").select(columns)
        rows = table.take(pa.array(mine & 0xFFFFFFFF)).to_pylist()
        info.update(zip(mine.tolist(), rows))
    decisions: dict[int, list[tuple[int, str, float, str]]] = {}
    clusters: list[tuple[str, int, list[str]]] = []
    starts = run_starts(root)
    for start, end in zip(starts.tolist(), np.r_[starts[1:], root.size].tolist()):
        members = node[start:end].tolist()
        rows = [info[m] for m in members]
        ranks = [survivor_rank(keep, r["id"], r["length"], r.get("score")) for r in rows]
        kept = min(range(len(members)), key=ranks.__getitem__)
        kept_id = rows[kept]["id"]
        # A removed document with an exact-text twin in its cluster is an exact duplicate; else a near one.
        texts = Counter((r["exact"], r["exact_hi"]) for r in rows)
        for i, (member, row) in enumerate(zip(members, rows)):
            if i != kept:
                name = "exact_dedup" if texts[(row["exact"], row["exact_hi"])] > 1 else "minhash_dedup"
                decisions.setdefault(member >> 32, []).append(
                    (member & 0xFFFFFFFF, kept_id, float(best[start + i]), name)
                )
        clusters.append((kept_id, len(members), sorted(r["id"] for i, r in enumerate(rows) if i != kept)))
    for index, name in enumerate(names):
        rows = sorted(decisions.get(index, []))
        table = pa.table(
            {
                "row": pa.array([r[0] for r in rows], pa.int64()),
                "duplicate_of": pa.array([r[1] for r in rows], pa.string()),
                "value": pa.array([r[2] for r in rows], pa.float64()),
                "filter": pa.array([r[3] for r in rows], pa.string()),
            }
        )
        write_ipc(work_dir / "decisions" / f"{name}-{shard:04d}.arrow", table)
    table = pa.table(
        {
            "representative": pa.array([c[0] for c in clusters], pa.string()),
            "size": pa.array([c[1] for c in clusters], pa.int64()),
            "members": pa.array([c[2] for c in clusters], pa.list_(pa.string())),
        }
    )
    write_ipc(work_dir / "clusters" / f"{shard:04d}.arrow", table)
    result = {
        "part": f"decide-{shard:04d}",
        "clusters": len(clusters),
        "removed": int(node.size) - len(clusters),
    }
    atomic_write_bytes(work_dir / DONE_DIR / f"{result['part']}.json", json.dumps(result).encode())
    return result


def _keep(cfg: DedupConfig) -> tuple[str, str | None]:
    """The keep rule and the meta signal it ranks by (exact-only dedup keeps the first id)."""
    return (cfg.minhash.keep, cfg.minhash.score_key) if cfg.minhash else ("first", None)


@ray.remote(num_cpus=1)
def _lines_task(shard: int, names: list[str], work: str, shards: int) -> dict[str, Any]:
    """Line spans of one hash shard: every occurrence after the first, among the documents that survive
    document-level dedup, in corpus order, is cut; the cuts are written per partition."""
    work_dir = Path(work)
    removed = [
        (index << 32) | read_ipc(work_dir / "decisions" / f"{name}-{s:04d}.arrow").column("row").to_numpy()
        for index, name in enumerate(names)
        for s in range(shards)
    ]
    rows = pa.concat_tables([read_ipc(work_dir / "lines" / f"{name}-{shard:04d}.arrow") for name in names])
    node = rows.column("node").to_numpy()
    alive = ~np.isin(node, np.concatenate(removed)) if removed else np.ones(node.size, bool)
    hashes, node, span = (
        rows.column("hash").to_numpy()[alive],
        node[alive],
        rows.column("span").to_numpy()[alive],
    )
    order = np.lexsort((span, node, hashes))
    hashes, node, span = hashes[order], node[order], span[order]
    later = np.r_[False, hashes[1:] == hashes[:-1]]  # not the first occurrence of its span
    cut_node, cut_span = node[later], span[later]
    for index, name in enumerate(names):
        mine = (cut_node >> 32) == index
        table = pa.table({"row": cut_node[mine] & 0xFFFFFFFF, "span": cut_span[mine]})
        write_ipc(work_dir / "linecuts" / f"{name}-{shard:04d}.arrow", table)
    result = {"part": f"lines-{shard:04d}", "spans": int(hashes.size), "cut": int(later.sum())}
    atomic_write_bytes(work_dir / DONE_DIR / f"{result['part']}.json", json.dumps(result).encode())
    return result


def _line_cuts(work: Path, name: str, shards: int) -> dict[int, list[int]]:
    """{row: spans to cut} of one partition."""
    cuts: dict[int, list[int]] = {}
    for shard in range(shards):
        table = read_ipc(work / "linecuts" / f"{name}-{shard:04d}.arrow")
        for row, span in zip(table.column("row").to_pylist(), table.column("span").to_pylist()):
            cuts.setdefault(row, []).append(span)
    return cuts


@ray.remote(num_cpus=1)
def _apply_task(part: Partition, out: str, work: str, cfg: DedupConfig) -> dict[str, Any]:
    out_dir, work_dir = Path(out), Path(work)
    decisions = pa.concat_tables(
        [read_ipc(work_dir / "decisions" / f"{part.name}-{shard:04d}.arrow") for shard in range(cfg.shards)]
    ).to_pydict()
    removed = dict(
        zip(decisions["row"], zip(decisions["duplicate_of"], decisions["value"], decisions["filter"]))
    )
    cuts = _line_cuts(work_dir, part.name, cfg.shards) if cfg.lines else {}
    ctx = StageContext("dedup")

    def kept_batches():
        row = 0
        for batch in part.batches():
            drop = np.array([row + i in removed for i in range(batch.num_rows)], dtype=bool)
            for name in ("exact_dedup", "minhash_dedup"):
                rows = [row + i for i in np.flatnonzero(drop) if removed[row + i][2] == name]
                if rows:
                    local = pa.array(np.array(rows) - row)
                    ctx.reject(
                        batch.take(local),
                        filter=name,
                        signal="text_hash" if name == "exact_dedup" else "jaccard",
                        values=[removed[r][1] for r in rows],
                        duplicate_of=[removed[r][0] for r in rows],
                    )
            batch = batch.filter(pa.array(~drop))
            if cuts:
                batch = _cut_lines(batch, [row + i for i in np.flatnonzero(~drop)], cuts, cfg, ctx)
            yield batch
            row += drop.size

    kept = write_parquet(out_dir / f"{part.name}.parquet", kept_batches(), DOCUMENT_SCHEMA)
    rejected = write_parquet(out_dir / REJECTED_DIR / f"{part.name}.parquet", ctx.rejected, REJECTED_SCHEMA)
    result = {"part": part.name, "kept": kept, "rejected": rejected, "counters": dict(ctx.counters)}
    atomic_write_bytes(work_dir / DONE_DIR / f"apply-{part.name}.json", json.dumps(result).encode())
    return result


def _cut_lines(
    batch: pa.RecordBatch, rows: list[int], cuts: dict[int, list[int]], cfg: DedupConfig, ctx: StageContext
) -> pa.RecordBatch:
    """The batch with its repeated line spans cut; documents left under ``min_words`` words rejected."""
    if not any(row in cuts for row in rows):
        return batch
    texts = batch.column("text").to_pylist()
    short = np.zeros(len(texts), dtype=bool)
    words: dict[int, int] = {}
    for i, row in enumerate(rows):
        if row in cuts:
            before = texts[i].count("\n") + 1
            texts[i] = cut_spans(texts[i], cuts[row], cfg.lines.span, cfg.lines.normalize)
            ctx.counters["line_dedup.documents_cut"] += 1
            ctx.counters["line_dedup.lines_cut"] += before - (texts[i].count("\n") + 1)
            words[i] = len(texts[i].split())
            short[i] = words[i] < cfg.lines.min_words
    original = batch
    batch = batch.set_column(batch.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    if short.any():
        ctx.reject(  # with the text as it came in: nothing is lost
            original.filter(pa.array(short)),
            filter="line_dedup",
            signal="words_after_cut",
            values=[words[i] for i in np.flatnonzero(short)],
            threshold=cfg.lines.min_words,
        )
    return batch.filter(pa.array(~short))


def run_dedup_stage(
    docs_dir: str | Path,
    out_dir: str | Path,
    cfg: DedupConfig,
    *,
    cache_key: str,
    inputs: dict[str, str],
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Deduplicate the documents of ``docs_dir`` into ``out_dir`` (kept, ``rejected/``, index)."""
    _, files = dataset_files(docs_dir)
    out = Path(out_dir)
    work = out / WORK
    parts = plan_partitions(files, cfg.partition_mb)
    names = [p.name for p in parts]
    by_name = {p.name: (i, p) for i, p in enumerate(parts)}

    def progress(phase: str) -> Callable[[int, int], None] | None:
        return None if on_progress is None else (lambda done, total: on_progress(phase, done, total))

    maps = run_partitions(
        work,
        [f"map-{n}" for n in names],
        lambda t: _map_task.remote(*by_name[t[4:]], str(work), cfg),
        progress("signatures"),
        cfg.workers,
    )
    reduces = run_partitions(
        work,
        [f"reduce-{s:04d}" for s in range(cfg.shards)],
        lambda t: _reduce_task.remote(int(t[7:]), names, str(work), cfg),
        progress("candidate pairs"),
        cfg.workers,
    )
    counters: Counter = Counter()
    counters["candidate_pairs"] = sum(r["candidate_pairs"] for r in reduces.values())
    counters["edges"] = sum(r["edges"] for r in reduces.values())
    shards = range(cfg.shards)
    step = 0
    while True:  # large-star / small-star rounds until every component is a star
        stars = run_partitions(
            work,
            [f"cc{step:03d}-{s:04d}" for s in shards],
            lambda t, step=step: _star_task.remote(step, int(t[-4:]), str(work), cfg.shards),
            progress(f"components (step {step + 1})"),
            cfg.workers,
        )
        if step % 2 == 0 and all(r["converged"] for r in stars.values()):
            break
        step += 1
        if step > MAX_STAR_STEPS:
            raise RuntimeError(f"dedup components did not converge in {MAX_STAR_STEPS} steps")
    counters["components_steps"] = step + 1
    decided = run_partitions(
        work,
        [f"decide-{s:04d}" for s in shards],
        lambda t: _decide_task.remote(int(t[-4:]), step, names, str(work), cfg),
        progress("clusters"),
        cfg.workers,
    )
    counters["clusters"] = sum(r["clusters"] for r in decided.values())
    if cfg.lines:
        spans = run_partitions(
            work,
            [f"lines-{s:04d}" for s in shards],
            lambda t: _lines_task.remote(int(t[-4:]), names, str(work), cfg.shards),
            progress("line spans"),
            cfg.workers,
        )
        counters["line_spans"] = sum(r["spans"] for r in spans.values())
        counters["line_spans_cut"] = sum(r["cut"] for r in spans.values())
    applied = run_partitions(
        work,
        [f"apply-{n}" for n in names],
        lambda t: _apply_task.remote(by_name[t[6:]][1], str(out), str(work), cfg),
        progress("write"),
        cfg.workers,
    )
    results = [applied[f"apply-{n}"] for n in names]
    for r in results:
        counters.update(r["counters"])
    docs_in = sum(m["documents"] for m in maps.values())
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
    clusters = pa.concat_tables([read_ipc(work / "clusters" / f"{s:04d}.arrow") for s in shards])
    clusters = clusters.sort_by([("size", "descending"), ("representative", "ascending")])
    pq.write_table(clusters, out / CLUSTERS)  # representative, size, members: for the quality report
    return write_index(
        out,
        stage="dedup",
        cache_key=cache_key,
        files=[r["kept"] for r in results],
        schema=DOCUMENT_SCHEMA,
        inputs=inputs,
        counters=dict(counters),
        extra={"clusters": {"path": CLUSTERS, "rows": clusters.num_rows}},
    )
