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

from tests.orchestration.test_pipeline_fast import _text
from tests.ray_nodes import cluster

REPO = Path(__file__).resolve().parents[2]


def _stages(corpus: str, out: str, env: dict | None = None, address: str | None = None) -> dict:
    args = [sys.executable, "-m", "tests.orchestration.cluster_stages", corpus, out]
    proc = subprocess.run(
        args + (["--address", address] if address else []),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_two_nodes_run_the_data_stages_with_the_corpus_and_outputs_on_s3(s3_server):
    prefix, query = s3_server(f"cluster-{time.monotonic_ns()}")
    fs, bucket = pafs.FileSystem.from_uri(prefix + query)
    rng = random.Random(11)
    texts = [_text(rng) for _ in range(160)]
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
    with cluster(2) as (address, _, env, nodes):
        remote = _stages(corpus, f"{prefix}/cluster{query}", env, address)
        assert all(node.proc.poll() is None for node in nodes)

    assert remote["digests"] == local["digests"] and remote["counters"] == local["counters"]
    assert remote["counters"]["dedup"]["rejected"] >= 16 and remote["counters"]["tokenize"]["documents"] > 0
    assert len(remote["nodes"]["clean"]) == 2 and len(remote["nodes"]["dedup"]) == 2
    assert set(remote["nodes"]["tokenize"]) <= set(remote["nodes"]["clean"])
    assert len(set(local["nodes"]["clean"])) == 1  # the embedded Ray is one node
