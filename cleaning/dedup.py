"""Exact and MinHash-LSH near-duplicate removal.

Both keep one document of each duplicate group by a deterministic rule (the first by document id, by
default) and write every removed document with ``duplicate_of`` naming the kept one. The stages here
see their whole input in one process: the reference forms. orchestration/dedup.py runs the same steps
(with the kernels below) as Ray tasks over shards of the signatures, buckets and graph.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from cleaning.minhash import MinHasher, ShingleHashName, dedup_normal_form
from core.stage import Stage, StageConfig, StageContext


def _sorted_by_id(batches: Iterable[pa.RecordBatch]) -> pa.Table | None:
    batches = list(batches)
    if not batches:
        return None
    table = pa.Table.from_batches(batches)
    return table.take(np.argsort(np.array(table.column("id").to_pylist(), dtype=object), kind="stable"))


def meta_scores(meta: pa.ChunkedArray | pa.Array, key: str | None) -> list[float | None]:
    """Each document's ``meta[key]`` signal (None where it has none, or without a key)."""
    if key is None:
        return [None] * len(meta)
    return [dict(m or []).get(key) for m in meta.to_pylist()]


def text_hash(text: str, normalize: bool = True) -> bytes:
    """128-bit blake2b of the text's dedup normal form (or of the raw text): 'the same text'."""
    return hashlib.blake2b((dedup_normal_form(text) if normalize else text).encode(), digest_size=16).digest()


class ExactDedupConfig(StageConfig):
    """Exact duplicate removal."""

    normalize: bool = Field(True, description="Compare the dedup normal form instead of raw text.")


class ExactDeduplicator(Stage):
    """Removes documents whose (normalized) text hash equals an earlier document's."""

    name = "exact_dedup"
    config: ExactDedupConfig

    def run(self, batches: Iterable[pa.RecordBatch], ctx: StageContext) -> Iterator[pa.RecordBatch]:
        table = _sorted_by_id(batches)
        if table is None:
            return
        first: dict[bytes, str] = {}
        duplicate_of: list[str | None] = []
        for doc_id, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist()):
            digest = text_hash(text, self.config.normalize)
            duplicate_of.append(first.get(digest))
            first.setdefault(digest, doc_id)
        dup = np.array([d is not None for d in duplicate_of], dtype=bool)
        ctx.reject(
            table.filter(pa.array(dup)),
            filter=self.name,
            signal="text_hash",
            duplicate_of=[d for d in duplicate_of if d is not None],
        )
        yield from table.filter(pa.array(~dup)).combine_chunks().to_batches()


class MinHashDedupConfig(StageConfig):
    """MinHash-LSH near-duplicate removal (defaults: 5-word shingles, 128 permutations, Jaccard 0.8)."""

    ngram: int = Field(5, ge=1, description="Words per shingle.")
    num_perm: int = Field(128, ge=16, description="MinHash permutations.")
    threshold: float = Field(
        0.8, gt=0, lt=1, description="Estimated Jaccard at which documents are duplicates."
    )
    seed: int = Field(1, description="Seed of the MinHash permutations (drawn as datasketch draws them).")
    verify: Literal["exact", "estimate", "none"] = Field(
        "exact",
        description="Confirm candidate pairs by exact Jaccard of shingle sets, by the MinHash estimate, or "
        "not at all (every bucket match is a duplicate, as in DataTrove).",
    )
    keep: Literal["first", "longest", "score"] = Field(
        "first",
        description="Which document of a cluster survives: the first by id, the longest text, or the "
        "highest quality score (meta[score_key]; ties and missing scores go to the first id).",
    )
    score_key: str | None = Field(None, description="The meta signal that keep='score' ranks by.")
    bands: int | None = Field(None, ge=1, description="LSH bands (with rows); default: datasketch's choice.")
    rows: int | None = Field(None, ge=1, description="Signature rows per LSH band (with bands).")
    shingle_hash: ShingleHashName = Field(
        "words", description="'words' (fast, compiled) or 'sha1' (datasketch's default hash, slow)."
    )

    def banding(self) -> tuple[int, int]:
        """(bands, rows): the configured ones, or chosen for the threshold (for recall when verifying
        exactly, since verification removes the false positives)."""
        if self.bands:
            return self.bands, self.rows
        return lsh_bands(self.threshold, self.num_perm, 0.95 if self.verify == "exact" else 0.5)

    @model_validator(mode="after")
    def _banding(self) -> MinHashDedupConfig:
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither (then they follow from threshold)")
        if self.bands and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows = {self.bands * self.rows} exceeds num_perm={self.num_perm}")
        if (self.keep == "score") != (self.score_key is not None):
            raise ValueError("keep='score' needs score_key (the meta signal to rank by), and only it does")
        return self


