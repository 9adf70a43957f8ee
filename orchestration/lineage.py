"""Walk a model's lineage back to the pages it was trained on, from the MLflow store alone.

model version -> logged model (config hash, code version, tokenizer, shard digest) -> the run that trained
it -> each input dataset -> the stage run that logged it as its output -> that run's inputs -> ... -> the
crawl (seeds, WARC files) and read.paths. Every link is a dataset (name, digest) logged as one stage run's
output and the next one's input, so anyone with access to the tracking server can follow it.
"""

from __future__ import annotations

from typing import Any

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from orchestration.tracking import ModelNotFound, find_logged_model

_CONTEXT = "mlflow.data.context"
_SOURCE_PARAMS = ("crawl.seeds", "crawl.seeds_file", "crawl.max_pages", "read.paths", "demo_site.modules")


class LineageError(LookupError):
    pass


def _datasets(run: Run, context: str) -> list[dict[str, str]]:
    out = []
    for d in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in d.tags}
        if tags.get(_CONTEXT) == context:
            out.append({"name": d.dataset.name, "digest": d.dataset.digest, "source": d.dataset.source})
    return out


def _model(client: MlflowClient, uri: str) -> tuple[dict[str, Any] | None, Any]:
    try:
        version, logged = find_logged_model(client, uri)
    except ModelNotFound as e:
        raise LineageError(str(e)) from None
    record = None
    if version is not None:
        record = {
            "name": version.name,
            "version": str(version.version),  # a server answers a string, the sqlite store an int
            "aliases": list(version.aliases),
            "model_id": logged.model_id,
        }
    return record, logged


def walk(model_uri: str, tracking_uri: str) -> dict[str, Any]:
    """The lineage of ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``models:/MODEL_ID``."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    version, logged = _model(client, model_uri)
    train = client.get_run(logged.source_run_id)
    parent_id = train.data.tags.get("mlflow.parentRunId")
    if parent_id is None:
        raise LineageError(f"{model_uri}: its training run {train.info.run_id} is not part of a pipeline run")
    stages = client.search_runs(
        [train.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000
    )
    producers = {(d["name"], d["digest"]): run for run in stages for d in _datasets(run, "output")}
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    frontier = [train]
    while frontier:
        run = frontier.pop(0)
        if run.info.run_id in seen:
            continue
        seen.add(run.info.run_id)
        inputs = _datasets(run, "input")
        step = {
            "stage": run.data.tags.get("lmforge.stage", run.info.run_name),
            "run_id": run.info.run_id,
            "outputs": _datasets(run, "output"),
            "inputs": inputs,
            "metrics": {k: v for k, v in sorted(run.data.metrics.items()) if k != "stage_seconds"},
        }
        for d in inputs:
            producer = producers.get((d["name"], d["digest"]))
            d["made_by"] = producer.info.run_id if producer is not None else None
            if producer is not None:
                frontier.append(producer)
        chain.append(step)
    parent = client.get_run(parent_id)
    sources = _data_params(parent.data.params)
    tags = {k: v for k, v in logged.tags.items() if k.startswith("lmforge.")}
    return {
        "model_version": version,
        "model": {
            "model_id": logged.model_id,
            "name": logged.name,
            "tags": tags,
            "metrics": {m.key: m.value for m in (logged.metrics or [])},
            "mixture": _mixture(tags),
        },
        "pipeline_run": {"run_id": parent_id, "name": parent.info.run_name, "sources": sources},
        "chain": chain,
    }


def _mixture(tags: dict[str, str]) -> dict[str, dict[str, str]]:
    """Per source of a mixture (``lmforge.mixture.<source>.<field>`` tags): the tokens the model saw
    from it, their repetition and the digest of its training shards."""
    out: dict[str, dict[str, str]] = {}
    for key, value in tags.items():
        if key.startswith("lmforge.mixture."):
            source, field = key.removeprefix("lmforge.mixture.").rsplit(".", 1)
            out.setdefault(source, {})[field] = value
    return out


def _data_params(params: dict[str, str]) -> dict[str, str]:
    """The pipeline run's parameters that say where its data came from: ``read.paths``, ``crawl.seeds``...,
    or a source's (``sources.docs.read.paths``); a crawl's page limit only where that source crawls."""
    found = {}
    for key, value in params.items():
        field = key.split(".", 2)[2] if key.startswith("sources.") and key.count(".") >= 2 else key
        if field in _SOURCE_PARAMS and value not in ("[]", "None"):
            found[key] = value
    crawls = {k.rsplit("crawl.", 1)[0] for k in found if k.endswith(("crawl.seeds", "crawl.seeds_file"))}
    crawls |= {k.rsplit("demo_site.", 1)[0] for k in found if k.endswith("demo_site.modules")}
    return {
        k: v
        for k, v in found.items()
        if not k.endswith("crawl.max_pages") or k.rsplit("crawl.", 1)[0] in crawls
    }


def render(lineage: dict[str, Any]) -> list[str]:
    """The chain as indented text lines, model first."""
    lines = []
    if lineage["model_version"]:
        v = lineage["model_version"]
        aliases = f" @{', @'.join(v['aliases'])}" if v["aliases"] else ""
        lines.append(f"model version {v['name']}/{v['version']}{aliases}")
    m = lineage["model"]
    tags = m["tags"]
    lines.append(
        f"  logged model {m['model_id']} ({m['name']}): code {tags.get('lmforge.code_version', '?')}, "
        f"config {tags.get('lmforge.config_hash', '?')[:12]}, tokenizer {tags.get('lmforge.tokenizer_id', '?')[:12]}"
    )
    for source, f in m.get("mixture", {}).items():
        lines.append(
            f"    mixture source {source}: {int(f['tokens_seen']):,} tokens seen, repeated "
            f"{float(f['repetition']):.2f}x, shards {f['shards_digest']}"
        )
    for step in lineage["chain"]:
        counts = ", ".join(f"{k}={v:g}" for k, v in list(step["metrics"].items())[:6])
        lines.append(f"  <- {step['stage']} run {step['run_id']}" + (f": {counts}" if counts else ""))
        for d in step["inputs"]:
            origin = "" if d["made_by"] else " (source)"
            lines.append(f"       input {d['name']} {d['digest'][:16]} {d['source']}{origin}")
        if not step["inputs"]:  # where the data entered: the crawl's WARC files, the read stage's copy
            for d in step["outputs"]:
                lines.append(f"       output {d['name']} {d['digest'][:16]} {d['source']}")
    p = lineage["pipeline_run"]
    lines.append(f"  pipeline run {p['run_id']} ({p['name']})")
    for k, v in p["sources"].items():
        lines.append(f"       {k} = {v}")
    return lines
