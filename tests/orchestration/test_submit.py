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
        "demo_site.modules": 6,
        "demo_site.port": 0,
        "demo_site.exact_duplicates": 1,
        "demo_site.near_duplicates": 1,
        "tokenize.tokenizer.vocab_size": 512,
        "tokenize.val_fraction": 0.2,
        "train.model.n_embd": 32,
        "train.model.n_head": 2,
        "train.seq_len": 32,
        "train.micro_batch_size": 2,
        "train.steps": 4,
        "train.warmup_steps": 1,
        "tracking.registered_model": "lmforge-submit-test",
    }
    sets = [arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]
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
