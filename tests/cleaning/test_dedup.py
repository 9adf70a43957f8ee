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


def _planted_run(config: MinHashDedupConfig, **corpus_args):
    from evaluation.dedup_quality import pair_metrics, planted_corpus

    corpus = planted_corpus(**corpus_args)
    texts = dict(zip(corpus.ids, corpus.texts))
    ctx = StageContext("dedup")
    kept = [
        i for b in MinHashDeduplicator(config).run([docs(texts)], ctx) for i in b.column("id").to_pylist()
    ]
    removed = {r["id"]: r for b in ctx.rejected for r in b.to_pylist()}
    assert len(kept) + len(removed) == len(texts)
    pos = {d: i for i, d in enumerate(corpus.ids)}
    metrics = pair_metrics(
        corpus, {pos[k]: pos[r["duplicate_of"]] for k, r in removed.items()}, config.threshold
    )
    return kept, removed, metrics, ctx


def test_planted_near_duplicates_precision_and_recall():
    """Variants at spread edit rates, boilerplate wrappers and same-template hard negatives."""
    config = MinHashDedupConfig(threshold=0.8)
    kept, removed, metrics, ctx = _planted_run(
        config, families=80, template_groups=20, singletons=150, seed=3
    )
    assert metrics.true_pairs > 100  # the corpus really holds near duplicates on both sides of 0.8
    assert metrics.precision >= 0.95 and metrics.recall >= 0.90, metrics
    assert all(r["duplicate_of"] in kept for r in removed.values())  # removed point at a survivor
    assert all(r["value"] >= 0.8 for r in removed.values())
    assert ctx.counters["minhash_dedup.clusters"] > 0


def test_keep_rule_first_or_longest_picks_the_survivor_not_the_clusters():
    from evaluation.dedup_quality import planted_corpus

    args = {"families": 20, "template_groups": 0, "singletons": 10, "seed": 5}
    text = dict(zip(*(lambda c: (c.ids, c.texts))(planted_corpus(**args))))
    kept_first, removed_first, *_ = _planted_run(MinHashDedupConfig(), **args)
    kept_long, removed_long, *_ = _planted_run(MinHashDedupConfig(keep="longest"), **args)

    def clusters(removed, kept):
        groups = {k: {k} for k in kept}
        for doc_id, r in removed.items():
            groups[r["duplicate_of"]].add(doc_id)
        return {frozenset(g) for g in groups.values()}

    assert clusters(removed_first, kept_first) == clusters(removed_long, kept_long)
    assert all(r["duplicate_of"] < doc_id for doc_id, r in removed_first.items())
    assert all(len(text[r["duplicate_of"]]) >= len(text[d]) for d, r in removed_long.items())
    assert set(kept_first) != set(kept_long)  # variants with insertions are longer than their base


def test_banding_must_fit_the_signature():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exceeds num_perm"):
        MinHashDedupConfig(num_perm=64, bands=20, rows=4)
    with pytest.raises(ValidationError, match="both bands and rows"):
        MinHashDedupConfig(bands=20)
