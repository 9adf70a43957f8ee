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
from pathlib import Path
from typing import Any

import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from orchestration.tracking import RunMetricsLogger
from training.config import PROGRESS_FILE, EngineConfig, TrainConfig


def _worker_loop(config: dict[str, Any]) -> None:
    # Imported in the worker: DeepSpeed loads there, not in the driver.
    import torch.distributed as dist

    from training.engine import install_checkpoint, rank_files
    from training.trainer import train

    if config["kind"] == "finetune":
        from training.finetune import FinetuneConfig

        cfg = FinetuneConfig.model_validate(config["train"])
    else:
        cfg = TrainConfig.model_validate(config["train"])
    ckpt_dir = Path(config["out_dir"]) / "checkpoints"
    context = ray.train.get_context()
    rank = context.get_world_rank()

    # After a restart (max_failures) or on a node that never saw the run, fetch the last checkpoint
    # reported to Ray Train's storage unless this node already holds one.
    reported = ray.train.get_checkpoint()
    if reported is not None and context.get_local_rank() == 0 and not (ckpt_dir / "latest").exists():
        with reported.as_directory() as local:
            install_checkpoint(Path(local), ckpt_dir, Path(reported.path).name)
    if dist.is_initialized():
        dist.barrier()

    def report(tag_dir: Path, step: int, metrics: dict[str, float]) -> None:
        """Every rank uploads the files it wrote; Ray Train merges them into one checkpoint in storage."""
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

    # One line per checkpoint upload otherwise; Ray Train v2 names some loggers by their file path.
    for name in ["ray.train", *logging.Logger.manager.loggerDict]:
        if name.startswith("ray.train") or "/ray/train/" in name:
            logging.getLogger(name).setLevel(logging.WARNING)
    # DeepSpeed 0.19 still calls the renamed collective; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    if config["kind"] == "finetune":
        from training.finetune import finetune

        finetune(
            cfg,
            config["out_dir"],
            on_metrics=config["metrics_logger"],
            on_checkpoint=report,
            print_progress=not config["progress_bar"],
        )
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


def _fit_with_progress(trainer: TorchTrainer, progress_file: Path, steps: int, console: Console) -> None:
    """Run ``trainer.fit()`` in a thread; draw rank 0's progress file as a rich progress bar meanwhile."""
    progress_file.unlink(missing_ok=True)
    outcome: dict[str, BaseException] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as e:  # re-raised in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    columns = (
        TextColumn("  [cyan]train[/cyan]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("train", total=steps, info="starting workers")
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.5)
            with contextlib.suppress(FileNotFoundError, ValueError):
                p = json.loads(progress_file.read_text())
                info = f"loss {p['loss']:.4f}  {p['tokens_per_s']:,.0f} tok/s"
                progress.update(task, completed=p["step"], info=info)
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
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "kind": kind,
            "train": cfg.model_dump(mode="json"),
            "data_dir": str(Path(data_dir).resolve()) if data_dir is not None else None,
            "out_dir": str(out_dir),
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
            storage_path=cfg.storage_path or str(out_dir / "ray_train"),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    if console is None:
        trainer.fit()
    else:
        _fit_with_progress(trainer, out_dir / PROGRESS_FILE, cfg.steps, console)
    summary_path = out_dir / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"training finished without writing {summary_path}; see the Ray worker logs above")
    return json.loads(summary_path.read_text())
