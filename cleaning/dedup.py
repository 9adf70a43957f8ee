"""Exact and MinHash-LSH near-duplicate removal.

Both keep the first document of each duplicate group in a deterministic order (by document id), and
write every removed document with ``duplicate_of`` naming the kept one. These run as barrier stages:
they must see the whole dataset (one process here; issue #6 distributes the clustering).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
from pydantic import Field

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
    shingle_hash: ShingleHashName = Field(
        "words", description="'words' (fast, compiled) or 'sha1' (datasketch's default hash, slow)."
    )


class MinHashDeduplicator(Stage):
    """Removes documents whose estimated Jaccard similarity to a kept document reaches the threshold.

    Signatures come from :class:`cleaning.minhash.MinHasher`; candidates from LSH bands with datasketch's
    choice of (bands, rows) for the threshold; a candidate is confirmed by the estimated Jaccard.
    """

    name = "minhash_dedup"
    config: MinHashDedupConfig

    def run(self, batches: Iterable[pa.RecordBatch], ctx: StageContext) -> Iterator[pa.RecordBatch]:
        table = _sorted_by_id(batches)
        if table is None:
            return
        cfg = self.config
        hasher = MinHasher(cfg.num_perm, cfg.seed, cfg.ngram, cfg.shingle_hash)
        sigs = hasher.signatures(table.column("text").to_pylist())
        ids = table.column("id").to_pylist()
        bands, rows = lsh_bands(cfg.threshold, cfg.num_perm)
        buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
        duplicate_of: list[str | None] = []
        similarity: list[float] = []
        for i, sig in enumerate(sigs):
            keys = [sig[b * rows : (b + 1) * rows].tobytes() for b in range(bands)]
            candidates = {j for b, key in enumerate(keys) for j in buckets[b].get(key, ())}
            best, best_j = None, 0.0
            for j in sorted(candidates):  # ids are sorted: the earliest kept document wins a tie
                jaccard = float(np.mean(sig == sigs[j]))
                if jaccard >= cfg.threshold and jaccard > best_j:
                    best, best_j = j, jaccard
            duplicate_of.append(None if best is None else ids[best])
            similarity.append(best_j)
            if best is None:
                for b, key in enumerate(keys):
                    buckets[b].setdefault(key, []).append(i)
        dup = np.array([d is not None for d in duplicate_of], dtype=bool)
        ctx.reject(
            table.filter(pa.array(dup)),
            filter=self.name,
            signal="jaccard_estimate",
            values=[s for s, d in zip(similarity, duplicate_of) if d is not None],
            threshold=cfg.threshold,
            duplicate_of=[d for d in duplicate_of if d is not None],
        )
        yield from table.filter(pa.array(~dup)).combine_chunks().to_batches()


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimizing false positives + false negatives at ``threshold``, as datasketch's
    ``MinHashLSH`` chooses them (equal weights)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 0.5, 0.5)