class MinHashDeduplicator(Stage):
    """Near-duplicate clusters: MinHash-LSH candidates, verified pairs, connected components.

    Every document's signature goes into LSH bands (datasketch's choice of bands x rows for the
    threshold, or the configured ones); documents sharing a band bucket are candidate pairs. A pair is
    an edge when its Jaccard similarity reaches the threshold: the exact one of the two documents' shingle
    sets (``verify='exact'``, the default) or the signatures' estimate. Connected components of the edges
    are the clusters; each keeps one document (the first id, or the longest text) and the others are
    removed with ``duplicate_of`` naming it and ``value`` their highest similarity to a cluster member.
    This is the one-process form; orchestration/dedup.py runs the same steps as Ray tasks.
    """

    name = "minhash_dedup"
    config: MinHashDedupConfig

    def run(self, batches: Iterable[pa.RecordBatch], ctx: StageContext) -> Iterator[pa.RecordBatch]:
        table = _sorted_by_id(batches)
        if table is None:
            return
        cfg = self.config
        hasher = MinHasher(cfg.num_perm, cfg.seed, cfg.ngram, cfg.shingle_hash)
        texts = table.column("text").to_pylist()
        flat, counts = hasher.shingle_hashes(texts)
        sigs = hasher.minimums(flat, counts)
        bands, rows = cfg.banding()
        keys = band_keys(sigs, bands, rows)
        n = len(texts)
        pairs = bucket_pairs(np.repeat(np.arange(bands), n), keys.T.ravel(), np.tile(np.arange(n), bands))
        ctx.counters[f"{self.name}.candidate_pairs"] += len(pairs)
        sets = np.split(flat, np.cumsum(counts)[:-1])
        similarity = Similarity(cfg.verify, lambda i: sets[i], lambda i: sigs[i])
        edges = [(i, j, sim) for i, j in pairs if (sim := similarity(i, j)) >= similarity.threshold(cfg)]
        ctx.counters[f"{self.name}.verified_pairs"] += len(edges)
        ids = table.column("id").to_pylist()
        scores = meta_scores(table.column("meta"), cfg.score_key)
        ranks = [survivor_rank(cfg.keep, ids[i], len(texts[i]), scores[i]) for i in range(n)]
        nodes = cluster_decisions(edges, ranks.__getitem__)
        decisions = {node: (ids[kept], sim) for node, (kept, sim) in nodes.items()}
        ctx.counters[f"{self.name}.clusters"] += len({d[0] for d in decisions.values()})
        dup = np.zeros(n, dtype=bool)
        dup[list(decisions)] = True
        order = np.flatnonzero(dup)
        ctx.reject(
            table.filter(pa.array(dup)),
            filter=self.name,
            signal=f"jaccard_{cfg.verify}",
            values=[decisions[i][1] for i in order],
            threshold=cfg.threshold,
            duplicate_of=[decisions[i][0] for i in order],
        )
        yield from table.filter(pa.array(~dup)).combine_chunks().to_batches()


class LineDedupConfig(StageConfig):
    """Repeated-span removal across documents, as C4 did it: every span of ``span`` consecutive lines
    that already appeared earlier in the corpus (or earlier in the same document) is cut, keeping its
    first occurrence; documents left too short are removed."""

    span: int = Field(
        3, ge=1, description="Consecutive non-empty lines per span (C4: three sentences; 1: CCNet's lines)."
    )
    normalize: bool = Field(True, description="Compare the lines' dedup normal form instead of raw text.")
    min_words: int = Field(
        50, ge=0, description="Documents with fewer words left are removed (DataTrove SentenceDedup: 50)."
    )


def _span_lines(text: str, normalize: bool) -> tuple[list[str], list[str], list[int]]:
    """The text's lines, their compared forms, and the indexes of the lines whose form is not empty."""
    lines = text.split("\n")
    forms = [dedup_normal_form(line) if normalize else line.strip() for line in lines]
    return lines, forms, [i for i, f in enumerate(forms) if f]


