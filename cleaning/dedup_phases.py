"""The phases of corpus-scale deduplication, as functions over Arrow tables and numpy arrays.

orchestration/dedup.py maps each phase over Ray tasks and owns the files between them; here is what each
task computes, with no I/O:

1. :func:`signatures` (per input partition): ids, lengths and 128-bit exact-text hashes of the
   documents, their shingle hashes and MinHash signatures, the LSH (band, key, node) rows, the line
   spans and the id hashes. A node is ``partition << 32 | row``. Then :func:`id_collisions` (per id-hash
   shard): a document whose id an earlier one already has is removed (``duplicate_id``) and takes no
   part in what follows.
2. :func:`candidate_pairs` (per key shard): documents sharing a bucket are candidate pairs, sent to the
   verify shard that owns the pair; :func:`verified_edges` (per verify shard): exact-text buckets are
   duplicates when all 128 bits agree, others are verified by exact Jaccard of their shingle sets (or
   the signatures' estimate), each pair once.
3. :func:`star_step` (per node shard, repeated): alternating large-star and small-star steps (Kiveris et
   al., 2014) until every component is a star around its smallest node.
4. :func:`decide_clusters` (per root shard): each component's survivor by the keep rule, the decisions
   for its removed members, and the cluster table rows.
5. :func:`repeated_spans` (per span-hash shard, with ``lines``): every occurrence of a line span after
   the first, among the documents that survive document-level dedup, in corpus order.
6. :func:`apply_decisions` (per partition): the kept documents; the removed ones go to the context's
   rejected sink with the reason.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from cleaning.dedup import (
    ExactDedupConfig,
    LineDedupConfig,
    MinHashDedupConfig,
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
from core.schema import DEDUP_COPIES, append_meta
from core.stage import StageConfig, StageContext

EXACT_BAND = -1
#: One row per duplicate cluster: its survivor, its size and the ids of the removed members.
CLUSTER_SCHEMA = pa.schema(
    [("representative", pa.string()), ("size", pa.int64()), ("members", pa.list_(pa.string()))]
)
#: A removed document: (duplicate_of, best similarity or None, filter).
Removal = tuple[str, float | None, str]


#: A shard task's memory: the process, and each document of its share. Fit to the peaks measured before
#: the verify phase was owned by pair; conservative since (10M documents -> 41 shards, the largest task
#: 857 MB against the default 2048 MB budget), kept so that a skewed corpus still fits.
SHARD_BASE_MB = 750
SHARD_BYTES_PER_DOCUMENT = 5_500


class DedupConfig(StageConfig):
    """Exact and near-duplicate removal (run on Ray by orchestration/dedup.py); null switches a step off."""

    exact: ExactDedupConfig | None = Field(default_factory=ExactDedupConfig)
    minhash: MinHashDedupConfig | None = Field(default_factory=MinHashDedupConfig)
    lines: LineDedupConfig | None = Field(
        None, description="Repeated line spans cut across documents (C4-style); off unless set."
    )
    partition_mb: float = Field(64, gt=0, description="Text (MiB) per signature task (the map phase).")
    shards: int | None = Field(
        None,
        ge=1,
        description="Reduce tasks: LSH buckets, and then graph nodes, are split among them by key (null: "
        "enough that each task's share of the corpus fits memory_mb, at least 4).",
    )
    memory_mb: int = Field(
        2048,
        ge=1024,
        description="Memory a shard task may use (MiB): with shards null it sets the shard count from the "
        "corpus size, so a task's peak follows this budget, not the corpus.",
    )
    workers: int | None = Field(
        None, ge=1, description="Tasks running at once (default: as many as the Ray cluster has CPUs for)."
    )

    def shards_for(self, documents: int) -> int:
        """``shards``, or the count that gives each shard task at most what ``memory_mb`` holds: a fixed
        base for the process plus ``SHARD_BYTES_PER_DOCUMENT`` for each of its documents (measured: a
        worker's peak grew 2.1 -> 6.2 GB from 250k to 1M documents per shard, 4 shards of 1M and 4M)."""
        if self.shards is not None:
            return self.shards
        room = (self.memory_mb - SHARD_BASE_MB) * 2**20
        return max(4, -(-documents * SHARD_BYTES_PER_DOCUMENT // room))

    def keep_rule(self) -> tuple[str, str | None]:
        """The keep rule and the meta signal it ranks by (exact-only dedup keeps the first id)."""
        return (self.minhash.keep, self.minhash.score_key) if self.minhash else ("first", None)


def split_by(table: pa.Table, owner: np.ndarray, shards: int) -> list[pa.Table]:
    """The rows of ``table`` whose ``owner`` is 0, 1, ... ``shards - 1``."""
    return [table.filter(pa.array(owner == shard)) for shard in range(shards)]


@dataclass
class Signatures:
    """What the map phase learns of one partition."""

    docs: pa.Table  # id, length, exact, exact_hi (and score): per row
    bands: pa.Table  # band, key, node: one row per document and LSH band (band -1: the exact hash)
    shingles: np.ndarray | None  # every document's shingle hashes, flat
    offsets: np.ndarray | None  # document i's shingles are shingles[offsets[i]:offsets[i + 1]]
    sigs: np.ndarray | None  # (documents, num_perm) MinHash signatures
    lines: pa.Table | None  # hash, node, span: one row per line span
    ids: pa.Table  # key, node: a 64-bit hash of each document's id

    def id_shards(self, shards: int) -> list[pa.Table]:
        """The id-hash rows split by hash, one table per id shard."""
        return split_by(self.ids, self.ids.column("key").to_numpy() % np.uint64(shards), shards)

    def band_shards(self, shards: int) -> list[pa.Table]:
        """The band rows split by bucket key, one table per reduce shard."""
        return split_by(self.bands, self.bands.column("key").to_numpy() % np.uint64(shards), shards)

    def line_shards(self, shards: int) -> list[pa.Table]:
        """The line-span rows split by span hash, one table per lines shard."""
        return split_by(self.lines, self.lines.column("hash").to_numpy() % np.uint64(shards), shards)


def _line_rows(node: np.ndarray, texts: list[str], cfg: LineDedupConfig) -> pa.Table:
    hashes, nodes, spans = [], [], []
    for doc, text in zip(node.tolist(), texts):
        h, first = line_spans(text, cfg.span, cfg.normalize)
        hashes.extend(h)
        nodes.extend([doc] * len(h))
        spans.extend(first)
    return pa.table(
        {
            "hash": pa.array(hashes, pa.uint64()),
            "node": pa.array(nodes, pa.int64()),
            "span": pa.array(spans, pa.int32()),
        }
    )


def signatures(batches: Iterable[pa.RecordBatch], index: int, cfg: DedupConfig) -> Signatures:
    """Phase 1 over the documents of partition ``index`` (batches with ``id``, ``text`` and, when the
    keep rule ranks by a score, ``meta``)."""
    ids, texts, scores = [], [], []
    score_key = cfg.keep_rule()[1]
    for batch in batches:
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
    docs = pa.table(
        {"id": ids, "length": [len(t) for t in texts], "exact": exact, "exact_hi": exact_hi}
        | ({"score": pa.array(scores, pa.float64())} if score_key else {})
    )
    band_col, key_col, node_col = [], [], []
    shingles = offsets = sigs = None
    if cfg.exact:
        band_col.append(np.full(n, EXACT_BAND, dtype=np.int16))
        key_col.append(exact)
        node_col.append(node)
    if cfg.minhash:
        m = cfg.minhash
        hasher = MinHasher(m.num_perm, m.seed, m.ngram, m.shingle_hash)
        shingles, counts = hasher.shingle_hashes(texts)
        sigs = hasher.minimums(shingles, counts)
        offsets = np.r_[0, np.cumsum(counts)]
        bands, rows = m.banding()
        keys = band_keys(sigs, bands, rows)
        band_col.append(np.repeat(np.arange(bands, dtype=np.int16), n))
        key_col.append(keys.T.ravel())
        node_col.append(np.tile(node, bands))
    band, key, nodes = (np.concatenate(c) if c else np.empty(0) for c in (band_col, key_col, node_col))
    table = pa.table(
        {"band": band.astype(np.int16), "key": key.astype(np.uint64), "node": nodes.astype(np.int64)}
    )
    lines = _line_rows(node, texts, cfg.lines) if cfg.lines else None
    id_keys = [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids]
    id_rows = pa.table({"key": pa.array(id_keys, pa.uint64()), "node": pa.array(node, pa.int64())})
    return Signatures(docs, table, shingles, offsets, sigs, lines, id_rows)


def id_collisions(rows: pa.Table, id_of: Callable[[int], str]) -> np.ndarray:
    """Phase 1b over one id shard's (key, node) rows: the nodes whose document id an earlier node (in
    corpus order) already has. Those documents are removed before any similarity is computed, so an id
    names one document downstream."""
    order = np.lexsort((rows.column("node").to_numpy(), rows.column("key").to_numpy()))
    key, node = rows.column("key").to_numpy()[order], rows.column("node").to_numpy()[order]
    same_key = np.flatnonzero(np.r_[False, key[1:] == key[:-1]] | np.r_[key[:-1] == key[1:], False])
    seen: set[tuple[int, str]] = set()
    later = []
    for i in same_key.tolist():  # only hash collisions need the ids themselves
        doc = (int(key[i]), id_of(int(node[i])))
        if doc in seen:
            later.append(int(node[i]))
        seen.add(doc)
    return np.array(sorted(later), dtype=np.int64)


PAIR_SCHEMA = pa.schema([("a", pa.int64()), ("b", pa.int64()), ("exact", pa.bool_())])


def candidate_pairs(rows: pa.Table, cfg: DedupConfig, shards: int) -> list[pa.Table]:
    """Phase 2a over one key shard's (band, key, node) rows: the candidate pairs (a < b, ``exact`` when
    they share an exact-text bucket) split by the verify shard that owns each pair.

    A near-duplicate pair shares most LSH bands and the bands are spread over the key shards, so every
    key shard finds most of the corpus's pairs: verifying them here would make each task's work (and
    the pages of the shingle files it reads) follow the corpus. Owned by pair, each is verified once."""
    band = rows.column("band").to_numpy()
    key, node = rows.column("key").to_numpy(), rows.column("node").to_numpy()
    exact = band == EXACT_BAND
    same_text = sorted(bucket_pairs(band[exact], key[exact], node[exact], max_bucket=0))
    near = sorted(bucket_pairs(band[~exact], key[~exact], node[~exact])) if cfg.minhash else []
    pairs = np.array(same_text + near, dtype=np.int64).reshape(-1, 2)
    flags = np.r_[np.ones(len(same_text), dtype=bool), np.zeros(len(near), dtype=bool)]
    table = pa.table({"a": pairs[:, 0], "b": pairs[:, 1], "exact": flags}, schema=PAIR_SCHEMA)
    return split_by(table, pair_shard(pairs[:, 0], pairs[:, 1], shards), shards)


def pair_shard(a: np.ndarray, b: np.ndarray, shards: int) -> np.ndarray:
    """The verify shard that owns each pair (a, b)."""
    return node_shard(a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ b.astype(np.uint64), shards)


def verified_edges(
    pairs: pa.Table,
    cfg: DedupConfig,
    exact_hi: Callable[[np.ndarray], dict[int, int]],
    shingles: Callable[[np.ndarray], dict[int, np.ndarray]],
    signatures: Callable[[np.ndarray], dict[int, np.ndarray]],
) -> tuple[pa.Table, int]:
    """Phase 2b over one verify shard's candidate pairs (a, b, exact), as every key shard found them: the
    verified edges (a, b, similarity), sorted, and the number of distinct near-duplicate candidates.
    Exact-bucket pairs are duplicates when all 128 bits of the text hash agree; the others are verified
    by exact Jaccard of their shingle sets (or the signatures' estimate). ``exact_hi``, ``shingles`` and
    ``signatures`` look the given nodes' high text-hash halves, shingle hashes and signatures up at once
    (partition by partition)."""
    a, b = pairs.column("a").to_numpy(), pairs.column("b").to_numpy()
    is_exact = pairs.column("exact").to_numpy(zero_copy_only=False)
    edges: dict[tuple[int, int], float] = {}
    exact = np.unique(np.stack([a[is_exact], b[is_exact]], axis=1), axis=0)
    high = exact_hi(np.unique(exact)) if exact.size else {}
    for x, y in exact.tolist():
        if high[x] == high[y]:  # all 128 bits agree
            edges[(x, y)] = 1.0
    candidates = 0
    if cfg.minhash:
        m = cfg.minhash
        near = np.unique(np.stack([a[~is_exact], b[~is_exact]], axis=1), axis=0)
        near = [(x, y) for x, y in near.tolist() if (x, y) not in edges]
        candidates = len(near)
        nodes = np.unique(np.array(near, dtype=np.int64))
        verify_by = signatures if m.verify in ("estimate", "none") else shingles
        looked_up = verify_by(nodes) if nodes.size else {}
        similarity = Similarity(m.verify, looked_up.__getitem__, looked_up.__getitem__)
        for x, y in near:
            if (sim := similarity(x, y)) >= similarity.threshold(m):
                edges[(x, y)] = sim
    order = sorted(edges)
    table = pa.table(
        {
            "a": pa.array([p[0] for p in order], pa.int64()),
            "b": pa.array([p[1] for p in order], pa.int64()),
            "similarity": pa.array([edges[p] for p in order], pa.float64()),
        }
    )
    return table, candidates


def step_edges(
    step: int, x: np.ndarray, y: np.ndarray, shards: int, sim: np.ndarray | None = None
) -> list[pa.Table]:
    """The edges (x, y) as input of components step ``step``, one table per owner shard: both directions
    for a large-star step (even), (larger, smaller) for a small-star step (odd)."""
    loop = x == y
    x, y = x[~loop], y[~loop]
    if step % 2 == 0:
        u, v = np.r_[x, y], np.r_[y, x]
        sim = None if sim is None else np.r_[sim[~loop], sim[~loop]]
    else:
        u, v = np.maximum(x, y), np.minimum(x, y)
    columns = {"u": u, "v": v} | ({"similarity": sim} if sim is not None else {})
    return split_by(pa.table(columns), node_shard(u, shards), shards)


def best_similarity(edges: pa.Table) -> pa.Table:
    """Each node's best similarity to a neighbour (node, best), over the step-0 edges of its shard."""
    u = edges.column("u").to_numpy()
    order = np.argsort(u, kind="stable")
    nodes = u[order]
    starts = run_starts(nodes)
    best = np.maximum.reduceat(edges.column("similarity").to_numpy()[order], starts) if nodes.size else []
    return pa.table({"node": nodes[starts], "best": pa.array(best, pa.float64())})


@dataclass
class StarStep:
    """One components step over the nodes of a shard."""

    x: np.ndarray  # the next step's edges (x, y)
    y: np.ndarray
    converged: bool  # a large-star step whose nodes were already stars around their minima
    labels: pa.Table | None  # node, root, best: set when converged


def star_step(step: int, edges: pa.Table, best: Callable[[], pa.Table]) -> StarStep:
    """Phase 3: large-star on even steps, small-star on odd ones, over one shard's edges (u, v).

    A large-star step whose nodes are already stars labels them (node, root, best similarity from
    ``best()``, the shard's :func:`best_similarity`): when every shard of a step converges, those are
    the components."""
    u, v = edges.column("u").to_numpy(), edges.column("v").to_numpy()
    if step % 2:
        x, y = small_star(u, v)
        return StarStep(x, y, False, None)
    (x, y), labels, converged = large_star(u, v)
    table = None
    if converged:
        known = best()
        if not np.array_equal(known.column("node").to_numpy(), labels[:, 0]):
            raise RuntimeError(f"dedup components lost nodes at step {step}")
        table = pa.table({"node": labels[:, 0], "root": labels[:, 1], "best": known.column("best")})
    return StarStep(x, y, converged, table)


def root_shards(labels: pa.Table, shards: int) -> list[pa.Table]:
    """Converged labels split by the shard that owns each component's root."""
    return split_by(labels, node_shard(labels.column("root").to_numpy(), shards), shards)


@dataclass
class Clusters:
    """Phase 4's outcome for one root shard."""

    decisions: dict[int, pa.Table]  # partition index -> (row, duplicate_of, value, filter), by row
    table: pa.Table  # representative, size, members: one row per cluster
    removed: int
    copies: dict[int, pa.Table] = field(default_factory=dict)  # partition -> (row, copies) of survivors


def decide_clusters(
    labels: pa.Table, info: dict[int, dict[str, Any]], cfg: DedupConfig, priority: list[int] | None = None
) -> Clusters:
    """Phase 4 over the labels (node, root, best) of the components one shard owns; ``info`` holds each
    node's ``id``, ``length``, ``exact``, ``exact_hi`` (and ``score``). ``priority``: a rank per input
    partition (node >> 32) that comes before the keep rule (across sources: the earlier source's copy
    survives)."""
    labels = labels.sort_by([("root", "ascending"), ("node", "ascending")])
    node, root = labels.column("node").to_numpy(), labels.column("root").to_numpy()
    best = labels.column("best").to_numpy()
    keep = cfg.keep_rule()[0]
    decisions: dict[int, list[tuple[int, str, float, str]]] = {}
    survivors: dict[int, list[tuple[int, int]]] = {}
    clusters: list[tuple[str, int, list[str]]] = []
    starts = run_starts(root)
    for start, end in zip(starts.tolist(), np.r_[starts[1:], root.size].tolist()):
        members = node[start:end].tolist()
        rows = [info[m] for m in members]
        ranks = [
            (priority[m >> 32] if priority else 0, *survivor_rank(keep, r["id"], r["length"], r.get("score")))
            for m, r in zip(members, rows)
        ]
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
        survivors.setdefault(members[kept] >> 32, []).append((members[kept] & 0xFFFFFFFF, len(members)))
    tables = {}
    for part, rows in decisions.items():
        rows.sort()
        tables[part] = pa.table(
            {
                "row": pa.array([r[0] for r in rows], pa.int64()),
                "duplicate_of": pa.array([r[1] for r in rows], pa.string()),
                "value": pa.array([r[2] for r in rows], pa.float64()),
                "filter": pa.array([r[3] for r in rows], pa.string()),
            }
        )
    columns = zip(*clusters) if clusters else ([], [], [])
    table = pa.table(dict(zip(CLUSTER_SCHEMA.names, columns)), schema=CLUSTER_SCHEMA)
    copies = {
        part: pa.table({"row": pa.array([r for r, _ in sorted(rows)], pa.int64()),
                        "copies": pa.array([n for _, n in sorted(rows)], pa.int64())})
        for part, rows in survivors.items()
    }  # fmt: skip
    return Clusters(tables, table, int(node.size) - len(clusters), copies)


EMPTY_COPIES = pa.schema([("row", pa.int64()), ("copies", pa.int64())])

EMPTY_DECISIONS = pa.schema(
    [("row", pa.int64()), ("duplicate_of", pa.string()), ("value", pa.float64()), ("filter", pa.string())]
)


def repeated_spans(rows: pa.Table, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Phase 5 over one hash shard's line spans (hash, node, span): the (node, span) of every occurrence
    after the first in corpus order, among nodes not in ``removed``; and how many spans were seen."""
    node = rows.column("node").to_numpy()
    alive = ~np.isin(node, removed)
    hashes, node, span = (
        rows.column("hash").to_numpy()[alive],
        node[alive],
        rows.column("span").to_numpy()[alive],
    )
    order = np.lexsort((span, node, hashes))
    hashes, node, span = hashes[order], node[order], span[order]
    later = np.r_[False, hashes[1:] == hashes[:-1]]  # not the first occurrence of its span
    return node[later], span[later], int(hashes.size)


def apply_decisions(
    batches: Iterable[pa.RecordBatch],
    removed: dict[int, Removal],
    cuts: dict[int, list[int]],
    cfg: DedupConfig,
    ctx: StageContext,
    copies: dict[int, int] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Phase 6 over one partition's documents: the kept ones (with repeated line spans cut); the removed
    rows (partition row -> duplicate_of, similarity, filter) go to ``ctx.reject`` with the reason.
    ``copies`` (partition row -> cluster size) of the survivors: in their ``meta`` as ``dedup.copies``
    (1 for the batch's other documents; a batch without a survivor gets none)."""
    row = 0
    for batch in batches:
        drop = np.array([row + i in removed for i in range(batch.num_rows)], dtype=bool)
        for name, signal in (
            ("duplicate_id", "id"),
            ("exact_dedup", "text_hash"),
            ("minhash_dedup", "jaccard"),
        ):
            rows = [row + i for i in np.flatnonzero(drop) if removed[row + i][2] == name]
            if rows:
                local = pa.array(np.array(rows) - row)
                ctx.reject(
                    batch.take(local),
                    filter=name,
                    signal=signal,
                    values=[removed[r][1] for r in rows],
                    duplicate_of=[removed[r][0] for r in rows],
                )
        batch = batch.filter(pa.array(~drop))
        kept = (row + np.flatnonzero(~drop)).tolist()
        if copies and any(r in copies for r in kept):
            batch = append_meta(
                batch, {DEDUP_COPIES: np.array([copies.get(r, 1) for r in kept], dtype=np.float64)}
            )
        if cuts:
            batch = _cut_lines(batch, [row + i for i in np.flatnonzero(~drop)], cuts, cfg.lines, ctx)
        yield batch
        row += drop.size


def _cut_lines(
    batch: pa.RecordBatch,
    rows: list[int],
    cuts: dict[int, list[int]],
    cfg: LineDedupConfig,
    ctx: StageContext,
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
            texts[i] = cut_spans(texts[i], cuts[row], cfg.span, cfg.normalize)
            ctx.counters["line_dedup.documents_cut"] += 1
            ctx.counters["line_dedup.lines_cut"] += before - (texts[i].count("\n") + 1)
            words[i] = len(texts[i].split())
            short[i] = words[i] < cfg.min_words
    original = batch
    batch = batch.set_column(batch.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    if short.any():
        ctx.reject(  # with the text as it came in: nothing is lost
            original.filter(pa.array(short)),
            filter="line_dedup",
            signal="words_after_cut",
            values=[words[i] for i in np.flatnonzero(short)],
            threshold=cfg.min_words,
        )
    return batch.filter(pa.array(~short))
