"""The dedup stage on Ray: map / shuffle by bucket key / reduce / components / apply, against one process."""

import json
import random
import shutil

import pyarrow.parquet as pq
import pytest

from cleaning.dedup import MinHashDedupConfig, MinHashDeduplicator
from core.files import file_entry, write_parquet
from core.manifest import read_table, write_index
from core.partitions import plan_partitions
from core.schema import DOCUMENT_SCHEMA, document_table
from core.stage import StageContext
from evaluation.dedup_quality import pair_metrics, planted_corpus
from orchestration.config import DedupConfig
from orchestration.dedup import run_dedup_stage

pytestmark = pytest.mark.integration


def _dataset(path, ids, texts, rows_per_group=50, meta=None):
    n = len(ids)
    table = document_table(texts, ids=ids, meta=meta, source="planted")
    write_parquet(
        path / "part-00000.parquet", table.to_batches(max_chunksize=rows_per_group), DOCUMENT_SCHEMA
    )
    write_index(path, stage="clean", cache_key="k", files=[file_entry(path / "part-00000.parquet", n)])
    return table


def _outcome(out):
    kept = set(read_table(out).column("id").to_pylist())
    removed = {r["id"]: (r["duplicate_of"], r["filter"]) for r in read_table(out / "rejected").to_pylist()}
    return kept, removed


def _corpus():
    corpus = planted_corpus(families=60, template_groups=15, singletons=120, seed=4)
    # Exact copies (a changed case and punctuation are the same normal form) of a few documents.
    copies = [(f"zz-copy{i}", corpus.texts[i].upper() + " !") for i in range(0, 40, 8)]
    return corpus, corpus.ids + [c[0] for c in copies], corpus.texts + [c[1] for c in copies]


def test_ray_stage_matches_one_process_and_any_partitioning(ray_session, tmp_path):
    corpus, ids, texts = _corpus()
    docs = tmp_path / "docs"
    _dataset(docs, ids, texts)
    many = DedupConfig(partition_mb=0.05, shards=3)
    assert len(plan_partitions([docs / "part-00000.parquet"], many.partition_mb)) >= 4
    runs = {}
    for name, cfg in (("many", many), ("one", DedupConfig(partition_mb=1024, shards=1))):
        index = run_dedup_stage(docs, tmp_path / name, cfg, cache_key=name, inputs={})
        assert (
            index["counters"]["documents_in"]
            == len(ids)
            == index["counters"]["kept"] + index["counters"]["rejected"]
        )
        runs[name] = _outcome(tmp_path / name)
    assert runs["many"] == runs["one"]  # the same decisions whatever the partitioning and shard count

    kept, removed = runs["many"]
    assert all(dup in kept for dup, _ in removed.values())
    # The cluster table: every survivor with its removed members, largest first.
    clusters = pq.read_table(tmp_path / "many" / "clusters.parquet").to_pylist()
    assert {c["representative"] for c in clusters} == {dup for dup, _ in removed.values()}
    assert sum(c["size"] - 1 for c in clusters) == len(removed)
    assert all(
        set(c["members"]) == {k for k, (d, _) in removed.items() if d == c["representative"]}
        for c in clusters
    )
    assert [c["size"] for c in clusters] == sorted((c["size"] for c in clusters), reverse=True)
    # Each survivor carries its cluster's size in meta (what rehydration upsamples by); others none or 1.
    sizes = {c["representative"]: c["size"] for c in clusters}
    for row in read_table(tmp_path / "many").to_pylist():
        assert dict(row["meta"]).get("dedup.copies", 1) == sizes.get(row["id"], 1), row["id"]
    for copy_id, (_, reason) in ((k, v) for k, v in removed.items() if k.startswith("zz-copy")):
        assert reason == "exact_dedup", copy_id
    pos = {d: i for i, d in enumerate(corpus.ids)}
    near = {pos[k]: pos[d] for k, (d, _) in removed.items() if k in pos and d in pos}
    metrics = pair_metrics(corpus, near, 0.8)
    assert metrics.precision >= 0.95 and metrics.recall >= 0.9, metrics

    # Without exact dedup, the same clusters as the one-process stage.
    only_near = DedupConfig(exact=None, partition_mb=0.05, shards=2)
    run_dedup_stage(docs, tmp_path / "near", only_near, cache_key="near", inputs={})
    ctx = StageContext("dedup")
    one = MinHashDeduplicator(MinHashDedupConfig())
    batch = _dataset(tmp_path / "again", ids, texts).to_batches()
    kept_one = {i for b in one.run(batch, ctx) for i in b.column("id").to_pylist()}
    removed_one = {r["id"]: r["duplicate_of"] for b in ctx.rejected for r in b.to_pylist()}
    kept_ray, removed_ray = _outcome(tmp_path / "near")
    assert kept_ray == kept_one and {k: d for k, (d, _) in removed_ray.items()} == removed_one


