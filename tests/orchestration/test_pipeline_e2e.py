"""The demo pipeline end to end on a smaller site: real HTTP server, Ray, DeepSpeed via Ray Train, MLflow."""

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner
from warcio.archiveiterator import ArchiveIterator

from core.manifest import index_digest, iter_parquet, read_table
from evaluation.tasks import resolve_task
from ingestion.readers import find_html
from orchestration.cli import app
from orchestration.config import load_config
from orchestration.lineage import walk
from orchestration.pipeline import Pipeline, run_pipeline
from orchestration.plan import Selection
from orchestration.tracking import start_mlflow_ui, wait_until_ready
from tests.conftest import free_port, lasting_port
from tests.fixtures import copy_of
from training.data.tokenizer import load_tokenizer

pytestmark = pytest.mark.system

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
STAGES = ["crawl", "clean", "dedup", "tokenize", "train", "evaluate"]


PORT = lasting_port()  # one port for every run: page URLs, and so document ids, must not differ


def _demo(workdir):
    overrides = {
        "workdir": str(workdir),
        "demo_site": {
            "modules": 12,
            "exact_duplicates": 2,
            "near_duplicates": 2,
            "private_pages": 2,
            "port": PORT,
        },
        "tokenize": {"tokenizer": {"vocab_size": 1024}, "val_fraction": 0.2},
        "train": {
            "model": {"n_embd": 64, "n_head": 2},
            "seq_len": 64,
            "micro_batch_size": 4,
            "steps": 16,
            "warmup_steps": 2,
            "checkpoint_every": 8,
        },
        "evaluate": {"tasks": ["arc_easy", "copa"], "task_limit": 40},
        "tracking": {
            "registered_model": "lmforge-e2e",
            "promote": [
                {"alias": "good", "metric": "val_loss", "below": 100.0},
                {"alias": "great", "metric": "arc_easy/acc", "above": 0.99},
            ],
        },
    }
    cfg = load_config(DEMO, overrides)
    return cfg, run_pipeline(cfg)


@pytest.fixture(scope="module")
def demo_run(ray_session, tmp_path_factory):
    return _demo(tmp_path_factory.mktemp("demo"))


def test_crawl_fetched_every_page_the_site_served(demo_run):
    cfg, result = demo_run
    manifest = json.loads((cfg.workdir / "site" / "manifest.json").read_text())
    crawl = result.stages["crawl"].index["counters"]
    assert crawl["pages_fetched"] == crawl["demo_pages_served"] == len(manifest["pages"])
    assert crawl["failed.robots_disallowed"] == len(manifest["disallowed"])
    assert crawl["crawl_workers"] == 1  # one host: one crawl worker started, not the pool's cap
    assert result.stages["clean"].index["counters"]["documents_in"] == crawl["pages_fetched"]


def test_every_extracted_document_is_kept_or_rejected_with_a_reason(demo_run):
    _, result = demo_run
    for stage in ("clean", "dedup"):
        out = result.stages[stage].out_dir
        kept, rejected = read_table(out), read_table(out / "rejected")
        assert result.stages[stage].index["counters"]["documents_in"] == kept.num_rows + rejected.num_rows
        assert not set(kept.column("id").to_pylist()) & set(rejected.column("id").to_pylist())
        assert all(rejected.column("filter").to_pylist()) and all(rejected.column("signal").to_pylist())


def test_planted_duplicates_are_removed_pointing_at_the_kept_copy(demo_run):
    cfg, result = demo_run
    manifest = json.loads((cfg.workdir / "site" / "manifest.json").read_text())
    clean = read_table(result.stages["clean"].out_dir).to_pylist()
    base = "{0.scheme}://{0.netloc}".format(urlsplit(clean[0]["url"]))
    dedup_kept = {r["url"]: r["id"] for r in read_table(result.stages["dedup"].out_dir).to_pylist()}
    removed = {r["url"]: r for r in read_table(result.stages["dedup"].out_dir / "rejected").to_pylist()}
    clean_urls = {r["url"] for r in clean}
    for kind, filter_name in (("exact_duplicates", "exact_dedup"), ("near_duplicates", "minhash_dedup")):
        for copy, original in manifest[kind].items():
            pair = [base + copy, base + original]
            assert all(u in clean_urls for u in pair), f"{pair} should pass the quality filter"
            (survivor,) = [u for u in pair if u in dedup_kept]
            (dropped,) = [u for u in pair if u in removed]
            assert removed[dropped]["filter"] == filter_name
            assert removed[dropped]["duplicate_of"] == dedup_kept[survivor]


