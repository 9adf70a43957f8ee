"""MLflow tracking and lineage: one parent run per pipeline, a nested run per stage, datasets, models.

Only orchestration/ imports MLflow. Workers log through ``RunMetricsLogger`` (orchestration/run_metrics.py),
a small picklable object that writes to a run by id, so training code stays free of MLflow.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from mlflow.data.dataset_source_registry import resolve_dataset_source  # noqa: E402
from mlflow.data.meta_dataset import MetaDataset  # noqa: E402
from mlflow.entities import LoggedModelOutput, LoggedModelStatus  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from mlflow.types.schema import Array, ColSpec, DataType, Map, Schema  # noqa: E402

from core.mappings import flatten  # noqa: E402
from core.redact import redact  # noqa: E402
from core.storage import Store, uri_scheme  # noqa: E402

_MAX_PARAM = 6000


_REPO = Path(__file__).resolve().parent.parent


def code_version(version: str, repo: Path = _REPO) -> dict[str, str]:
    """The code a run used: the package version, and where the code is a git checkout, its commit and
    whether tracked files differ from it (``lmforge.git_dirty``)."""
    tags = {"lmforge.version": version, "lmforge.code_version": version}
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):  # not a checkout (a shipped working dir), or no git
        return tags
    dirty = bool(status.strip())
    tags |= {"lmforge.git_commit": commit, "lmforge.git_dirty": str(dirty).lower()}
    tags["lmforge.code_version"] = f"{version}+g{commit[:12]}" + (".dirty" if dirty else "")
    return tags


def _params(mapping: dict[str, Any]) -> dict[str, str]:
    return {k: redact(str(v))[:_MAX_PARAM] for k, v in flatten(mapping).items()}


def _tags(tags: dict[str, str]) -> dict[str, str]:
    return {k: redact(v) for k, v in tags.items()}


class Tracker:
    """Pipeline-level MLflow bookkeeping."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None):
        """``artifact_location``: where a newly created experiment stores artifacts (MLflow's default for a
        database store is ./mlruns of the current directory; the pipeline keeps them in its work dir)."""
        self.tracking_uri = tracking_uri
        mlflow.set_tracking_uri(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        existing = self.client.get_experiment_by_name(experiment)
        if existing is None:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=artifact_location
            )
        else:
            self.experiment_id = existing.experiment_id
        # The MLflow UI opens an experiment of this kind on its training runs and models (else on traces).
        self.client.set_experiment_tag(
            self.experiment_id, "mlflow.experimentKind", "custom_model_development"
        )
        mlflow.set_experiment(experiment_id=self.experiment_id)
        self.parent_run_id: str | None = None

    @contextmanager
    def pipeline_run(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> Iterator[str]:
        with mlflow.start_run(run_name=name, experiment_id=self.experiment_id, tags=_tags(tags)) as run:
            self.parent_run_id = run.info.run_id
            mlflow.log_params(_params(params))
            yield run.info.run_id

    @contextmanager
    def stage_run(self, stage: str, params: dict[str, Any]) -> Iterator[str]:
        """A nested run for one stage; its wall time is logged when it ends."""
        start = time.perf_counter()
        with mlflow.start_run(run_name=stage, nested=True, tags={"lmforge.stage": stage}) as run:
            if params:
                mlflow.log_params(_params(params))
            yield run.info.run_id
            mlflow.log_metric("stage_seconds", time.perf_counter() - start)

    @staticmethod
    def active_run_id() -> str:
        return mlflow.active_run().info.run_id

    @staticmethod
    def set_tag(key: str, value: str) -> None:
        mlflow.set_tag(key, redact(value))

    @staticmethod
    def log_artifact(path: str | Path) -> None:
        mlflow.log_artifact(str(path))

    @staticmethod
    def log_confusion_matrix(matrix: list, names: list[str], artifact: str) -> None:
        """A confusion matrix (rows true, columns predicted) as a table and an interactive heatmap; a
        multi-label one (a 2x2 matrix per label) as one table row per label."""
        import plotly.graph_objects as go

        if matrix and isinstance(matrix[0][0], list):  # multi-label: [[tn, fp], [fn, tp]] per label
            columns = {"label": names, "tn": [], "fp": [], "fn": [], "tp": []}
            for (tn, fp), (fn, tp) in matrix:
                for key, value in zip(("tn", "fp", "fn", "tp"), (tn, fp, fn, tp)):
                    columns[key].append(value)
            mlflow.log_table(columns, artifact_file=f"{artifact}.json")
            return
        columns = {
            "true": names,
            **{f"predicted {n}": [row[j] for row in matrix] for j, n in enumerate(names)},
        }
        mlflow.log_table(columns, artifact_file=f"{artifact}.json")
        figure = go.Figure(
            go.Heatmap(z=matrix, x=names, y=names, text=matrix, texttemplate="%{text}", colorscale="Blues")
        )
        figure.update_layout(
            title=artifact.rsplit("/", 1)[-1],
            xaxis_title="predicted",
            yaxis_title="true",
            yaxis_autorange="reversed",
        )
        mlflow.log_figure(figure, f"{artifact}.html")

    @staticmethod
    def log_report_figures(figures: dict[str, Any]) -> None:
        """The report's key figures on the active (pipeline) run: metrics, and its tables (the funnel,
        rejections, signal quartiles, languages; comparable across runs in the UI's artifact view)."""
        mlflow.log_metrics(figures.get("metrics", {}))
        for artifact, rows in figures.get("tables", {}).items():
            columns = {k: [r.get(k) for r in rows] for k in rows[0]}
            mlflow.log_table(columns, artifact_file=artifact)

    @staticmethod
    def dataset(
        name: str, path: str | Path | Store, digest: str, index: dict[str, Any] | None = None
    ) -> MetaDataset:
        """An MLflow dataset naming a stage output directory by its index digest; with the stage's
        ``index``, also its schema (of its first data file) and profile (rows, files, bytes, documents,
        tokens)."""
        with warnings.catch_warnings():  # local paths match two equivalent source types; either is right
            warnings.simplefilter("ignore", UserWarning)
            uri = path if isinstance(path, str) and uri_scheme(path) else Store(path).uri
            source = resolve_dataset_source(redact(uri))
        if index is None:
            return MetaDataset(source=source, name=name, digest=digest)
        return StageDataset(source, name, digest, _data_schema(uri, index), dataset_profile(index))

    @staticmethod
    def log_datasets(inputs: list[MetaDataset], outputs: list[MetaDataset]) -> None:
        """Stage inputs and outputs, distinguished by the dataset context tag."""
        for ds in inputs:
            mlflow.log_input(ds, context="input")
        for ds in outputs:
            mlflow.log_input(ds, context="output")

    @staticmethod
    def log_counters(counters: dict[str, float]) -> None:
        safe = {k.replace(":", "_"): float(v) for k, v in counters.items()}
        if safe:
            mlflow.log_metrics(safe)

    def log_model(
        self,
        model_dir: str | Path,
        name: str,
        params: dict[str, Any],
        tags: dict[str, str],
        step: int,
        register_as: str | None,
        model_type: str = "causal-lm",
    ) -> tuple[str, str | None]:
        """Log an exported model directory as an MLflow LoggedModel of the active run; register it.

        Returns (model_id, registered version or None).
        """
        run_id = mlflow.active_run().info.run_id
        model = mlflow.initialize_logged_model(
            name=name, source_run_id=run_id, tags=_tags(tags), params=_params(params), model_type=model_type
        )
        try:
            self.client.log_model_artifacts(model.model_id, str(model_dir))
        except Exception:
            mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
            raise
        mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        mlflow.log_outputs(models=[LoggedModelOutput(model.model_id, step)])
        version = None
        if register_as:
            version = mlflow.register_model(
                f"models:/{model.model_id}", register_as, tags=_tags(tags)
            ).version
        return model.model_id, version

    def log_checkpoint(self, name: str, step: int, path: Path | str, tags: dict[str, str]) -> str:
        """A training checkpoint as a LoggedModel of the active run at its step. The DeepSpeed state stays
        where training wrote it (optimizer and ZeRO partitions, several times the model): the model records
        its path, step and the lineage tags of the final model."""
        run_id = mlflow.active_run().info.run_id
        tags = _tags(
            {**tags, "lmforge.checkpoint_step": str(step), "lmforge.checkpoint_path": str(Store(path))}
        )
        model = mlflow.initialize_logged_model(
            name=name, source_run_id=run_id, tags=tags, params={"step": str(step)}, model_type="checkpoint"
        )
        mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        mlflow.log_outputs(models=[LoggedModelOutput(model.model_id, step)])
        return model.model_id

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def tag_version(self, name: str, version: str, key: str, value: str) -> None:
        self.client.set_model_version_tag(name, version, key, redact(value))

    def find_model(self, model_id: str) -> bool:
        """Whether this tracking store holds a READY logged model with this id."""
        try:
            return self.client.get_logged_model(model_id).status == LoggedModelStatus.READY
        except mlflow.exceptions.MlflowException:
            return False

    def model_metric_keys(self, model_id: str | None) -> set[str]:
        """Metric names already logged against a logged model."""
        if not model_id:
            return set()
        return {m.key for m in self.client.get_logged_model(model_id).metrics or []}

    @staticmethod
    def log_model_metrics(metrics: dict[str, float], model_id: str, dataset: MetaDataset) -> None:
        for key, value in metrics.items():
            mlflow.log_metric(key, float(value), model_id=model_id, dataset=dataset)


class StageDataset(MetaDataset):
    """A stage output as MLflow shows it: source, digest, schema and a profile."""

    def __init__(self, source: Any, name: str, digest: str, schema: Schema | None, profile: dict[str, Any]):
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest, schema=schema)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return super().to_dict() | {"profile": json.dumps(self._profile)}


