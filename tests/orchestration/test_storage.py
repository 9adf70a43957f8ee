"""Stage outputs on an object store: a local S3 server (moto's server mode; there is no real S3 here) that
pyarrow's S3FileSystem talks HTTP to as it would to S3. A Store behaves as a local directory does, and a
document stage run by Ray tasks with its input and its output there commits the same bytes as on a local
disk, keeps each task's log there and reruns nothing."""

import gzip
import hashlib
import json
import os
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cleaning.normalize import TextNormalizer, TextNormalizerConfig
from core.manifest import read_index, read_table, verify_files
from core.storage import Store
from ingestion.readers import ReadConfig
from orchestration.config import DedupConfig
from orchestration.dedup import run_dedup_stage
from orchestration.executors import corpus_source, run_document_stage
from orchestration.stages.tokenize import run_tokenize_stage
from tests.conftest import free_port
from tests.fixtures import exploding_stage
from tests.ray_nodes import SMALL_DEMO, lmforge, set_args
from training.data.tokenize import TokenizeConfig
from training.data.tokenizer import TokenizerConfig

REPO = Path(__file__).resolve().parents[2]
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED")


@pytest.fixture
def bucket(s3_server):
    prefix, query = s3_server(f"work-{time.monotonic_ns()}")
    return prefix, query


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(tmp_path / "dir")
    prefix, query = request.getfixturevalue("bucket")
    return Store(f"{prefix}/dir{query}")


@pytest.mark.integration
def test_a_store_reads_writes_lists_and_removes_as_a_directory_does(store, tmp_path):
    assert not store.exists() and store.files() == [] and not store.exists("a.txt")
    store.write_bytes("a.txt", b"first")
    (store / "sub").write_bytes("b.json", b"{}")
    assert store.read_bytes("a.txt") == b"first" and store.read_text("sub/b.json") == "{}"
    assert store.files() == ["a.txt", "sub/b.json"] and (store / "sub").files() == ["b.json"]
    assert store.is_file("a.txt") and not store.is_file("sub") and store.size("a.txt") == 5
    store.write_bytes("a.txt", b"second")  # replaced whole
    gz = gzip.compress(b"a WARC record")  # bytes as they are: no compression guessed from the name
    store.write_bytes("c.warc.gz", gz)
    assert store.read_bytes("c.warc.gz") == gz and store.sha256("c.warc.gz") == hashlib.sha256(gz).hexdigest()
    assert store.stats()["c.warc.gz"][0] == len(gz)
    store.remove("c.warc.gz")
    store.append_bytes("log/t.log", b"one\n")
    store.append_bytes("log/t.log", b"two\n")
    assert store.read_bytes("a.txt") == b"second" and store.read_bytes("log/t.log") == b"one\ntwo\n"
    local = tmp_path / "staged.bin"
    local.write_bytes(b"\x00" * 1000 + b"end")
    store.put(local, "deep/er/staged.bin")
    assert not local.exists()
    with store.open_input("deep/er/staged.bin") as f:
        assert f.read_at(3, 1000) == b"end"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        store.read_bytes("missing.txt")
    store.remove("a.txt")
    store.remove("a.txt")  # already gone: no error
    store.rmtree("sub")
    assert store.files() == ["deep/er/staged.bin", "log/t.log"]
    store.rmtree()
    assert store.files() == [] and not store.exists("log/t.log")


@pytest.mark.integration
def test_a_remote_store_keeps_the_uri_query_for_every_path_below_it(bucket):
    prefix, query = bucket
    store = Store(f"{prefix}/run/{query}")
    assert store.local is None and store.uri == f"{prefix}/run{query}"
    assert (store / "clean" / "rejected").uri == f"{prefix}/run/clean/rejected{query}"
    assert store.uri_of("index.json") == f"{prefix}/run/index.json{query}"
    assert Store(store) == store and Store(store.uri) == store
    assert Store("relative/dir").local == Store(os.path.abspath("relative/dir")).local


def _upload_corpus(bucket_uri: tuple[str, str], texts: list[str]) -> str:
    prefix, query = bucket_uri
    fs, root = pafs.FileSystem.from_uri(prefix + query)
    with fs.open_output_stream(f"{root}/input/dump.jsonl") as out:
        out.write(
            "".join(json.dumps({"id": f"d{i:02d}", "text": t}) + "\n" for i, t in enumerate(texts)).encode()
        )
    return f"{prefix}/input/dump.jsonl{query}"


def _run(uri, out, options=None):
    read = ReadConfig(batch_size=8)
    stages = [TextNormalizer(TextNormalizerConfig()), exploding_stage("POISON")]
    partitions = [("read-00000", corpus_source(uri, read))]
    return run_document_stage("clean", stages, partitions, out, cache_key="k", inputs={}, options=options)


