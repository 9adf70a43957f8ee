"""Launch training (pretraining or fine-tuning) through Ray Train: a TorchTrainer with one worker per GPU
(or CPU process)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from rich.console import Console

from core.storage import Store, node_dir, uri_scheme
from orchestration.run_metrics import RunMetricsLogger  # light: MLflow loads where rank 0 logs
from training.config import PROGRESS_FILE, EngineConfig, TrainConfig


def _worker_loop(config: dict[str, Any]) -> None:
    # Imported in the worker: DeepSpeed loads there, not in the driver.
    import torch.distributed as dist

    from training.engine import install_checkpoint
    from training.trainer import train

    context = ray.train.get_context()
    rank = context.get_world_rank()
    config = _on_this_node(config, context.get_local_rank() == 0)
    if config["kind"] == "finetune":
        from training.config import FinetuneConfig

        cfg = FinetuneConfig.model_validate(config["train"])
    else:
        cfg = TrainConfig.model_validate(config["train"])
    ckpt_dir = Path(config["out_dir"]) / "checkpoints"

    # After a restart (max_failures) or on a node that never saw the run, fetch the last checkpoint
    # reported to Ray Train's storage unless this node already holds one.
    reported = ray.train.get_checkpoint()
    if reported is not None and context.get_local_rank() == 0 and not (ckpt_dir / "latest").exists():
        with reported.as_directory() as local:
            install_checkpoint(Path(local), ckpt_dir, Path(reported.path).name)
    if dist.is_initialized():
        dist.barrier()
    report = partial(_report_checkpoint, ckpt_dir, rank)
    _quiet_worker()
    if config["kind"] == "finetune":
        from training.finetune import finetune

        finetune(
            cfg,
            config["out_dir"],
            on_metrics=config["metrics_logger"],
            on_checkpoint=report,
            print_progress=not config["progress_bar"],
        )
        _publish(config, rank)
        return
    on_eval = None
    if cfg.eval_every:
        from evaluation.periodic import PeriodicEvaluator

        on_eval = PeriodicEvaluator(cfg, config["data_dir"])
    train(
        cfg,
        config["data_dir"],
        config["out_dir"],
        on_metrics=config["metrics_logger"],
        on_checkpoint=report,
        print_progress=not config["progress_bar"],  # the driver draws rank 0's progress instead
        on_eval=on_eval,
    )
    _publish(config, rank)


def _report_checkpoint(
    ckpt_dir: Path, rank: int, tag_dir: Path, step: int, metrics: dict[str, float]
) -> None:
    """Every rank uploads the checkpoint files it wrote; Ray Train merges them into one checkpoint in
    storage."""
    from training.engine import rank_files

    staging = ckpt_dir / ".upload" / f"{tag_dir.name}-rank{rank}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for f in rank_files(tag_dir, rank):
        os.link(f, staging / f.name)
    try:
        ray.train.report(
            {"step": step, **metrics},
            checkpoint=Checkpoint.from_directory(str(staging)),
            checkpoint_dir_name=tag_dir.name,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _quiet_worker() -> None:
    """No line per checkpoint upload (Ray Train v2 names some loggers by their file path), no warning about
    the collective DeepSpeed 0.19 still calls by its old name: nothing a user can act on."""
    for name in ["ray.train", *logging.Logger.manager.loggerDict]:
        if name.startswith("ray.train") or "/ray/train/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def _on_this_node(config: dict[str, Any], first: bool) -> dict[str, Any]:
    """The worker's config with local paths: for a remote work dir (``out_store``), the output directory
    becomes one of this node's cache (kept for a resumed run of the same name, others removed by the
    node's first worker) and remote inputs (token shards, the base model, labeled splits) local copies."""
    if config["out_store"] is None:
        return config
    from core.storage import local_copy, local_file, node_dir

    runs = node_dir(config["out_store"], "stages")
    if first and runs.is_dir():
        for old in runs.iterdir():
            if old.name != config["run_name"]:
                shutil.rmtree(old, ignore_errors=True)
    train = dict(config["train"])
    if uri_scheme(train.get("init_from") or ""):
        train["init_from"] = str(local_copy(train["init_from"]))
    data = train.get("data")
    if isinstance(data, dict) and data.get("splits"):
        train["data"] = {**data, "splits": {k: str(local_file(v)) for k, v in data["splits"].items()}}
    data_dir = config["data_dir"]
    if data_dir is not None and uri_scheme(data_dir):
        data_dir = str(local_copy(data_dir))  # the loader checks each shard's sha256 against the index
    return {**config, "train": train, "data_dir": data_dir, "out_dir": str(runs / config["run_name"])}


