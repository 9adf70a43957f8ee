"""``RunMetricsLogger``: the picklable sink through which training rank 0 logs step metrics to one MLflow run
from inside a Ray worker. Light to import: every training worker unpickles it with its config, and only the
rank that logs loads MLflow (at its first call)."""

from __future__ import annotations

import os
import time
from typing import Any


class RunMetricsLogger:
    """Logs step metrics to one run, by id (training code stays free of MLflow)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client: Any = None

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if self._client is None:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(
            self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client": None}
