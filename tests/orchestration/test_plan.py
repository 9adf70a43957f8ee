"""Stage selection, content-keyed caching and the dry-run plan (orchestration/plan.py), on a real
pipeline over a small corpus read from ``read.paths`` (local Ray, no training)."""

import json
import random
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from core.manifest import read_table, write_index
from core.stage import StageConfig
from orchestration.cli import app
from orchestration.component import StageComponent, last
from orchestration.config import ConfigError, PipelineConfig, parse_config
from orchestration.pipeline import Pipeline
from orchestration.plan import PARTS_FILE, Selection, changes, code_digests, key_of, module_closure
from orchestration.stage_files import write_json
from orchestration.stages import register, stage_names, unregister
from tests.fixtures import copy_of, prose

pytestmark = pytest.mark.integration

ORDER = ["crawl", "clean", "dedup", "tokenize", "train", "evaluate"]
DEPS = {
    "crawl": (),
    "clean": ("crawl",),
    "dedup": ("clean",),
    "tokenize": ("dedup",),
    "train": ("tokenize",),
    "evaluate": ("train", "tokenize"),
}


def test_selection_picks_a_range_a_subset_and_the_outputs_they_read():
    def resolve(**kw):
        return Selection(**kw).resolve(ORDER, DEPS, ORDER)

    assert resolve() == (ORDER, ORDER)
    assert resolve(until="dedup") == (ORDER[:3], ORDER[:3])
    # Train only, from existing shards: tokenize and what it read are used as they are.
    assert resolve(only=("train",)) == (["train"], ORDER[:5])
    assert resolve(start="train") == (["train", "evaluate"], ORDER)
    assert resolve(only=("crawl", "tokenize")) == (["crawl", "tokenize"], ORDER[:4])
    assert resolve(start="clean", until="dedup", force=("dedup",)) == (["clean", "dedup"], ORDER[:3])
    for kw, message in [
        ({"only": ("dedupe",)}, "--only dedupe: no such stage"),
        ({"start": "train", "until": "clean"}, "--from train comes after --until clean"),
        ({"until": "dedup", "force": ("train",)}, "--force train: the selection does not run train"),
    ]:
        with pytest.raises(ValueError, match=message):
            resolve(**kw)
    # A config without a crawl stage (no seeds) or without fine-tuning says so.
    with pytest.raises(ValueError, match="this config has no crawl stage"):
        Selection(only=("crawl",)).resolve(ORDER[1:], DEPS, ORDER)


def test_a_stage_code_is_its_module_import_closure_and_no_wider():
    """Each stage's code (in its cache key) is its component module's import closure: the crawl's holds no
    cleaning, training or evaluation code; clean's holds the filters but not the tokenizer; a module
    imported for type annotations only (``if TYPE_CHECKING:``) is in no closure."""
    crawl = module_closure(["orchestration.stages.crawl"])
    assert {"orchestration.stages.crawl", "orchestration.crawl", "ingestion.crawler", "core.files"} <= set(
        crawl
    )
    assert not any(m.startswith(("cleaning.", "training.", "evaluation.")) for m in crawl)
    clean = module_closure(["orchestration.stages.clean"])
    assert {"cleaning.filters", "cleaning.extract", "orchestration.executors"} <= set(clean)
    # No training code, no other stage (the crawl's output is read through its manifest, not its code).
    assert [m for m in clean if m.startswith(("training.", "orchestration.stages."))] == [
        "orchestration.stages.clean"
    ]
    assert "orchestration.crawl" not in clean
    dedup = code_digests(["orchestration.stages.dedup"])
    assert {"cleaning/dedup_phases.py", "cleaning/minhash.py", "orchestration/executors.py"} <= set(dedup)
    assert "ingestion/crawler.py" not in dedup and "training/data/tokenizer.py" not in dedup
    assert "training/data/tokenizer.py" in code_digests(["orchestration.stages.tokenize"])
    assert "evaluation.loglikelihood" not in module_closure(["evaluation.tasks"])  # TYPE_CHECKING only
    assert "evaluation.loglikelihood" in module_closure(["evaluation.perplexity"])


