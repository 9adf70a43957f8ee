"""`lmforge submit` against a real Ray head started with `ray start` on loopback."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.ray_nodes import SMALL_DEMO, lmforge, set_args

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def ray_head():
    """A separate Ray cluster (its own GCS, raylet and dashboard) in its own process group."""
    port, dash = free_port(), free_port()
    # Every port of its own: the session's Ray already holds the defaults (dashboard agent 52365, ...).
    own_ports = [
        f"--{flag}={free_port()}"
        for flag in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "ray-client-server-port",
            "runtime-env-agent-port",
        )
    ]
    temp_dir = tempfile.mkdtemp(prefix="lmf-head-", dir="/tmp")  # short: Ray's unix sockets live here
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [BIN / "ray", "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--object-store-memory=300000000", f"--temp-dir={temp_dir}", "--disable-usage-stats", *own_ports],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dash}"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + 120
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:
                if time.monotonic() > deadline or head.poll() is not None:
                    raise RuntimeError("the Ray head did not come up") from None
                time.sleep(1)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_submit_runs_the_pipeline_as_a_ray_job(ray_head, tmp_path):
    address, env = ray_head
    workdir = tmp_path / "work"
    overrides = {
        "workdir": str(workdir),
        **SMALL_DEMO,
        "tracking.registered_model": "lmforge-submit-test",
    }
    sets = set_args(overrides)
    proc = subprocess.run(
        [BIN / "lmforge", "submit", REPO / "configs" / "demo.yaml", "--address", address, *sets],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stderr
    # The job ran the whole pipeline on the cluster and wrote where the config said.
    summary = json.loads((workdir / "train" / "summary.json").read_text())
    assert summary["steps"] == 4
    assert (workdir / "evaluate").is_dir() and (workdir / "report.md").is_file()
    # Nothing was staged into the repository for the job.
    assert not list(REPO.glob(".lmforge*")) and not list(REPO.glob("*.yaml"))


def _lmforge(env, *args, timeout=600) -> subprocess.CompletedProcess:
    return lmforge(list(args), env, timeout=timeout, check=False)


@pytest.mark.slow
def test_jobs_status_logs_stop_and_a_killed_job_resubmitted_with_retries(ray_head, ray_session, tmp_path):
    """A data-only pipeline submitted with --retries 1: its driver is killed once clean has finished, the
    resubmitted job serves clean from the cache and finishes, and its shards match a local run's."""
    import random

    import yaml

    from core.manifest import index_digest, read_index
    from orchestration.config import parse_config
    from orchestration.pipeline import Pipeline
    from tests.orchestration.test_pipeline_fast import _text

    address, env = ray_head
    rng = random.Random(5)
    with open(tmp_path / "dump.jsonl", "w") as f:
        for i in range(300):
            text = _text(rng)
            f.write(json.dumps({"id": f"d{i}", "text": text, "url": f"https://example.org/{i}"}) + "\n")
    raw = {
        "name": "jobs",
        "workdir": str(tmp_path / "work"),
        "read": {"paths": [str(tmp_path / "dump.jsonl")]},
        "clean": {"gopher_repetition": None},
        "dedup": {"shards": 4},
        "tokenize": {"tokenizer": {"vocab_size": 300, "min_frequency": 1}, "val_fraction": 0.2},
    }
    config = tmp_path / "jobs.yaml"
    config.write_text(yaml.safe_dump(raw))
    workdir = tmp_path / "work"

    submit = subprocess.Popen(
        [BIN / "lmforge", "submit", config, "--address", address, "--submission-id", "lmf-jobs",
         "--retries", "1", "--until", "tokenize"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (workdir / "clean" / "index.json").exists():
        assert submit.poll() is None and time.monotonic() < deadline, submit.communicate()
        time.sleep(0.05)
    assert not (workdir / "tokenize" / "index.json").exists()
    drivers = subprocess.run(
        ["pgrep", "-f", "orchestration.cli run --config-env"], capture_output=True, text=True
    ).stdout.split()
    assert drivers
    for pid in drivers:
        os.kill(int(pid), signal.SIGKILL)
    out, err = submit.communicate(timeout=600)
    assert submit.returncode == 0, out[-3000:] + err[-3000:]
    assert "job lmf-jobs: FAILED" in err and "resubmitting (attempt 2 of 2)" in err
    assert "job lmf-jobs-r1: SUCCEEDED" in err

    # status, logs and jobs see both attempts; the second served clean from the cache.
    assert _lmforge(env, "status", "lmf-jobs", "--address", address).stdout.startswith("lmf-jobs: FAILED")
    assert _lmforge(env, "status", "lmf-jobs-r1", "--address", address).stdout.startswith(
        "lmf-jobs-r1: SUCCEEDED"
    )
    logs = _lmforge(env, "logs", "lmf-jobs-r1", "--address", address).stdout
    assert "clean: cached" in logs and "▶ tokenize" in logs
    listed = _lmforge(env, "jobs", "--address", address).stdout
    assert "lmf-jobs-r1" in listed and "--until=tokenize" in listed
    missing = _lmforge(env, "status", "no-such-job", "--address", address)
    assert missing.returncode == 2 and "no job 'no-such-job'" in missing.stderr

    # The cluster's outputs are the outputs of the same config run here.
    local = parse_config({**raw, "workdir": str(tmp_path / "local")}, "test")
    Pipeline(local).run(until="tokenize")
    for stage in ("clean", "dedup", "tokenize"):
        assert index_digest(read_index(workdir / stage)) == index_digest(read_index(local.workdir / stage))

    # A job stopped while it runs ends STOPPED.
    started = _lmforge(env, "submit", config, "--address", address, "--submission-id", "lmf-stop",
                       "--no-wait", "--force", "clean", "--until", "clean")  # fmt: skip
    assert started.returncode == 0, started.stderr
    stopped = _lmforge(env, "stop", "lmf-stop", "--address", address)
    assert stopped.returncode == 0 and stopped.stdout == "lmf-stop: STOPPED\n", stopped.stderr