def test_killed_stage_resumes_from_finished_tasks(ray_session, tmp_path):
    _, ids, texts = _corpus()
    docs = tmp_path / "docs"
    _dataset(docs, ids, texts)
    cfg = DedupConfig(partition_mb=0.05, shards=2)
    out = tmp_path / "out"
    first = run_dedup_stage(docs, out, cfg, cache_key="k", inputs={})
    # Undo the last apply task and the commit, as if killed before them; the rest is reused.
    work = out / "_work" / "_done"
    victim = sorted(work.glob("apply-*.json"))[-1]
    part = victim.stem.removeprefix("apply-")
    victim.unlink()
    (out / f"{part}.parquet").unlink()
    (out / "index.json").unlink()
    reused = {p.name: p.stat().st_mtime_ns for p in work.glob("*.json")}
    again = run_dedup_stage(docs, out, cfg, cache_key="k", inputs={})
    assert [f["sha256"] for f in again["files"]] == [f["sha256"] for f in first["files"]]
    assert all((work / n).stat().st_mtime_ns == t for n, t in reused.items())
    assert sum(json.loads(p.read_text())["clusters"] for p in work.glob("decide-*.json")) > 0
    shutil.rmtree(out)


def test_one_or_two_workers_give_the_same_bytes_and_keep_by_score(ray_session, tmp_path):
    _, ids, texts = _corpus()
    # A quality score on most documents (none on every seventh), unrelated to id order.
    meta = [[] if i % 7 == 0 else [("quality", (i * 37 % 101) / 101)] for i in range(len(ids))]
    docs = tmp_path / "docs"
    _dataset(docs, ids, texts, meta=meta)
    minhash = MinHashDedupConfig(keep="score", score_key="quality")
    files = {}
    for workers in (1, 2):
        cfg = DedupConfig(exact=None, minhash=minhash, partition_mb=0.05, shards=3, workers=workers)
        index = run_dedup_stage(docs, tmp_path / f"w{workers}", cfg, cache_key="k", inputs={})
        files[workers] = [f["sha256"] for f in index["files"]] + [
            pq.read_table(tmp_path / f"w{workers}" / "clusters.parquet").to_pylist()
        ]
    assert files[1] == files[2]

    ctx = StageContext("dedup")
    one = MinHashDeduplicator(minhash)
    kept_one = {
        i
        for b in one.run(_dataset(tmp_path / "again", ids, texts, meta=meta).to_batches(), ctx)
        for i in b.column("id").to_pylist()
    }
    removed_one = {r["id"]: r["duplicate_of"] for b in ctx.rejected for r in b.to_pylist()}
    kept, removed = _outcome(tmp_path / "w2")
    assert kept == kept_one and {k: d for k, (d, _) in removed.items()} == removed_one
    score = {i: dict(m).get("quality", -1.0) for i, m in zip(ids, meta)}
    assert all(score[d] >= score[k] for k, (d, _) in removed.items())
    assert any(d > k for k, (d, _) in removed.items())  # not simply the first id


def test_line_dedup_cuts_repeated_spans_among_surviving_documents(ray_session, tmp_path):
    from cleaning.dedup import LineDedupConfig

    def words(tag, n):
        return " ".join(f"{tag}{i}" for i in range(n))

    footer = "Share this page\nCopyright 2024 Example Corp\nPrivacy policy and terms"
    own = "Only in the pair one\nOnly in the pair two\nOnly in the pair three"
    texts = {  # in corpus order
        "b0": f"{words('b', 60)}\n{own}",  # an exact copy of a9: removed, so it claims no span
        "a0": f"{words('x', 60)}\n{footer}",
        "a1": f"{words('y', 60)}\n{footer}\nEnd of y",
        "a2": f"{words('z', 10)}\n{footer}",
        "a9": f"{words('b', 60)}\n{own}",
    }
    docs = tmp_path / "docs"
    _dataset(docs, list(texts), list(texts.values()), rows_per_group=2)
    cfg = DedupConfig(minhash=None, lines=LineDedupConfig(span=3), partition_mb=0.0005, shards=2)
    index = run_dedup_stage(docs, tmp_path / "out", cfg, cache_key="k", inputs={})
    kept = {r["id"]: r["text"] for r in read_table(tmp_path / "out").to_pylist()}
    rejected = {r["id"]: r for r in read_table(tmp_path / "out" / "rejected").to_pylist()}
    # a0 holds the footer first; a1 loses it and keeps 61 words; a2 keeps 10 < 50 words and goes.
    assert kept == {"a0": texts["a0"], "a1": f"{words('y', 60)}\nEnd of y", "a9": texts["a9"]}
    assert rejected["b0"]["filter"] == "exact_dedup" and rejected["b0"]["duplicate_of"] == "a9"
    assert rejected["a2"]["filter"] == "line_dedup" and rejected["a2"]["value"] == 10
    assert rejected["a2"]["text"] == texts["a2"]  # removed as it came in
    # The footer's 3-line span once in a0, and in a1 and a2: 2 cuts of 3 lines.
    assert index["counters"]["line_spans_cut"] == 2
    assert index["counters"]["line_dedup.lines_cut"] == 6