def test_changes_name_the_config_fields_files_inputs_and_modules_that_differ():
    old = {
        "config": {"gopher": {"min_words": 50, "max_words": 10}, "pii": None},
        "files": {"clean.url_blocklist.path": "aa"},
        "inputs": {"crawl": "11"},
        "code": {"cleaning/filters.py": "f1", "core/files.py": "c1"},
    }
    new = json.loads(json.dumps(old))
    assert changes(old, new) == [] and key_of(old) == key_of(new)
    new["config"]["gopher"]["min_words"] = 40
    new["files"]["clean.url_blocklist.path"] = "bb"
    new["code"]["cleaning/filters.py"] = "f2"
    new["code"]["cleaning/pii.py"] = "p1"
    assert changes(old, new) == [
        "config gopher.min_words",
        "file clean.url_blocklist.path",
        "code cleaning/filters.py",
        "code cleaning/pii.py",
    ]
    assert key_of(old) != key_of(new)
    assert changes(None, new) == ["cache key (made before lmforge kept its parts)"]


BLOCKLIST = "# nothing blocked yet\n"


@pytest.fixture(scope="module")
def planned_once(ray_session, tmp_path_factory):
    """A read.paths corpus with a URL block list; clean -> dedup -> tokenize run once for the module."""
    root = tmp_path_factory.mktemp("plan")
    rng = random.Random(3)
    lines = []
    for i in range(16):
        text = prose(rng)
        lines.append(json.dumps({"id": f"d{i:02d}", "text": text, "url": f"https://site{i % 4}.org/{i}"}))
    (root / "dump.jsonl").write_text("\n".join(lines) + "\n")
    blocklist = root / "blocklist.txt"
    blocklist.write_text(BLOCKLIST)
    raw = {
        "name": "plan",
        "workdir": str(root / "work"),
        "read": {"paths": [str(root / "dump.jsonl")]},
        "clean": {"gopher_repetition": None, "url_blocklist": {"path": str(blocklist)}},
        "dedup": {"shards": 1},
        "tokenize": {"tokenizer": {"vocab_size": 300, "min_frequency": 1}, "val_fraction": 0.2},
    }
    first = Pipeline(parse_config(raw, "test")).run(until="tokenize")
    return raw, blocklist, first


@pytest.fixture
def planned(planned_once, tmp_path):
    """A private copy of that work dir, with the block list as the first run read it (stage keys hold the
    list's content, not its mtime, so the copy is up to date)."""
    raw, blocklist, first = planned_once
    blocklist.write_text(BLOCKLIST)
    raw = {**raw, "workdir": str(copy_of(Path(raw["workdir"]), tmp_path / "work"))}
    return raw, parse_config(raw, "test"), blocklist, first


def _plan(cfg, **kw):
    return {e.stage: (e.action, e.reason) for e in Pipeline(cfg).plan(Selection(until="tokenize", **kw))}


