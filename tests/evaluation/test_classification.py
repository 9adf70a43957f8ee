"""Classification and seq2seq metrics against scikit-learn and sacrebleu's own sentence-level functions."""

import numpy as np
import pytest
from sklearn import metrics as sk

from evaluation.classification import classification_metrics, multilabel_metrics, seq2seq_metrics

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_label_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 300)
    p = np.where(rng.random(300) < 0.6, y, rng.integers(0, 4, 300))
    p[p == 3] = 2  # class 3 is never predicted: its precision is 0 (zero_division=0)
    names = ["a", "b", "c", "d"]
    m = classification_metrics(y, p, names)
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(y, p))
    for avg in ("macro", "micro"):
        assert m[f"precision_{avg}"] == pytest.approx(sk.precision_score(y, p, average=avg, zero_division=0))
        assert m[f"recall_{avg}"] == pytest.approx(sk.recall_score(y, p, average=avg, zero_division=0))
        assert m[f"f1_{avg}"] == pytest.approx(sk.f1_score(y, p, average=avg, zero_division=0))
    assert m["f1_weighted"] == pytest.approx(sk.f1_score(y, p, average="weighted", zero_division=0))
    per_class = sk.precision_recall_fscore_support(y, p, labels=range(4), zero_division=0)
    for i, name in enumerate(names):
        assert m[f"precision/{name}"] == pytest.approx(per_class[0][i])
        assert m[f"recall/{name}"] == pytest.approx(per_class[1][i])
        assert m[f"f1/{name}"] == pytest.approx(per_class[2][i])
    assert m["confusion_matrix"] == sk.confusion_matrix(y, p, labels=range(4)).tolist()


def test_multilabel_metrics_match_scikit_learn():
    rng = np.random.default_rng(5)
    y = rng.random((200, 5)) < 0.3
    p = np.where(rng.random((200, 5)) < 0.8, y, ~y)
    m = multilabel_metrics(y, p, list("vwxyz"))
    assert m["subset_accuracy"] == pytest.approx(sk.accuracy_score(y, p))
    for avg in ("macro", "micro", "weighted"):
        assert m[f"f1_{avg}"] == pytest.approx(sk.f1_score(y, p, average=avg, zero_division=0))
    assert m["precision_micro"] == pytest.approx(sk.precision_score(y, p, average="micro"))
    per_label = sk.multilabel_confusion_matrix(y, p)
    assert m["confusion_matrix"] == per_label.tolist()


def test_seq2seq_metrics():
    import sacrebleu

    preds = ["the cat sat on the mat", "a dog", "hello world"]
    refs = ["the cat sat on the mat", "the dog barked", "hello world "]
    m = seq2seq_metrics(preds, refs)
    assert m["exact_match"] == pytest.approx(2 / 3)
    assert m["bleu"] == pytest.approx(sacrebleu.BLEU().corpus_score(preds, [refs]).score)
    assert m["chrf"] == pytest.approx(sacrebleu.CHRF().corpus_score(preds, [refs]).score)
    assert seq2seq_metrics(refs, refs)["bleu"] == pytest.approx(100.0)
