"""The quality classifier (cleaning/quality.py): fastText trained on two separable sources, its scores
against fastText's own predictions, and the exact top-fraction cut across partitions."""

import hashlib
import random

import fasttext
import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError
from sklearn.metrics import f1_score, precision_score, recall_score

from cleaning.quality import (
    LABEL,
    SCORE,
    TIER,
    ClassifierConfig,
    Cut,
    FastTextConfig,
    QualityScoreConfig,
    QualityScorer,
    SelectConfig,
    binary_metrics,
    fasttext_line,
    held_out,
    sample,
    top_cut,
    train_fasttext,
    write_training_file,
)
from core.schema import append_meta, document_table
from core.stage import StageContext, run_chain
from tests.fixtures import prose, spam

pytestmark = pytest.mark.unit

#: A small model: 20,000 buckets x 16 dimensions (1.3 MB) instead of fastText's 800 MB default.
SMALL = FastTextConfig(dim=16, bucket=20_000, epoch=10)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """fastText trained on 300 prose (positive) and 300 spam (negative) documents; 200 more of each held
    out."""
    rng = random.Random(3)
    train = [(prose(rng), True) for _ in range(300)] + [(spam(rng), False) for _ in range(300)]
    held_out = [(prose(rng), True) for _ in range(200)] + [(spam(rng), False) for _ in range(200)]
    root = tmp_path_factory.mktemp("classifier")
    write_training_file(root / "train.txt", train, seed=0)
    train_fasttext(root / "train.txt", root / "model.bin", SMALL)
    return root, held_out


def test_a_classifier_of_separable_sources_scores_held_out_documents_correctly(classifier):
    root, held_out = classifier
    docs = document_table([t for t, _ in held_out], ids=[f"h{i}" for i in range(len(held_out))])
    cfg = QualityScoreConfig(digest="d" * 16, model_dir=str(root), threshold=0.5)
    ctx = StageContext("quality")
    kept = pa.Table.from_batches(list(run_chain([QualityScorer(cfg)], docs.to_batches(), ctx)))
    truth = [y for _, y in held_out]
    predicted = [f"h{i}" in set(kept.column("id").to_pylist()) for i in range(len(held_out))]
    assert f1_score(truth, predicted) > 0.9
    ours = binary_metrics(truth, predicted)
    assert ours["f1"] == pytest.approx(f1_score(truth, predicted))
    assert ours["precision"] == pytest.approx(precision_score(truth, predicted))
    assert ours["recall"] == pytest.approx(recall_score(truth, predicted))
    # every rejected document carries its score, the threshold and the classifier's digest
    rejected = pa.Table.from_batches(ctx.rejected)
    assert kept.num_rows + rejected.num_rows == len(held_out) and rejected.num_rows
    assert set(rejected.column("signal").to_pylist()) == {f"{SCORE}@dddddddddddd"}
    assert set(rejected.column("threshold").to_pylist()) == {0.5}
    assert all(v < 0.5 for v in rejected.column("value").to_pylist())


def test_scores_equal_the_fasttext_package_s_own_predictions(classifier):
    root, held_out = classifier
    texts = [t for t, _ in held_out[::7]]
    model = fasttext.load_model(str(root / "model.bin"))
    expected = []
    for text in texts:  # the package's own route: one predict per document, on its one-line form
        labels, probs = model.predict(text.replace("\n", " "), k=2)
        expected.append(probs[labels.index("__label__hq")])
    meta = [[("gopher.words", float(i))] for i in range(len(texts))]
    docs = document_table(texts, meta=meta)
    cfg = QualityScoreConfig(digest="d" * 16, model_dir=str(root), tiers=[0.25, 0.75], batch_size=4)
    out = pa.Table.from_batches(list(run_chain([QualityScorer(cfg)], docs.to_batches(), StageContext("q"))))
    assert out.num_rows == len(texts)  # tiers keep everything
    metas = [dict(m) for m in out.column("meta").to_pylist()]
    assert [m[SCORE] for m in metas] == [float(np.float32(p)) for p in expected]
    assert [m["gopher.words"] for m in metas] == [float(i) for i in range(len(texts))]
    assert [m[LABEL] for m in metas] == [float(p > 0.5) for p in expected]
    assert [m[TIER] for m in metas] == [float(int(p >= 0.25) + int(p >= 0.75)) for p in np.float32(expected)]


