"""Pre-flight: what a valid config can still get wrong, checked before any stage runs.

The config's own validation sees values one at a time; these checks look at the files and the cluster the
values point to, so a run never fails late inside a Ray task (a missing tokenizer, an ``init_from`` model
shorter than ``seq_len``) or waits forever for workers the cluster can never place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from core.redact import redact
from ingestion.readers import ReadConfig
from orchestration.config import ConfigError, PipelineConfig
from training.labeled import load_labeled, resolve_path

#: How long the pre-flight waits for the work dir's filesystem or the tracking server to answer.
REACH_TIMEOUT_S = 20.0


def reach_problems(cfg: PipelineConfig) -> list[str]:
    """A remote work dir whose filesystem, or a tracking server that, does not answer within
    REACH_TIMEOUT_S (an unreachable endpoint otherwise fails late with a raw OSError, or retries
    silently for minutes). Any answer counts, an error status included: it is reachable."""
    problems = []
    if "://" in str(cfg.workdir) and (error := _filesystem_answers(str(cfg.workdir))) is not None:
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
    """Problems with the files and directories the config names (no cluster needed), and with the
    services it names (a remote work dir, a tracking server)."""
    problems = reach_problems(cfg)
    try:
        problems += _parquet_column_problems(cfg.read, cfg.read.inputs())
    except (FileNotFoundError, ValueError) as e:  # its message names read.paths and the pattern
        problems.append(str(e))
    if cfg.crawl.seeds_file is not None and not Path(cfg.crawl.seeds_file).is_file():
        problems.append(f"crawl.seeds_file: {cfg.crawl.seeds_file} does not exist")
    tokenizer = cfg.tokenize.tokenizer.path
    if tokenizer is not None:
        path = Path(tokenizer)
        if not (path / "tokenizer.json" if path.is_dir() else path).is_file():
            problems.append(
                f"tokenize.tokenizer.path: {tokenizer!r} is neither a tokenizer.json file nor a directory "
                "holding one; point it at an existing tokenizer or remove it to train one"
            )
    if cfg.train.init_from is not None and cfg.has_corpus:
        problems += _init_from_problems(Path(cfg.train.init_from), cfg.train.seq_len)
    if cfg.finetune is not None:
        ft = cfg.finetune
        if ft.init_from is not None:
            problems += _init_from_problems(Path(ft.init_from), ft.seq_len, "finetune")
        elif cfg.train.init_from is None and cfg.train.model.arch != "t5" and ft.seq_len > cfg.train.seq_len:
            # The base is the train stage's model, made with train.seq_len positions (T5's are relative).
            problems.append(
                f"finetune.seq_len: {ft.seq_len} is longer than the {cfg.train.seq_len} positions of the model "
                f"the train stage makes (train.seq_len); set finetune.seq_len <= {cfg.train.seq_len} "
                "or train with a longer train.seq_len"
            )
        missing = [
            f"finetune.data.{name}: {source} does not exist"
            for name, source in [
                ("path", ft.data.path),
                *((f"splits.{k}", v) for k, v in ft.data.splits.items()),
            ]
            if source is not None and not resolve_path(source).exists()
        ]
        problems += missing
        if not missing:  # the columns, and every split's labels among the classes, before any training
            try:
                load_labeled(ft.data, ft.task)
            except ValueError as e:
                problems.append(f"finetune.data: {e}")
    return problems


#: How many Parquet inputs the pre-flight opens to check their columns.
PARQUET_CHECKED = 64


def _parquet_column_problems(read: ReadConfig, inputs: list[str]) -> list[str]:
    """The Parquet inputs must hold ``read.text_field`` (their footers are read, no data; the first
    PARQUET_CHECKED of them, a second each at most on an object store): the stage would otherwise fail
    in its first task."""
    import pyarrow.parquet as pq

    from core.storage import open_input_file

    problems = []
    parquet = [uri for uri in inputs if uri.split("?")[0].endswith(".parquet")]
    for uri in parquet[:PARQUET_CHECKED]:
        with open_input_file(uri) as f:
            names = pq.ParquetFile(f).schema_arrow.names
        if read.text_field not in names:
            problems.append(
                f"read.text_field: {uri} has no column {read.text_field!r} (its columns: {', '.join(names)}); "
                "set read.text_field to the one holding the text"
            )
    return problems


def _init_from_problems(model_dir: Path, seq_len: int, section: str = "train") -> list[str]:
    field = f"{section}.init_from: {str(model_dir)!r}"
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return [f"{field} is not a Hugging Face model directory (no config.json there)"]
    problems = []
    if not (model_dir / "tokenizer.json").is_file():
        problems.append(
            f"{field} has no tokenizer.json; fine-tuning tokenizes with the model's own tokenizer"
        )
    config: dict[str, Any] = json.loads(config_file.read_text())
    positions = config.get("n_positions") or config.get("max_position_embeddings")
    if positions is not None and config.get("model_type") == "roberta":
        positions -= 2  # RoBERTa's first two positions are the padding offset
    if positions is not None and seq_len > positions:
        problems.append(
            f"{section}.seq_len: {seq_len} is longer than the {positions} positions of {model_dir}; "
            f"set {section}.seq_len <= {positions}"
        )
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
