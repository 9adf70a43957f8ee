"""The data-quality report: what each stage received, kept and rejected (and why), and whether it adds up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from core.manifest import index_digest, read_index
from core.storage import Store, node_dir, open_input_file
from orchestration.instances import output_path, split_instance
from orchestration.stage_files import MODEL_RECORD
from training.data.tokenize import validation_warning

STAGES = (
    "crawl",
    "clean",
    "dedup",
    "dedup_across",
    "quality_classifier",
    "quality",
    "tokenize",
    "train",
    "evaluate",
    "labeled",
    "finetune",
)
#: The stages of a source's chain: one corpus's, or each source's (``clean[web]``).
CHAIN_STAGES = ("crawl", "clean", "dedup")
#: The pipeline run's MLflow identity, written in the work dir beside the stage outputs.
RUN_RECORD = "run.json"
#: Each stage's config as its cache key hashed it, written beside its output (the report's thresholds).
STAGE_CONFIG = "stage_config.json"


def run_stages(workdir: str | Path | Store, last: str | list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The committed manifests of a work dir's run, by stage instance: from ``last`` (a stage or several,
    e.g. evaluate and finetune; default: the last stage that has one), back through each manifest's
    ``inputs``; each source's chain first (in the order the pooled stages read them), then the pooled
    stages, in pipeline order (an output the run did not use is left out)."""
    workdir = Store(workdir)
    if last is None:
        todo = [next((n for n in reversed(STAGES) if read_index(workdir / n) is not None), None)]
    else:
        todo = [last] if isinstance(last, str) else list(last)
    used: dict[str, dict[str, Any]] = {}
    while todo:  # breadth first: the sources come in the order the pooled stages list them
        name = todo.pop(0)
        if name is None or name in used or (index := read_index(workdir / output_path(name))) is None:
            continue
        used[name] = index
        todo += list(index.get("inputs", {}))
    sources = list(dict.fromkeys(s for n in used if (s := split_instance(n)[1]) is not None))

    def order(name: str) -> tuple[int, int, int]:
        stage, source = split_instance(name)
        place = STAGES.index(stage) if stage in STAGES else len(STAGES)
        return (0, sources.index(source), place) if source is not None else (1, 0, place)

    return {name: used[name] for name in sorted(used, key=order)}


def chains(stages: dict[str, dict[str, Any]]) -> dict[str | None, dict[str, str]]:
    """Each source's per-source stages, stage -> instance (``{"web": {"clean": "clean[web]"}}``); a
    single-corpus run is the one source None."""
    out: dict[str | None, dict[str, str]] = {}
    for name in stages:
        stage, source = split_instance(name)
        if source is not None or stage in CHAIN_STAGES:
            out.setdefault(source, {})[stage] = name
    return out


def build_report(workdir: str | Path | Store, last: str | list[str] | None = None) -> dict[str, Any]:
    """Per-stage figures and consistency checks, from the manifests (index.json) of a work dir (of the
    stages up to ``last``, by default all that have one); each source's chain has its own."""
    workdir = Store(workdir)
    stages = run_stages(workdir, last)
    if not stages:
        raise FileNotFoundError(f"{workdir}: no stage has committed an index.json; run the pipeline first")
    run = workdir.read_json(RUN_RECORD)
    rep: dict[str, Any] = {"workdir": str(workdir), "mlflow_run_id": run.get("mlflow_run_id")}
    rep["stages"] = {name: _figures(workdir, name, index) for name, index in stages.items()}
    checks: dict[str, bool] = {}
    for name, index in stages.items():
        for source, digest in index.get("inputs", {}).items():
            if source in stages:
                checks[f"{name}: input {source} is the committed {source} output"] = (
                    index_digest(stages[source]) == digest
                )
    sources = chains(stages)
    for chain in sources.values():
        checks.update(_chain_report(workdir, stages, chain, rep["stages"]))
    for name in _pooled_documents(stages):
        checks.update(_pooled_report(workdir, stages, name, rep["stages"]))
    warnings = []
    if "tokenize" in stages:
        if (warning := validation_warning(stages["tokenize"])) is not None:
            warnings.append(f"tokenize: {warning}")
        last_docs = [rep["stages"][name] for name in _last_documents(sources, stages) if name in stages]
        if last_docs:
            tokenized = stages["tokenize"]["counters"]
            out = tokenized["documents"] + tokenized.get("quarantined", 0)
            checks["documents tokenized + quarantined = documents kept"] = out == sum(
                d["kept"] for d in last_docs
            )
    checks.update(_tokenized_id_checks(workdir, stages, sources))
    if "train" in stages:
        train = rep["stages"]["train"]
        checks["training loss fell"] = train["final_loss"] < train["first_loss"]
    if "finetune" in stages:
        finetune = rep["stages"]["finetune"]
        checks["fine-tuning loss fell"] = finetune["final_loss"] < finetune["first_loss"]
    model = workdir.read_json(f"train/{MODEL_RECORD}")
    rep["model"] = {"model_id": model.get("model_id"), "registered_version": model.get("version")}
    rep["checks"] = checks
    rep["warnings"] = warnings  # not failures: the run is consistent, but a figure is not to be trusted
    rep["ok"] = all(checks.values())
    return rep


