"""The data-quality report: what each stage received, kept and rejected (and why), and whether it adds up."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from core.manifest import read_index, read_table

if TYPE_CHECKING:
    from orchestration.pipeline import PipelineResult


def stage_line(index: dict[str, Any]) -> str:
    """One-line summary of a stage's counters for the console."""
    c = index.get("counters", {})
    if "documents_in" in c:
        return f"({c['documents_in']} in, {c['kept']} kept, {c['rejected']} rejected)"
    if "pages_fetched" in c:
        return f"({c['pages_fetched']} pages, {c.get('fetch_failures', 0)} failed/refused URLs)"
    if "tokens" in c and "vocab_size" in c:
        return f"({c['tokens']} tokens, {c['documents']} documents, vocab {c['vocab_size']})"
    if "final_loss" in c:
        return f"(loss {c['first_loss']:.3f} -> {c['final_loss']:.3f})"
    if "perplexity" in c:
        return f"(val loss {c['loss']:.3f}, perplexity {c['perplexity']:.1f})"
    return ""


def _document_stage(out_dir: Path, index: dict[str, Any]) -> dict[str, Any]:
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
        "conserved": c["documents_in"] == c["kept"] + c["rejected"],
        "rejected_by_reason": dict(by_reason.most_common()),
        "examples": examples,
    }


def build_report(result: PipelineResult) -> dict[str, Any]:
    """Collect per-stage figures and consistency checks from the committed stage indexes."""
    stages = result.stages
    rep: dict[str, Any] = {
        "workdir": str(result.workdir),
        "mlflow_run_id": result.parent_run_id,
        "stages": {},
    }
    checks: dict[str, bool] = {}
    crawl = stages["crawl"].index["counters"]
    rep["stages"]["crawl"] = crawl
    for name in ("clean", "dedup"):
        if name in stages:
            rep["stages"][name] = _document_stage(stages[name].out_dir, stages[name].index)
            checks[f"{name}: documents in = kept + rejected"] = rep["stages"][name]["conserved"]
    clusters_file = stages["dedup"].index.get("clusters") if "dedup" in stages else None
    if clusters_file:
        clusters = pq.read_table(stages["dedup"].out_dir / clusters_file["path"]).to_pylist()
        rep["stages"]["dedup"]["duplicate_clusters"] = len(clusters)
        # Largest first (the table is sorted so): representative id -> cluster size.
        rep["stages"]["dedup"]["largest_clusters"] = {c["representative"]: c["size"] for c in clusters[:5]}
        checks["dedup: cluster members = documents removed"] = (
            sum(c["size"] - 1 for c in clusters) == rep["stages"]["dedup"]["rejected"]
        )
    if "demo_pages_served" in crawl:
        checks["crawl pages fetched = pages the demo site served"] = (
            crawl["pages_fetched"] == crawl["demo_pages_served"]
        )
    checks["crawl pages fetched = documents read by clean"] = (
        crawl.get("pages_fetched") == rep["stages"]["clean"]["documents_in"]
    )
    last_docs = rep["stages"]["dedup" if "dedup" in stages else "clean"]
    tok = stages["tokenize"].index
    rep["stages"]["tokenize"] = stages["tokenize"].index["counters"]
    checks["documents tokenized = documents kept"] = (
        sum(s["documents"] for s in tok["splits"].values()) == last_docs["kept"]
    )
    rep["stages"]["train"] = stages["train"].index["counters"]
    checks["training loss fell"] = rep["stages"]["train"]["final_loss"] < rep["stages"]["train"]["first_loss"]
    rep["stages"]["evaluate"] = stages["evaluate"].index["counters"]
    rep["model"] = {"model_id": result.model_id, "registered_version": result.model_version}
    rep["checks"] = checks
    rep["ok"] = all(checks.values())
    return rep


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


def write_report(result: PipelineResult) -> Path:
    """Write report.json and report.md into the work dir; returns the JSON path."""
    rep = build_report(result)
    path = result.workdir / "report.json"
    path.write_text(json.dumps(rep, indent=2, default=str))
    path.with_suffix(".md").write_text(render_markdown(rep))
    return path
