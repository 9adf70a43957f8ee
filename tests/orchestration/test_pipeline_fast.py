"""The pipeline, MLflow tracking and the report on a tiny corpus read from ``read.paths`` (no crawl, no
Ray Train): fast enough for ``make test-fast``."""

import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

from core.files import file_sha256
from core.manifest import read_table
from orchestration.config import parse_config
from orchestration.errors import ConfigError
from orchestration.pipeline import Pipeline
from tests.fixtures import copy_of, prose


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """20 distinct documents, one exact copy of doc 0, one malformed line."""
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("corpus")
    texts = {f"doc{i:02d}": prose(rng) for i in range(20)}
    texts["copy00"] = texts["doc00"]
    lines = [json.dumps({"id": i, "text": t, "url": f"https://example.org/{i}"}) for i, t in texts.items()]
    lines.insert(5, "{not json")
    (root / "dump.jsonl").write_text("\n".join(lines) + "\n")
    return root / "dump.jsonl", texts


@pytest.fixture(scope="module")
def fast_run(ray_session, corpus, tmp_path_factory):
    path, _ = corpus
    cfg = parse_config(_fast_config(path, tmp_path_factory.mktemp("work")), "test")
    return cfg, Pipeline(cfg).run(until="tokenize")


def _fast_config(corpus: Path, workdir: Path) -> dict:
    return {
        "name": "fast",
        "workdir": str(workdir),
        "read": {"paths": [str(corpus)]},
        "clean": {"gopher_repetition": None},
        "dedup": {"shards": 2},
        "tokenize": {"tokenizer": {"vocab_size": 300, "min_frequency": 1}, "val_fraction": 0.2},
    }


@pytest.mark.integration
def test_read_only_run_reports_every_document_and_passes_its_checks(fast_run, corpus):
    cfg, result = fast_run
    _, texts = corpus
    # No crawl seeds: no crawl stage starts.
    assert list(result.stages) == ["clean", "dedup", "tokenize"]
    assert not (cfg.workdir / "crawl").exists()
    report = json.loads(result.report_path.read_text())
    assert report["ok"], report["checks"]
    # Every record of read.paths reached clean.
    clean = result.stages["clean"].index["counters"]
    assert clean["documents_in"] == clean["documents_in.read"] == len(texts) + 1  # + the malformed line
    assert clean["malformed"] == 1 and clean["rejected"] == 1
    (bad,) = read_table(result.stages["clean"].out_dir / "rejected").to_pylist()
    assert (bad["text"], bad["url"], bad["filter"]) == ("{not json\n", "dump.jsonl#line 6", "malformed")
    assert report["checks"]["clean: documents read = from the crawl + from read.paths"]
    # The planted pair is one exact-duplicate cluster; the smallest id survives ("copy00" < "doc00").
    removed = read_table(result.stages["dedup"].out_dir / "rejected").to_pylist()
    assert [(r["id"], r["filter"], r["duplicate_of"]) for r in removed] == [
        ("doc00", "exact_dedup", "copy00")
    ]
    kept = result.stages["dedup"].index["counters"]["kept"]
    assert result.stages["tokenize"].index["counters"]["documents"] == kept == len(texts) - 1
    # Ids are conserved across stages (multiset sums of 64-bit id hashes, recomputed here from the files).
    assert report["checks"]["dedup: every document id kept by clean leaves as kept or rejected"]
    assert report["checks"]["tokenize: the document ids tokenized (and quarantined) are the ids dedup kept"]
    for stage in ("clean", "dedup"):
        for entry in result.stages[stage].index["files"]:
            ids = pq.read_table(result.stages[stage].out_dir / entry["path"]).column("id").to_pylist()
            hashes = (
                int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids
            )
            assert int(entry["id_sum"], 16) == sum(hashes) % 2**64
    # Lineage: every manifest names the digest of the stage it read.
    assert all(ok for name, ok in report["checks"].items() if ": input " in name)
    assert sum(": input " in name for name in report["checks"]) == 2  # dedup<-clean, tokenize<-dedup