def _figures(workdir: Store, name: str, index: dict[str, Any]) -> dict[str, Any]:
    """A stage's section of the report, as its component writes it (the counters of one no longer
    registered)."""
    from orchestration.stages import component_of

    component = component_of(name)
    if component is None:
        return dict(index.get("counters", {}))
    return component.figures(index, workdir / output_path(name))


def _chain_documents(sources: dict[str | None, dict[str, str]]) -> list[str]:
    """Each source's last document stage: its dedup, else its clean."""
    return [chain.get("dedup") or chain["clean"] for chain in sources.values() if "clean" in chain]


def _last_documents(sources: dict[str | None, dict[str, str]], stages: dict[str, Any]) -> list[str]:
    """The document stages tokenize read (as its manifest names them), else each source's last."""
    if "tokenize" in stages:
        return [n for n in stages["tokenize"]["inputs"] if stages.get(n, {}).get("kind") == "documents"]
    return _chain_documents(sources)


def _pooled_documents(stages: dict[str, dict[str, Any]]) -> list[str]:
    """The document stages over every source's documents (dedup_across, quality), in run order."""
    return [
        name
        for name, index in stages.items()
        if index.get("kind") == "documents" and split_instance(name)[1] is None and name not in CHAIN_STAGES
    ]


def _pooled_report(
    workdir: Store, stages: dict[str, dict[str, Any]], name: str, figures: dict[str, Any]
) -> dict[str, bool]:
    """A pooled document stage's checks: documents in = kept + rejected, its clusters (if it has any),
    and the ids in being those the document stages it read kept."""
    out, index = workdir / output_path(name), stages[name]
    checks = {f"{name}: documents in = kept + rejected": figures[name]["conserved"]}
    checks.update(_cluster_checks(name, out, index, figures[name]))
    read = [n for n in index.get("inputs", {}) if stages.get(n, {}).get("kind") == "documents"]
    ins = [_ids(stages[n]) for n in read]
    kept, rejected = _ids(index), _ids(read_index(out / "rejected"))
    if read and None not in (*ins, kept, rejected):
        named = read[0] if len(read) == 1 else " and ".join(read)
        checks[f"{name}: every document id {named} kept leaves as kept or rejected"] = (
            sum(ins) % 2**64 == (kept + rejected) % 2**64
        )
    return checks


def _chain_report(
    workdir: Store, stages: dict[str, dict[str, Any]], chain: dict[str, str], figures: dict[str, Any]
) -> dict[str, bool]:
    """One source's crawl, clean and dedup: their figures (into ``figures``, by instance) and checks."""
    checks: dict[str, bool] = {}
    crawl, clean, dedup = (chain.get(n) for n in ("crawl", "clean", "dedup"))
    if crawl is not None:
        counters = stages[crawl]["counters"]
        if "demo_pages_served" in counters:
            checks[f"{crawl} pages fetched = pages the demo site served"] = (
                counters["pages_fetched"] == counters["demo_pages_served"]
            )
    for name in (clean, dedup):
        if name is not None:
            checks[f"{name}: documents in = kept + rejected"] = figures[name]["conserved"]
    if clean is not None:
        checks.update(_source_checks(clean, stages[clean]["counters"], crawl, stages.get(crawl or "")))
    if dedup is not None:
        checks.update(_cluster_checks(dedup, workdir / output_path(dedup), stages[dedup], figures[dedup]))
        if clean is not None:
            ins, kept = _ids(stages[clean]), _ids(stages[dedup])
            rejected = _ids(read_index(workdir / output_path(dedup) / "rejected"))
            if None not in (ins, kept, rejected):
                checks[f"{dedup}: every document id kept by {clean} leaves as kept or rejected"] = (
                    ins == (kept + rejected) % 2**64
                )
    return checks


def _ids(index: dict[str, Any] | None) -> int | None:
    """The id_sum of a manifest's files (None when a file lacks one: written before lmforge kept them)."""
    if index is None:
        return None
    sums = [f.get("id_sum") for f in index["files"] if f["path"].endswith((".parquet", ".docs.arrow"))]
    return None if None in sums else sum(int(x, 16) for x in sums) % 2**64


