"""Pre-flight: what a valid config can still get wrong, checked before any stage runs.

The config's own validation sees values one at a time; these checks look at the files and the cluster the
values point to, so a run never fails late inside a Ray task (a missing tokenizer, an ``init_from`` model
shorter than ``seq_len``) or waits forever for workers the cluster can never place.
"""

from __future__ import annotations

import os
from pathlib import Path

from core.redact import redact
from core.storage import is_remote
from orchestration.config import ConfigError, PipelineConfig

#: How long the pre-flight waits for the work dir's filesystem or the tracking server to answer.
REACH_TIMEOUT_S = 20.0


def reach_problems(cfg: PipelineConfig) -> list[str]:
    """A remote work dir whose filesystem, or a tracking server that, does not answer within
    REACH_TIMEOUT_S (an unreachable endpoint otherwise fails late with a raw OSError, or retries
    silently for minutes). Any answer counts, an error status included: it is reachable."""
    problems = []
    if is_remote(cfg.workdir) and (error := _filesystem_answers(str(cfg.workdir))) is not None:
        problems.append(_unreachable("workdir", str(cfg.workdir), error))
    uri = cfg.tracking.uri or ""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri, timeout=REACH_TIMEOUT_S).close()
        except urllib.error.HTTPError:  # an error status is an answer
            pass
        except (OSError, ValueError) as e:
            timed_out = isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError)
            error = f"no answer within {REACH_TIMEOUT_S:g} s" if timed_out else f"{type(e).__name__}: {e}"
            problems.append(_unreachable("tracking.uri", uri, error))
    return problems


def _unreachable(field: str, address: str, error: str) -> str:
    return redact(
        f"{field}: {address} cannot be reached ({error}); check the address, the network and the "
        "credentials, or start the service"
    )


#: Lists the work dir's filesystem in a child process: a blocked pyarrow call holds the interpreter (a
#: thread waiting on it could not give up), a process can be killed. The URI comes on stdin, not argv.
_LIST = "import sys; from core.storage import Store; Store(sys.stdin.read()).exists()"


def _filesystem_answers(uri: str) -> str | None:
    """None when the filesystem of ``uri`` answers a listing within REACH_TIMEOUT_S, else why not."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            [sys.executable, "-c", _LIST], input=uri, capture_output=True, text=True,
            timeout=REACH_TIMEOUT_S, cwd=repo,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"no answer within {REACH_TIMEOUT_S:g} s"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit status {done.returncode}"
    return None


def file_problems(cfg: PipelineConfig) -> list[str]:
    """Problems with the files and directories the config names (no cluster needed: each stage checks its
    own, orchestration/stages/), and with the services it names (a remote work dir, a tracking server)."""
    from orchestration.config import SOURCE_SECTIONS
    from orchestration.stages import dag

    problems = reach_problems(cfg)
    for stage in dag(cfg):
        for problem in stage.component.preflight(cfg.view(stage.source)):
            named = stage.source is not None and problem.split(".")[0] in SOURCE_SECTIONS
            problems.append(f"sources.{stage.source}.{problem}" if named else problem)
    return problems


def task_problems(cfg: PipelineConfig, resources: dict[str, float]) -> list[str]:
    """Stages whose ``ray.resources`` task could never be placed on the cluster's total ``resources``."""
    problems = []
    for stage, r in sorted(cfg.ray.resources.items()):
        need = {"CPU": r.cpus, "GPU": r.gpus, "memory": (r.memory_mb or 0) * 2**20}
        for kind, value in need.items():
            has = resources.get(kind, 0)
            if value > has:
                field = {"CPU": "cpus", "GPU": "gpus", "memory": "memory_mb"}[kind]
                amount = f"{value / 2**20:.0f} MB" if kind == "memory" else f"{value:g} {kind}(s)"
                total = f"{has / 2**20:.0f} MB" if kind == "memory" else f"{has:g}"
                problems.append(
                    f"ray.resources.{stage}.{field}: each {stage} task asks for {amount}, the Ray cluster has "
                    f"{total} in all, so it could never be placed; lower it or add nodes"
                )
    return problems


def cluster_problems(cfg: PipelineConfig, resources: dict[str, float], train: bool = True) -> list[str]:
    """Whether the training worker group (when ``train``) and each stage's tasks fit the cluster's total
    ``resources`` (ray.cluster_resources())."""
    problems = task_problems(cfg, resources)
    if not train:
        return problems
    t = cfg.train
    need = {"CPU": t.num_workers * t.cpus_per_worker, "GPU": t.num_workers if t.use_gpu else 0}
    short = {k: v for k, v in need.items() if v > resources.get(k, 0)}
    if not short:
        return problems
    has = ", ".join(f"{resources.get(k, 0):g} {k}s" for k in need)
    wants = " and ".join(f"{v:g} {k}s" for k, v in need.items() if v)
    return problems + [
        f"train.num_workers: {t.num_workers} workers x {t.cpus_per_worker} CPU(s)"
        + (" and 1 GPU" if t.use_gpu else "")
        + f" each need {wants}; the Ray cluster has {has} in all, so the worker group could never be "
        "placed: lower train.num_workers / train.cpus_per_worker or add nodes"
    ]


def embedded_resources(cfg: PipelineConfig) -> dict[str, float]:
    """What an embedded Ray of this config will have, without starting it: ``ray.num_cpus`` (else the
    machine's CPUs), its GPUs (asked only when the config trains on GPUs), and at most the machine's
    memory. ``lmforge validate`` checks these as ``lmforge run`` checks ray.cluster_resources()."""
    import psutil

    gpus = 0
    if cfg.train.use_gpu:
        import torch

        gpus = torch.cuda.device_count()
    return {
        "CPU": cfg.ray.num_cpus or os.cpu_count() or 1,
        "GPU": gpus,
        "memory": psutil.virtual_memory().total,
    }


def preflight(cfg: PipelineConfig, resources: dict[str, float] | None = None, train: bool = True) -> None:
    """Raise ConfigError naming every problem (field, value, fix) before any stage runs: the files the
    config names, or, given the cluster's ``resources``, whether the stages' tasks and (when ``train``)
    the training worker group fit them."""
    _raise(file_problems(cfg) if resources is None else cluster_problems(cfg, resources, train))


def _raise(problems: list[str]) -> None:
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(f"pre-flight found {len(problems)} problem(s) before any stage ran:\n{lines}")
