"""The HTML report's figures and tables on their own (no run): what the histogram's axis holds, what the
lineage table counts."""

import numpy as np
import pytest

from orchestration.report_html import _histogram, _records

pytestmark = pytest.mark.unit


def test_a_few_rejected_documents_stay_on_the_histograms_axis():
    """700 kept documents scored 0.9-1.0 and one rejected at 0.31 (the language filter's case): the axis
    reaches the rejected one, so its bar is drawn at its score, not clipped into the first bin."""
    rng = np.random.default_rng(0)
    fig = _histogram("language score", rng.uniform(0.9, 1.0, 700), np.array([0.31]), [0.65])
    rejected = next(t for t in fig.data if t.name.startswith("rejected"))
    centers, counts = np.asarray(rejected.x), np.asarray(rejected.y)
    width = centers[1] - centers[0]
    assert counts.sum() == 1 and abs(centers[counts.argmax()] - 0.31) <= width / 2 + 1e-9
    assert "off the axis" not in fig.layout.title.text  # the threshold is drawn


def test_the_lineage_table_counts_what_each_output_holds_once():
    shards = [{"path": "train-p0.arrow", "rows": 3}, {"path": "train-p0.docs.arrow", "rows": 3}]
    assert _records({"kind": "tokens", "documents": 3, "rows": 6, "files": shards}) == "3 documents"
    parts = [{"path": "p0.parquet", "rows": 5}, {"path": "clusters.parquet", "rows": 2}]
    assert _records({"kind": "documents", "files": parts[:1]}) == "5 documents"
    assert _records({"kind": "warc", "rows": 21, "files": []}) == "21 WARC records"
    assert _records({"kind": "model", "rows": 0, "files": []}) == "—"


def test_each_component_writes_its_one_line_result_and_a_stage_it_does_not_know_gets_none():
    from orchestration.stages import component_of

    def line(name: str, **counters) -> str:
        return component_of(name).summary({"counters": counters})

    assert line("crawl[web]", pages_fetched=21, fetch_failures=41) == "21 pages, 41 failed/refused URLs"
    assert line("clean[docs]", documents_in=13, kept=12, rejected=1) == "13 in, 12 kept, 1 rejected"
    assert line("dedup_across", documents_in=40, kept=39, rejected=1) == "40 in, 39 kept, 1 rejected"
    assert (
        line("tokenize", tokens=90435, documents=39, vocab_size=4096)
        == "90435 tokens, 39 documents, vocab 4096"
    )
    assert line("train", first_loss=8.30575, final_loss=5.90157) == "loss 8.306 -> 5.902"
    assert line("evaluate", loss=6.9191, perplexity=1011.38) == "val loss 6.919, perplexity 1011.4"
    assert line(
        "finetune", first_loss=0.6933, final_loss=0.0383, test_accuracy=0.9583, test_f1_macro=0.9564
    ) == ("loss 0.693 -> 0.038, test accuracy 0.958, test f1_macro 0.956")
    assert line("clean", documents_in=5) == "" and component_of("count") is None