def test_shard_token_counts_match_the_tokenizer(demo_run):
    _, result = demo_run
    tok_dir = result.stages["tokenize"].out_dir
    index = result.stages["tokenize"].index
    tokenizer = load_tokenizer(tok_dir / "tokenizer.json")
    docs = read_table(result.stages["dedup"].out_dir)
    expected = sum(
        len(e.ids) + 1
        for e in tokenizer.encode_batch(docs.column("text").to_pylist(), add_special_tokens=False)
    )
    stored = sum(
        pa.ipc.open_file(pa.memory_map(str(tok_dir / s["path"]))).read_all().num_rows
        for split in index["splits"].values()
        for s in split["shards"]
    )
    assert index["total_tokens"] == stored == expected
    assert sum(s["documents"] for s in index["splits"].values()) == docs.num_rows
    assert index["splits"]["val"]["documents"] >= 1


def test_training_loss_falls_and_the_model_evaluates(demo_run):
    cfg, result = demo_run
    losses = result.stages["train"].index["summary"]["losses"]
    assert len(losses) == cfg.train.steps
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    vocab = result.stages["tokenize"].index["tokenizer"]["vocab_size"]
    assert result.metrics["val_loss"] < math.log(vocab)  # better than uniform over the vocabulary
    assert result.metrics["val_perplexity"] == pytest.approx(math.exp(result.metrics["val_loss"]))
    report = json.loads(result.report_path.read_text())
    assert report["ok"], report["checks"]
    # The planted exact and near duplicates are clusters of two in the report.
    dedup = report["stages"]["dedup"]
    assert dedup["duplicate_clusters"] == cfg.demo_site.exact_duplicates + cfg.demo_site.near_duplicates
    assert set(dedup["largest_clusters"].values()) == {2}