def _publish(config: dict[str, Any], rank: int) -> None:
    """Rank 0 copies the exported model and the summary from this node's disk to a remote work dir (a
    local one holds them already)."""
    if config["out_store"] is None or rank != 0:
        return
    from core.storage import Store

    out, local = Store(config["out_store"]), Path(config["out_dir"])
    out.rmtree("model")
    out.upload(local / "model", "model")
    out.write_bytes("summary.json", (local / "summary.json").read_bytes())


def _fit_with_progress(trainer: TorchTrainer, progress_file: Path, steps: int, console: Console) -> None:
    """Run ``trainer.fit()`` in a thread; show rank 0's progress file meanwhile as every stage shows its
    progress (orchestration/progress.py: a bar on a terminal, a line every few seconds in a log)."""
    from orchestration.progress import StageProgress

    progress_file.unlink(missing_ok=True)
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    with StageProgress(console, "train", "steps", total=steps) as progress:
        progress.update(0, note="starting workers")
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.5)
            with contextlib.suppress(FileNotFoundError, ValueError):
                p = json.loads(progress_file.read_text())
                progress.update(p["step"], note=f"loss {p['loss']:.4f}, {p['tokens_per_s']:,.0f} tok/s")
    if "error" in outcome:
        raise outcome["error"]


def launch_training(
    cfg: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    run_name: str,
    metrics_logger: RunMetricsLogger | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train on ``cfg.num_workers`` Ray Train workers; returns rank 0's summary (losses, model dir).

    With a ``console``, a progress bar follows rank 0's steps (loss, tokens/s, time left).
    """
    return _launch("train", cfg, data_dir, out_dir, run_name, metrics_logger, console)


def launch_finetuning(
    cfg: EngineConfig,
    out_dir: str | Path,
    run_name: str,
    metrics_logger: RunMetricsLogger | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Fine-tune (training/finetune.py) on ``cfg.num_workers`` Ray Train workers; rank 0's summary."""
    return _launch("finetune", cfg, None, out_dir, run_name, metrics_logger, console)


def _launch(
    kind: str,
    cfg: EngineConfig,
    data_dir: str | Path | None,
    out_dir: str | Path,
    run_name: str,
    metrics_logger: RunMetricsLogger | None,
    console: Console | None,
) -> dict[str, Any]:
    out = Store(out_dir)
    if out.local is not None:
        out.local.mkdir(parents=True, exist_ok=True)
        storage = {"storage_path": cfg.storage_path or str(out.local / "ray_train")}
        progress_file = out.local / PROGRESS_FILE
    else:  # checkpoints go to Ray Train's storage in the work dir; rank 0's progress is read where it
        # runs on this node (a bar without steps otherwise)
        storage = {"storage_path": out.path("ray_train"), "storage_filesystem": out.fs}
        if cfg.storage_path:
            storage = {"storage_path": cfg.storage_path}
        progress_file = node_dir(out, "stages") / run_name / PROGRESS_FILE
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "kind": kind,
            "train": cfg.model_dump(mode="json"),
            "data_dir": Store(data_dir).uri if data_dir is not None else None,
            "out_dir": str(out.local) if out.local is not None else None,
            "out_store": out.uri if out.local is None else None,
            "run_name": run_name,
            "metrics_logger": metrics_logger,
            "progress_bar": console is not None,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name,
            **storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    if console is None:
        trainer.fit()
    else:
        _fit_with_progress(trainer, progress_file, cfg.steps, console)
    summary = out.read_json("summary.json")
    if not summary:
        raise RuntimeError(
            f"training finished without writing {out / 'summary.json'}; see the Ray worker logs above"
        )
    if out.local is None:
        summary["model_dir"] = str(out / "model")  # a record: credentials masked
    return summary
