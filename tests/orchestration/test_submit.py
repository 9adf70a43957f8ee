"""`lmforge submit` against a real Ray head started with `ray start` on loopback."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.ray_nodes import lmforge

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head():
    """A separate Ray cluster (its own GCS, raylet and dashboard) in its own process group, shared by the
    module's jobs (each with a submission id of its own)."""
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


@pytest.mark.unit
def test_requirements_name_a_file_or_lmforge(tmp_path):
    """``--requirements``: a file's packages (comments dropped), lmforge's own dependencies, or an error
    naming the missing file, before anything reaches a cluster."""
    from packaging.requirements import Requirement

    from orchestration.cli import _pip_requirements

    reqs = tmp_path / "reqs.txt"
    reqs.write_text("# pinned for the cluster\nnumpy>=1.26  # arrays\n\n--find-links /wheels\nrich\n")
    assert _pip_requirements(str(reqs)) == {
        "packages": ["numpy>=1.26", "--find-links /wheels", "rich"],
        "pip_check": False,
    }
    assert _pip_requirements(None) is None
    # lmforge's: the dependencies pyproject.toml declares, none of the extras'.
    listed = (REPO / "pyproject.toml").read_text().split("\ndependencies = [")[1].split("\n]")[0]
    declared = [Requirement(r) for r in re.findall(r'^    "([^"]+)",', listed, re.M)]
    assert len(declared) > 20
    assert [Requirement(r) for r in _pip_requirements("lmforge")["packages"]] == declared
    missing = lmforge(["submit", REPO / "configs" / "demo.yaml", "--requirements", tmp_path / "nope.txt"],
                      dict(os.environ), check=False)  # fmt: skip
    # The terminal's width wraps the message anywhere (a long path on a line of its own): compare without it.
    said = "".join(missing.stderr.split())
    assert missing.returncode == 2 and f"--requirements{tmp_path / 'nope.txt'}:nosuchfile" in said


def _lmforge(env, *args, timeout=600) -> subprocess.CompletedProcess:
    return lmforge(list(args), env, timeout=timeout, check=False)


@pytest.mark.system
def test_jobs_status_logs_stop_and_a_killed_job_resubmitted_with_retries(ray_head, ray_session, tmp_path):
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

    address, env = ray_head
    rng = random.Random(5)
    dump = tmp_path / "dump"
    dump.mkdir()
    for f in range(8):  # eight input files: eight clean tasks, two at a time on the head's two CPUs
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


@pytest.mark.unit
def test_a_job_that_lacks_a_module_says_which_and_how_to_add_it(tmp_path):
    from orchestration.cli import _missing_module_hint

    crashed = subprocess.run(
        [BIN / "python", "-c", "import lmforge_no_such_module"], capture_output=True, text=True
    )
    logs = "▶ clean (never ran)\n" + crashed.stderr
    assert "lmforge_no_such_module" in _missing_module_hint(logs, None)
    assert "--requirements lmforge" in _missing_module_hint(logs, None)
    assert "add it to the requirements file" in _missing_module_hint(logs, "reqs.txt")
    assert _missing_module_hint("▶ clean (never ran)\nValueError: bad\n", None) is None
