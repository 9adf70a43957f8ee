"""Corpora from many sources (docs/ARCHITECTURE.md, "Sources"): each source's crawl or reader, clean and dedup
as instances of the same stages (``clean[web]``), dedup across sources, one tokenizer and shards per
source, selection by instance or stage, and a report with each source's chain."""

import json
import random
import re
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cleaning.dedup_phases import DedupConfig, decide_clusters
from core.manifest import read_index, read_table
from orchestration.config import ConfigError, parse_config
from orchestration.pipeline import Pipeline
from orchestration.plan import Selection, SelectionError
from orchestration.report import build_report
from orchestration.report_html import build_html
from orchestration.stages import dag
from tests.fixtures import prose
from training.data.shards import TokenSequences


def _raw(root: Path, **extra) -> dict:
    """Two read sources: docs (JSONL) and code (Parquet, text in ``content``)."""
    return {
        "name": "multi",
        "workdir": str(root / "work"),
        "clean": {"gopher_repetition": None, "c4": {}},
        "dedup": {"shards": 1},
        "sources": {
            "docs": {"read": {"paths": [str(root / "docs.jsonl")]}},
            "code": {
                "read": {"paths": [str(root / "code.parquet")], "text_field": "content"},
                "clean": {"c4": None, "gopher": None},
                "dedup": {"minhash": None},
            },
        },
        "tokenize": {"tokenizer": {"vocab_size": 300, "min_frequency": 1}, "val_fraction": 0.1},
        **extra,
    }


# -- config and DAG (no Ray) ---------------------------------------------------------------------------
@pytest.mark.unit
def test_a_mixture_weighs_tiers_only_of_sources_that_quality_scoring_buckets(tmp_path):
    by_tier = {"train": {"mixture": {"weights": {"docs": {2: 0.5, 1: 0.3}, "code": 0.2}}}}
    with pytest.raises(ValueError, match=r"weighs tiers of docs: quality scoring must bucket it into tiers"):
        parse_config(_raw(tmp_path, **by_tier), "test")
    quality = {
        "classifier": {"positive": [{"source": "docs"}], "negative": [{"source": "code"}]},
        "select": {"tiers": [0.3, 0.7]},
    }
    cfg = parse_config(_raw(tmp_path, quality=quality, **by_tier), "test")
    assert cfg.train.mixture.sources == ["code", "docs.tier1", "docs.tier2"]
    too_high = {"train": {"mixture": {"weights": {"docs": {3: 1.0}}}}}
    with pytest.raises(
        ValueError, match=r"docs has tiers 0 to 2 \(quality.select.tiers \[0.3, 0.7\]\), not 3"
    ):
        parse_config(_raw(tmp_path, quality=quality, **too_high), "test")
    scored = quality | {"sources": ["code"]}
    with pytest.raises(ValueError, match="weighs tiers of docs"):
        parse_config(_raw(tmp_path, quality=scored, **by_tier), "test")


