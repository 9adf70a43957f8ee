import pyarrow as pa
import pytest

from cleaning.filters import GopherQualityConfig, GopherQualityFilter, gopher_signals
from core.schema import document_table
from core.stage import StageContext

pytestmark = pytest.mark.unit

# 50 words, mean length 4, two distinct stop words (the, and)
PASSING = " ".join(["the", "river", "and", "stone"] * 12 + ["the", "river"])


def docs(*texts: str) -> pa.RecordBatch:
    return document_table(list(texts), source="t").to_batches()[0]


def run_filter(*texts: str, **cfg):
    ctx = StageContext("clean")
    kept = list(GopherQualityFilter(GopherQualityConfig(**cfg)).run([docs(*texts)], ctx))
    kept_ids = [i for b in kept for i in b.column("id").to_pylist()]
    rejected = [r for b in ctx.rejected for r in b.to_pylist()]
    assert len(kept_ids) + len(rejected) == len(texts)  # nothing lost
    return kept_ids, rejected


def test_passing_document_is_kept_with_signals():
    kept_ids, rejected = run_filter(PASSING)
    assert kept_ids == ["d0"] and rejected == []


@pytest.mark.parametrize(
    ("text", "signal", "value", "threshold"),
    [
        # 49 words < 50
        (" ".join(PASSING.split()[:49]), "words", 49, 50),
        # mean word length of 'a' and 'to' = 1.5 < 3 (50 words, 25 stop words)
        (" ".join(["a", "to"] * 25), "avg_word_length", 1.5, 3),
        # 6 '#' among 56 tokens: 6/56 > 0.1
        (PASSING + " #" * 6, "hash_ratio", 6 / 56, 0.1),
        # 13 numbers among 63 words: alphabetic share 50/63 < 0.8
        (PASSING + " 123" * 13, "alpha_words_ratio", 50 / 63, 0.8),
        # no stop word at all
        (" ".join(["river", "stone"] * 25), "stop_words", 0, 2),
        # every line starts with a bullet: 1.0 > 0.9
        (
            "\n".join(["- the river the river the river the river the river"] * 10),
            "bullet_lines_ratio",
            1.0,
            0.9,
        ),
        # 4 of 10 lines end with an ellipsis: 0.4 > 0.3
        (
            "\n".join(["the river the river the river"] * 6 + ["the river flows and then..."] * 4),
            "ellipsis_lines_ratio",
            0.4,
            0.3,
        ),
    ],
)
def test_each_rule_rejects_with_reason(text, signal, value, threshold):
    kept_ids, rejected = run_filter(text)
    assert kept_ids == []
    (row,) = rejected
    assert (row["filter"], row["signal"]) == ("gopher_quality", signal)
    assert row["value"] == pytest.approx(value) and row["threshold"] == pytest.approx(threshold)


def test_boundaries_are_inclusive_like_the_reference():
    # exactly 50 words, exactly 5/55 hashes (< 0.1), 50/62 alphabetic (> 0.8): all kept
    kept_ids, _ = run_filter(PASSING, PASSING + " #" * 5, PASSING + " 123" * 12)
    assert kept_ids == ["d0", "d1", "d2"]


def test_rules_can_be_switched_off():
    kept_ids, _ = run_filter(" ".join(["river", "stone"] * 25), min_stop_words=None)
    assert kept_ids == ["d0"]


def test_empty_and_whitespace_documents_are_rejected_not_crashed():
    kept_ids, rejected = run_filter("", "   \n\t ")
    assert kept_ids == [] and [r["signal"] for r in rejected] == ["words", "words"]


def test_signals_hand_computed():
    s = gopher_signals("The cat, the dog.\n- item ...")
    # tokens: The cat , the dog . - item ... -> 9 tokens, 5 with letters
    assert s["words"] == 5 and s["alpha_words_ratio"] == pytest.approx(5 / 9)
    assert s["bullet_lines_ratio"] == 0.5 and s["ellipsis_lines_ratio"] == 0.5
    # Distinct stop words, case-sensitive as in the reference: "the" (not "The")
    assert s["stop_words"] == 1
    assert gopher_signals("the the of of The")["stop_words"] == 2