def _tokenized_id_checks(
    workdir: Store, stages: dict[str, dict[str, Any]], sources: dict[str | None, dict[str, str]]
) -> dict[str, bool]:
    """The ids tokenized (and quarantined) are those each source's last document stage kept."""
    docs = _last_documents(sources, stages)
    if not docs or "tokenize" not in stages:
        return {}
    kept = [_ids(stages[d]) for d in docs]
    tokenized = _ids(stages["tokenize"])
    quarantined = _ids(read_index(workdir / "tokenize" / "rejected")) or 0
    if None in (*kept, tokenized):
        return {}
    named = docs[0] if len(docs) == 1 else " and ".join(docs)
    return {
        f"tokenize: the document ids tokenized (and quarantined) are the ids {named} kept": sum(kept) % 2**64
        == (tokenized + quarantined) % 2**64
    }


def _source_checks(
    name: str, clean: dict[str, Any], crawl_name: str | None, crawl: dict[str, Any] | None
) -> dict[str, bool]:
    """Documents clean read = WARC records of the crawl + records read from read.paths."""
    from_crawl, from_read = clean.get("documents_in.crawl", 0), clean.get("documents_in.read", 0)
    checks = {
        f"{name}: documents read = from the crawl + from read.paths": clean["documents_in"]
        == from_crawl + from_read
    }
    if crawl is not None:
        checks[f"{crawl_name} pages fetched = documents {name} read from the crawl"] = (
            crawl["counters"].get("pages_fetched", 0) == from_crawl
        )
        records = sum(f.get("rows", 0) for f in crawl["files"])
        checks[
            f"{crawl_name} manifest records = documents {name} read from the crawl + responses it skipped"
        ] = records == from_crawl + clean.get("warc.skipped_status", 0)
    return checks


def _cluster_checks(
    name: str, out_dir: Store, index: dict[str, Any], figures: dict[str, Any]
) -> dict[str, bool]:
    clusters_file = index.get("clusters")
    if not clusters_file:
        return {}
    with open_input_file(out_dir.uri_of(clusters_file["path"])) as f:
        clusters = pq.read_table(f).to_pylist()
    figures["duplicate_clusters"] = len(clusters)
    # Largest first (the table is sorted so): representative id -> cluster size.
    figures["largest_clusters"] = {c["representative"]: c["size"] for c in clusters[:5]}
    return {
        f"{name}: cluster members = documents removed": sum(c["size"] - 1 for c in clusters)
        == figures["rejected"] - figures.get("quarantined", 0)  # quarantined: in no cluster
    }


def render_markdown(rep: dict[str, Any]) -> str:
    lines = [
        "# lmforge data-quality report",
        "",
        f"Work dir: `{rep['workdir']}`  ",
        f"MLflow run: `{rep['mlflow_run_id']}`",
        "",
    ]
    for name, figures in rep["stages"].items():
        lines.append(f"## {name}")
        for key, value in figures.items():
            if key == "examples":
                continue
            if isinstance(value, dict):
                lines.append(f"- {key}:")
                lines += [f"  - {k}: {v}" for k, v in value.items()]
            else:
                lines.append(f"- {key}: {value:.4g}" if isinstance(value, float) else f"- {key}: {value}")
        for reason, rows in figures.get("examples", {}).items() if isinstance(figures, dict) else []:
            lines.append(f"- examples of {reason}: " + ", ".join(r["url"] or "?" for r in rows))
        lines.append("")
    lines.append("## checks")
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in rep["checks"].items()]
    if rep.get("warnings"):
        lines += ["", "## warnings", *(f"- {w}" for w in rep["warnings"])]
    return "\n".join(lines) + "\n"


def write_report(workdir: str | Path | Store, last: str | list[str] | None = None) -> Path:
    """Write report.json and report.md into the work dir from its manifests; returns the JSON path on
    this machine (a remote work dir's run directory in the node cache keeps a copy: see local_output)."""
    rep = build_report(workdir, last)
    store = Store(workdir)
    store.write_bytes("report.json", json.dumps(rep, indent=2, default=str).encode())
    store.write_bytes("report.md", render_markdown(rep).encode())
    return local_output(store, "report.json", "report.md")


def local_output(store: Store, *names: str) -> Path:
    """The first of ``names`` (files of the work dir ``store``) on this machine's disk: where it is, or
    for a remote work dir copies in the run's node-cache directory (for MLflow to log, a browser to open)."""
    if store.local is not None:
        return store.local / names[0]
    local = node_dir(store, "runs")
    local.mkdir(parents=True, exist_ok=True)
    for name in names:
        (local / name).write_bytes(store.read_bytes(name))
    return local / names[0]
