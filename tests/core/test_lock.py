"""One run per work dir (core/lock.py): a second run is refused naming the holder; the lock of a killed
holder is taken over. Holders are real processes; the remote lease is held on the local S3 server."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.lock import LOCK_FILE, WorkdirLocked, workdir_lock

REPO = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from core.lock import workdir_lock
with workdir_lock(sys.argv[1], "lmforge run holder.yaml", lease=float(sys.argv[2])):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(where: str, lease: float = 60.0) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, where, str(lease)], cwd=REPO, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.stdout.readline() == "held\n"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.unit
def test_a_second_run_on_a_local_work_dir_is_refused_and_a_dead_holders_lock_taken_over(tmp_path):
    from orchestration.config import ConfigError, parse_config
    from orchestration.pipeline import Pipeline

    work = tmp_path / "work"
    holder = _holder(str(work))
    try:
        said = f"in use by another run: lmforge run holder.yaml \\(pid {holder.pid} on"
        with pytest.raises(WorkdirLocked, match=said), workdir_lock(work):
            pass
        # The pipeline stops before it starts anything, with the same message.
        corpus = tmp_path / "corpus.jsonl"
        corpus.write_text('{"id": "a", "text": "some text"}\n')
        cfg = parse_config({"workdir": str(work), "read": {"paths": [str(corpus)]}}, "test")
        with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
            Pipeline(cfg).run()
    finally:
        _kill(holder)
    with workdir_lock(work, "the next run"):  # the kernel dropped the killed holder's lock
        assert "the next run" in (work / LOCK_FILE).read_text()
    with workdir_lock(work):  # and this process's, when the block ended
        pass


@pytest.mark.integration
def test_a_lease_on_an_object_store_refuses_a_second_run_until_it_expires(s3_server):
    from core.storage import Store

    prefix, query = s3_server(f"lock-{time.monotonic_ns()}")
    work = Store(f"{prefix}/work{query}")
    holder = _holder(work.uri, lease=3.0)
    try:
        time.sleep(2.5)  # past the first lease: the holder renewed it
        with pytest.raises(WorkdirLocked, match=f"pid {holder.pid}"), workdir_lock(work, lease=3.0):
            pass
    finally:
        _kill(holder)  # never renewed again
    time.sleep(3.5)
    with workdir_lock(work, "the next run", lease=3.0):
        assert "the next run" in work.read_text(LOCK_FILE)
    assert not work.exists(LOCK_FILE)  # released