def dataset_profile(index: dict[str, Any]) -> dict[str, Any]:
    """What a stage output holds, from its manifest."""
    counters = index.get("counters", {})
    profile = {
        "rows": index.get("rows", 0),
        "files": len(index["files"]),
        "bytes": sum(f.get("bytes", 0) for f in index["files"]),
    }
    return profile | {k: counters[k] for k in ("documents", "tokens") if k in counters}


_ARROW_TYPES = {
    "string": DataType.string, "large_string": DataType.string, "bool": DataType.boolean,
    "int8": DataType.integer, "int16": DataType.integer, "int32": DataType.integer, "int64": DataType.long,
    "uint8": DataType.integer, "uint16": DataType.integer, "uint32": DataType.long, "uint64": DataType.long,
    "float": DataType.float, "double": DataType.double, "binary": DataType.binary,
    "large_binary": DataType.binary,
}  # fmt: skip


def _mlflow_type(t: pa.DataType) -> Any:
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return DataType.datetime
    if pa.types.is_map(t):
        return Map(_mlflow_type(t.item_type))
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return Array(_mlflow_type(t.value_type))
    return _ARROW_TYPES.get(str(t), DataType.string)


def arrow_to_mlflow_schema(schema: pa.Schema) -> Schema:
    return Schema([ColSpec(_mlflow_type(f.type), f.name, required=not f.nullable) for f in schema])


