"""Exact and MinHash-LSH near-duplicate removal.

Both keep one document of each duplicate group by a deterministic rule (the first by document id, by
default) and write every removed document with ``duplicate_of`` naming the kept one. These run as
barrier stages: they see the whole dataset in one process for now (signatures, banding and clustering
are batch operations ready to be split across Ray workers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from cleaning.minhash import MinHasher, ShingleHashName, dedup_normal_form
from orchestration.stage import Stage, StageConfig, StageContext


def _sorted_by_id(batches: Iterable[pa.RecordBatch]) -> pa.Table | None:
    batches = list(batches)
    if not batches:
        return None
    table = pa.Table.from_batches(batches)
    return table.take(np.argsort(np.array(table.column("id").to_pylist(), dtype=object), kind="stable"))


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
    keep: Literal["first", "longest"] = Field(
        "first", description="Which document of a cluster survives: the first by id, or the longest text."
    )
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
        lengths = [len(t) for t in texts]
        decisions = cluster_decisions(edges, lambda i: ids[i], lambda i: lengths[i], cfg.keep)
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


def cluster_decisions(
    edges: Iterable[tuple[int, int, float]], id_of, length_of, keep: str
) -> dict[int, tuple[str, float]]:
    """Connected components of the verified edges -> ``{removed node: (kept id, best similarity)}``.

    The kept node of a component is the smallest id (``keep='first'``) or the longest text, ties to the
    smallest id (``keep='longest'``).
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
    decisions: dict[int, tuple[str, float]] = {}
    for members in components.values():
        if keep == "first":
            kept = min(members, key=id_of)
        else:
            kept = min(members, key=lambda k: (-length_of(k), id_of(k)))
        kept_id = id_of(kept)
        for node in members:
            if node != kept:
                decisions[node] = (kept_id, best[node])
    return decisions


def lsh_bands(threshold: float, num_perm: int, miss_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows per band) minimizing the weighted areas of false positives and false negatives around
    ``threshold``, as datasketch's ``MinHashLSH`` chooses them (``miss_weight`` is its
    false-negative weight; it uses 0.5)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 1 - miss_weight, miss_weight)