def test_the_top_fraction_keeps_exactly_the_k_best_across_partitions_ties_by_id():
    rng = np.random.default_rng(5)
    # scores with many ties (a few distinct values) and a wide range, in partitions of uneven size
    values = np.concatenate([rng.choice([0.1, 0.5, 0.9, 1.0], 700), rng.random(300)]).astype(np.float32)
    ids = [f"{i:05d}" for i in rng.permutation(values.size)]
    cuts = np.cumsum([0, 1, 250, 3, 400, 346])
    parts = [(values[a:b], ids[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    reference = sorted(range(values.size), key=lambda i: (-float(values[i]), ids[i]))
    for k in (1, 37, 250, 500, 999, 1000):
        cut = top_cut(lambda with_ids: ((s, i if with_ids else None) for s, i in parts), k)
        kept = set()
        for scores, part_ids in parts:
            batch = document_table([""] * scores.size, ids=part_ids).to_batches()[0]
            batch = append_meta(batch, {SCORE: scores.astype(np.float64)})
            scorer = QualityScorer(QualityScoreConfig(digest="d" * 16, cut=cut))
            for out in run_chain([scorer], [batch], StageContext("q")):
                kept |= set(out.column("id").to_pylist())
        assert kept == {ids[i] for i in reference[:k]}, k
    with pytest.raises(ValueError, match="at least one"):
        top_cut(lambda with_ids: iter(parts), 0)


def test_negative_and_special_scores_keep_their_order_in_the_cut():
    scores = np.array([-2.5, -0.0, 0.0, 1e-30, 3.0, -1e-30, 7.5], np.float32)
    ids = [str(i) for i in range(scores.size)]
    for k in range(1, scores.size + 1):
        cut = top_cut(lambda with_ids: iter([(scores, ids if with_ids else None)]), k)
        keep = (scores > np.float32(cut.score)) | (
            (scores == np.float32(cut.score))
            & np.array([cut.last_id is None or i <= cut.last_id for i in ids])
        )
        expected = sorted(range(scores.size), key=lambda i: (-float(scores[i]), ids[i]))[:k]
        assert set(np.flatnonzero(keep)) == set(expected), (k, cut)


def test_append_meta_adds_each_document_s_values_after_its_own_in_a_sliced_batch():
    meta = [[("a", 1.0)], [], [("b", 2.0), ("c", 3.0)], [("d", 4.0)]]
    batch = document_table(list("wxyz"), meta=meta).to_batches()[0].slice(1, 3)
    out = append_meta(batch, {"q": np.array([0.1, 0.2, 0.3]), "r": np.array([1, 2, 3])})
    expected = [m + [("q", q), ("r", r)] for m, q, r in zip(meta[1:], [0.1, 0.2, 0.3], [1.0, 2.0, 3.0])]
    assert out.column("meta").to_pylist() == expected
    assert out.column("id").to_pylist() == ["d1", "d2", "d3"]


def test_sampling_and_the_held_out_split_depend_on_ids_only():
    docs = [(f"id{i}", f"text {i}") for i in range(100)]
    assert sample(docs, 10) == sample(list(reversed(docs)), 10)
    assert len(sample(docs, 10)) == 10 and sample(docs, 500) == sample(docs[::-1], 500)
    labeled = [(d, i % 10 != 0) for i, (d, _) in enumerate(docs)]  # 90 positive, 10 negative
    held = {d for (d, _), h in zip(labeled, held_out(labeled, 0.2)) if h}
    assert held == {d for (d, _), h in zip(labeled[::-1], held_out(labeled[::-1], 0.2)) if h}
    by_hash = sorted(labeled, key=lambda e: hashlib.sha256(e[0].encode()).digest())
    positives, negatives = [d for d, y in by_hash if y], [d for d, y in by_hash if not y]
    assert held == set(positives[:18]) | set(negatives[:2])
    # a class of 3 at a 10% split keeps one out and two in; a class of one cannot be split
    assert sum(held_out([("a", True), ("b", True), ("c", True), ("d", False), ("e", False)], 0.1)) == 2
    assert held_out([("a", True), ("b", False)], 0.5) == [False, False]
    assert fasttext_line("a\n\nb\tc") == "a  b\tc"


def test_the_config_names_its_data_and_one_selection():
    with pytest.raises(ValidationError, match="positive and negative"):
        ClassifierConfig(positive=[{"source": "docs"}])
    with pytest.raises(ValidationError, match="exactly one of threshold, top_fraction, tiers"):
        SelectConfig(threshold=0.5, top_fraction=0.1)
    with pytest.raises(ValidationError, match="tiers must increase"):
        SelectConfig(tiers=[0.5, 0.2])
    with pytest.raises(ValidationError, match="min_score"):
        ClassifierConfig(labeled={"paths": ["x.jsonl"]})
    assert Cut(score=0.5).last_id is None