def _data_schema(out_dir: str | Path, index: dict[str, Any]) -> Schema | None:
    """The schema of the output's first Parquet or Arrow IPC file, if it has one (local or remote)."""
    store = Store(out_dir)
    for f in index["files"]:
        suffix = Path(f["path"]).suffix
        if suffix not in (".parquet", ".arrow"):
            continue
        try:
            with store.open_input(f["path"]) as source:
                if suffix == ".parquet":
                    return arrow_to_mlflow_schema(pq.read_schema(source))
                return arrow_to_mlflow_schema(pa.ipc.open_file(source).schema)
        except (OSError, pa.ArrowInvalid):
            return None
    return None


class ModelNotFound(LookupError):
    pass


def find_logged_model(client: MlflowClient, uri: str) -> tuple[Any, Any]:
    """(registered model version or None, LoggedModel) of ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``
    or ``models:/MODEL_ID``."""
    ref = uri.removeprefix("models:/")
    version = None
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, number = ref.split("/", 1)
            version = client.get_model_version(name, number)
        model_id = ref if version is None else version.model_id
        if model_id is None and version.source.startswith("models:/"):  # registered from models:/<id>
            model_id = version.source.removeprefix("models:/")
        return version, client.get_logged_model(model_id)
    except mlflow.exceptions.MlflowException as e:
        raise ModelNotFound(f"{uri}: not in the tracking store {client.tracking_uri} ({e.message})") from None


def resolve_model(uri: str, tracking_uri: str, dst: Path) -> tuple[Path, Any]:
    """A local Hugging Face directory for a model reference, and its MLflow LoggedModel (None for a path)."""
    if not uri.startswith("models:/"):
        return Path(uri), None
    _, logged = find_logged_model(MlflowClient(tracking_uri, registry_uri=tracking_uri), uri)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=logged.artifact_location, dst_path=str(dst), tracking_uri=tracking_uri
    )
    return Path(local), logged


def log_evaluation(
    tracking_uri: str, logged_model: Any, evaluations: dict[str, Any], params: dict[str, Any]
) -> str:
    """An evaluation run in the model's experiment: each metric logged against the model and its dataset
    (the task data, named by its digest). Returns the run id."""
    from evaluation.tasks import task_metric_names  # torch comes with it: not for every tracking import

    mlflow.set_tracking_uri(tracking_uri)
    tags = {"lmforge.stage": "evaluate", "lmforge.model_id": logged_model.model_id}
    with mlflow.start_run(
        experiment_id=logged_model.experiment_id, run_name=f"eval-{logged_model.name}", tags=tags
    ) as run:
        mlflow.log_params(_params(params))
        for ev in evaluations.values():
            dataset = Tracker.dataset(ev.name, ev.source, ev.digest[:16])
            mlflow.log_input(dataset, context="eval")
            metrics = task_metric_names(ev.name, {k: v for k, v in ev.metrics.items() if k != "seconds"})
            Tracker.log_model_metrics(metrics, logged_model.model_id, dataset)
        return run.info.run_id


def start_mlflow_ui(tracking_uri: str, port: int, cwd: str | Path | None = None) -> subprocess.Popen:
    """``mlflow server`` over a tracking store on 127.0.0.1, set to start fast: one worker, no job runner
    (11-18 s to ready instead of ~44 s here), no telemetry."""
    import sys

    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_until_ready(url: str, server: subprocess.Popen, timeout_s: float = 120) -> None:
    """Poll ``url/health`` until the server answers; raise with its stderr if it exits first."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return
        except OSError:
            if server.poll() is not None:
                err = server.stderr.read().decode(errors="replace")[-2000:] if server.stderr else ""
                raise RuntimeError(f"mlflow server exited with {server.returncode}: {err}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not ready after {timeout_s:.0f}s") from None
            time.sleep(0.5)