@pytest.mark.system
def test_a_document_stage_on_ray_reads_and_commits_on_s3_the_bytes_a_local_run_does(
    ray_session, bucket, tmp_path
):
    texts = [
        f"document number {i % 4} is  fine, and it is long enough to share its shingles" for i in range(30)
    ]
    texts[13] = "document 13 holds the POISON marker"
    uri = _upload_corpus(bucket, texts)
    # The workers get the credentials as any Ray job would: in its runtime environment.
    options = {"runtime_env": {"env_vars": {k: os.environ[k] for k in AWS_ENV}}}
    remote = Store(f"{bucket[0]}/work/clean{bucket[1]}")
    index = _run(uri, str(remote), options)
    local = _run(uri, tmp_path / "clean")

    assert index["counters"] == local["counters"] and index["counters"]["quarantined"] == 1
    assert [(f["path"], f["sha256"], f["rows"]) for f in index["files"]] == [
        (f["path"], f["sha256"], f["rows"]) for f in local["files"]
    ]
    assert read_index(remote) == index and read_table(remote).equals(read_table(tmp_path / "clean"))
    (bad,) = read_table(remote / "rejected").to_pylist()
    assert (bad["id"], bad["filter"]) == ("d13", "quarantined")
    assert set(remote.files()) == {
        "index.json",
        "read-00000.parquet",
        "rejected/index.json",
        "rejected/read-00000.parquet",
        "_done/read-00000.json",
        "_logs/read-00000.log",
    }  # nothing staged is left behind on the store
    log = remote.read_text("_logs/read-00000.log")
    assert log.startswith("--- start ") and "document d13 raised ValueError: quarantined" in log

    # A rerun finds the task's marker on the store and runs nothing.
    before = remote.read_bytes("_done/read-00000.json")
    again = _run(uri, remote, options)
    assert again["files"] == index["files"] and remote.read_bytes("_done/read-00000.json") == before
    assert remote.read_text("_logs/read-00000.log") == log

    # The tokenize stage reads that output from the store and commits its shards there, as locally.
    config = TokenizeConfig(tokenizer=TokenizerConfig(vocab_size=300, min_frequency=1), val_fraction=0.2)
    tokens = run_tokenize_stage(remote, Store(f"{bucket[0]}/work/tokens{bucket[1]}"), config, options=options)
    reference = run_tokenize_stage(tmp_path / "clean", tmp_path / "tokens", config)
    assert [(f["path"], f["sha256"], f["bytes"]) for f in tokens["files"]] == [
        (f["path"], f["sha256"], f["bytes"]) for f in reference["files"]
    ]
    assert tokens["counters"] == reference["counters"] and tokens["documents"] == 29

    # So does the dedup stage, whose phases hand their files to each other through the store.
    cfg = DedupConfig(partition_mb=0.0005, shards=2)
    deduped = Store(f"{bucket[0]}/work/dedup{bucket[1]}")
    out = run_dedup_stage(remote, deduped, cfg, cache_key="k", inputs={}, options=options)
    expected = run_dedup_stage(tmp_path / "clean", tmp_path / "dedup", cfg, cache_key="k", inputs={})
    assert out["counters"] == expected["counters"] and out["counters"]["rejected"] > 0
    assert [(f["path"], f["sha256"]) for f in out["files"]] == [
        (f["path"], f["sha256"]) for f in expected["files"]
    ]
    assert read_table(deduped / "rejected").equals(read_table(tmp_path / "dedup" / "rejected"))
    assert deduped.read_bytes("clusters.parquet") == (tmp_path / "dedup" / "clusters.parquet").read_bytes()


