"""Corpora users already have (JSONL, a directory of HTML and text files) through the clean stage."""

import gzip
import json

import pytest

from cleaning.extract import HtmlExtractor, HtmlExtractorConfig
from cleaning.normalize import TextNormalizer, TextNormalizerConfig
from core.manifest import read_table
from ingestion.readers import ReadConfig
from orchestration.config import parse_config
from orchestration.executors import corpus_source, run_document_stage

pytestmark = pytest.mark.integration

PARAGRAPH = "The river runs past the old mill and the stone bridge, as it has for three hundred years. "


def test_jsonl_and_html_directory_feed_the_clean_stage(ray_session, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "pages").mkdir(parents=True)
    with gzip.open(corpus / "dump.jsonl.gz", "wt") as out:
        out.write(json.dumps({"id": "j1", "text": PARAGRAPH * 3, "url": "http://x/j1"}) + "\n")
        out.write("{broken\n")
        out.write(json.dumps({"id": "j2", "text": PARAGRAPH * 2}) + "\n")
    html = f"<html><body><article><p>{PARAGRAPH * 4}</p></article></body></html>"
    (corpus / "pages" / "a.html").write_text(html)
    (corpus / "notes.txt").write_text(PARAGRAPH)
    read = ReadConfig(paths=[str(corpus)])
    inputs = read.inputs()
    assert inputs == [str(corpus / "dump.jsonl.gz"), str(corpus)]
    stages = [HtmlExtractor(HtmlExtractorConfig()), TextNormalizer(TextNormalizerConfig())]
    parts = [(f"read-{i:05d}", corpus_source(uri, read)) for i, uri in enumerate(inputs)]
    index = run_document_stage("clean", stages, parts, tmp_path / "clean", cache_key="k", inputs={})
    docs = {r["id"]: r for r in read_table(tmp_path / "clean").to_pylist()}
    assert {"j1", "j2"} <= set(docs) and len(docs) == 4
    assert docs["j1"]["url"] == "http://x/j1" and docs["j1"]["text"] == (PARAGRAPH * 3).strip()
    from_html = [d for d in docs.values() if d["source"] == "pages/a.html"]
    assert len(from_html) == 1 and from_html[0]["text"].startswith("The river runs")
    # The broken line is a rejected record, with its bytes and where it was: 4 documents + 1 = 5 in.
    assert index["counters"]["malformed"] == 1 and index["counters"]["documents_in"] == 5
    (bad,) = read_table(tmp_path / "clean" / "rejected").to_pylist()
    assert (bad["text"], bad["url"], bad["filter"]) == ("{broken\n", "dump.jsonl.gz#line 2", "malformed")
    assert bad["signal"].startswith("bad JSON")


def test_read_only_config_is_a_source_and_missing_paths_fail_clearly(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    cfg = parse_config({"read": {"paths": [str(tmp_path / "*.jsonl")]}, "workdir": str(tmp_path / "w")}, "t")
    assert cfg.read.inputs() == [str(tmp_path / "a.jsonl")]
    with pytest.raises(FileNotFoundError, match="nothing matches"):
        ReadConfig(paths=[str(tmp_path / "*.parquet")]).inputs()


def test_a_truncated_input_fails_the_stage_naming_the_file(ray_session, tmp_path):
    from ingestion.readers import CorruptInputError

    path = tmp_path / "dump.jsonl.gz"
    data = gzip.compress(
        b"".join(json.dumps({"id": f"r{i}", "text": PARAGRAPH}).encode() + b"\n" for i in range(50))
    )
    path.write_bytes(data[: len(data) // 2])
    read = ReadConfig(paths=[str(path)])
    parts = [("read-00000", corpus_source(str(path), read))]
    stages = [TextNormalizer(TextNormalizerConfig())]
    with pytest.raises(CorruptInputError, match=f"{path}: truncated or corrupt.*re-download"):
        run_document_stage("clean", stages, parts, tmp_path / "clean", cache_key="k", inputs={})
    assert not (tmp_path / "clean" / "index.json").exists()  # nothing committed
