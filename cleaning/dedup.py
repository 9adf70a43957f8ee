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
            key = dedup_normal_form(text) if self.config.normalize else text
            digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
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
    verify: Literal["exact", "estimate"] = Field(
        "exact",
        description="Confirm candidate pairs by exact Jaccard of shingle sets, or the MinHash estimate.",
    )
    keep: Literal["first", "longest"] = Field(
        "first", description="Which document of a cluster survives: the first by id, or the longest text."
    )
    bands: int | None = Field(None, ge=1, description="LSH bands (with rows); default: datasketch's choice.")
    rows: int | None = Field(None, ge=1, description="Signature rows per LSH band (with bands).")
    shingle_hash: ShingleHashName = Field(
        "words", description="'words' (fast, compiled) or 'sha1' (datasketch's default hash, slow)."
    )

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
        if cfg.bands:
            bands, rows = cfg.bands, cfg.rows
        else:  # exact verification removes false positives: band for recall (miss weight 0.95)
            bands, rows = lsh_bands(cfg.threshold, cfg.num_perm, 0.95 if cfg.verify == "exact" else 0.5)
        pairs = candidate_pairs(sigs, bands, rows)
        ctx.counters[f"{self.name}.candidate_pairs"] += len(pairs)
        if cfg.verify == "exact":
            ends = np.cumsum(counts)
            sets = np.split(flat, ends[:-1])
            unique: dict[int, np.ndarray] = {}

            def similarity(i: int, j: int) -> float:
                a = unique[i] if i in unique else unique.setdefault(i, np.unique(sets[i]))
                b = unique[j] if j in unique else unique.setdefault(j, np.unique(sets[j]))
                inter = np.intersect1d(a, b, assume_unique=True).size
                return inter / (a.size + b.size - inter)
        else:

            def similarity(i: int, j: int) -> float:
                return float(np.mean(sigs[i] == sigs[j]))

        parent = list(range(len(texts)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        best = np.zeros(len(texts))
        edges = 0
        for i, j in pairs:
            sim = similarity(i, j)
            if sim >= cfg.threshold:
                edges += 1
                best[i], best[j] = max(best[i], sim), max(best[j], sim)
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
        ctx.counters[f"{self.name}.verified_pairs"] += edges
        members: dict[int, list[int]] = {}
        for i in range(len(texts)):
            members.setdefault(find(i), []).append(i)
        keep = np.ones(len(texts), dtype=bool)
        duplicate_of: list[str | None] = [None] * len(texts)
        ids = table.column("id").to_pylist()
        clusters = 0
        for group in members.values():
            if len(group) == 1:
                continue
            clusters += 1
            ctx.counters[f"{self.name}.largest_cluster"] = max(
                ctx.counters[f"{self.name}.largest_cluster"], len(group)
            )
            # Ties (and 'first') go to the smallest id: rows are sorted by id.
            kept = group[0] if cfg.keep == "first" else max(group, key=lambda k: (len(texts[k]), -k))
            for k in group:
                if k != kept:
                    keep[k] = False
                    duplicate_of[k] = ids[kept]
        ctx.counters[f"{self.name}.clusters"] += clusters
        dup = ~keep
        ctx.reject(
            table.filter(pa.array(dup)),
            filter=self.name,
            signal=f"jaccard_{cfg.verify}",
            values=best[dup].tolist(),
            threshold=cfg.threshold,
            duplicate_of=[d for d in duplicate_of if d is not None],
        )
        yield from table.filter(pa.array(keep)).combine_chunks().to_batches()


def candidate_pairs(sigs: np.ndarray, bands: int, rows: int, max_bucket: int = 64) -> list[tuple[int, int]]:
    """Distinct pairs (i < j) of documents sharing a bucket in at least one band.

    Within a bucket every pair is a candidate; a bucket larger than ``max_bucket`` (a template shared by
    many documents) contributes its first document paired with each other one instead, which still
    connects the bucket after verification when they are duplicates of the first.
    """
    found: set[tuple[int, int]] = set()
    mult = np.uint64(0x9E3779B97F4A7C15)
    for band in range(bands):
        key = np.zeros(sigs.shape[0], dtype=np.uint64)
        for col in sigs[:, band * rows : (band + 1) * rows].T:
            key = key * mult + col.astype(np.uint64)
        order = np.argsort(key, kind="stable")
        sorted_keys = key[order]
        bounds = np.flatnonzero(np.diff(sorted_keys)) + 1
        for bucket in np.split(order, bounds):
            if bucket.size < 2:
                continue
            bucket = np.sort(bucket).tolist()
            if len(bucket) <= max_bucket:
                found.update((a, b) for x, a in enumerate(bucket) for b in bucket[x + 1 :])
            else:
                found.update((bucket[0], b) for b in bucket[1:])
    return sorted(found)


def lsh_bands(threshold: float, num_perm: int, miss_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows per band) minimizing the weighted areas of false positives and false negatives around
    ``threshold``, as datasketch's ``MinHashLSH`` chooses them (``miss_weight`` is its
    false-negative weight; it uses 0.5)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 1 - miss_weight, miss_weight)
