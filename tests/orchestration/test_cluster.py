"""A two-node Ray cluster on 127.0.0.1 (a head and a worker node, each with its own temp dir and one CPU,
stopped by their recorded PIDs) runs the data stages with the corpus and every output on a local S3
server (moto's server mode: there is no real S3 here); the tasks run on both nodes and the outputs are
the bytes an embedded Ray writes from the same corpus."""

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tests.fixtures import prose
from tests.ray_nodes import cluster, lmforge

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]


def _stages(corpus: str, out: str, env: dict | None = None, address: str | None = None) -> dict:
    args = [sys.executable, "-m", "tests.orchestration.cluster_stages", corpus, out]
    proc = subprocess.run(
        args + (["--address", address] if address else []),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head and a worker node for the module, each with a node cache of its own (no shared disk):
    (GCS address, dashboard address, the drivers' env, the nodes, the caches)."""
    caches = [tmp_path_factory.mktemp("node0-cache"), tmp_path_factory.mktemp("node1-cache")]
    with cluster(2, lambda i: {"LMFORGE_CACHE": str(caches[i])}) as (address, dashboard, env, nodes):
        yield address, dashboard, env, nodes, caches


def _mirrored(cache: Path) -> set[Path]:
    return set((cache / "mirror").glob("*/index.json"))


def test_two_nodes_run_the_data_stages_with_the_corpus_and_outputs_on_s3(two_nodes, s3_server):
    prefix, query = s3_server(f"cluster-{time.monotonic_ns()}")
    fs, bucket = pafs.FileSystem.from_uri(prefix + query)
    rng = random.Random(11)
    texts = [prose(rng) for _ in range(160)]
    texts += [texts[i] for i in range(0, 160, 10)]  # exact copies for dedup to remove
    for f in range(4):  # four input files: four clean tasks to spread over the nodes
        lines = [
            json.dumps({"id": f"f{f}-{i}", "text": t, "url": f"https://example.org/{f}/{i}"})
            for i, t in enumerate(texts[f::4])
        ]
        with fs.open_output_stream(f"{bucket}/corpus/part-{f}.jsonl") as out:
            out.write(("\n".join(lines) + "\n").encode())
    corpus = f"{prefix}/corpus{query}"

    local = _stages(corpus, f"{prefix}/local{query}")  # an embedded Ray, same corpus, same code
    address, _, env, nodes, _ = two_nodes
    remote = _stages(corpus, f"{prefix}/cluster{query}", env, address)
    assert all(node.proc.poll() is None for node in nodes)

    assert remote["digests"] == local["digests"] and remote["counters"] == local["counters"]
    assert remote["counters"]["dedup"]["rejected"] >= 16 and remote["counters"]["tokenize"]["documents"] > 0
    assert len(remote["nodes"]["clean"]) == 2 and len(remote["nodes"]["dedup"]) == 2
    assert set(remote["nodes"]["tokenize"]) <= set(remote["nodes"]["clean"])
    assert len(set(local["nodes"]["clean"])) == 1  # the embedded Ray is one node


def test_submit_to_two_nodes_without_a_shared_disk_runs_the_pipeline_a_local_run_does(
    two_nodes, s3_server, tmp_path
):
    """`lmforge submit` to a head and a worker node whose only common storage is the S3 server (each node
    has a cache of its own) runs clean, dedup, tokenize, a 2-worker training (one worker per node: a CPU
    each) and the evaluation with the workdir on S3; each output's digest is a local run's."""
    import yaml

    from core.manifest import index_digest, read_index
    from core.storage import Store

    prefix, query = s3_server(f"submit-{time.monotonic_ns()}")
    fs, bucket = pafs.FileSystem.from_uri(prefix + query)
    rng = random.Random(3)
    texts = [prose(rng) for _ in range(120)]
    texts += texts[:12]
    for f in range(2):
        lines = [json.dumps({"id": f"f{f}-{i}", "text": t}) for i, t in enumerate(texts[f::2])]
        with fs.open_output_stream(f"{bucket}/corpus/part-{f}.jsonl") as out:
            out.write(("\n".join(lines) + "\n").encode())
    raw = {
        "name": "two-nodes",
        "read": {"paths": [f"{prefix}/corpus{query}"]},
        "clean": {"gopher_repetition": None},
        "dedup": {"shards": 2},
        "tokenize": {"tokenizer": {"vocab_size": 300, "min_frequency": 1}, "val_fraction": 0.2},
        "train": {
            "model": {"arch": "gpt2", "preset": "debug", "n_embd": 32, "n_head": 2},
            "seq_len": 32, "micro_batch_size": 2, "num_workers": 2, "steps": 4, "warmup_steps": 1,
            "checkpoint_every": 2, "precision": "fp32",
        },
        "evaluate": {"batch_size": 4, "tasks": []},
    }  # fmt: skip
    config = tmp_path / "two-nodes.yaml"
    config.write_text(yaml.safe_dump(raw))
    workdir = Store(f"{prefix}/cluster{query}")

    _, dashboard, env, nodes, caches = two_nodes
    before = [_mirrored(cache) for cache in caches]
    job = lmforge(
        ["submit", config, "--address", dashboard, "--submission-id", "two-nodes", "--set",
         f"workdir={workdir.uri}"],
        env, tmp_path,
    )  # fmt: skip
    assert "job two-nodes: SUCCEEDED" in job.stderr
    assert all(node.proc.poll() is None for node in nodes)
    # The job's status and logs, as the cluster keeps them.
    status = lmforge(["status", "two-nodes", "--address", dashboard], env, tmp_path)
    assert status.stdout.startswith("two-nodes: SUCCEEDED")
    logs = lmforge(["logs", "two-nodes", "--address", dashboard], env, tmp_path).stdout
    assert all(f"▶ {stage}" in logs for stage in ("clean", "dedup", "tokenize", "train", "evaluate"))
    # Both nodes' training workers read the token shards from S3 into their own cache.
    for cache, old in zip(caches, before):
        assert _mirrored(cache) - old, f"{cache}: no copy of the token shards"

    local_env = {**env, "LMFORGE_CACHE": str(tmp_path / "local-cache")}
    lmforge(["run", config, "--set", f"workdir={tmp_path / 'local'}"], local_env, tmp_path)
    for stage in ("clean", "dedup", "tokenize", "train", "evaluate"):
        remote, local = read_index(workdir / stage), read_index(tmp_path / "local" / stage)
        assert index_digest(remote) == index_digest(local), stage
    assert read_index(workdir / "train")["counters"] == read_index(tmp_path / "local" / "train")["counters"]
