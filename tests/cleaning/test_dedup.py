import random

import pyarrow as pa

from cleaning.dedup import (
    ExactDedupConfig,
    ExactDeduplicator,
    MinHashDedupConfig,
    MinHashDeduplicator,
    dedup_normal_form,
)
from ingestion.schema import DOCUMENT_SCHEMA
from orchestration.stage import StageContext


def docs(texts: dict[str, str]) -> pa.RecordBatch:
    n = len(texts)
    return pa.RecordBatch.from_pydict(
        {
            "id": list(texts),
            "url": [None] * n,
            "text": list(texts.values()),
            "source": ["t"] * n,
            "lang": [None] * n,
            "fetched_at": [None] * n,
            "meta": [[] for _ in range(n)],
        },
        schema=DOCUMENT_SCHEMA,
    )


def run(stage, texts):
    ctx = StageContext("dedup")
    kept = [i for b in stage.run([docs(texts)], ctx) for i in b.column("id").to_pylist()]
    rejected = {r["id"]: r for b in ctx.rejected for r in b.to_pylist()}
    assert len(kept) + len(rejected) == len(texts)
    return kept, rejected


def test_exact_dedup_keeps_first_id_and_names_it():
    texts = {"b": "Hello, World!", "a": "hello world", "c": "something else", "d": "HELLO   world."}
    kept, rejected = run(ExactDeduplicator(ExactDedupConfig()), texts)
    assert kept == ["a", "c"]
    assert {k: r["duplicate_of"] for k, r in rejected.items()} == {"b": "a", "d": "a"}


def test_exact_dedup_without_normalization_is_byte_exact():
    kept, rejected = run(
        ExactDeduplicator(ExactDedupConfig(normalize=False)), {"a": "x y", "b": "X Y", "c": "x y"}
    )
    assert kept == ["a", "b"] and rejected["c"]["duplicate_of"] == "a"


def _shingles(text: str, n: int = 5) -> set[str]:
    words = dedup_normal_form(text).split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_minhash_removes_near_duplicates_against_exact_jaccard():
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(5000)]
    base = [rng.choice(vocab) for _ in range(400)]
    near = list(base)
    near[100] = "edited"  # one edit breaks at most 5 of 396 shingles
    far = list(base)
    for i in range(0, 400, 10):  # an edit every 10 words: about half the shingles change
        far[i] = "changed"
    other = [rng.choice(vocab) for _ in range(400)]
    texts = {"a": " ".join(base), "b": " ".join(near), "c": " ".join(far), "d": " ".join(other)}
    jaccard = {
        k: len(_shingles(texts["a"]) & _shingles(t)) / len(_shingles(texts["a"]) | _shingles(t))
        for k, t in texts.items()
    }
    assert jaccard["b"] > 0.95 and jaccard["c"] < 0.6 and jaccard["d"] < 0.01  # the ground truth
    kept, rejected = run(MinHashDeduplicator(MinHashDedupConfig(threshold=0.8)), texts)
    assert kept == ["a", "c", "d"]
    assert rejected["b"]["duplicate_of"] == "a"
    assert abs(rejected["b"]["value"] - jaccard["b"]) < 0.1  # the estimate is near the true Jaccard