@pytest.mark.unit
def test_a_source_inherits_the_top_level_sections_and_overrides_what_it_names(tmp_path):
    cfg = parse_config(_raw(tmp_path, crawl={"max_pages": 7}), "test")
    docs, code = cfg.view("docs"), cfg.view("code")
    assert docs.read.paths == [str(tmp_path / "docs.jsonl")] and docs.read.text_field == "text"
    assert code.read.text_field == "content" and code.crawl.max_pages == docs.crawl.max_pages == 7
    assert (
        docs.clean.c4 is not None and docs.clean.gopher is not None and docs.clean.gopher_repetition is None
    )
    assert code.clean.c4 is None and code.clean.gopher is None and code.clean.gopher_repetition is None
    assert docs.dedup.minhash is not None and code.dedup.minhash is None and code.dedup.shards == 1
    assert docs.sources == {} and cfg.view(None) is cfg and list(cfg.source_views()) == ["docs", "code"]
    single = parse_config({"read": {"paths": ["x.jsonl"]}}, "test")
    assert list(single.source_views()) == [None] and single.view(None) is single

    def refused(raw: dict, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            parse_config(raw, "test")

    refused({**_raw(tmp_path), "read": {"paths": ["x.jsonl"]}}, r"read.paths is set beside sources")
    refused({**_raw(tmp_path), "demo_site": {}}, r"demo_site is set beside sources")
    refused({"sources": {"web": {"demo_site": {}}}}, r"sources.web.demo_site is served on 127.0.0.1")
    refused({"sources": {"a": {"read": {"paths": ["x"]}}, "b": {}}}, r"sources.b names no corpus")
    refused({"sources": {"a b": {"read": {"paths": ["x"]}}}}, r"sources.a b: a source name is letters")
    refused({**_raw(tmp_path), "dedup_across": {"order": ["web"]}}, r"dedup_across.order: no source web")
    one = {"sources": {"docs": {"read": {"paths": ["x"]}}}, "dedup_across": {}}
    refused(one, r"dedup_across needs two sources")


@pytest.mark.unit
def test_each_source_has_its_chain_and_the_pooled_stages_read_every_chain(tmp_path):
    cfg = parse_config(_raw(tmp_path), "test")
    assert [(i.name, i.reads) for i in dag(cfg)] == [
        ("clean[docs]", ()),
        ("dedup[docs]", ("clean[docs]",)),
        ("clean[code]", ()),
        ("dedup[code]", ("clean[code]",)),
        ("tokenize", ("dedup[docs]", "dedup[code]")),
        ("train", ("tokenize",)),
        ("evaluate", ("train", "tokenize")),
    ]
    across = parse_config(_raw(tmp_path, dedup_across={"order": ["code"]}), "test")
    reads = {i.name: i.reads for i in dag(across)}
    assert reads["dedup_across"] == ("dedup[docs]", "dedup[code]") and reads["tokenize"] == ("dedup_across",)
    assert across.source_order() == ["code", "docs"]
    # A single corpus keeps its stage names.
    single = parse_config({"read": {"paths": ["x.jsonl"]}}, "test")
    assert [i.name for i in dag(single)][:3] == ["clean", "dedup", "tokenize"]


@pytest.mark.unit
def test_a_selection_names_an_instance_or_a_whole_stage_and_keeps_to_the_chains_it_reaches(tmp_path):
    nodes = dag(parse_config(_raw(tmp_path, dedup_across={}), "test"))
    order, deps = [n.name for n in nodes], {n.name: n.reads for n in nodes}

    def resolve(**kw):
        return Selection(**kw).resolve(order, deps, ["crawl", "clean", "dedup", "dedup_across", "tokenize"])

    assert resolve(only=("clean",))[0] == ["clean[docs]", "clean[code]"]
    selected, needed = resolve(start="clean[code]", until="tokenize")
    assert selected == ["clean[code]", "dedup[code]", "dedup_across", "tokenize"]
    assert needed == ["clean[docs]", "dedup[docs]", *selected]  # the other chain's outputs, used as they are
    assert resolve(until="dedup[docs]")[0] == ["clean[docs]", "dedup[docs]"]
    assert resolve(start="dedup", until="dedup_across")[0] == ["dedup[docs]", "dedup[code]", "dedup_across"]
    assert resolve(only=("clean[docs]",), force=("clean",))[0] == ["clean[docs]"]
    with pytest.raises(SelectionError, match=r"--only clean\[web\]: this config has no clean\[web\] stage"):
        resolve(only=("clean[web]",))
    with pytest.raises(
        SelectionError, match=r"--force dedup\[code\]: the selection does not run dedup\[code\]"
    ):
        resolve(only=("dedup[docs]",), force=("dedup[code]",))


@pytest.mark.unit
def test_across_sources_the_first_sources_copy_survives_whatever_the_keep_rule_prefers():
    # One cluster of three nodes: partition 0 row 0 (id "b"), partition 1 row 0 ("a"), partition 1 row 1
    # ("c"). The keep rule "first" keeps the smallest id, "a"; a priority ranking partition 0 first keeps
    # "b", and the others are its duplicates.
    nodes = [0, 1 << 32, (1 << 32) | 1]
    labels = pa.table({"node": nodes, "root": [0, 0, 0], "best": [1.0, 0.9, 0.85]})
    info = {n: {"id": i, "length": 10, "exact": 1, "exact_hi": j} for n, i, j in zip(nodes, "bac", (1, 2, 3))}
    cfg = DedupConfig(shards=1)
    assert decide_clusters(labels, info, cfg).table.column("representative").to_pylist() == ["a"]
    ranked = decide_clusters(labels, info, cfg, priority=[0, 1])
    assert ranked.table.to_pylist() == [{"representative": "b", "size": 3, "members": ["a", "c"]}]
    assert ranked.decisions[1].column("duplicate_of").to_pylist() == ["b", "b"]


# -- a run (the session's Ray, no training) --------------------------------------------------------------
@pytest.fixture(scope="module")
def two_sources(ray_session, tmp_path_factory):
    """docs (16 prose records) and code (12 records, one of them a copy of docs' d03), deduplicated
    across sources with code first, run up to tokenize once for the module."""
    root = tmp_path_factory.mktemp("sources")
    rng = random.Random(5)
    docs = {f"d{i:02d}": prose(rng) for i in range(16)}
    lines = [json.dumps({"id": k, "text": v, "url": f"https://docs.example/{k}"}) for k, v in docs.items()]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    code = {f"c{i:02d}": prose(rng) for i in range(11)} | {"c11": docs["d03"]}
    pq.write_table(pa.table({"id": list(code), "content": list(code.values())}), root / "code.parquet")
    raw = _raw(root, dedup_across={"order": ["code"]})
    return raw, docs, code, Pipeline(parse_config(raw, "test")).run(until="tokenize")


@pytest.mark.integration
def test_each_source_is_cleaned_and_deduplicated_apart_then_across_and_tokenized_into_its_own_shards(
    two_sources,
):
    raw, docs, code, result = two_sources
    work = Path(raw["workdir"])
    assert list(result.stages) == ["clean[docs]", "dedup[docs]", "clean[code]", "dedup[code]", "dedup_across", "tokenize"]  # fmt: skip
    for source, texts in (("docs", docs), ("code", code)):
        stage = result.stages[f"clean[{source}]"]
        assert stage.out_dir == work / "sources" / source / "clean"
        assert stage.index["counters"]["documents_in"] == len(texts)
    # Each source's own filters: C4's rules ran on docs only.
    assert "c4_quality.in" in result.stages["clean[docs]"].index["counters"]
    assert not any(k.startswith("c4_quality") for k in result.stages["clean[code]"].index["counters"])
    # Across sources, code's copy of d03 survives (code comes first) and docs' d03 is removed.
    across = result.stages["dedup_across"]
    rejected = read_table(work / "dedup_across" / "rejected").to_pylist()
    assert [(r["id"], r["duplicate_of"]) for r in rejected] == [("d03", "c11")]
    assert across.index["sources"] == {"code": ["code-p00000.parquet"], "docs": ["docs-p00000.parquet"]}
    kept = {s: set(pq.read_table(work / "dedup_across" / f).column("id").to_pylist()) for s, (f,) in across.index["sources"].items()}  # fmt: skip
    assert kept == {"code": set(code), "docs": set(docs) - {"d03"}}
    # One tokenizer; the shards of each source apart, named and tagged by it, adding up to its totals.
    tokens = result.stages["tokenize"].index
    shards = [s for split in tokens["splits"].values() for s in split["shards"]]
    for source in ("docs", "code"):
        mine = [s for s in shards if s["source"] == source]
        assert mine and all(re.fullmatch(rf"(train|val)-{source}-p\d+-\d+\.arrow", s["path"]) for s in mine)
        assert (
            tokens["sources"][source]["documents"] == sum(s["documents"] for s in mine) == len(kept[source])
        )
        assert tokens["sources"][source]["tokens"] == sum(s["tokens"] for s in mine)
        assert tokens["counters"][f"tokens.{source}"] == tokens["sources"][source]["tokens"]
    assert sum(s["tokens"] for s in shards) == tokens["total_tokens"]
    # Code's c11, kept of the two copies across sources, carries its cluster's size to its shard's docs
    # table (what train.mixture.rehydrate upsamples by); the others had no copy.
    work_tokens = result.stages["tokenize"].out_dir
    found = {}
    for shard in shards:
        docs = pa.ipc.open_file(work_tokens / shard["docs_path"]).read_all()
        if "copies" in docs.column_names:
            found |= dict(zip(docs.column("doc_id").to_pylist(), docs.column("copies").to_pylist()))
    assert {d: n for d, n in found.items() if n != 1} == {"c11": 2}
    # Each source holds documents out to measure it on (its lowest-hash one where none fell in the split).
    assert all(tokens["sources"][s]["val_documents"] >= 1 for s in ("docs", "code"))


@pytest.mark.integration
def test_a_mixture_past_a_sources_repetition_cap_is_refused_before_training_and_unknown_sources_at_load(
    two_sources,
):
    raw, _, _, result = two_sources
    tokens = result.stages["tokenize"].index["sources"]
    # 40 steps of 8 sequences of 32 tokens: code's half is 160 sequences, 5,120 tokens.
    mixture = {"weights": {"docs": 1, "code": 1}, "max_repetition": {"code": 1.5}}
    train = {"model": {"n_embd": 32, "n_head": 2}, "seq_len": 32, "micro_batch_size": 8, "steps": 40}
    cfg = parse_config(raw | {"train": train | {"mixture": mixture}}, "test")
    assert cfg.train.mixture.notes() == ["train.mixture.weights sum to 2; normalised to docs 0.5, code 0.5"]
    code = tokens["code"]["train_tokens"]
    assert 5120 / code > 1.5  # the fixture's code is smaller than its share
    with pytest.raises(ConfigError) as refused:
        Pipeline(cfg).run()
    assert f"source code holds {code:,} training tokens; its share 50.0% of the run is 5,120 tokens, a repetition of {5120 / code:.2f}x past its max_repetition 1.5" in str(refused.value)  # fmt: skip
    assert not (Path(raw["workdir"]) / "train" / "model").exists()
    with pytest.raises(ValueError, match=r"train.mixture: no source web \(sources: docs, code\)"):
        parse_config(raw | {"train": train | {"mixture": {"weights": {"web": 1, "docs": 1}}}}, "test")


@pytest.mark.integration
def test_the_report_and_mlflow_show_each_sources_chain_and_a_change_to_one_source_reruns_its_chain(
    two_sources,
):
    raw, docs, code, result = two_sources
    work = Path(raw["workdir"])
    rep = build_report(work)
    assert rep["ok"] and list(rep["stages"])[:4] == [
        "clean[docs]",
        "dedup[docs]",
        "clean[code]",
        "dedup[code]",
    ]
    assert rep["stages"]["clean[docs]"]["documents_in"] == len(docs)
    assert rep["stages"]["dedup_across"]["rejected"] == 1
    for check in (
        "clean[code]: documents in = kept + rejected",
        "dedup_across: every document id dedup[docs] and dedup[code] kept leaves as kept or rejected",
        "tokenize: the document ids tokenized (and quarantined) are the ids dedup_across kept",
    ):
        assert rep["checks"][check]
    # 27 documents at val_fraction 0.1 (7 by the split rule's hash): a validation split under 10 documents
    # is named, not failed.
    val = result.stages["tokenize"].index["counters"]["val_documents"]
    assert val < 10 and rep["warnings"] == [
        f"tokenize: the validation split holds {val} document(s) ({rep['stages']['tokenize']['val_tokens']:,} "
        "tokens), fewer than 10: its loss is noise; raise tokenize.val_fraction or add documents"
    ]
    page, figures = build_html(work)
    assert re.findall(r"<h3>source (\w+)</h3>", page)[:2] == ["docs", "code"]
    assert "⚠ tokenize: the validation split holds" in page and "Every cluster (1), the kept document" in page
    assert figures["metrics"]["report.code.documents.after_deduplication_across_sources"] == len(code)
    assert figures["metrics"]["report.docs.documents.after_deduplication_across_sources"] == len(docs) - 1
    # Each instance is an MLflow stage run of its own, with its counters and its dataset in and out.
    client = mlflow.MlflowClient(parse_config(raw, "test").tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("lmforge").experiment_id],
        f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
    )
    by_stage = {r.data.tags["lmforge.stage"]: r for r in runs}
    assert set(by_stage) == set(result.stages)
    assert by_stage["clean[code]"].data.metrics["documents_in"] == len(code)
    assert {d.dataset.name for d in by_stage["dedup_across"].inputs.dataset_inputs} == {
        "dedup[docs]", "dedup[code]", "dedup_across"
    }  # fmt: skip
    # A filter changed for docs alone: docs' chain and what follows rerun, code's stays cached.
    changed = json.loads(json.dumps(raw))
    changed["sources"]["docs"]["clean"] = {"c4": None}
    plan = {
        e.stage: e.action for e in Pipeline(parse_config(changed, "test")).plan(Selection(until="tokenize"))
    }
    assert plan == {
        "clean[docs]": "run", "dedup[docs]": "run", "clean[code]": "cached", "dedup[code]": "cached",
        "dedup_across": "run", "tokenize": "run",
    }  # fmt: skip
    assert read_index(work / "sources" / "code" / "clean")["cache_key"] == result.plan[2].key
    assert np.isfinite(rep["stages"]["tokenize"]["tokens"])