def line_spans(text: str, span: int, normalize: bool = True) -> tuple[list[int], list[int]]:
    """64-bit hashes of the document's spans of ``span`` consecutive non-empty lines (non-empty in the
    normal form, when comparing it), and the index of each span's first line among the text's lines."""
    _, forms, kept = _span_lines(text, normalize)
    hashes, firsts = [], []
    for k in range(len(kept) - span + 1):
        joined = "\n".join(forms[i] for i in kept[k : k + span]).encode()
        hashes.append(int.from_bytes(hashlib.blake2b(joined, digest_size=8).digest(), "little"))
        firsts.append(k)
    return hashes, firsts


def cut_spans(text: str, spans: Iterable[int], span: int, normalize: bool = True) -> str:
    """The text without the lines of the given spans (numbered as :func:`line_spans` numbers them)."""
    lines, _, kept = _span_lines(text, normalize)
    cut = {kept[k + j] for k in spans for j in range(span)}
    return "\n".join(line for i, line in enumerate(lines) if i not in cut)


_FOLD = np.uint64(0x9E3779B97F4A7C15)


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """``(len(sigs), bands)`` uint64: each band's rows folded into one 64-bit bucket key."""
    keys = np.zeros((sigs.shape[0], bands), dtype=np.uint64)
    for band in range(bands):
        for col in sigs[:, band * rows : (band + 1) * rows].T:
            keys[:, band] = keys[:, band] * _FOLD + col.astype(np.uint64)
    return keys


def bucket_pairs(
    band: np.ndarray, key: np.ndarray, node: np.ndarray, max_bucket: int = 64
) -> set[tuple[int, int]]:
    """Distinct candidate pairs (a < b) of nodes sharing a (band, key) bucket.

    Within a bucket every pair is a candidate; a bucket larger than ``max_bucket`` (a template shared by
    many documents) pairs its smallest node with each other one instead.
    """
    order = np.lexsort((node, key, band))
    band, key, node = band[order], key[order], node[order]
    starts = np.flatnonzero(np.r_[True, (band[1:] != band[:-1]) | (key[1:] != key[:-1])])
    sizes = np.diff(np.r_[starts, band.size])
    found: set[tuple[int, int]] = set()
    for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
        members = node[start : start + size].tolist()
        if size <= max_bucket:
            found.update((a, b) for x, a in enumerate(members) for b in members[x + 1 :] if a != b)
        else:
            found.update((members[0], b) for b in members[1:] if b != members[0])
    return found


class Similarity:
    """Jaccard of two documents: exact over their shingle-hash sets, or the signatures' estimate."""

    def __init__(self, verify: str, shingles_of, signature_of):
        self.verify, self.shingles_of, self.signature_of = verify, shingles_of, signature_of
        self._unique: dict[int, np.ndarray] = {}

    def _set(self, i: int) -> np.ndarray:
        if i not in self._unique:
            self._unique[i] = np.unique(self.shingles_of(i))
        return self._unique[i]

    def threshold(self, cfg: MinHashDedupConfig) -> float:
        """The similarity an edge needs: the config's, or none at all without verification."""
        return -1.0 if self.verify == "none" else cfg.threshold

    def __call__(self, i: int, j: int) -> float:
        if self.verify in ("estimate", "none"):  # without verification, the estimate is only reported
            return float(np.mean(self.signature_of(i) == self.signature_of(j)))
        a, b = self._set(i), self._set(j)
        inter = np.intersect1d(a, b, assume_unique=True).size
        return inter / (a.size + b.size - inter)


def survivor_rank(keep: str, doc_id: str, length: int, score: float | None) -> tuple:
    """Sort key of a cluster member under the keep rule: the smallest key survives."""
    if keep == "first":
        return (doc_id,)
    if keep == "longest":
        return (-length, doc_id)
    missing = score is None or score != score  # NaN: no score
    return (missing, 0.0 if missing else -score, doc_id)


def cluster_decisions(edges: Iterable[tuple[int, int, float]], rank_of) -> dict[int, tuple[int, float]]:
    """Connected components of the verified edges -> ``{removed node: (kept node, best similarity)}``.

    The kept node of a component has the smallest ``rank_of(node)`` (see ``survivor_rank``).
    """
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        parent.setdefault(i, i)
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    best: dict[int, float] = {}
    for i, j, sim in edges:
        best[i], best[j] = max(best.get(i, 0.0), sim), max(best.get(j, 0.0), sim)
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    components: dict[int, list[int]] = {}
    for node in parent:
        components.setdefault(find(node), []).append(node)
    decisions: dict[int, tuple[int, float]] = {}
    for members in components.values():
        kept = min(members, key=rank_of)
        for node in members:
            if node != kept:
                decisions[node] = (kept, best[node])
    return decisions


