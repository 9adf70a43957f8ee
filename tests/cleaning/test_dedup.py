import random

import pyarrow as pa
import pytest

from cleaning.dedup import (
    ExactDedupConfig,
    ExactDeduplicator,
    MinHashDedupConfig,
    MinHashDeduplicator,
    dedup_normal_form,
)
from core.schema import DOCUMENT_SCHEMA, document_table
from core.stage import StageContext

pytestmark = pytest.mark.unit


def docs(texts: dict[str, str]) -> pa.RecordBatch:
    return document_table(list(texts.values()), ids=list(texts), source="t").to_batches()[0]


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


def test_keep_rule_score_ranks_by_a_meta_signal():
    import pytest
    from pydantic import ValidationError

    base = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat " * 4
    batch = docs({"a": base, "b": base + "tail", "c": base + "end", "d": "something else entirely here"})
    meta = [[("q", 0.2)], [("q", 0.9)], [], [("q", 5.0)]]
    batch = batch.set_column(6, "meta", pa.array(meta, DOCUMENT_SCHEMA.field("meta").type))
    ctx = StageContext("dedup")
    stage = MinHashDeduplicator(MinHashDedupConfig(keep="score", score_key="q", threshold=0.5))
    kept = [i for b in stage.run([batch], ctx) for i in b.column("id").to_pylist()]
    removed = {r["id"]: r["duplicate_of"] for b in ctx.rejected for r in b.to_pylist()}
    assert kept == ["b", "d"] and removed == {"a": "b", "c": "b"}  # 0.9 beats 0.2; c has no score
    with pytest.raises(ValidationError, match="score_key"):
        MinHashDedupConfig(keep="score")


def _star_components(a, b, shards):
    """Large-star / small-star rounds with each step split over ``shards`` owners, as the Ray stage does."""
    import numpy as np

    from cleaning.dedup import large_star, node_shard, small_star

    def owned(u, v, s):
        mine = node_shard(u, shards) == s
        return u[mine], v[mine]

    u, v = np.r_[a, b], np.r_[b, a]
    for _ in range(100):
        steps = [large_star(*owned(u, v, s)) for s in range(shards)]
        if all(done for _, _, done in steps):
            return dict(row for _, labels, _ in steps for row in labels.tolist())
        x = np.concatenate([new[0] for new, _, _ in steps])
        y = np.concatenate([new[1] for new, _, _ in steps])
        hi, lo = np.maximum(x, y), np.minimum(x, y)
        parts = [small_star(*owned(hi, lo, s)) for s in range(shards)]
        x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        u, v = np.r_[x, y], np.r_[y, x]
    raise AssertionError("no convergence")


def test_large_small_star_rounds_find_connected_components():
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rng = np.random.default_rng(7)
    for n, m, shards in ((50, 30, 1), (400, 300, 3), (3000, 2500, 4), (200, 0, 2)):
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        a, b = a[a != b], b[a != b]
        # A long path too: the worst case for label propagation, shuffled node numbers.
        path = rng.permutation(n)[: n // 4] + (n if n > 100 else 0)
        a, b = np.r_[a, path[:-1]], np.r_[b, path[1:]]
        labels = _star_components(a.astype(np.int64) << 32, b.astype(np.int64) << 32, shards)
        nodes = np.unique(np.r_[a, b])
        _, ref = connected_components(coo_matrix((np.ones(a.size), (a, b)), shape=(2 * n, 2 * n)))
        expected = {int(x) << 32: int(nodes[ref[nodes] == ref[x]].min()) << 32 for x in nodes}
        assert labels == expected


def test_line_spans_and_cuts_by_hand():
    import hashlib

    from cleaning.dedup import cut_spans, line_spans

    text = "Alpha one.\nBeta, two\n  \nGamma three\n!!\nDelta"
    hashes, firsts = line_spans(text, 2)
    # Non-empty normal-form lines: 0 "alpha one", 1 "beta two", 3 "gamma three", 5 "delta".
    joined = [b"alpha one\nbeta two", b"beta two\ngamma three", b"gamma three\ndelta"]
    expected = [int.from_bytes(hashlib.blake2b(j, digest_size=8).digest(), "little") for j in joined]
    assert hashes == expected and firsts == [0, 1, 2]
    assert cut_spans(text, [1], 2) == "Alpha one.\n  \n!!\nDelta"
    assert cut_spans(text, [0, 2], 2) == "  \n!!"
    assert line_spans("one line", 3) == ([], [])
    raw, _ = line_spans("Beta, two\nx", 1, normalize=False)
    assert raw[0] != line_spans("beta two\nx", 1, normalize=False)[0][0]


@pytest.mark.parametrize(
    ("threshold", "num_perm", "miss_weight"),
    [(0.5, 16, 0.5), (0.8, 64, 0.5), (0.9, 64, 0.5), (0.8, 128, 0.5), (0.7, 128, 0.95), (0.8, 128, 0.95)],
)
def test_lsh_bands_match_datasketch_minhash_lsh(threshold, num_perm, miss_weight):
    from datasketch import MinHashLSH

    from cleaning.dedup import lsh_bands

    reference = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(1 - miss_weight, miss_weight))
    assert lsh_bands(threshold, num_perm, miss_weight) == (reference.b, reference.r)


def test_the_shard_count_follows_the_corpus_so_a_task_fits_its_memory():
    """By hand: a shard task holds 750 MiB plus 5,500 bytes per document of its share; with 2048 MiB the
    room is 1298 MiB = 1,361,051,648 bytes: 1M documents (5.5e9 bytes) need 5 shards, 10M need 41."""
    from cleaning.dedup_phases import DedupConfig

    assert DedupConfig().shards_for(100) == 4  # never fewer than 4
    assert DedupConfig().shards_for(1_000_000) == 5
    assert DedupConfig().shards_for(10_000_000) == 41
    assert DedupConfig(memory_mb=4096).shards_for(10_000_000) == 16  # 5.5e10 / (3346 MiB) = 15.7
    assert DedupConfig(shards=3).shards_for(10**9) == 3  # set by hand: kept
