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
