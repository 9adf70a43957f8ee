"""Launch training through Ray Train: a TorchTrainer with one worker per GPU (or CPU process)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from orchestration.tracking import RunMetricsLogger
from training.config import TrainConfig


def _worker_loop(config: dict[str, Any]) -> None:
    from training.trainer import train  # imported in the worker: DeepSpeed loads there, not in the driver

    train(
        TrainConfig.model_validate(config["train"]),
        config["data_dir"],
        config["out_dir"],
        on_metrics=config["metrics_logger"],
    )


def launch_training(
    cfg: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    run_name: str,
    metrics_logger: RunMetricsLogger | None = None,
) -> dict[str, Any]:
    """Train on ``cfg.num_workers`` Ray Train workers; returns rank 0's summary (losses, model dir)."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "data_dir": str(Path(data_dir).resolve()),
            "out_dir": str(out_dir),
            "metrics_logger": metrics_logger,
        },
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        ),
        run_config=RunConfig(name=run_name, storage_path=str(out_dir / "ray_train")),
    )
    trainer.fit()
    summary_path = out_dir / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"training finished without writing {summary_path}; see the Ray worker logs above")
    return json.loads(summary_path.read_text())