@pytest.mark.integration
def test_each_stage_is_a_nested_mlflow_run_of_the_pipeline_run(fast_run, tmp_path):
    cfg, result = fast_run
    client = mlflow.MlflowClient(cfg.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    by_stage = {r.data.tags["lmforge.stage"]: r for r in children}
    assert set(by_stage) == {"clean", "dedup", "tokenize"}
    assert by_stage["dedup"].data.metrics["rejected"] == 1
    assert json.loads((cfg.workdir / "run.json").read_text())["mlflow_run_id"] == result.parent_run_id
    # The report's tables are on the parent run, the funnel with the manifests' numbers.
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    names = ("funnel", "rejections", "signals", "languages")
    assert {f"report/{n}.json" for n in names} <= artifacts
    path = client.download_artifacts(result.parent_run_id, "report/funnel.json", str(tmp_path))
    funnel = json.loads(Path(path).read_text())  # mlflow.log_table's {"columns": [...], "data": [[...]]}
    rows = [dict(zip(funnel["columns"], row)) for row in funnel["data"]]
    table = {r["step"]: r["documents"] for r in rows}
    clean = result.stages["clean"].index["counters"]
    assert table["after quality filters"] == clean["kept"]
    assert table["after deduplication"] == result.stages["dedup"].index["counters"]["kept"]
    assert table["tokenized"] == result.stages["tokenize"].index["counters"]["documents"]
    assert parent.data.metrics["report.documents.after_quality_filters"] == clean["kept"]
    # The UI opens the experiment on its training runs and models, not on the GenAI traces page.
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # The code version names the commit (and whether tracked files differed from it).
    repo = Path(__file__).resolve().parents[2]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        dirty = (
            subprocess.run(
                ["git", "-C", str(repo), "diff", "--quiet", "HEAD"], capture_output=True
            ).returncode
            != 0
        )
        tags = parent.data.tags
        assert tags["lmforge.git_commit"] == head.stdout.strip()
        assert tags["lmforge.git_dirty"] == str(dirty).lower()
        assert tags["lmforge.code_version"].startswith(
            f"{tags['lmforge.version']}+g{head.stdout.strip()[:12]}"
        )


@pytest.mark.integration
def test_training_is_refused_before_it_starts_when_evaluate_could_not_measure_the_model(
    fast_run, corpus, tmp_path
):
    """A validation split shorter than one sequence: the train stage says so (and what to change) before
    training, instead of the evaluate stage failing after it."""
    cfg, result = fast_run
    held_out = result.stages["tokenize"].index["splits"]["val"]["tokens"]
    raw = _fast_config(corpus[0], copy_of(cfg.workdir, tmp_path / "work"))
    too_long = parse_config({**raw, "train": {"seq_len": held_out}}, "test")
    with pytest.raises(ConfigError) as refused:
        Pipeline(too_long).run(until="train")
    assert f"holds {held_out} tokens, fewer than train.seq_len+1={held_out + 1}" in str(refused.value)
    assert "raise tokenize.val_fraction (now 0.2)" in str(refused.value)
    assert not list((too_long.workdir / "train").rglob("*.safetensors"))
    assert not (too_long.workdir / "train" / "index.json").exists()


def _cli(*args: str):
    """The lmforge command line in this process (a fresh interpreter imports torch again: ~10 s a call)."""
    from typer.testing import CliRunner

    from orchestration.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.mark.integration
def test_lmforge_report_rebuilds_the_report_from_the_manifests(fast_run, tmp_path):
    cfg, result = fast_run
    before = json.loads(result.report_path.read_text())
    result.report_path.unlink()
    result.report_path.with_suffix(".md").unlink()
    done = _cli("report", str(cfg.workdir))
    assert done.exit_code == 0, done.output
    assert json.loads(result.report_path.read_text()) == before
    assert "documents in = kept + rejected" in result.report_path.with_suffix(".md").read_text()
    # A manifest that no longer adds up fails its check, and the command says so.
    index_path = cfg.workdir / "dedup" / "index.json"
    original = index_path.read_text()
    index = json.loads(original)
    index["counters"]["rejected"] += 1
    index_path.write_text(json.dumps(index))
    try:
        done = _cli("report", str(cfg.workdir))
        assert done.exit_code == 1
        assert "✗ dedup: documents in = kept + rejected" in done.output
    finally:
        index_path.write_text(original)
    assert _cli("report", str(tmp_path)).exit_code == 2  # no run there


@pytest.mark.integration
def test_an_output_that_no_longer_matches_its_manifest_is_rebuilt(fast_run):
    """A token shard changed in place with its mtime put back, and a clean file cut short: a plain rerun
    rebuilds exactly those stages, and their files match their manifests again."""
    cfg, result = fast_run
    tokens = result.stages["tokenize"]
    shard_entry = tokens.index["splits"]["train"]["shards"][0]
    shard = tokens.out_dir / shard_entry["path"]
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    clean_file = result.stages["clean"].out_dir / result.stages["clean"].index["files"][0]["path"]
    table = pq.read_table(clean_file)
    pq.write_table(table.slice(0, table.num_rows - 1), clean_file)

    again = Pipeline(cfg).run(until="tokenize")
    assert {n: s.cached for n, s in again.stages.items()} == {
        "clean": False,  # rebuilt: one row short of its manifest
        "dedup": True,  # the rebuilt clean output has the same digest, so dedup's key holds
        "tokenize": False,  # rebuilt: a shard's bytes changed
    }
    assert file_sha256(shard) == shard_entry["sha256"]
    assert pq.read_table(clean_file).num_rows == table.num_rows
    assert json.loads(again.report_path.read_text())["ok"]


RUN_IN_A_FRESH_PROCESS = """
import json, sys
from orchestration.config import parse_config
from orchestration.errors import ConfigError
from orchestration.pipeline import Pipeline
cfg = parse_config(json.loads(sys.argv[1]), "test")
Pipeline(cfg).run(until="tokenize")
"""


def _tmp_entries() -> set[str]:
    ray_sessions = (
        {f"ray/{p.name}" for p in Path("/tmp/ray").glob("session_*")} if Path("/tmp/ray").is_dir() else set()
    )
    return {p.name for p in Path("/tmp").iterdir()} | ray_sessions


@pytest.mark.system  # a whole run in a fresh process
@pytest.mark.serial  # compares /tmp before and after: nothing else may run meanwhile
def test_an_embedded_run_leaves_nothing_in_tmp(corpus, tmp_path):
    """Ray's session files and the workers' temporary files go to a private directory that is removed
    when the run's process exits (the work dir here, 150 characters or more, is too long a path for Ray's
    sockets: "AF_UNIX path length cannot exceed 107 bytes" before)."""
    path, texts = corpus
    workdir = tmp_path / "a-work-dir-whose-path-is-too-long-for-ray-sockets"
    workdir = workdir.with_name(workdir.name + "-x" * max(0, (150 - len(str(workdir))) // 2 + 1))
    assert len(str(workdir)) >= 150
    config = {
        "workdir": str(workdir),
        "read": {"paths": [str(path)]},
        "clean": {"gopher_repetition": None},
        "ray": {"num_cpus": 2, "dashboard": False},
        "tokenize": {"tokenizer": {"vocab_size": 300, "min_frequency": 1}, "val_fraction": 0.2},
    }
    before = _tmp_entries()
    env = {k: v for k, v in os.environ.items() if k != "TMPDIR"}
    done = subprocess.run(
        [sys.executable, "-c", RUN_IN_A_FRESH_PROCESS, json.dumps(config)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / config["workdir"] / "tokenize" / "index.json").exists()
    left = {e for e in _tmp_entries() - before if not e.startswith("pytest-of-")}
    assert left == set(), left


@pytest.mark.integration
def test_a_short_work_dir_keeps_ray_files_beside_the_outputs(tmp_path):
    from orchestration.executors import _embedded_temp_dir

    short = Path("/w")
    assert _embedded_temp_dir(short) == Path("/w/.ray")
    long = tmp_path / ("x" * 60)
    assert _embedded_temp_dir(long).parent == Path(tempfile.gettempdir())


@pytest.mark.integration
def test_html_report_of_a_data_only_read_paths_run_shows_raw_records(ray_session, tmp_path):
    """A run that stops at dedup on a WARC file and a directory of HTML pages (no crawl): the report has
    the data sections only, and each rejected example carries the raw HTML it was extracted from."""
    import html
    import io
    import re

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    from orchestration.report_html import build_html

    rng = random.Random(3)
    page = "<html><head><title>{0}</title></head><body><article><p>{1}</p></article></body></html>"
    pages = {f"http://site.test/{i}": page.format(i, prose(rng, 12)) for i in range(3)}
    pages["http://site.test/short"] = page.format("short", "Too short to keep, by any rule.")
    warc = tmp_path / "in" / "pages.warc.gz"
    warc.parent.mkdir()
    with open(warc, "wb") as out:
        writer = WARCWriter(out, gzip=True)
        for url, markup in pages.items():
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], "HTTP/1.1")
            body = io.BytesIO(markup.encode())
            writer.write_record(
                writer.create_warc_record(url, "response", payload=body, http_headers=headers)
            )
    site = tmp_path / "in" / "site"
    site.mkdir()
    (site / "good.html").write_text(page.format("good", prose(rng, 12)))
    (site / "tiny.html").write_text(page.format("tiny", "Two words."))
    cfg = parse_config(
        {
            "name": "data-only",
            "workdir": str(tmp_path / "work"),
            "read": {"paths": [str(warc), str(site)]},
            "clean": {"gopher_repetition": None, "pii": None},
            "dedup": {"shards": 1},
        },
        "test",
    )
    result = Pipeline(cfg).run(until="dedup")
    assert list(result.stages) == ["clean", "dedup"]
    html_page, figures = build_html(cfg.workdir)
    sections = re.findall(r'<section id="(\w+)">', html_page)
    assert sections[:3] == ["funnel", "rejections", "signals"] and "training" not in sections
    assert "tokens" not in sections and "evaluation" not in sections
    rejected = {r["url"]: r for r in read_table(cfg.workdir / "clean" / "rejected").to_pylist()}
    assert set(rejected) == {"http://site.test/short", f"file://{site / 'tiny.html'}"}
    assert figures["metrics"]["report.documents.extracted_documents"] == 6
    assert figures["metrics"]["report.documents.after_quality_filters"] == 4
    raw = re.findall(r'<details class="raw">.*?<pre>(.*?)</pre></details>', html_page, re.S)
    assert sorted(html.unescape(r) for r in raw) == sorted(
        [pages["http://site.test/short"], (site / "tiny.html").read_text()]
    )
    assert "pages.warc.gz, record at byte" in html_page