@pytest.mark.system
def test_a_whole_pipeline_runs_and_reruns_from_its_cache_with_the_workdir_on_s3(s3_server, tmp_path):
    """`lmforge run` of the demo (crawl of the demo site, clean, dedup, tokenize, 2-worker training,
    evaluation, report) with ``workdir: s3://...``: every output lands on the store, verified against its
    manifest; the only local files are the node cache's; a rerun is all cached. The work dir URI carries
    credentials (``s3://KEY:SECRET@bucket``): the secret is in no output, record, report, log or MLflow
    entry, where the URI shows it is masked."""
    prefix, query = s3_server(f"pipeline-{time.monotonic_ns()}")
    secret = "SeCrEtLmForge42"
    workdir = Store(f"s3://AKIDLMFORGE:{secret}@{prefix.removeprefix('s3://')}/runs/demo{query}")
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    overrides = {"workdir": workdir.uri, **SMALL_DEMO, "train.checkpoint_every": 2, "evaluate.task_limit": 10}
    sets = set_args(overrides)
    config = REPO / "configs" / "demo.yaml"
    first = lmforge(["run", config, *sets], env, tmp_path)
    # The session's Ray runs beside this one: nothing in the run failed to tell which to connect to.
    assert "ConnectionError: Found multiple active Ray instances" not in first.stdout + first.stderr

    stages = ("crawl", "clean", "dedup", "tokenize", "train", "evaluate")
    for stage in stages:
        index = read_index(workdir / stage)
        assert index is not None, stage
        verify_files(workdir / stage, index, "always")  # every file listed is on the store, same sha256
    crawl = read_index(workdir / "crawl")
    assert crawl["counters"]["pages_fetched"] == crawl["counters"]["demo_pages_served"] > 0 and all(
        ".warc" in f["path"] for f in crawl["files"]
    )
    train = workdir / "train"
    assert json.loads(train.read_bytes("summary.json"))["steps"] == 4
    assert {"model/model.safetensors", "model/tokenizer.json"} <= set(train.files())
    steps = {p.split("/")[-2] for p in train.files("ray_train") if "/step" in p}
    assert steps == {"step00000002", "step00000004"}, steps
    report = json.loads(workdir.read_bytes("report.json"))
    assert report["ok"], report["checks"]
    assert workdir.is_file("report.html") and workdir.is_file("report.md") and workdir.is_file("run.json")
    # Nothing of the run was written where it started: its local state is in the node cache.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    (run_dir,) = (tmp_path / "cache" / "runs").iterdir()
    assert (run_dir / "mlflow.db").is_file() and (run_dir / "report.html").is_file()
    assert json.loads(workdir.read_bytes("run.json"))["tracking_uri"] == f"sqlite:///{run_dir / 'mlflow.db'}"

    # A rerun with nothing changed plans nothing and runs nothing: it needs no Ray (here an address nothing
    # listens on: connecting would fail the run).
    plan = lmforge(["run", config, *sets, "--dry-run"], env, tmp_path)
    assert "nothing to run: all cached" in plan.stdout, plan.stdout
    before = {s: (workdir / s).read_bytes("index.json") for s in stages}
    again = lmforge(["run", config, *sets, "--address", f"127.0.0.1:{free_port()}"], env, tmp_path)
    assert all(f"• {s}: cached" in again.stderr for s in stages), again.stderr[-3000:]
    assert {s: (workdir / s).read_bytes("index.json") for s in stages} == before
    assert "▶" not in again.stderr
    print([line.strip() for line in again.stderr.splitlines() if "finished in" in line])  # the rerun's time

    # The secret: in no console output, no object of the store, no file of the node cache (MLflow's
    # database and artifacts, Ray's session logs); MLflow shows the work dir masked.
    for out in (first, plan, again):
        assert secret not in out.stdout + out.stderr
    for rel in workdir.files():
        assert secret.encode() not in workdir.read_bytes(rel), rel
    for path in (tmp_path / "cache").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(json.loads(workdir.read_bytes("run.json"))["mlflow_run_id"])
    assert run.data.params["workdir"] == f"s3://***@{prefix.removeprefix('s3://')}/runs/demo{query}"


@pytest.mark.system
def test_pretraining_then_finetuning_with_the_workdir_on_s3_commits_what_a_local_run_does(
    s3_server, masked_pipeline, tmp_path
):
    """A BERT pretrained, evaluated, then fine-tuned on labeled data from its own output, with the work dir
    on S3 (the labeled splits and the base model reach the workers as node-local copies): the labeled data,
    the fine-tuned model and its scores are a local run's, bit for bit. The local run is the shared
    ``masked_pipeline`` (the session's Ray, in this process), the S3 run `lmforge run`'s own embedded Ray
    with the same config."""
    import yaml

    from core.manifest import index_digest

    raw, _, _ = masked_pipeline
    local = Path(raw["workdir"])
    config = tmp_path / "ft.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "workdir"}))
    prefix, query = s3_server(f"finetune-{time.monotonic_ns()}")
    workdir = Store(f"{prefix}/ft{query}")
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    lmforge(["run", config, "--set", f"workdir={workdir.uri}"], env, tmp_path)

    for stage in ("train", "evaluate", "labeled", "finetune"):
        remote, here = read_index(workdir / stage), read_index(local / stage)
        assert index_digest(remote) == index_digest(here), stage
        verify_files(workdir / stage, remote, "always")
    metrics = json.loads(workdir.read_bytes("finetune/metrics.json"))
    assert metrics == json.loads((local / "finetune" / "metrics.json").read_text())
    assert {"validation", "test"} <= set(metrics) and "model/model.safetensors" in (
        workdir / "finetune"
    ).files()