def test_mlflow_run_tree_dataset_links_and_model_lineage(demo_run):
    cfg, result = demo_run
    client = MlflowClient(cfg.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{result.parent_run_id}'"
    )
    by_name = {r.info.run_name: r for r in children}
    # Artifacts (models, reports) stay in the work dir, not in ./mlruns of whatever directory ran it.
    assert parent.info.artifact_uri.startswith((cfg.workdir.resolve() / "mlartifacts").as_uri())
    assert set(STAGES) <= set(by_name)
    assert by_name["clean"].data.metrics["kept"] == result.stages["clean"].index["counters"]["kept"]
    tokens_digest = index_digest(result.stages["tokenize"].index)
    train_inputs = {(d.dataset.name, d.dataset.digest) for d in by_name["train"].inputs.dataset_inputs}
    assert ("tokenize", tokens_digest) in train_inputs
    tok_outputs = {(d.dataset.name, d.dataset.digest) for d in by_name["tokenize"].inputs.dataset_inputs}
    assert ("tokenize", tokens_digest) in tok_outputs
    # Each stage output carries its profile and schema (the dedup output read back with pyarrow).
    datasets = {d.dataset.name: d.dataset for d in by_name["tokenize"].inputs.dataset_inputs}
    tok_profile = json.loads(datasets["tokenize"].profile)
    assert tok_profile["tokens"] == result.stages["tokenize"].index["counters"]["tokens"]
    dedup_dir = result.stages["dedup"].out_dir
    dedup_profile, dedup_schema = json.loads(datasets["dedup"].profile), json.loads(datasets["dedup"].schema)
    parquet = [
        dedup_dir / f["path"] for f in result.stages["dedup"].index["files"] if f["path"].endswith(".parquet")
    ]
    assert dedup_profile["rows"] == sum(pq.read_metadata(f).num_rows for f in parquet) > 0
    columns = {c["name"]: c["type"] for c in dedup_schema["mlflow_colspec"]}
    assert columns["text"] == "string" and columns["meta"] == "map" and columns["fetched_at"] == "datetime"
    assert "loss" in by_name["train"].data.metrics  # logged by Ray Train rank 0
    model = client.get_logged_model(result.model_id)
    assert model.source_run_id == by_name["train"].info.run_id
    assert model.tags["lmforge.shards_digest"] == tokens_digest
    val = {m.key: m for m in model.metrics}
    assert val["val_loss"].value == pytest.approx(result.metrics["val_loss"])
    assert val["val_loss"].dataset_digest == tokens_digest
    # Benchmark scores are logged against the model and the task's data, named by its digest.
    for task in ("arc_easy", "copa"):
        assert val[f"{task}/examples"].value == 40
        assert 0 <= val[f"{task}/acc"].value <= 1
        assert val[f"{task}/acc"].dataset_digest == resolve_task(task).digest()[:16]
        assert val[f"{task}/acc"].value == pytest.approx(result.metrics[f"{task}/acc"])
    assert val["val_bits_per_byte"].value > 0
    version = client.get_model_version("lmforge-e2e", result.model_version)
    assert version.tags["lmforge.shards_digest"] == tokens_digest
    # The checkpoints kept on disk are logged models too, at their steps, with the model's lineage tags.
    checkpoints = client.search_logged_models(
        experiment_ids=[parent.info.experiment_id], filter_string="name = 'demo-checkpoint'"
    )
    kept = sorted(int(p.name[4:]) for p in (cfg.workdir / "train" / "checkpoints").glob("step*"))
    assert kept and sorted(int(m.tags["lmforge.checkpoint_step"]) for m in checkpoints) == kept
    assert all(m.source_run_id == by_name["train"].info.run_id for m in checkpoints)
    assert all(m.tags["lmforge.shards_digest"] == tokens_digest for m in checkpoints)
    # The new version is the candidate; a promotion rule that passes moves its alias, one that fails does not.
    assert client.get_model_version_by_alias("lmforge-e2e", "candidate").version == result.model_version
    assert client.get_model_version_by_alias("lmforge-e2e", "good").version == result.model_version
    assert sorted(version.aliases) == ["candidate", "good"]
    assert version.tags["lmforge.promotion.great"].startswith("not promoted to @great: arc_easy/acc = ")