def test_an_unchanged_rerun_does_no_work_and_a_block_list_edit_reruns_clean_and_downstream(planned):
    raw, cfg, blocklist, first = planned
    assert list(first.stages) == ["clean", "dedup", "tokenize"]  # no seeds: no crawl stage
    assert {e.stage: e.action for e in first.plan} == {"clean": "run", "dedup": "run", "tokenize": "run"}
    assert {s: a for s, (a, _) in _plan(cfg).items()} == {
        "clean": "cached",
        "dedup": "cached",
        "tokenize": "cached",
    }
    start = time.perf_counter()
    again = Pipeline(cfg).run(until="tokenize")
    assert all(s.cached for s in again.stages.values()) and time.perf_counter() - start < 30

    # The block list is keyed by its content: a new mtime alone changes nothing ...
    blocklist.write_text("# nothing blocked yet\n")
    assert {a for a, _ in _plan(cfg).values()} == {"cached"}
    # ... a listed site reruns clean (which reads the list) and what follows it, and the plan says so first.
    blocklist.write_text("site1.org\n")
    plan = _plan(cfg)
    assert plan["clean"] == ("run", "changed: file clean.url_blocklist.path")
    assert plan["dedup"] == ("run", "its input clean is rebuilt first")
    assert plan["tokenize"] == ("run", "its input dedup is rebuilt first")
    edited = Pipeline(cfg).run(until="tokenize")
    assert [n for n, s in edited.stages.items() if not s.cached] == ["clean", "dedup", "tokenize"]
    clean = edited.stages["clean"].index["counters"]
    assert clean["rejected.url_blocklist"] == 4  # site1.org: documents 1, 5, 9, 13
    # In the run itself each rebuilt input is known by then, and its new digest is the change.
    assert [e.reason for e in edited.plan] == [
        "changed: file clean.url_blocklist.path",
        "changed: input clean",
        "changed: input dedup",
    ]

    # A config edit names the field; code that differs from what built an output names the module.
    tweaked = parse_config({**raw, "clean": {**raw["clean"], "gopher": {"min_doc_words": 20}}}, "test")
    assert _plan(tweaked)["clean"] == ("run", "changed: config clean.gopher.min_doc_words")
    clean_dir = cfg.workdir / "clean"
    parts = json.loads((clean_dir / PARTS_FILE).read_text())
    parts["code"]["cleaning/filters.py"] = "0" * 16  # as if an older filters.py had built it
    (clean_dir / PARTS_FILE).write_text(json.dumps(parts))
    index = json.loads((clean_dir / "index.json").read_text())
    (clean_dir / "index.json").write_text(json.dumps({**index, "cache_key": key_of(parts)}))
    assert _plan(cfg)["clean"] == ("run", "changed: code cleaning/filters.py")


def test_only_force_and_unselected_outputs_used_as_they_are(planned):
    raw, cfg, blocklist, first = planned
    shards = first.stages["tokenize"].index
    # Dedup alone, forced: clean is read as it is; tokenize after it is not run.
    forced = Pipeline(cfg).run(selection=Selection(only=("dedup",), force=("dedup",)))
    assert list(forced.stages) == ["clean", "dedup"]
    assert [(e.stage, e.action) for e in forced.plan] == [("clean", "use"), ("dedup", "run")]
    assert forced.plan[1].reason == "forced (--force)" and not forced.stages["dedup"].cached
    # Deterministic dedup: the same output, so tokenize stays cached.
    assert _plan(cfg)["tokenize"] == ("cached", "unchanged")

    # A stale unselected stage is used as it is, and the plan says what changed since it ran.
    blocklist.write_text("site2.org\n")
    plan = _plan(cfg, only=("tokenize",))
    assert plan["clean"] == (
        "use",
        "not selected: used as it is, stale (file clean.url_blocklist.path changed since it ran)",
    )
    assert plan["dedup"] == ("use", "not selected: used as it is (up to date)")
    assert plan["tokenize"] == ("cached", "unchanged")
    tokens = Pipeline(cfg).run(selection=Selection(only=("tokenize",)))
    assert tokens.stages["tokenize"].cached and tokens.stages["tokenize"].index == shards

    # A selected stage that reads an output never made is refused before anything runs.
    fresh = parse_config({**raw, "workdir": str(cfg.workdir.parent / "empty")}, "test")
    fresh_plan = _plan(fresh, only=("tokenize",))
    assert fresh_plan["dedup"][0] == "missing"
    assert fresh_plan["tokenize"] == ("blocked", "its input dedup is missing")
    with pytest.raises(ConfigError, match="stage clean: not selected and .* holds no finished output"):
        Pipeline(fresh).run(selection=Selection(only=("tokenize",)))
    with pytest.raises(ConfigError, match="--only crawl: this config has no crawl stage"):
        Pipeline(cfg).plan(Selection(only=("crawl",)))


def test_lmforge_run_dry_run_prints_the_plan_and_runs_nothing(planned, tmp_path):
    raw, cfg, blocklist, _ = planned
    blocklist.write_text("site3.org\n")
    config = tmp_path / "plan.yaml"
    config.write_text(yaml.safe_dump(raw))
    index = cfg.workdir / "clean" / "index.json"
    before = (sorted(p.name for p in cfg.workdir.iterdir()), index.stat().st_mtime_ns)
    # The command line in this process (a fresh interpreter imports torch again), as wide as a terminal.
    done = CliRunner().invoke(
        app, ["run", str(config), "--dry-run", "--until", "tokenize"], env={"COLUMNS": "160"}
    )
    assert done.exit_code == 0, done.output
    rows = {line.split("│")[1].strip(): line for line in done.stdout.splitlines() if line.count("│") == 4}
    assert "run" in rows["clean"] and "file clean.url_blocklist.path" in rows["clean"]
    assert "its input clean is rebuilt first" in rows["dedup"]
    assert "3 stage(s) would run: clean, dedup, tokenize" in done.stdout
    assert (sorted(p.name for p in cfg.workdir.iterdir()), index.stat().st_mtime_ns) == before


