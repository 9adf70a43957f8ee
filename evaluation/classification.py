"""Classification and sequence-to-sequence metrics of fine-tuned models.

Classification: accuracy, precision, recall and F1 (macro, micro, weighted and per class) and the
confusion matrix, with scikit-learn's conventions (a class never predicted has precision 0, as with
``zero_division=0``). Multi-label: the same per label over the label-indicator matrix, plus subset accuracy.
Seq2seq: exact match, corpus BLEU and chrF as sacrebleu computes them.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return precision, recall, ratio(2 * precision * recall, precision + recall)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """``m[i, j]``: examples of true class ``i`` predicted as ``j``."""
    return np.bincount(
        np.asarray(labels) * num_classes + np.asarray(predictions), minlength=num_classes**2
    ).reshape(num_classes, num_classes)


def _summary(
    tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, support: np.ndarray, names: list[str]
) -> dict[str, Any]:
    precision, recall, f1 = _prf(tp, fp, fn)
    micro_p, micro_r, micro_f1 = _prf(np.array([tp.sum()]), np.array([fp.sum()]), np.array([fn.sum()]))
    weights = support / max(support.sum(), 1)
    out: dict[str, Any] = {
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "precision_micro": float(micro_p[0]),
        "recall_micro": float(micro_r[0]),
        "f1_micro": float(micro_f1[0]),
        "f1_weighted": float((f1 * weights).sum()),
    }
    for i, name in enumerate(names):
        out |= {
            f"precision/{name}": float(precision[i]),
            f"recall/{name}": float(recall[i]),
            f"f1/{name}": float(f1[i]),
        }
    return out


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Single-label metrics; ``confusion_matrix`` is a nested list (rows true, columns predicted)."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    matrix = confusion_matrix(labels, predictions, len(names))
    tp = np.diag(matrix).astype(np.float64)
    out = {
        "accuracy": float((labels == predictions).mean()) if labels.size else 0.0,
        "examples": int(labels.size),
    }
    out |= _summary(tp, matrix.sum(axis=0) - tp, matrix.sum(axis=1) - tp, matrix.sum(axis=1), names)
    return out | {"confusion_matrix": matrix.tolist()}


def multilabel_metrics(labels: np.ndarray, predictions: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Multi-label metrics over ``(examples, labels)`` 0/1 matrices; per-label confusion counts."""
    y, p = np.asarray(labels, dtype=bool), np.asarray(predictions, dtype=bool)
    tp = (y & p).sum(axis=0).astype(np.float64)
    fp, fn = (~y & p).sum(axis=0).astype(np.float64), (y & ~p).sum(axis=0).astype(np.float64)
    out = {"subset_accuracy": float((y == p).all(axis=1).mean()), "examples": int(y.shape[0])}
    out |= _summary(tp, fp, fn, y.sum(axis=0), names)
    tn = (~y & ~p).sum(axis=0)
    return out | {
        "confusion_matrix": [[[int(tn[i]), int(fp[i])], [int(fn[i]), int(tp[i])]] for i in range(len(names))]
    }


def seq2seq_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (after stripping whitespace), corpus BLEU and chrF (sacrebleu defaults)."""
    import sacrebleu

    exact = np.mean([p.strip() == r.strip() for p, r in zip(predictions, references)]) if references else 0.0
    return {
        "exact_match": float(exact),
        "bleu": float(sacrebleu.corpus_bleu(predictions, [references]).score),
        "chrf": float(sacrebleu.corpus_chrf(predictions, [references]).score),
        "examples": len(references),
    }