# -- configs/sources.yaml end to end (one training launch) -------------------------------------------------
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.system
def test_the_mixture_config_crawls_reads_and_trains_on_each_source_by_its_share_in_lineage_and_report(
    ray_session, tmp_path
):
    """configs/mixture.yaml (configs/sources.yaml's three sources, mixed 60/30/10 then annealed): each
    source's chain, the tokens seen from each within one sequence of the hand-computed share, logged at
    every step, held-out metrics per source, the mixture in the lineage and the report."""
    from mlflow.tracking import MlflowClient

    from orchestration.config import load_config
    from orchestration.lineage import render, walk
    from tests.conftest import lasting_port

    data = REPO / "configs" / "data"
    overrides = {
        "workdir": str(tmp_path / "work"),
        "tracking": {"experiment": "sources-test"},
        "sources": {
            "web": {"demo_site": {"modules": 8, "port": lasting_port()}},
            "docs": {"read": {"paths": [str(data / "docs.jsonl")]}},
            "code": {"read": {"paths": [str(data / "code.parquet")]}},
        },
        "tokenize": {"tokenizer": {"vocab_size": 1024}},
        "train": {"model": {"n_embd": 32, "n_head": 2}, "seq_len": 64, "steps": 8, "warmup_steps": 2},
    }
    cfg = load_config(REPO / "configs" / "mixture.yaml", overrides)
    result = Pipeline(cfg).run()
    names = [
        "crawl[web]",
        "clean[web]",
        "dedup[web]",
        "clean[docs]",
        "dedup[docs]",
        "clean[code]",
        "dedup[code]",
    ]
    assert list(result.stages) == [*names, "dedup_across", "tokenize", "train", "evaluate"]
    # Each source read what ships (or what the demo site served), through its own filters.
    docs_in = sum(1 for _ in (data / "docs.jsonl").open())
    assert result.stages["clean[docs]"].index["counters"]["documents_in"] == docs_in
    assert (
        result.stages["clean[code]"].index["counters"]["documents_in"]
        == pq.read_metadata(data / "code.parquet").num_rows
    )
    assert "language.in" not in result.stages["clean[code]"].index["counters"]  # switched off for code
    crawl = result.stages["crawl[web]"].index["counters"]
    assert crawl["pages_fetched"] == crawl["demo_pages_served"] > 8
    tokens = result.stages["tokenize"].index
    assert set(tokens["sources"]) == {"web", "docs", "code"}
    kept = result.stages["dedup_across"].index["counters"]
    assert all(tokens["sources"][s]["documents"] == kept[f"kept.{s}"] > 0 for s in tokens["sources"])
    summary = result.stages["train"].index["summary"]
    assert summary["losses"][-1] < summary["losses"][0] and "val_loss" in result.metrics
    # 8 steps of 16 sequences of 64 tokens; the anneal starts at round(0.8 * 8) = step 6: 96 samples at
    # 0.6/0.3/0.1, then 32 at 0.3/0.6/0.1 (the weights of configs/mixture.yaml).
    train = result.stages["train"].index["counters"]
    target = {"web": 96 * 0.6 + 32 * 0.3, "docs": 96 * 0.3 + 32 * 0.6, "code": 96 * 0.1 + 32 * 0.1}
    for source, samples in target.items():
        assert abs(train[f"tokens_seen.{source}"] / 64 - samples) < 1, source
        assert (
            train[f"repetition.{source}"]
            == train[f"tokens_seen.{source}"] / tokens["sources"][source]["train_tokens"]
        )
        assert f"val_bits_per_byte.{source}" in result.metrics  # each source's own held-out split
    assert sum(train[f"tokens_seen.{s}"] for s in target) == train["tokens_seen"] == 8 * 16 * 64
    # web is rehydrated: the demo site's duplicated pages count as often as their copies (cap 3).
    sequences = result.stages["train"].index["summary"]["mixture"]["source_sequences"]
    web = TokenSequences(result.stages["tokenize"].out_dir, "train", 64, source="web")
    assert sequences["web"] == web.multiplicity(3).sum() > len(web)
    client = MlflowClient(cfg.tracking_uri)
    run_id = client.get_logged_model(result.model_id).source_run_id
    web = client.get_metric_history(run_id, "mixture/tokens.web")
    assert (
        sorted(m.step for m in web) == list(range(1, 9))
        and max(m.value for m in web) == train["tokens_seen.web"]
    )
    # The model's lineage walks back through every source's chain to the crawl and the read files.
    found = walk(f"models:/lmforge-mixture/{result.model_version}", cfg.tracking_uri)
    assert {step["stage"] for step in found["chain"]} == set(result.stages) - {"evaluate"}
    assert {s: int(f["tokens_seen"]) for s, f in found["model"]["mixture"].items()} == {
        s: train[f"tokens_seen.{s}"] for s in target
    }
    assert any(line.startswith("    mixture source docs: ") for line in render(found))
    assert found["pipeline_run"]["sources"]["sources.docs.read.paths"] == str([str(data / "docs.jsonl")])
    assert "sources.docs.crawl.max_pages" not in found["pipeline_run"]["sources"]
    # The report: every check passes, and each source has its funnel.
    rep = json.loads((tmp_path / "work" / "report.json").read_text())
    assert rep["ok"], [k for k, ok in rep["checks"].items() if not ok]
    page = (tmp_path / "work" / "report.html").read_text()
    assert re.findall(r"<h3>source (\w+)</h3>", page)[:3] == ["web", "docs", "code"]
    assert "<h3>Mixture</h3>" in page and "web realised" in page and "held-out split of source" in page
    # The funnel names the URLs that gave no page (the site's robots.txt refuses its private pages), and
    # the lineage table counts a token dataset's documents once.
    refused = crawl["failed.robots_disallowed"]
    assert refused > 0 and f"<tr><td>robots_disallowed</td><td>{refused}</td></tr>" in page
    assert f"<td>{tokens['documents']} documents</td>" in page
    # A filter changed for code alone reruns code's chain and what reads it, the crawl and the others' stay.
    changed = cfg.model_copy(
        update={
            "sources": {**cfg.sources, "code": cfg.sources["code"].model_copy(update={"dedup": cfg.dedup})}
        }
    )
    plan = {e.stage: e.action for e in Pipeline(changed).plan()}
    assert [s for s, a in plan.items() if a == "run"] == [
        "dedup[code]",
        "dedup_across",
        "tokenize",
        "train",
        "evaluate",
    ]
    assert {a for s, a in plan.items() if s in names and s != "dedup[code]"} == {"cached"}