# Connected components across Ray tasks: the large-star / small-star rounds of Kiveris et al.,
# "Connected Components in MapReduce and Beyond" (SoCC 2014). Each task owns the nodes of one hash shard
# and sees only their edges; alternating the two steps turns every component into a star around its
# smallest node in O(log^2 n) rounds.


def node_shard(nodes: np.ndarray, shards: int) -> np.ndarray:
    """The shard (0..shards-1) that owns each node: a multiplicative hash, so partitions spread evenly."""
    mixed = nodes.astype(np.uint64) * _FOLD
    return ((mixed >> np.uint64(32)) % np.uint64(shards)).astype(np.int64)


def run_starts(values: np.ndarray) -> np.ndarray:
    """Where each run of equal values starts in a sorted array (empty for an empty one)."""
    return np.flatnonzero(np.r_[True, values[1:] != values[:-1]]) if values.size else np.empty(0, np.int64)


def _groups(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (u, v) rows sorted by u then v, and the start of each u's run."""
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    distinct = np.r_[True, (u[1:] != u[:-1]) | (v[1:] != v[:-1])]
    u, v = u[distinct], v[distinct]
    return u, v, run_starts(u)


def large_star(u: np.ndarray, v: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, bool]:
    """One large-star step over every edge (both directions) of the nodes ``u`` a task owns.

    Each node links its larger neighbours to the smallest node of its neighbourhood. Returns the new
    edges, each owned node's smallest neighbourhood node (its component's smallest node once converged),
    and whether the owned part of the graph is already stars around minima: every node has no smaller
    neighbour (a centre) or exactly one and no larger ones (a leaf).
    """
    if u.size == 0:
        empty = np.empty(0, np.int64)
        return (empty, empty), np.empty((0, 2), np.int64), True
    u, v, starts = _groups(u, v)
    minimum = np.minimum(np.minimum.reduceat(v, starts), u[starts])
    sizes = np.diff(np.r_[starts, u.size])
    larger = v > u
    new = (v[larger], np.repeat(minimum, sizes)[larger])
    n_smaller = np.add.reduceat((v < u).astype(np.int64), starts)
    n_larger = np.add.reduceat(larger.astype(np.int64), starts)
    converged = bool(np.all((n_smaller == 0) | ((n_smaller == 1) & (n_larger == 0))))
    return new, np.stack([u[starts], minimum], axis=1), converged


def small_star(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One small-star step over the edges (u, v < u) keyed by their larger node ``u``: each node and its
    smaller neighbours are linked to the smallest of them."""
    if u.size == 0:
        return u, v
    u, v, starts = _groups(u, v)
    minimum = np.minimum.reduceat(v, starts)
    sizes = np.diff(np.r_[starts, u.size])
    row_min = np.repeat(minimum, sizes)
    other = v != row_min
    return np.r_[u[starts], v[other]], np.r_[minimum, row_min[other]]


def lsh_bands(threshold: float, num_perm: int, miss_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows per band) minimizing the weighted areas of false positives and false negatives around
    ``threshold``, as datasketch's ``MinHashLSH`` chooses them (``miss_weight`` is its false-negative
    weight; it uses 0.5).

    A pair of Jaccard similarity s shares a bucket with probability 1 - (1 - s^r)^b (Leskovec et al.,
    Mining of Massive Datasets, 3.4). The areas under that curve below the threshold (false positives)
    and above 1 minus it above the threshold (false negatives) are integrated for every b * r <= num_perm;
    ties keep the smallest b, then r, as datasketch does.
    """
    from scipy.integrate import quad  # here, not with the config: scipy takes a second to import

    best, choice = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = quad(lambda s, b=b, r=r: 1 - (1 - s**r) ** b, 0.0, threshold)[0]
            fn = quad(lambda s, b=b, r=r: (1 - s**r) ** b, threshold, 1.0)[0]
            error = fp * (1 - miss_weight) + fn * miss_weight
            if error < best:
                best, choice = error, (b, r)
    return choice
