"""The data-quality report: what each stage received, kept and rejected (and why), and whether it adds up."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from core.manifest import index_digest, read_index, read_table
from core.storage import Store, node_dir, open_input_file
from orchestration.stage_files import MODEL_RECORD

STAGES = ("crawl", "clean", "dedup", "tokenize", "train", "evaluate", "labeled", "finetune")
#: The pipeline run's MLflow identity, written in the work dir beside the stage outputs.
RUN_RECORD = "run.json"
#: Each stage's config as its cache key hashed it, written beside its output (the report's thresholds).
STAGE_CONFIG = "stage_config.json"


def stage_line(index: dict[str, Any]) -> str:
    """One-line summary of a stage's counters for the console."""
    c = index.get("counters", {})
    if {"documents_in", "kept", "rejected"} <= c.keys():
        return f"({c['documents_in']} in, {c['kept']} kept, {c['rejected']} rejected)"
    if "pages_fetched" in c:
        deeper = c.get("urls_not_fetched_max_depth", 0)
        beyond = f", {deeper} URLs beyond crawl.max_depth not fetched" if deeper else ""
        return f"({c['pages_fetched']} pages, {c.get('fetch_failures', 0)} failed/refused URLs{beyond})"
    if "tokens" in c and "vocab_size" in c:
        return f"({c['tokens']} tokens, {c['documents']} documents, vocab {c['vocab_size']})"
    if "final_loss" in c:
        return f"(loss {c['first_loss']:.3f} -> {c['final_loss']:.3f})"
    if "perplexity" in c:
        return f"(val loss {c['loss']:.3f}, perplexity {c['perplexity']:.1f})"
    return ""


def _document_stage(out_dir: Store, index: dict[str, Any]) -> dict[str, Any]:
    c = index["counters"]
    rejected_dir = out_dir / "rejected"
    by_reason: Counter = Counter()
    examples: dict[str, list[dict[str, Any]]] = {}
    if read_index(rejected_dir) is not None:
        table = read_table(rejected_dir)
        if table.num_rows:
            rows = table.select(["url", "filter", "signal", "value", "threshold", "duplicate_of"]).to_pylist()
            for row in rows:
                reason = f"{row['filter']}:{row['signal']}"
                by_reason[reason] += 1
                if len(examples.setdefault(reason, [])) < 3:
                    examples[reason].append(row)
    return {
        "documents_in": c["documents_in"],
        "kept": c["kept"],
        "rejected": c["rejected"],
        "quarantined": c.get("quarantined", 0),
        "conserved": c["documents_in"] == c["kept"] + c["rejected"],
        "rejected_by_reason": dict(by_reason.most_common()),
        "examples": examples,
    }