def test_lineage_walks_from_the_model_version_back_to_the_crawl(demo_run, tmp_path):
    cfg, result = demo_run
    uri = f"models:/lmforge-e2e/{result.model_version}"
    found = walk(uri, cfg.tracking_uri)
    assert found["model"]["model_id"] == result.model_id
    assert found["model"]["tags"]["lmforge.shards_digest"] == index_digest(result.stages["tokenize"].index)
    chain = found["chain"]
    assert [step["stage"] for step in chain] == ["train", "tokenize", "dedup", "clean", "crawl"]
    # Every link: the dataset a stage read is the one the stage before it wrote, digests from the manifests.
    for step, below in zip(chain, chain[1:]):
        [read] = step["inputs"]
        assert read["name"] == below["stage"] and read["made_by"] == below["run_id"]
        assert read["digest"] == index_digest(result.stages[below["stage"]].index)
        assert read["digest"] in {d["digest"] for d in below["outputs"]}
    assert chain[-1]["inputs"] == [] and chain[-1]["metrics"]["pages_fetched"] > 0
    assert chain[1]["metrics"]["tokens"] == result.stages["tokenize"].index["counters"]["tokens"]
    assert found["pipeline_run"]["run_id"] == result.parent_run_id
    out = CliRunner().invoke(app, ["lineage", uri, "--tracking-uri", cfg.tracking_uri, "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout)["chain"] == json.loads(json.dumps(chain))
    missing = CliRunner().invoke(
        app, ["lineage", "models:/lmforge-e2e/99", "--tracking-uri", cfg.tracking_uri]
    )
    assert missing.exit_code == 2
    # The store can also be named by the config that logged the model, or by MLFLOW_TRACKING_URI.
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    by_config = CliRunner().invoke(app, ["lineage", uri, "--config", str(config), "--json"])
    assert by_config.exit_code == 0 and json.loads(by_config.stdout)["chain"] == json.loads(json.dumps(chain))
    by_env = CliRunner().invoke(
        app, ["lineage", uri, "--json"], env={"MLFLOW_TRACKING_URI": cfg.tracking_uri}
    )
    assert by_env.exit_code == 0
    nowhere = CliRunner().invoke(app, ["lineage", uri], env={"MLFLOW_TRACKING_URI": ""})
    assert nowhere.exit_code == 2 and "give --tracking-uri, --config" in " ".join(nowhere.output.split())


def test_rerun_is_served_from_the_stage_cache(demo_run):
    cfg, first = demo_run
    client = MlflowClient(cfg.tracking_uri)
    before = len(client.get_logged_model(first.model_id).metrics)
    second = run_pipeline(cfg)
    assert all(second.stages[s].cached for s in STAGES)
    assert second.metrics == first.metrics
    assert len(client.get_logged_model(first.model_id).metrics) == before  # nothing logged twice
    assert (second.model_id, second.model_version) == (first.model_id, first.model_version)
    assert [e.action for e in second.plan] == ["cached"] * len(STAGES)


def test_a_seeds_file_is_keyed_by_its_content_and_the_dry_run_plan_says_what_reruns(demo_run, tmp_path):
    cfg, _ = demo_run
    seeds = tmp_path / "seeds.txt"
    seeds.write_text("http://127.0.0.1:9/extra/\n")
    with_seeds = cfg.model_copy(update={"crawl": cfg.crawl.model_copy(update={"seeds_file": seeds})})
    plan = {e.stage: (e.action, e.reason) for e in Pipeline(with_seeds).plan()}
    assert plan["crawl"] == ("run", "changed: config crawl.seeds_file, file crawl.seeds_file")
    assert plan["clean"] == ("run", "its input crawl is rebuilt first")
    assert plan["evaluate"] == ("run", "its inputs train and tokenize are rebuilt first")
    assert {e.action for e in Pipeline(cfg).plan()} == {"cached"}
    # Only the crawl is selected: everything after it is left alone.
    only = Pipeline(with_seeds).plan(Selection(only=("crawl",)))
    assert [(e.stage, e.action) for e in only] == [("crawl", "run")]


def test_a_forced_rerun_of_the_same_config_gives_the_same_data_and_model(demo_run, tmp_path):
    """Every stage after the crawl run again (forced) on a copy of the work dir: every document, token,
    weight, loss and metric is the same."""
    cfg, first = demo_run
    copy = cfg.model_copy(update={"workdir": copy_of(cfg.workdir, tmp_path / "again")})
    after_crawl = tuple(s for s in STAGES if s != "crawl")
    second = Pipeline(copy).run(selection=Selection(start="clean", force=after_crawl))
    assert [(e.stage, e.action) for e in second.plan] == [("crawl", "use")] + [
        (s, "run") for s in after_crawl
    ]
    for stage in ("clean", "dedup"):
        for sub in ("", "rejected"):
            a, b = (read_table(r.stages[stage].out_dir / sub) for r in (first, second))
            assert a.equals(b), (stage, sub)
    for stage in ("tokenize", "train", "evaluate"):
        assert index_digest(first.stages[stage].index) == index_digest(second.stages[stage].index), stage
    assert (
        first.stages["train"].index["summary"]["losses"] == second.stages["train"].index["summary"]["losses"]
    )
    assert first.metrics == second.metrics


def test_a_stage_used_as_it_is_is_verified_and_a_cached_model_is_not_registered_again(demo_run, tmp_path):
    """`--only train` on a copy: with nothing changed, train is cached and no model version is added;
    with a token shard changed (its mtime set back), tokenize, used as it is, fails its sha256 check and
    the run stops naming the file, before anything trains or registers (it used to say "up to date")."""
    from orchestration.config import ConfigError

    cfg, _ = demo_run
    copy = cfg.model_copy(update={"workdir": copy_of(cfg.workdir, tmp_path / "only")})
    name = cfg.tracking.registered_model
    client = MlflowClient(copy.tracking_uri)
    before = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    again = Pipeline(copy).run(selection=Selection(only=("train",)))
    actions = {e.stage: e.action for e in again.plan}
    assert actions["tokenize"] == "use" and actions["train"] == "cached"
    assert sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'")) == before

    tokens = copy.workdir / "tokenize"
    shard = tokens / next(
        f["path"] for f in again.stages["tokenize"].index["files"] if f["path"].endswith(".arrow")
    )
    stat = shard.stat()
    with open(shard, "r+b") as f:
        f.seek(stat.st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ConfigError, match=f"stage tokenize \\(not selected, used as it is\\): {shard}"):
        Pipeline(copy).run(selection=Selection(only=("train",)))
    assert sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'")) == before


def _cut_last_record(warc: Path) -> int:
    """Truncate a gzip WARC at the start of its last record (a record boundary); returns records left."""
    with open(warc, "rb") as f:
        offsets = [(r.rec_type, it.get_record_offset()) for it in [ArchiveIterator(f)] for r in it]
    with open(warc, "r+b") as f:
        f.truncate(offsets[-1][1])
    return len(offsets) - 1


def test_a_warc_cut_at_a_record_boundary_is_recrawled_not_half_read(demo_run, tmp_path):
    """The crawl output no longer matches its manifest: the crawl is not cached but redone, and clean
    reads every page again (before: crawl stayed cached and clean read what was left)."""
    cfg, result = demo_run
    copy = copy_of(cfg.workdir, tmp_path / "copy")
    crawl = copy / "crawl"
    warc = crawl / max(result.stages["crawl"].index["files"], key=lambda f: f["rows"])["path"]
    _cut_last_record(warc)
    again = Pipeline(cfg.model_copy(update={"workdir": copy})).run(until="clean")
    assert not again.stages["crawl"].cached and not again.stages["clean"].cached
    pages = result.stages["crawl"].index["counters"]["pages_fetched"]
    assert again.stages["crawl"].index["counters"]["pages_fetched"] == pages
    assert again.stages["clean"].index["counters"]["documents_in"] == pages
    assert json.loads(again.report_path.read_text())["ok"]


def test_lineage_through_a_real_mlflow_server(demo_run, tmp_path):
    """The walk uses only the tracking API: a `mlflow server` on 127.0.0.1 over the run's store gives the
    same chain as the sqlite file."""
    cfg, result = demo_run
    port = free_port()
    server = start_mlflow_ui(cfg.tracking_uri, port, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_ready(url, server)
        uri = "models:/lmforge-e2e@candidate"
        assert walk(uri, url) == walk(uri, cfg.tracking_uri)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _shots(tmp_path: Path) -> Path:
    """Where the browser tests save their screenshots: LMFORGE_SCREENSHOTS (docs/ refreshes the README's
    pictures), else the test's temporary directory."""
    out = Path(os.environ.get("LMFORGE_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _browser():
    """Headless Chromium (Debian's, installed by .ci/install.sh) driven by playwright."""
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (make install adds Debian's)")
    return playwright.sync_playwright(), chromium


def test_the_html_report_renders_offline_in_a_real_browser(demo_run, tmp_path):
    cfg, result = demo_run
    page_path = result.workdir / "report.html"
    assert page_path.exists()
    manager, chromium = _browser()
    with manager as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_path.as_uri())
        page.wait_for_selector(".plotly-graph-div .main-svg")
        # The funnel's numbers are those of the stage manifests.
        rows = page.locator("table.funnel tbody tr").all_inner_texts()
        funnel = {r.split("\t")[0]: r.split("\t")[1].replace(",", "") for r in rows}
        clean, dedup = result.stages["clean"].index["counters"], result.stages["dedup"].index["counters"]
        assert funnel["extracted documents"] == str(clean["documents_in"])
        assert funnel["after quality filters"] == str(clean["kept"])
        assert funnel["after deduplication"] == str(dedup["kept"])
        assert funnel["tokenized"] == str(result.stages["tokenize"].index["counters"]["documents"])
        # Every plot drew something.
        plots = page.locator(".plotly-graph-div")
        assert plots.count() >= 8
        for i in range(plots.count()):
            assert plots.nth(i).locator(".main-svg").count() > 0
            assert plots.nth(i).bounding_box()["height"] > 100
        # Expanding a rejection shows its examples, with the value against the threshold.
        reason = page.locator("details.reason").first
        assert not reason.locator(".example").first.is_visible()
        reason.locator("> summary").click()
        assert reason.locator(".example").first.is_visible()
        assert "against threshold" in reason.locator(".example .meta").first.inner_text() or "duplicate" in (
            reason.inner_text()
        )
        # The raw HTML record of an example is the WARC's record of that document.
        raw = reason.locator("details.raw").first
        raw.locator("> summary").click()
        shown = raw.locator("pre").inner_text()
        doc = next(
            r
            for b in iter_parquet(result.workdir / "clean" / "rejected")
            for r in b.to_pylist()
            if r["url"] == reason.locator(".example .meta a").first.inner_text()
        )
        offset = int(dict(doc["meta"])["warc_offset"])
        assert shown == find_html(result.workdir / "crawl" / doc["source"], doc["id"], offset)[: len(shown)]
        assert shown.lstrip().lower().startswith("<!doctype html") or "<html" in shown.lower()
        # Every signal histogram draws its filter's cut (the demo config's, Gopher's defaults otherwise),
        # rejections or not; one far off the data is named in the title.
        titles = {}
        for i in range(plots.count()):
            title = plots.nth(i).locator(".gtitle").text_content() or ""
            notes = plots.nth(i).locator(".annotation-text").all_text_contents()
            titles[title.split(" (", 1)[0]] = " ".join([title, *notes])
        assert "threshold 0.65" in titles["lang_score"]
        assert "threshold 2" in titles["gopher.stop_words"]
        assert "threshold 0.5" in titles["gopher.alpha_words_ratio"]  # configs/demo.yaml relaxes it
        assert "threshold 0.9" in titles["gopher.bullet_lines_ratio"]
        assert "threshold 50" in titles["gopher.words"]
        assert "threshold 100000, off the axis" in titles["gopher.words"]
        shot = _shots(tmp_path) / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert [r for r in requests if not r.startswith(("file:", "data:"))] == []  # nothing left the page
    assert shot.stat().st_size > 50_000


def test_lmforge_ui_shows_the_runs_models_datasets_and_report(demo_run, tmp_path):
    """`lmforge ui` on the run's store, opened headless: the experiment's runs, the parent run's report
    artifact, a stage run's metrics and datasets, the registered version's alias, the logged model."""
    cfg, result = demo_run
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestration.cli", "ui", "--tracking-uri", cfg.tracking_uri, "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while not any(line.startswith("  experiment ") for line in lines):
            assert proc.poll() is None, f"lmforge ui exited: {lines}"
            assert time.monotonic() < deadline, f"no experiment link printed: {lines}"
            time.sleep(0.5)
        link = next(line for line in lines if line.startswith("  experiment ")).split(": ", 1)[1].strip()
        assert link.startswith(f"http://127.0.0.1:{port}/#/experiments/")
        assert link.endswith("?workflowType=machine_learning"), link
        client = MlflowClient(cfg.tracking_uri)
        exp = client.get_run(result.parent_run_id).info.experiment_id
        stage_runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
        clean_run = next(r for r in stage_runs if r.info.run_name == "clean")
        base = f"http://127.0.0.1:{port}/#"
        manager, chromium = _browser()
        with manager as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})

            def visit(url: str, *texts: str, shot: str) -> None:
                page.goto(url)
                for text in texts:
                    page.get_by_text(text, exact=False).first.wait_for(timeout=60_000)
                page.screenshot(path=str(_shots(tmp_path) / f"ui-{shot}.png"))

            ml = "?workflowType=machine_learning"  # the UI's workflow switch, as the printed link sets it
            visit(link, "Runs", "Models", cfg.name, shot="experiment")
            visit(
                f"{base}/experiments/{exp}/runs/{result.parent_run_id}/artifacts{ml}",
                "report.html",
                shot="parent",
            )
            clean_page = f"{base}/experiments/{exp}/runs/{clean_run.info.run_id}{ml}"
            visit(clean_page, "Datasets", "crawl", "documents_in", "kept", shot="stage")
            version = f"{base}/models/lmforge-e2e/versions/{result.model_version}{ml}"
            visit(version, "Aliases", "candidate", "lmforge.shards_digest", shot="version")
            logged = f"{base}/experiments/{exp}/models/{result.model_id}{ml}"
            visit(logged, "val_loss", "arc_easy/acc", "tokens (#", shot="model")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_a_code_edit_reruns_its_stage_and_what_follows_never_what_comes_before(demo_run, tmp_path):
    """A stage's code, in its cache key, is its component module's import closure (docs/ARCHITECTURE.md):
    `lmforge run --dry-run` on a copy of the source with the tokenizer's module edited plans crawl, clean
    and dedup cached; with the quality filters' module edited, the crawl cached and clean on rerun."""
    from orchestration.plan import PACKAGES

    cfg, _ = demo_run
    config = tmp_path / "demo.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    repo = Path(__file__).resolve().parents[2]

    def plan(edited: str) -> dict[str, tuple[str, str]]:
        src = tmp_path / edited.replace("/", "-")
        for package in PACKAGES:
            shutil.copytree(repo / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
        with open(src / edited, "a") as f:
            f.write("\n# an edit\n")
        done = subprocess.run(
            [sys.executable, "-m", "orchestration.cli", "run", str(config), "--dry-run"],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(src), "COLUMNS": "240"},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        cells = (line.split("│") for line in done.stdout.splitlines() if line.count("│") == 4)
        return {c[1].strip(): (c[2].strip(), c[3].strip()) for c in cells}

    tokenizer = plan("training/data/tokenizer.py")
    assert [tokenizer[s][0] for s in STAGES] == ["cached", "cached", "cached", "run", "run", "run"], tokenizer
    assert "code training/data/tokenizer.py" in tokenizer["tokenize"][1]
    filters = plan("cleaning/filters.py")
    assert [filters[s][0] for s in STAGES] == ["cached", "run", "run", "run", "run", "run"], filters
    assert "code cleaning/filters.py" in filters["clean"][1]


def test_a_changed_cleaning_threshold_makes_a_new_chain_and_keeps_the_old(demo_run):
    """Runs last in this module: it rebuilds the work dir from clean on."""
    cfg, first = demo_run
    old_uri = f"models:/lmforge-e2e/{first.model_version}"
    old = walk(old_uri, cfg.tracking_uri)
    texts = read_table(first.stages["clean"].out_dir).column("text").to_pylist()
    median_words = sorted(len(t.split()) for t in texts)[len(texts) // 2]
    gopher = cfg.clean.gopher.model_copy(update={"min_doc_words": median_words})
    changed = cfg.model_copy(update={"clean": cfg.clean.model_copy(update={"gopher": gopher})})
    second = run_pipeline(changed)
    assert (
        0 < second.stages["clean"].index["counters"]["kept"] < first.stages["clean"].index["counters"]["kept"]
    )
    assert second.model_version != first.model_version
    new = walk(f"models:/lmforge-e2e/{second.model_version}", cfg.tracking_uri)
    digests = {
        w: {s["stage"]: [d["digest"] for d in s["inputs"]] for s in found["chain"]}
        for w, found in (("old", old), ("new", new))
    }
    assert digests["new"]["clean"] == digests["old"]["clean"]  # the same crawl feeds both
    for stage in ("dedup", "tokenize", "train"):  # everything downstream of the threshold is new data
        assert digests["new"][stage] != digests["old"][stage]
    again = walk(old_uri, cfg.tracking_uri)  # the old chain is intact (only aliases moved to the new version)
    assert again["chain"] == old["chain"] and again["model"] == old["model"]
    assert again["model_version"]["aliases"] == [] and new["model_version"]["aliases"] == [
        "candidate",
        "good",
    ]
    client = MlflowClient(cfg.tracking_uri)
    assert client.get_model_version_by_alias("lmforge-e2e", "candidate").version == second.model_version
