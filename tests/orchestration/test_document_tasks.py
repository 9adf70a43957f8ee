"""Document-stage tasks on real Ray: a document that makes a stage raise is quarantined to the rejected
dataset with its traceback, a stage that raises on most documents still fails, and ray.resources caps
the tasks in flight."""

import json

import pytest

from cleaning.normalize import TextNormalizer, TextNormalizerConfig
from core.manifest import read_index, read_table
from core.stage import Stage, StageConfig
from ingestion.readers import ReadConfig
from orchestration.executors import corpus_source, run_document_stage
from tests.fixtures import exploding_stage

pytestmark = pytest.mark.integration


def _corpus(tmp_path, texts, name="dump.jsonl", part="read-00000"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"id": f"d{i:02d}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return [(part, corpus_source(str(path), ReadConfig(batch_size=8)))]


def test_a_document_that_crashes_a_stage_is_quarantined_with_its_traceback(ray_session, tmp_path):
    texts = [f"document number {i} is fine" for i in range(30)]
    texts[13] = "document 13 holds the POISON marker"
    out = tmp_path / "clean"
    stages = [TextNormalizer(TextNormalizerConfig()), exploding_stage("POISON")]
    index = run_document_stage("clean", stages, _corpus(tmp_path, texts), out, cache_key="k", inputs={})
    c = index["counters"]
    assert (c["documents_in"], c["kept"], c["rejected"], c["quarantined"]) == (30, 29, 1, 1)
    kept = read_table(out).column("id").to_pylist()
    assert kept == [f"d{i:02d}" for i in range(30) if i != 13]  # the others, in order, none lost
    (bad,) = read_table(out / "rejected").to_pylist()
    assert (bad["id"], bad["filter"], bad["stage"]) == ("d13", "quarantined", "clean")
    assert bad["text"] == texts[13]
    assert bad["signal"].startswith("Traceback (most recent call last):")
    assert "ValueError: cannot handle a document with 'POISON'" in bad["signal"]
    assert read_index(out / "rejected")["files"][0]["rows"] == 1
    # The task's log in the work dir says so too (it ran in a Ray worker).
    log = (out / "_logs" / "read-00000.log").read_text()
    assert "document d13 raised ValueError: quarantined" in log and log.startswith("--- start ")


def test_a_stage_that_raises_on_most_documents_fails_with_the_first_traceback(ray_session, tmp_path):
    texts = [f"every document {i} trips it" for i in range(30)]
    with pytest.raises(Exception, match="11 of 11 documents raised, too many to quarantine"):
        run_document_stage(
            "clean",
            [exploding_stage("trips")],
            _corpus(tmp_path, texts),
            tmp_path / "clean",
            cache_key="k",
            inputs={},
        )


def test_max_in_flight_caps_the_tasks_running_at_once(ray_session, tmp_path):
    """ray.resources' cap on real Ray tasks: each task writes its start and end time; with a cap of one
    no two intervals overlap, with two CPUs and no cap some do."""
    import time

    log = tmp_path / "spans"
    log.mkdir()

    class Slow(Stage):
        name = "slow"

        def run(self, batches, ctx):
            start = time.time()
            time.sleep(0.5)
            yield from batches
            (log / f"{start}-{time.time()}").touch()

    parts = [p for i in range(4) for p in _corpus(tmp_path, [f"text {i}"], f"{i}.jsonl", f"read-{i:05d}")]

    def spans():
        out = sorted(tuple(map(float, f.name.split("-"))) for f in log.iterdir())
        for f in log.iterdir():
            f.unlink()
        return out

    def overlaps(s):
        return any(b[0] < a[1] for a, b in zip(s, s[1:]))

    stage = Slow(StageConfig())
    run_document_stage("clean", [stage], parts, tmp_path / "one", cache_key="k", inputs={}, max_in_flight=1)
    one = spans()
    assert len(one) == 4 and not overlaps(one)
    run_document_stage(
        "clean", [stage], parts, tmp_path / "two", cache_key="k", inputs={}, options={"num_cpus": 1}
    )
    assert overlaps(spans())


def test_running_tasks_report_the_documents_read_so_far(ray_session, tmp_path):
    """The driver hears of documents while the tasks still run (every REPORT_EVERY_S), the counts never
    go back, end at the corpus' size, and a rerun served from the markers starts from that size."""
    import time

    class Slow(Stage):
        name = "slow"

        def run(self, batches, ctx):
            for batch in batches:
                time.sleep(0.4)
                yield batch

    texts = [f"document {i} of a slow stage" for i in range(48)]
    parts = _corpus(tmp_path, texts)  # one task, six batches of eight: about 2.4 s
    seen: list[int] = []
    index = run_document_stage(
        "clean", [Slow(StageConfig())], parts, tmp_path / "out", cache_key="k", inputs={},
        on_counts=lambda counts: seen.append(counts.get("documents", 0)),
    )  # fmt: skip
    assert index["counters"]["documents_in"] == 48
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == 48
    assert any(0 < n < 48 for n in seen), seen  # heard of before the task ended
    again: list[int] = []
    run_document_stage(
        "clean", [Slow(StageConfig())], parts, tmp_path / "out", cache_key="k", inputs={},
        on_counts=lambda counts: again.append(counts.get("documents", 0)),
    )  # fmt: skip
    assert again == [48]  # from the marker, before anything runs