# -- a stage from outside the package: one component plus its config field --------------------------
class CountConfig(StageConfig):
    min_words: int = 20


class CountingConfig(PipelineConfig):
    count: CountConfig | None = None


class Count(StageComponent):
    """Counts the words of the last document stage's output (dedup's here) and its documents of at least
    ``min_words`` words; a side branch of the DAG: tokenize still reads dedup."""

    name = "count"
    produces = "counts"

    def enabled(self, cfg):
        return getattr(cfg, "count", None) is not None

    def reads(self, cfg, before):
        return last(before, "documents")

    def key_config(self, cfg):
        return cfg.count

    def build(self, ctx, out, key, inputs):
        (docs,) = inputs
        words = [len(t.split()) for t in read_table(ctx.outcome(docs).store).column("text").to_pylist()]
        counters = {
            "documents_in": len(words),
            "words": sum(words),
            "long_documents": sum(w >= ctx.cfg.count.min_words for w in words),
        }
        files = [write_json(out, "counts.json", counters)]
        return write_index(
            out, stage="count", kind="counts", cache_key=key, files=files, inputs=inputs, counters=counters
        )


@pytest.fixture
def counting():
    register(Count(), after="dedup")
    yield
    unregister("count")


def test_a_stage_registered_from_outside_runs_caches_and_plans_as_the_built_in_ones(planned, counting):
    from mlflow.tracking import MlflowClient

    raw, _, _, first = planned
    assert stage_names()[:4] == ("crawl", "clean", "dedup", "count")
    cfg = CountingConfig.model_validate({**raw, "count": {"min_words": 20}})
    result = Pipeline(cfg).run(until="count")
    assert [(e.stage, e.action) for e in result.plan] == [
        ("clean", "cached"),
        ("dedup", "cached"),
        ("count", "run"),
    ]
    texts = read_table(first.stages["dedup"].out_dir).column("text").to_pylist()  # by hand, from its input
    counters = result.stages["count"].index["counters"]
    assert counters["words"] == sum(len(t.split()) for t in texts) > 0
    assert counters["long_documents"] == sum(len(t.split()) >= 20 for t in texts)
    assert json.loads((cfg.workdir / "count" / "counts.json").read_text()) == counters
    # Its MLflow run, nested in the pipeline's, as every stage's: its counters and its dataset in.
    client = MlflowClient(cfg.tracking_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        f"tags.mlflow.parentRunId = '{result.parent_run_id}' and tags.lmforge.stage = 'count'",
    )
    assert (
        run.data.metrics["words"] == counters["words"]
        and run.inputs.dataset_inputs[0].dataset.name == "dedup"
    )
    # A rerun finds it cached; its own config change reruns it alone (tokenize reads dedup, not it); its
    # code is this module's (its key's code part), and --only names it.
    assert {e.stage: e.action for e in Pipeline(cfg).plan(Selection(until="tokenize"))} == {
        "clean": "cached", "dedup": "cached", "count": "cached", "tokenize": "cached"
    }  # fmt: skip
    changed = CountingConfig.model_validate({**raw, "count": {"min_words": 5}})
    plan = {e.stage: (e.action, e.reason) for e in Pipeline(changed).plan(Selection(until="tokenize"))}
    assert plan["count"] == ("run", "changed: config min_words") and plan["tokenize"][0] == "cached"
    parts = json.loads((cfg.workdir / "count" / PARTS_FILE).read_text())
    assert "tests/orchestration/test_plan.py" in parts["code"]
    only = Pipeline(changed).plan(Selection(only=("count",)))
    assert [(e.stage, e.action) for e in only] == [("clean", "use"), ("dedup", "use"), ("count", "run")]