def run_stages(workdir: str | Path | Store, last: str | list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The committed manifests of a work dir's run: from ``last`` (a stage or several, e.g. evaluate and
    finetune; default: the last stage that has one), back through each manifest's ``inputs``, in pipeline
    order (an output the run did not use is left out)."""
    workdir = Store(workdir)
    found = {name: index for name in STAGES if (index := read_index(workdir / name)) is not None}
    if last is None:
        todo = [next((n for n in reversed(STAGES) if n in found), None)]
    else:
        todo = [last] if isinstance(last, str) else list(last)
    used: set[str] = set()
    while todo:
        name = todo.pop()
        if name in found and name not in used:
            used.add(name)
            todo += list(found[name].get("inputs", {}))
    return {name: found[name] for name in STAGES if name in used}


def build_report(workdir: str | Path | Store, last: str | list[str] | None = None) -> dict[str, Any]:
    """Per-stage figures and consistency checks, from the manifests (index.json) of a work dir (of the
    stages up to ``last``, by default all that have one)."""
    workdir = Store(workdir)
    stages = run_stages(workdir, last)
    if not stages:
        raise FileNotFoundError(f"{workdir}: no stage has committed an index.json; run the pipeline first")
    run = workdir.read_json(RUN_RECORD)
    rep: dict[str, Any] = {"workdir": str(workdir), "mlflow_run_id": run.get("mlflow_run_id"), "stages": {}}
    checks: dict[str, bool] = {}
    for name, index in stages.items():
        for source, digest in index.get("inputs", {}).items():
            if source in stages:
                checks[f"{name}: input {source} is the committed {source} output"] = (
                    index_digest(stages[source]) == digest
                )
    if "crawl" in stages:
        crawl = rep["stages"]["crawl"] = stages["crawl"]["counters"]
        if "demo_pages_served" in crawl:
            checks["crawl pages fetched = pages the demo site served"] = (
                crawl["pages_fetched"] == crawl["demo_pages_served"]
            )
    for name in ("clean", "dedup"):
        if name in stages:
            rep["stages"][name] = _document_stage(workdir / name, stages[name])
            checks[f"{name}: documents in = kept + rejected"] = rep["stages"][name]["conserved"]
    if "clean" in stages:
        checks.update(_source_checks(stages["clean"]["counters"], stages.get("crawl")))
    if "dedup" in stages:
        checks.update(_cluster_checks(workdir / "dedup", stages["dedup"], rep["stages"]["dedup"]))
    checks.update(_id_checks(workdir, stages))
    if "tokenize" in stages:
        rep["stages"]["tokenize"] = stages["tokenize"]["counters"]
        last_docs = next((rep["stages"][n] for n in ("dedup", "clean") if n in rep["stages"]), None)
        if last_docs is not None:
            tokenized = stages["tokenize"]["counters"]
            checks["documents tokenized + quarantined = documents kept"] = (
                tokenized["documents"] + tokenized.get("quarantined", 0) == last_docs["kept"]
            )
    if "train" in stages:
        train = rep["stages"]["train"] = stages["train"]["counters"]
        checks["training loss fell"] = train["final_loss"] < train["first_loss"]
    if "evaluate" in stages:
        rep["stages"]["evaluate"] = stages["evaluate"]["counters"]
    if "labeled" in stages:
        rep["stages"]["labeled"] = stages["labeled"]["counters"]
    if "finetune" in stages:
        finetune = rep["stages"]["finetune"] = stages["finetune"]["counters"]
        checks["fine-tuning loss fell"] = finetune["final_loss"] < finetune["first_loss"]
    model = workdir.read_json(f"train/{MODEL_RECORD}")
    rep["model"] = {"model_id": model.get("model_id"), "registered_version": model.get("version")}
    rep["checks"] = checks
    rep["ok"] = all(checks.values())
    return rep


def _ids(index: dict[str, Any] | None) -> int | None:
    """The id_sum of a manifest's files (None when a file lacks one: written before lmforge kept them)."""
    if index is None:
        return None
    sums = [f.get("id_sum") for f in index["files"] if f["path"].endswith((".parquet", ".docs.arrow"))]
    return None if None in sums else sum(int(x, 16) for x in sums) % 2**64


def _id_checks(workdir: Store, stages: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """Every document id that enters a stage leaves it, kept or rejected; the ids tokenized are those kept."""
    checks = {}
    if "clean" in stages and "dedup" in stages:
        ins, kept, rejected = (
            _ids(stages["clean"]),
            _ids(stages["dedup"]),
            _ids(read_index(workdir / "dedup" / "rejected")),
        )
        if None not in (ins, kept, rejected):
            checks["dedup: every document id kept by clean leaves as kept or rejected"] = (
                ins == (kept + rejected) % 2**64
            )
    docs = next((n for n in ("dedup", "clean") if n in stages), None)
    if docs is not None and "tokenize" in stages:
        kept, tokenized = _ids(stages[docs]), _ids(stages["tokenize"])
        quarantined = _ids(read_index(workdir / "tokenize" / "rejected")) or 0
        if None not in (kept, tokenized):
            checks[f"tokenize: the document ids tokenized (and quarantined) are the ids {docs} kept"] = (
                kept == (tokenized + quarantined) % 2**64
            )
    return checks


def _source_checks(clean: dict[str, Any], crawl: dict[str, Any] | None) -> dict[str, bool]:
    """Documents clean read = WARC records of the crawl + records read from read.paths."""
    from_crawl, from_read = clean.get("documents_in.crawl", 0), clean.get("documents_in.read", 0)
    checks = {
        "clean: documents read = from the crawl + from read.paths": clean["documents_in"]
        == from_crawl + from_read
    }
    if crawl is not None:
        checks["crawl pages fetched = documents clean read from the crawl"] = (
            crawl["counters"].get("pages_fetched", 0) == from_crawl
        )
        records = sum(f.get("rows", 0) for f in crawl["files"])
        checks["crawl manifest records = documents clean read from the crawl + responses it skipped"] = (
            records == from_crawl + clean.get("warc.skipped_status", 0)
        )
    return checks


def _cluster_checks(out_dir: Store, index: dict[str, Any], figures: dict[str, Any]) -> dict[str, bool]:
    clusters_file = index.get("clusters")
    if not clusters_file:
        return {}
    with open_input_file(out_dir.uri_of(clusters_file["path"])) as f:
        clusters = pq.read_table(f).to_pylist()
    figures["duplicate_clusters"] = len(clusters)
    # Largest first (the table is sorted so): representative id -> cluster size.
    figures["largest_clusters"] = {c["representative"]: c["size"] for c in clusters[:5]}
    return {
        "dedup: cluster members = documents removed": sum(c["size"] - 1 for c in clusters)
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
