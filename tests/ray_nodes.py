"""Ray clusters of their own for tests: nodes started with `ray start` on 127.0.0.1, each in its own
process group and temp dir, every port chosen free (the session's Ray already holds the defaults), stopped
by the PIDs recorded when they started (never by name: other Ray processes run on this machine)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tests.conftest import lasting_port

BIN = Path(sys.executable).parent


def _own_ports() -> list[str]:
    flags = (
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    )
    return [f"--{flag}={lasting_port()}" for flag in flags]


def node_env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", None)  # a cluster's default: nodes may be drained
    return env


class Node:
    """One `ray start --block` process (and what it spawns: its process group)."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.temp_dir = tempfile.mkdtemp(
            prefix="lmf-node-", dir="/tmp"
        )  # short: Ray's unix sockets live here
        self.proc = subprocess.Popen(
            [BIN / "ray", "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1",
             "--object-store-memory=200000000", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
             *_own_ports(), *args],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)

    def reap(self) -> None:
        """Wait for the node after ``terminate``; kill it when it lingers; remove its temp dir."""
        try:  # `ray start --block` often outlives SIGTERM by half a minute: its temp dir goes anyway
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def cluster(
    nodes: int = 2, own_env: Callable[[int], dict[str, str]] | None = None
) -> Iterator[tuple[str, str, dict[str, str], list[Node]]]:
    """A head node plus ``nodes - 1`` worker nodes, one CPU each: (GCS address, dashboard address, env
    to run drivers and the CLI in, the nodes), once every node is alive. ``own_env(i)`` adds variables
    to node i's environment (0: the head), which its workers inherit."""
    env = node_env()
    own_env = own_env or (lambda i: {})
    for attempt in range(3):
        # Every port is chosen below the kernel's ephemeral range, where no outgoing connection (Ray's own,
        # the other test process's) can take it between the choice and the node's listen; a node that
        # exits while starting all the same (a port taken by a listener) makes the cluster start again.
        port, dash = lasting_port(), lasting_port()
        started: list[Node] = []
        try:
            started.append(
                Node(
                    [
                        "--head",
                        f"--port={port}",
                        f"--dashboard-port={dash}",
                        "--dashboard-host=127.0.0.1",
                        f"--ray-client-server-port={lasting_port()}",
                    ],
                    {**env, **own_env(0)},
                )  # fmt: skip
            )
            address = f"127.0.0.1:{port}"
            for i in range(1, nodes):
                started.append(Node([f"--address={address}"], {**env, **own_env(i)}))
            try:
                _wait_alive(address, nodes, env, started)
            except NodeExited:
                if attempt == 2:
                    raise
                continue
            yield address, f"http://127.0.0.1:{dash}", env, started
            return
        finally:
            for node in reversed(started):  # all at once: each may take its grace period
                node.terminate()
            for node in reversed(started):
                node.reap()


class NodeExited(RuntimeError):
    """A Ray node exited while the cluster started."""


def _wait_alive(address: str, nodes: int, env: dict[str, str], started: list[Node]) -> None:
    probe = f"import ray; ray.init(address={address!r}); print(sum(n['Alive'] for n in ray.nodes()))"
    deadline = time.monotonic() + 180
    while True:
        dead = [n for n in started if n.proc.poll() is not None]
        if dead:
            raise NodeExited(f"a Ray node exited with {dead[0].proc.returncode} while starting")
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
        )
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(nodes)]:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the cluster did not reach {nodes} alive nodes: {out.stdout[-500:]}{out.stderr[-1000:]}"
            )
        time.sleep(2)


def lmforge(
    args: list, env: dict[str, str], cwd: str | Path | None = None, timeout: int = 1200, check: bool = True
) -> subprocess.CompletedProcess:
    """Run the ``lmforge`` command line of this environment; with ``check``, fail showing its output's end
    unless it exits 0."""
    proc = subprocess.run(
        [BIN / "lmforge", *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


#: configs/demo.yaml, small enough for a test: a six-module site, a tiny model, four steps.
SMALL_DEMO = {
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
}


def set_args(overrides: dict) -> list[str]:
    """``--set KEY=VALUE`` arguments for the command line."""
    return [arg for k, v in overrides.items() for arg in ("--set", f"{k}={v}")]
