"""The tokenize stage on Ray: partitions in parallel, same shards as one process, resumable."""

import shutil

import numpy as np
import pyarrow as pa
import pytest

from core.files import file_entry, write_parquet
from core.manifest import read_index, read_table, write_index
from core.partitions import plan_partitions
from core.schema import DOCUMENT_SCHEMA
from orchestration.stages.tokenize import run_tokenize_stage
from tests.fixtures import batches, corpus
from training.data.tokenize import TokenizeConfig, tokenize_documents
from training.data.tokenizer import TokenizerConfig

pytestmark = pytest.mark.integration


def _docs_dataset(path, texts, rows_per_group=40):
    table = pa.Table.from_batches(batches(texts))
    write_parquet(
        path / "part-00000.parquet", table.to_batches(max_chunksize=rows_per_group), DOCUMENT_SCHEMA
    )
    entry = file_entry(path / "part-00000.parquet", table.num_rows)
    write_index(path, stage="dedup", cache_key="k", files=[entry], schema=DOCUMENT_SCHEMA)
    return table


def _token_streams(out, index):
    streams = {}
    for split, info in index["splits"].items():
        streams[split] = np.concatenate(
            [
                pa.ipc.open_file(str(out / s["path"])).read_all().column("tokens").to_numpy()
                for s in info["shards"]
            ]
        )
    return streams


def test_parallel_stage_matches_one_process_and_resumes(ray_session, tmp_path):
    texts = corpus(400, seed=3)
    docs = tmp_path / "docs"
    table = _docs_dataset(docs, texts)
    cfg = TokenizeConfig(
        tokenizer=TokenizerConfig(vocab_size=320, min_frequency=1), val_fraction=0.1, partition_mb=0.01
    )
    parts = plan_partitions([docs / "part-00000.parquet"], cfg.partition_mb)
    assert len(parts) >= 3  # the stage really fans out

    out = tmp_path / "tokens"
    counts: list[dict[str, int]] = []
    index = run_tokenize_stage(docs, out, cfg, on_counts=counts.append)
    reference_out = tmp_path / "reference"
    reference = tokenize_documents(lambda: table.to_batches(max_chunksize=100), reference_out, cfg)

    assert index["tokenizer"]["id"] == reference["tokenizer"]["id"]
    assert index["documents"] == table.num_rows
    assert {s: v["documents"] for s, v in index["splits"].items()} == {
        s: v["documents"] for s, v in reference["splits"].items()
    }
    for split, stream in _token_streams(out, index).items():
        np.testing.assert_array_equal(stream, _token_streams(reference_out, reference)[split])
    assert {s["path"].split("-")[1] for s in index["splits"]["train"]["shards"]} == {p.name for p in parts}
    # The progress counts: documents and tokens, never going back, ending at what the shards hold.
    assert [c.get("documents", 0) for c in counts] == sorted(c.get("documents", 0) for c in counts)
    assert counts[-1] == {
        "documents": table.num_rows,
        "tokens": sum(v["tokens"] for v in index["splits"].values()),
    }

    # Kill-and-resume: a partition that never finished is redone, the finished ones are reused.
    victim = parts[1].name
    (out / "_done" / f"{victim}.json").unlink()
    for f in out.glob(f"*-{victim}-*"):
        f.unlink()
    (out / "index.json").unlink()
    reused = {
        p.name: (out / "_done" / f"{p.name}.json").stat().st_mtime_ns for p in parts if p.name != victim
    }
    resumed = run_tokenize_stage(docs, out, cfg)
    assert resumed["files"] == index["files"]  # same bytes: same sha256 for every shard
    assert all((out / "_done" / f"{n}.json").stat().st_mtime_ns == t for n, t in reused.items())
    shutil.rmtree(reference_out)


def test_partitions_cover_every_row_once_in_order(tmp_path):
    texts = corpus(230, seed=5)
    table = _docs_dataset(tmp_path, texts, rows_per_group=37)
    path = tmp_path / "part-00000.parquet"
    ids = table.column("id").to_pylist()
    for mb in (1.0, 0.01, 0.003, 0.0005):
        parts = plan_partitions([path], mb)
        got = [[i for b in p.batches(["id"]) for i in b.column(0).to_pylist()] for p in parts]
        assert [i for g in got for i in g] == ids
        assert all(got) and [len(g) for g in got] == [p.stop - p.start for p in parts]
    assert len(plan_partitions([path], 0.0005)) > 7  # finer than the 7 row groups


def test_a_document_the_tokenizer_raises_on_is_quarantined_with_its_traceback(ray_session, tmp_path):
    """A document without text (a null the tokenizer cannot encode) in a stage run from an existing
    tokenizer: it goes to tokens/rejected with the traceback; every other document is tokenized exactly as
    in a run without it."""
    texts = corpus(120, seed=5)
    good = dict(texts)
    texts["doc0042"] = None
    reference_out = tmp_path / "reference"
    fit = TokenizeConfig(tokenizer=TokenizerConfig(vocab_size=300, min_frequency=1), val_fraction=0.1)
    reference = tokenize_documents(
        lambda: batches({k: v for k, v in good.items() if k != "doc0042"}), reference_out, fit
    )
    cfg = TokenizeConfig(
        tokenizer=TokenizerConfig(path=str(reference_out / "tokenizer.json")), val_fraction=0.1
    )
    docs = tmp_path / "docs"
    _docs_dataset(docs, texts)

    out = tmp_path / "tokens"
    index = run_tokenize_stage(docs, out, cfg)
    assert (index["documents"], index["counters"]["quarantined"]) == (119, 1)
    for split, stream in _token_streams(out, index).items():
        np.testing.assert_array_equal(stream, _token_streams(reference_out, reference)[split])
    (bad,) = read_table(out / "rejected").to_pylist()
    assert (bad["id"], bad["stage"], bad["filter"], bad["text"]) == (
        "doc0042",
        "tokenize",
        "quarantined",
        None,
    )
    assert bad["signal"].startswith("Traceback (most recent call last):") and "TypeError" in bad["signal"]
    assert read_index(out / "rejected")["files"][0]["rows"] == 1
