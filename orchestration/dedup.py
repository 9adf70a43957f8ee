"""Exact and MinHash-LSH deduplication as Ray tasks: no process ever holds every signature.

1. map, one task per input partition (row ranges, as for tokenization): shingle hashes, signatures, the
   LSH band keys and the exact-text hash of each document. It writes its documents' ids and lengths, its
   shingle hashes (and signatures) as memory-mappable arrays, and its (band, key, node) rows split into
   ``shards`` files by key, so each reduce task reads only its share. A node is
   ``partition << 32 | row``.
2. reduce, one task per key shard: sort its rows by (band, key); documents sharing a bucket are candidate
   pairs; exact-text buckets (band -1) are duplicates when all 128 bits of the text hash agree; others are
   verified by exact Jaccard
   of their shingle sets (or the signatures' estimate), read from the map outputs for just those nodes.
   It writes the verified edges.
3. the driver joins the edges (one per duplicate pair, far fewer than documents) into connected
   components, picks each cluster's survivor by the keep rule, and writes the cluster table
   (``clusters.parquet``: representative, size, members).
4. apply, one task per partition: writes kept documents and the removed ones with ``duplicate_of``
   (the survivor), ``value`` (best similarity in the cluster) and the filter that removed them
   (``exact_dedup`` when another member of the cluster has the same normalized text, else
   ``minhash_dedup``).

Every phase leaves completion markers: a killed stage resumes from the finished tasks. The output depends
on the documents and the config only (the partition plan comes from the files and ``partition_mb``).
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

from cleaning.dedup import Similarity, band_keys, bucket_pairs, cluster_decisions, text_hash
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


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


@ray.remote(num_cpus=1)
def _map_task(index: int, part: Partition, work: str, cfg: DedupConfig) -> dict[str, Any]:
    work_dir = Path(work)
    ids, texts = [], []
    for batch in part.batches(["id", "text"]):
        ids.extend(batch.column("id").to_pylist())
        texts.extend(batch.column("text").to_pylist())
    n = len(ids)
    node = (np.int64(index) << np.int64(32)) | np.arange(n, dtype=np.int64)
    normal = cfg.exact is None or cfg.exact.normalize
    # A 128-bit hash of the (normalized) text: the low half buckets, the high half confirms.
    digests = [text_hash(t, normal) for t in texts]
    exact = np.array([int.from_bytes(d[:8], "little") for d in digests], dtype=np.uint64)
    exact_hi = np.array([int.from_bytes(d[8:], "little") for d in digests], dtype=np.uint64)
    write_ipc(
        work_dir / "docs" / f"{part.name}.arrow",
        pa.table({"id": ids, "length": [len(t) for t in texts], "exact": exact, "exact_hi": exact_hi}),
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
    table = pa.table(
        {
            "a": np.array([p[0] for p in pairs], dtype=np.int64),
            "b": np.array([p[1] for p in pairs], dtype=np.int64),
            "similarity": np.array([edges[p] for p in pairs], dtype=np.float64),
        }
    )
    write_ipc(work_dir / "edges" / f"{shard:04d}.arrow", table)
    result = {"part": f"reduce-{shard:04d}", "candidate_pairs": candidates, "edges": len(pairs)}
    atomic_write_bytes(work_dir / DONE_DIR / f"reduce-{shard:04d}.json", json.dumps(result).encode())
    return result


@ray.remote(num_cpus=1)
def _apply_task(part: Partition, out: str, work: str) -> dict[str, Any]:
    out_dir, work_dir = Path(out), Path(work)
    decisions = read_ipc(work_dir / "decisions" / f"{part.name}.arrow").to_pydict()
    removed = dict(
        zip(decisions["row"], zip(decisions["duplicate_of"], decisions["value"], decisions["filter"]))
    )
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
            yield batch.filter(pa.array(~drop))
            row += batch.num_rows

    kept = write_parquet(out_dir / f"{part.name}.parquet", kept_batches(), DOCUMENT_SCHEMA)
    rejected = write_parquet(out_dir / REJECTED_DIR / f"{part.name}.parquet", ctx.rejected, REJECTED_SCHEMA)
    result = {"part": part.name, "kept": kept, "rejected": rejected, "counters": dict(ctx.counters)}
    atomic_write_bytes(work_dir / DONE_DIR / f"apply-{part.name}.json", json.dumps(result).encode())
    return result


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
    )
    reduces = run_partitions(
        work,
        [f"reduce-{s:04d}" for s in range(cfg.shards)],
        lambda t: _reduce_task.remote(int(t[7:]), names, str(work), cfg),
        progress("candidate pairs"),
    )
    counters: Counter = Counter()
    counters["candidate_pairs"] = sum(r["candidate_pairs"] for r in reduces.values())
    if not (work / DONE_DIR / "decisions.json").exists():
        _decide(work, names, cfg)
    counters.update(json.loads((work / DONE_DIR / "decisions.json").read_text()))
    applied = run_partitions(
        work,
        [f"apply-{n}" for n in names],
        lambda t: _apply_task.remote(by_name[t[6:]][1], str(out), str(work)),
        progress("write"),
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
    clusters = read_ipc(work / "clusters.arrow")
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


def _decide(work: Path, names: list[str], cfg: DedupConfig) -> None:
    """Connected components of every shard's edges; one decisions file per partition."""
    edges = pa.concat_tables([read_ipc(p) for p in sorted((work / "edges").glob("*.arrow"))])
    a, b = edges.column("a").to_numpy(), edges.column("b").to_numpy()
    sim = edges.column("similarity").to_numpy()
    nodes = np.unique(np.r_[a, b])
    # The ids, lengths and exact hashes of just the nodes in some edge.
    info: dict[int, tuple[str, int, tuple[int, int]]] = {}
    for index, name in enumerate(names):
        mine = nodes[(nodes >> 32) == index]
        if mine.size:
            table = read_ipc(work / "docs" / f"{name}.arrow").take(pa.array(mine & 0xFFFFFFFF))
            columns = (table.column(c).to_pylist() for c in ("id", "length", "exact", "exact_hi"))
            for node, doc_id, length, lo, hi in zip(mine.tolist(), *columns):
                info[int(node)] = (doc_id, length, (lo, hi))
    keep = cfg.minhash.keep if cfg.minhash else "first"
    decisions = cluster_decisions(
        zip(a.tolist(), b.tolist(), sim.tolist()), lambda n: info[n][0], lambda n: info[n][1], keep
    )
    # A removed document with an exact-text twin in its cluster is an exact duplicate; else a near one.
    exact_in_cluster = Counter((kept_id, info[n][2]) for n, (kept_id, _) in decisions.items())
    survivors = {info[n][0]: n for n in info}
    for kept_id in {k for k, _ in decisions.values()}:
        exact_in_cluster[(kept_id, info[survivors[kept_id]][2])] += 1
    per_part: dict[int, list[tuple[int, str, float, str]]] = {}
    for node, (kept_id, value) in decisions.items():
        name = "exact_dedup" if exact_in_cluster[(kept_id, info[node][2])] > 1 else "minhash_dedup"
        per_part.setdefault(node >> 32, []).append((node & 0xFFFFFFFF, kept_id, value, name))
    for index, name in enumerate(names):
        rows = sorted(per_part.get(index, []))
        table = pa.table(
            {
                "row": pa.array([r[0] for r in rows], pa.int64()),
                "duplicate_of": pa.array([r[1] for r in rows], pa.string()),
                "value": pa.array([r[2] for r in rows], pa.float64()),
                "filter": pa.array([r[3] for r in rows], pa.string()),
            }
        )
        write_ipc(work / "decisions" / f"{name}.arrow", table)
    members: dict[str, list[str]] = {}
    for node, (kept_id, _) in decisions.items():
        members.setdefault(kept_id, []).append(info[node][0])
    table = pa.table(
        {
            "representative": pa.array(list(members), pa.string()),
            "size": pa.array([len(m) + 1 for m in members.values()], pa.int64()),
            "members": pa.array([sorted(m) for m in members.values()], pa.list_(pa.string())),
        }
    )
    write_ipc(
        work / "clusters.arrow", table.sort_by([("size", "descending"), ("representative", "ascending")])
    )
    summary = {"edges": int(a.size), "clusters": len(members)}
    atomic_write_bytes(work / DONE_DIR / "decisions.json", json.dumps(summary).encode())