@pytest.mark.unit
def test_the_command_line_plans_an_instance_and_names_instances_as_text(tmp_path):
    """``--only clean[code]`` on the command line, and an error naming instances, printed with their
    brackets (rich would take ``[code]`` for a style and drop it)."""
    import yaml
    from typer.testing import CliRunner

    from orchestration.cli import app

    (tmp_path / "docs.jsonl").write_text(json.dumps({"id": "d0", "text": "some text"}) + "\n")
    pq.write_table(pa.table({"id": ["c0"], "content": ["x = 1"]}), tmp_path / "code.parquet")
    config = tmp_path / "multi.yaml"
    config.write_text(yaml.safe_dump(_raw(tmp_path), sort_keys=False))
    runner = CliRunner()
    done = runner.invoke(
        app, ["run", str(config), "--dry-run", "--only", "clean[code]"], env={"COLUMNS": "200"}
    )
    assert done.exit_code == 0, done.output
    assert "1 stage(s) would run: clean[code]" in done.stdout and "│ clean[code] │ run" in done.stdout
    done = runner.invoke(
        app, ["run", str(config), "--dry-run", "--only", "clean[web]"], env={"COLUMNS": "300"}
    )
    assert done.exit_code != 0
    assert (
        "--only clean[web]: this config has no clean[web] stage (its stages: clean[docs], dedup[docs],"
        in " ".join(done.output.split())
    )


@pytest.mark.unit
def test_the_model_tags_digest_each_mixture_entrys_own_training_shards():
    import hashlib

    from orchestration.stages.train import _mixture_tags

    shards = [
        {"source": "web", "tier": 2, "sha256": "a"},
        {"source": "web", "tier": 1, "sha256": "b"},
        {"source": "docs", "sha256": "c"},
        {"source": "docs", "sha256": "d"},
    ]
    index = {
        "mixture": {"sources": {"web.tier2": {}, "docs": {}}},
        "counters": {"tokens_seen.web.tier2": 64, "repetition.web.tier2": 0.5, "tokens_seen.docs": 32,
                     "repetition.docs": 2.0},
    }  # fmt: skip
    tags = _mixture_tags(index, {"splits": {"train": {"shards": shards}}})
    assert tags["lmforge.mixture.web.tier2.shards_digest"] == hashlib.sha256(b"a").hexdigest()[:16]
    assert tags["lmforge.mixture.docs.shards_digest"] == hashlib.sha256(b"cd").hexdigest()[:16]
    assert tags["lmforge.mixture.web.tier2.tokens_seen"] == "64"
