"""The GPU benchmark's scripts on the CPU, before they ever meet a GPU: gpu_check.sh skips cleanly, and
train_gpu.py's whole path (shards, lmforge's trainer, the plain peer, the result lines) runs in smoke mode."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import BENCHMARK_RESULT_KEYS

ROOT = Path(__file__).resolve().parents[2]


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and subprocess.run(["nvidia-smi", "-L"]).returncode == 0


@pytest.mark.unit
@pytest.mark.skipif(has_nvidia_gpu(), reason="this machine has a GPU: the check would run for minutes")
def test_gpu_check_skips_cleanly_without_a_gpu(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_check.sh"), str(tmp_path / "out")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "out/train_gpu.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"bench": "gpu_check", "skipped": "no NVIDIA GPU on this machine", "ok": False}
    ]


@pytest.mark.integration
def test_train_gpu_smoke_runs_ours_and_the_peer(tmp_path):
    out = tmp_path / "lines.jsonl"
    args = ["--smoke", "--steps", "4", "--warmup", "1", "--tokens-per-batch", "256", "--out", str(out)]
    # A fresh process group of its own: not the one other tests in this process left in the environment.
    dist = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in dist}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/train_gpu.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["bench"] == "train_gpu" and len(last["results"]) == 1
    (line,) = last["results"]
    assert line.keys() >= BENCHMARK_RESULT_KEYS
    assert line["smoke"] is True and line["ours"] > 0 and line["peer_value"] > 0
    assert line["ratio"] == pytest.approx(line["ours"] / line["peer_value"], rel=1e-2)
    assert line["ok"] == (line["ratio"] >= 0.95 and line["mfu_pct"] >= line["mfu_goal_pct"])
    assert [json.loads(x) for x in out.read_text().splitlines()] == [line, last]
