"""A two-node Ray cluster on 127.0.0.1 (a head and a worker node, each with its own temp dir and one CPU,
stopped by their recorded PIDs). `lmforge submit` runs the pipeline there as a Ray job with the corpus and
every output on a local S3 server (moto's server mode: there is no real S3 here); the data stages' tasks
run on both nodes and the outputs are the bytes an embedded Ray writes from the same corpus. The job
commands (status, logs, jobs, stop, --retries, --requirements) act on the cluster's jobs."""

import json
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tests.fixtures import prose
from tests.ray_nodes import BIN, cluster, lmforge

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head and a worker node for the module, each with a node cache of its own (no shared disk):
    (GCS address, dashboard address, the drivers' env, the nodes, the caches)."""
    caches = [tmp_path_factory.mktemp("node0-cache"), tmp_path_factory.mktemp("node1-cache")]
    with cluster(2, lambda i: {"LMFORGE_CACHE": str(caches[i])}) as (address, dashboard, env, nodes):
        yield address, dashboard, env, nodes, caches


def _mirrored(cache: Path) -> set[Path]:
    return set((cache / "mirror").glob("*/index.json"))


def test_submit_to_two_nodes_without_a_shared_disk_runs_the_pipeline_a_local_run_does(
    two_nodes, s3_server, tmp_path
):
    """`lmforge submit` to a head and a worker node whose only common storage is the S3 server (each node
    has a cache of its own) runs clean, dedup, tokenize, a 2-worker training (one worker per node: a CPU
    each) and the evaluation with the corpus and the workdir on S3: the data stages' tasks run on both
    nodes, and each output's digest and counters are a local run's (an embedded Ray: one node)."""
    import yaml

    from core.manifest import index_digest, read_index
    from core.storage import Store

    prefix, query = s3_server(f"submit-{time.monotonic_ns()}")
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
    raw = {
        "name": "two-nodes",
        "read": {"paths": [f"{prefix}/corpus{query}"]},
        "clean": {"gopher_repetition": None},
        "dedup": {"shards": 2, "partition_mb": 0.02},  # several partitions: tasks for both nodes
        "tokenize": {
            "tokenizer": {"vocab_size": 300, "min_frequency": 1}, "val_fraction": 0.2, "partition_mb": 0.02
        },
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
        assert remote["counters"] == local["counters"], stage
    assert read_index(workdir / "dedup")["counters"]["rejected"] >= 16
    assert read_index(workdir / "tokenize")["counters"]["documents"] > 0
    # The data stages' tasks ran on both nodes (each task's completion marker names its node); the local
    # run's on its one.
    remote_nodes, local_nodes = _task_nodes(workdir), _task_nodes(Store(tmp_path / "local"))
    assert len(remote_nodes["clean"]) == 2 and len(remote_nodes["dedup"]) == 2, remote_nodes
    assert remote_nodes["tokenize"] <= remote_nodes["clean"]
    assert len(local_nodes["clean"]) == 1


def _task_nodes(workdir) -> dict[str, set[str]]:
    """The Ray nodes that ran each data stage's tasks, from their completion markers."""
    markers = {"clean": "clean/_done", "dedup": "dedup/_work/_done", "tokenize": "tokenize/_done"}
    return {
        stage: {
            json.loads(workdir.read_bytes(f)).get("node", "")
            for f in workdir.files(where)
            if f.endswith(".json")
        }
        for stage, where in markers.items()
    }


def _wheel(dest: Path, name: str, version: str) -> Path:
    """A pure-Python wheel of one module ``name`` (its RECORD with each file's sha256, as pip expects)."""
    import base64
    import hashlib
    import zipfile

    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: lmforge-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join(record + [f"{info}/RECORD,,"]) + "\n"
    wheel = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def _lmforge(env, *args, timeout=600) -> subprocess.CompletedProcess:
    return lmforge(list(args), env, timeout=timeout, check=False)


def test_jobs_status_logs_stop_and_a_killed_job_resubmitted_with_retries(two_nodes, ray_session, tmp_path):
    """A data-only pipeline submitted with --retries 1 and a requirements file (a wheel this environment
    lacks): its driver is killed while clean's tasks run (some finished, some not); the resubmitted job keeps
    the finished tasks as they are, runs the others, and finishes in the environment Ray built for it, where
    the required package imports; its shards match a local run's."""
    import random

    import yaml

    from core.manifest import index_digest, read_index
    from orchestration.config import parse_config
    from orchestration.pipeline import Pipeline
    from tests.fixtures import prose

    _, address, env, nodes, _ = two_nodes
    rng = random.Random(5)
    dump = tmp_path / "dump"
    dump.mkdir()
    for f in range(8):  # eight input files: eight clean tasks, one at a time on each node's CPU
        with open(dump / f"part-{f}.jsonl", "w") as out:
            for i in range(60):
                text = prose(rng)
                out.write(
                    json.dumps({"id": f"d{f}-{i}", "text": text, "url": f"https://example.org/{f}/{i}"})
                )
                out.write("\n")
    raw = {
        "name": "jobs",
        "workdir": str(tmp_path / "work"),
        "read": {"paths": [str(dump)]},
        "clean": {"gopher_repetition": None},
        "dedup": {"shards": 4},
        "tokenize": {"tokenizer": {"vocab_size": 300, "min_frequency": 1}, "val_fraction": 0.2},
    }
    config = tmp_path / "jobs.yaml"
    config.write_text(yaml.safe_dump(raw))
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"# for the job only\n{_wheel(tmp_path, 'lmforge_probe', '1.0')}\n")
    assert subprocess.run([BIN / "python", "-c", "import lmforge_probe"], capture_output=True).returncode
    workdir = tmp_path / "work"
    done = workdir / "clean" / "_done"

    submit = subprocess.Popen(
        [BIN / "lmforge", "submit", config, "--address", address, "--submission-id", "lmf-jobs",
         "--retries", "1", "--until", "tokenize", "--requirements", requirements],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(done.glob("*.json")):
        assert submit.poll() is None and time.monotonic() < deadline, submit.communicate()
        time.sleep(0.02)
    drivers = subprocess.run(
        ["pgrep", "-f", "orchestration.cli run --config-env"], capture_output=True, text=True
    ).stdout.split()
    assert drivers
    for pid in drivers:
        os.kill(int(pid), signal.SIGKILL)
    finished = {m.name: m.stat().st_mtime_ns for m in done.glob("*.json")}
    assert 1 <= len(finished) < 8 and not (workdir / "clean" / "index.json").exists()
    out, err = submit.communicate(timeout=600)
    assert submit.returncode == 0, out[-3000:] + err[-3000:]
    assert "job lmf-jobs: FAILED" in err and "resubmitting (attempt 2 of 2)" in err
    assert "job lmf-jobs-r1: SUCCEEDED" in err
    # Its driver ran in the environment Ray built for the job, where the required package imports.
    drivers_seen = re.findall(r"job driver: (\S+) on ", out)
    assert drivers_seen, out[-3000:]
    driver = Path(drivers_seen[-1])
    assert "runtime_resources" in driver.parts and driver != BIN / "python"
    probe = subprocess.run([driver, "-c", "import lmforge_probe; print(lmforge_probe.VERSION)"],
                           capture_output=True, text=True)  # fmt: skip
    assert probe.stdout == "1.0\n", probe.stderr
    # Nothing was staged into the repository for the job.
    assert not list(REPO.glob(".lmforge*")) and not list(REPO.glob("*.yaml"))
    # The tasks that had finished were not run again: their markers are the first job's.
    assert {m.name: m.stat().st_mtime_ns for m in done.glob("*.json") if m.name in finished} == finished
    assert len(list(done.glob("*.json"))) == 8

    # status, logs and jobs see both attempts.
    assert _lmforge(env, "status", "lmf-jobs", "--address", address).stdout.startswith("lmf-jobs: FAILED")
    assert _lmforge(env, "status", "lmf-jobs-r1", "--address", address).stdout.startswith(
        "lmf-jobs-r1: SUCCEEDED"
    )
    logs = _lmforge(env, "logs", "lmf-jobs-r1", "--address", address).stdout
    assert "▶ clean" in logs and "▶ tokenize" in logs
    listed = _lmforge(env, "jobs", "--address", address).stdout
    assert "lmf-jobs-r1" in listed and "--until=tokenize" in listed
    missing = _lmforge(env, "status", "no-such-job", "--address", address)
    assert missing.returncode == 2 and "no job 'no-such-job'" in missing.stderr

    # The cluster's outputs are the outputs of the same config run here.
    local = parse_config({**raw, "workdir": str(tmp_path / "local")}, "test")
    Pipeline(local).run(until="tokenize")
    for stage in ("clean", "dedup", "tokenize"):
        assert index_digest(read_index(workdir / stage)) == index_digest(read_index(local.workdir / stage))

    # `logs --follow` of a running job prints its logs until it ends, then how it ended.
    started = _lmforge(env, "submit", config, "--address", address, "--submission-id", "lmf-follow",
                       "--no-wait", "--until", "dedup")  # fmt: skip
    assert started.returncode == 0, started.stderr
    followed = _lmforge(env, "logs", "lmf-follow", "--follow", "--address", address)
    assert followed.returncode == 0 and "job lmf-follow: SUCCEEDED" in followed.stderr
    assert "clean: cached" in followed.stdout and "dedup: cached" in followed.stdout

    # A job stopped while it runs ends STOPPED.
    started = _lmforge(env, "submit", config, "--address", address, "--submission-id", "lmf-stop",
                       "--no-wait", "--force", "clean", "--until", "clean")  # fmt: skip
    assert started.returncode == 0, started.stderr
    stopped = _lmforge(env, "stop", "lmf-stop", "--address", address)
    assert stopped.returncode == 0 and stopped.stdout == "lmf-stop: STOPPED\n", stopped.stderr
