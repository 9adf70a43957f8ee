"""Poison documents: a document that makes a stage raise is quarantined to the rejected dataset with its
traceback (real Ray tasks, real files); a stage that raises on most documents still fails."""

import json

import pytest

from cleaning.normalize import TextNormalizer, TextNormalizerConfig
from core.manifest import read_index, read_table
from core.stage import Stage, StageConfig
from ingestion.readers import ReadConfig
from orchestration.executors import corpus_source, run_document_stage


def _explodes(on: str) -> Stage:
    class Explodes(Stage):  # local: Ray pickles it by value into the workers
        name = "explodes"

        def run(self, batches, ctx):
            for batch in batches:
                if any(on in t for t in batch.column("text").to_pylist()):
                    raise ValueError(f"cannot handle a document with {on!r}")
                yield batch

    return Explodes(StageConfig())


def _corpus(tmp_path, texts):
    path = tmp_path / "dump.jsonl"
    path.write_text("".join(json.dumps({"id": f"d{i:02d}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return [("read-00000", corpus_source(str(path), ReadConfig(batch_size=8)))]


def test_a_document_that_crashes_a_stage_is_quarantined_with_its_traceback(ray_session, tmp_path):
    texts = [f"document number {i} is fine" for i in range(30)]
    texts[13] = "document 13 holds the POISON marker"
    out = tmp_path / "clean"
    stages = [TextNormalizer(TextNormalizerConfig()), _explodes("POISON")]
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


def test_a_stage_that_raises_on_most_documents_fails_with_the_first_traceback(ray_session, tmp_path):
    texts = [f"every document {i} trips it" for i in range(30)]
    with pytest.raises(Exception, match="11 of 11 documents raised, too many to quarantine"):
        run_document_stage(
            "clean",
            [_explodes("trips")],
            _corpus(tmp_path, texts),
            tmp_path / "clean",
            cache_key="k",
            inputs={},
        )