def test_no_input_documents_give_an_empty_output(ray_session, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    write_index(docs, stage="clean", cache_key="k", files=[])
    index = run_dedup_stage(docs, tmp_path / "out", DedupConfig(shards=2), cache_key="k", inputs={})
    assert index["rows"] == 0 and index["files"] == []
    assert index["counters"] == {"documents_in": 0, "kept": 0, "rejected": 0}
    assert pq.read_table(tmp_path / "out" / "clusters.parquet").num_rows == 0


def test_two_documents_with_one_id_keep_the_first_in_corpus_order(ray_session, tmp_path):
    rng = random.Random(3)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "mu"]
    texts = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(30)]
    ids = [f"doc{i:02d}" for i in range(30)]
    ids[25] = ids[3]  # another text under an id already used, in another partition
    ids[27] = ids[3]
    docs = tmp_path / "docs"
    _dataset(docs, ids, texts, rows_per_group=5)
    cfg = DedupConfig(partition_mb=0.002, shards=3)
    assert len(plan_partitions([docs / "part-00000.parquet"], cfg.partition_mb)) > 1
    index = run_dedup_stage(docs, tmp_path / "out", cfg, cache_key="k", inputs={})
    kept = read_table(tmp_path / "out").to_pylist()
    rejected = read_table(tmp_path / "out" / "rejected").to_pylist()
    assert [r["text"] for r in kept if r["id"] == "doc03"] == [texts[3]]  # the first one stays
    dup = [(r["text"], r["filter"], r["signal"], r["duplicate_of"]) for r in rejected if r["id"] == "doc03"]
    assert sorted(dup) == sorted([(texts[i], "duplicate_id", "id", "doc03") for i in (25, 27)])
    assert index["counters"]["id_collisions"] == 2
    assert len(kept) + len(rejected) == 30 and len({r["id"] for r in kept}) == len(kept)


def test_a_document_dedup_raises_on_is_quarantined_and_the_rest_deduplicated_as_without_it(
    ray_session, tmp_path
):
    """A document without text (its hash cannot be taken) among planted duplicates, in the second of
    several partitions: it goes to dedup/rejected with its traceback; every other document is kept or
    removed exactly as in a run on the corpus without it (the later rows of its partition included)."""
    corpus, ids, texts = _corpus()
    cfg = DedupConfig(partition_mb=0.05, shards=3)
    clean = tmp_path / "clean"
    _dataset(clean, ids, texts)
    expected = run_dedup_stage(clean, tmp_path / "expected", cfg, cache_key="k", inputs={})

    at = 70
    poisoned = tmp_path / "poisoned"
    table = _dataset(poisoned, ids[:at] + ["poison"] + ids[at:], texts[:at] + [None] + texts[at:])
    parts = plan_partitions([poisoned / "part-00000.parquet"], cfg.partition_mb)
    assert len(parts) >= 3 and parts[0].stop <= at  # not in the first partition: row numbers shift
    index = run_dedup_stage(poisoned, tmp_path / "out", cfg, cache_key="k", inputs={})

    kept, removed = _outcome(tmp_path / "out")
    (bad,) = [r for r in read_table(tmp_path / "out" / "rejected").to_pylist() if r["id"] == "poison"]
    assert (bad["filter"], bad["stage"], bad["text"]) == ("quarantined", "dedup", None)
    assert bad["signal"].startswith("Traceback (most recent call last):")
    del removed["poison"]
    assert (kept, removed) == _outcome(tmp_path / "expected")
    c = index["counters"]
    assert (c["documents_in"], c["quarantined"]) == (table.num_rows, 1)
    assert c["kept"] + c["rejected"] == table.num_rows
    assert c["kept"] == expected["counters"]["kept"]
