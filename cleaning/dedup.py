"""Exact and MinHash-LSH near-duplicate removal.

Both keep the first document of each duplicate group in a deterministic order (by document id), and
write every removed document with ``duplicate_of`` naming the kept one. These run as barrier stages:
they must see the whole dataset (one process here; issue #6 distributes the clustering).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
from datasketch import MinHash, MinHashLSH
from pydantic import Field

from orchestration.stage import Stage, StageConfig, StageContext

_NON_WORD = re.compile(r"[^\w]+")


def dedup_normal_form(text: str) -> str:
    """Lower-case, punctuation-free, single-spaced text: what 'the same text' means for dedup."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def word_shingles(text: str, n: int) -> set[bytes]:
    """Word n-grams of the dedup normal form (the whole text when it has fewer than n words)."""
    words = dedup_normal_form(text).split()
    if len(words) < n:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}


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
    seed: int = Field(1, description="Seed of the MinHash permutations.")


class MinHashDeduplicator(Stage):
    """Removes documents whose estimated Jaccard similarity to a kept document reaches the threshold."""

    name = "minhash_dedup"
    config: MinHashDedupConfig

    def run(self, batches: Iterable[pa.RecordBatch], ctx: StageContext) -> Iterator[pa.RecordBatch]:
        table = _sorted_by_id(batches)
        if table is None:
            return
        cfg = self.config
        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        kept_sigs: dict[str, MinHash] = {}
        duplicate_of: list[str | None] = []
        similarity: list[float] = []
        for doc_id, text in zip(table.column("id").to_pylist(), table.column("text").to_pylist()):
            sig = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
            sig.update_batch(list(word_shingles(text, cfg.ngram)))
            best, best_j = None, 0.0
            for other in lsh.query(sig):
                j = sig.jaccard(kept_sigs[other])
                if j >= cfg.threshold and (j > best_j or (j == best_j and other < best)):
                    best, best_j = other, j
            duplicate_of.append(best)
            similarity.append(best_j)
            if best is None:
                lsh.insert(doc_id, sig)
                kept_sigs[doc_id] = sig
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
