"""The quality stages in a pipeline (orchestration/stages/quality_classifier.py, quality.py): a fastText
classifier trained DCLM's way (reference text against the crawl), every document of a source scored on Ray
tasks, the exact corpus-wide top fraction kept, the classifier in MLflow, and the cache."""

import json
import random
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cleaning.quality import SCORE, TIER
from core.manifest import read_index, read_table
from orchestration.config import ConfigError, parse_config
from orchestration.pipeline import Pipeline
from orchestration.plan import Selection
from orchestration.report import build_report
from orchestration.report_html import build_html
from orchestration.stages import dag
from tests.fixtures import prose, spam


def _raw(root: Path, **quality) -> dict:
    return {
        "name": "quality",
        "workdir": str(root / "work"),
        "clean": {"gopher_repetition": None, "gopher": None, "c4": None, "fineweb": None, "language": None},
        "dedup": {"shards": 1},
        "sources": {
            "docs": {"read": {"paths": [str(root / "docs.jsonl")]}},
            "web": {"read": {"paths": [str(root / "web.jsonl")]}},
        },
        "quality": {
            "classifier": {
                "positive": [{"paths": [str(root / "reference.jsonl")]}],
                "negative": [{"source": "web"}],
                "test_fraction": 0.2,
                "fasttext": {"dim": 16, "bucket": 20000, "epoch": 10},
            },
            "select": {"top_fraction": 0.5},
            "sources": ["web"],
            **quality,
        },
        "tokenize": {"tokenizer": {"vocab_size": 300, "min_frequency": 1}, "val_fraction": 0.1},
    }


def _write(path: Path, texts: dict[str, str]) -> None:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in texts.items()))


@pytest.fixture(scope="module")
def quality_run(ray_session, tmp_path_factory):
    """docs: 30 prose documents (passed on unscored); web: 60 prose and 60 spam pages; the reference: 80
    prose documents (the text wanted)."""
    root = tmp_path_factory.mktemp("quality")
    rng = random.Random(11)
    _write(root / "docs.jsonl", {f"doc{i}": prose(rng) for i in range(30)})
    web = {f"good{i}": prose(rng) for i in range(60)} | {f"spam{i}": spam(rng) for i in range(60)}
    _write(root / "web.jsonl", web)
    _write(root / "reference.jsonl", {f"ref{i}": prose(rng) for i in range(80)})
    cfg = parse_config(_raw(root), "test")
    return root, cfg, Pipeline(cfg).run(until="tokenize")


@pytest.mark.unit
def test_the_quality_stages_come_after_dedup_and_before_tokenize_and_name_known_sources(tmp_path):
    cfg = parse_config(_raw(tmp_path), "test")
    names = [i.name for i in dag(cfg)]
    assert names[-5:] == ["quality_classifier", "quality", "tokenize", "train", "evaluate"]
    reads = {i.name: i.reads for i in dag(cfg)}
    assert reads["quality"] == ("quality_classifier", "dedup[docs]", "dedup[web]")
    assert reads["tokenize"] == ("quality",)
    with pytest.raises(ConfigError, match=r"quality.classifier \(positive, negative\): no source news"):
        parse_config(
            _raw(tmp_path, classifier={"positive": [{"source": "news"}], "negative": [{"source": "web"}]}),
            "t",
        )
    with pytest.raises(ConfigError, match="quality.sources: no source news"):
        parse_config(_raw(tmp_path, sources=["news"]), "t")


@pytest.mark.integration
def test_the_top_half_of_the_scored_source_is_kept_exactly_and_the_rest_passes_through(quality_run):
    root, cfg, result = quality_run
    out = result.stages["quality"]
    index = out.index
    kept, rejected = read_table(out.store), read_table(out.store / "rejected")
    web_kept = [r for r in kept.to_pylist() if not r["id"].startswith("doc")]
    # docs is not scored: all 30 pass on, with no score
    docs = [r for r in kept.to_pylist() if r["id"].startswith("doc")]
    assert len(docs) == 30 and all(SCORE not in dict(r["meta"]) for r in docs)
    # web: exactly half of its 120 documents, the best by (score, id) of every web document scored
    scored = read_table(out.store / "scored").to_pylist()
    web_scored = sorted(
        ((dict(r["meta"])[SCORE], r["id"]) for r in scored if not r["id"].startswith("doc")),
        key=lambda e: (-e[0], e[1]),
    )
    assert len(web_scored) == 120
    assert {r["id"] for r in web_kept} == {i for _, i in web_scored[:60]}
    assert sorted(rejected.column("id").to_pylist()) == sorted(i for _, i in web_scored[60:])
    # the classifier learned the reference's prose: the kept half is the web's prose
    assert sum(r["id"].startswith("good") for r in web_kept) >= 57
    digest = index["quality"]["classifier_digest"]
    assert set(rejected.column("signal").to_pylist()) == {f"{SCORE}@{digest[:12]}"}
    assert set(rejected.column("threshold").to_pylist()) == {index["quality"]["cut"]}
    assert index["counters"]["documents_in"] == 150 and index["counters"]["kept"] == 90
    # each source's files apart, so tokenize writes each source's shards
    assert set(index["sources"]) == {"docs", "web"}
    tokens = result.stages["tokenize"].index
    assert {s["source"] for s in tokens["splits"]["train"]["shards"]} == {"docs", "web"}
    hist = index["quality"]["histograms"]
    assert list(hist) == ["web"] and sum(hist["web"]["kept"]) == sum(hist["web"]["rejected"]) == 60
    rep = build_report(cfg.workdir)
    assert rep["ok"], rep["checks"]
    for check in (
        "quality: documents in = kept + rejected",
        "quality: every document id dedup[docs] and dedup[web] kept leaves as kept or rejected",
        "tokenize: the document ids tokenized (and quarantined) are the ids quality kept",
    ):
        assert rep["checks"][check]


@pytest.mark.integration
def test_the_classifier_is_measured_on_held_out_documents_and_logged_with_its_training_data(quality_run):
    root, cfg, result = quality_run
    index = result.stages["quality_classifier"].index
    c = index["counters"]
    assert c["positives"] == 80 and c["negatives"] == 120
    assert c["train_documents"] + c["test_documents"] == 200 and c["test_documents"] > 20
    # reference prose against a crawl half prose (DCLM's labels): the positives are found, and the crawl's
    # own prose, labeled negative, is taken for positive
    assert c["recall"] > 0.9 and c["precision"] < c["recall"]
    client = mlflow.MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    models = client.search_logged_models([experiment.experiment_id])
    (classifier,) = [m for m in models if m.model_type == "quality-classifier"]
    metrics = {m.key: m.value for m in classifier.metrics}
    assert metrics["heldout_f1"] == pytest.approx(c["f1"])
    assert metrics["heldout_precision"] == pytest.approx(c["precision"])
    tags = classifier.tags
    assert tags["lmforge.trained_on.dedup[web]"] == index["inputs"]["dedup[web]"]
    assert (
        str(root / "reference.jsonl") in tags["lmforge.trained_on_files.quality.classifier.positive[0].paths"]
    )
    assert pq.read_metadata(result.stages["quality"].store.local / "scored" / "web-p00000.parquet").num_rows


@pytest.mark.integration
def test_a_rerun_is_cached_and_a_new_classifier_reruns_scoring_and_what_follows(quality_run):
    root, cfg, _ = quality_run
    plan = {e.stage: e.action for e in Pipeline(cfg).plan(Selection(until="tokenize"))}
    assert set(plan.values()) == {"cached"}
    changed = parse_config(
        _raw(
            root, classifier={**_raw(root)["quality"]["classifier"], "fasttext": {"dim": 16, "bucket": 20000}}
        ),
        "test",
    )
    plan = {e.stage: e.action for e in Pipeline(changed).plan(Selection(until="tokenize"))}
    assert plan == {
        "clean[docs]": "cached",
        "dedup[docs]": "cached",
        "clean[web]": "cached",
        "dedup[web]": "cached",
        "quality_classifier": "run",
        "quality": "run",
        "tokenize": "run",
    }
    threshold = parse_config(_raw(root, select={"threshold": 0.5}), "test")
    plan = {e.stage: e.action for e in Pipeline(threshold).plan(Selection(until="tokenize"))}
    assert plan["quality_classifier"] == "cached" and plan["quality"] == "run"
    assert read_index(Path(cfg.workdir) / "quality") is not None


@pytest.mark.system  # one fine-tuning launch on Ray Train
@pytest.mark.parametrize("objective", ["masked_lm"])
def test_an_encoder_lmforge_pretrained_is_fine_tuned_into_the_classifier_that_scores_the_corpus(
    trained, objective, tmp_path
):
    """The whole loop in lmforge: the shared BERT lmforge pretrained, fine-tuned by lmforge's fine-tuning on
    reference prose (positive) against spam (negative), scores a web of both on Ray tasks."""
    import numpy as np
    import torch
    from sklearn.metrics import f1_score, precision_score
    from transformers import AutoModelForSequenceClassification

    from training.finetune import encode_inputs, load_tokenizer_of

    base = trained(objective).model_dir
    rng = random.Random(5)
    _write(tmp_path / "docs.jsonl", {f"doc{i}": prose(rng) for i in range(10)})
    web = {f"good{i}": prose(rng) for i in range(30)} | {f"spam{i}": spam(rng) for i in range(30)}
    _write(tmp_path / "web.jsonl", web)
    _write(tmp_path / "reference.jsonl", {f"ref{i}": prose(rng) for i in range(60)})
    _write(tmp_path / "junk.jsonl", {f"junk{i}": spam(rng) for i in range(60)})
    classifier = {
        "kind": "encoder",
        "positive": [{"paths": [str(tmp_path / "reference.jsonl")]}],
        "negative": [{"paths": [str(tmp_path / "junk.jsonl")]}],
        "test_fraction": 0.25,
        "encoder": {"init_from": str(base), "seq_len": 64, "steps": 24, "lr": 1e-3, "micro_batch_size": 8},
        "scoring_batch_size": 16,
    }
    too_long = parse_config(_raw(tmp_path, classifier=classifier, select={"threshold": 0.5}), "test")
    with pytest.raises(
        ConfigError, match="quality.classifier.encoder.seq_len: 64 is longer than the 32 positions"
    ):
        Pipeline(too_long).run(until="quality")  # refused before any stage runs
    classifier["encoder"]["seq_len"] = 32
    cfg = parse_config(_raw(tmp_path, classifier=classifier, select={"threshold": 0.5}), "test")
    result = Pipeline(cfg).run(until="quality")
    index = result.stages["quality_classifier"].index
    assert index["classifier"] == {"kind": "encoder", "dir": "finetune/model", "seq_len": 32}
    out = result.stages["quality"]
    rows = read_table(out.store).to_pylist() + read_table(out.store / "rejected").to_pylist()
    scored = {r["id"]: dict(r["meta"])[SCORE] for r in rows if not r["id"].startswith("doc")}
    assert len(scored) == 60
    kept = {r["id"] for r in read_table(out.store).to_pylist() if not r["id"].startswith("doc")}
    assert kept == {i for i, v in scored.items() if np.float32(v) >= np.float32(0.5)}
    # the scores are the fine-tuned model's as lmforge's fine-tuning evaluation computes them (every
    # example padded to seq_len, in file order): length-sorted batches change nothing
    model_dir = Path(cfg.workdir) / "quality_classifier" / "finetune" / "model"
    tokenizer = load_tokenizer_of(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    positive = model.config.label2id["positive"]

    def probabilities(texts: list[str]) -> np.ndarray:
        inputs = encode_inputs(tokenizer, texts, None, 32, model.config)
        with torch.inference_mode():
            logits = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits
        return logits.softmax(-1)[:, positive].numpy()

    ids = sorted(scored)
    np.testing.assert_allclose(
        [scored[i] for i in ids], probabilities([web[i] for i in ids]), atol=1e-5, rtol=0
    )
    # the classifier's held-out figures are scikit-learn's on its held-out split
    test = pq.read_table(Path(cfg.workdir) / "quality_classifier" / "data" / "test.parquet").to_pylist()
    truth = [r["label"] == "positive" for r in test]
    predicted = list(probabilities([r["text"] for r in test]) > 0.5)
    assert index["counters"]["f1"] == pytest.approx(f1_score(truth, predicted), abs=1e-9)
    assert index["counters"]["precision"] == pytest.approx(precision_score(truth, predicted, zero_division=0))


@pytest.mark.integration
def test_one_corpus_is_the_negative_side_and_tiers_keep_everything(ray_session, tmp_path):
    """Without sources the corpus is named ``corpus``: the classifier learns the reference against it,
    and tiers keep every document with its tier in meta; tokenize writes each tier's shards apart (what a
    mixture weighs by tier)."""
    rng = random.Random(2)
    web = {f"good{i}": prose(rng) for i in range(25)} | {f"spam{i}": spam(rng) for i in range(25)}
    _write(tmp_path / "web.jsonl", web)
    _write(tmp_path / "reference.jsonl", {f"ref{i}": prose(rng) for i in range(40)})
    raw = _raw(tmp_path)
    del raw["sources"]
    raw["read"] = {"paths": [str(tmp_path / "web.jsonl")]}
    raw["quality"] = {
        "classifier": {**raw["quality"]["classifier"], "negative": [{"source": "corpus"}]},
        "select": {"tiers": [0.3, 0.5]},  # this classifier scores 25 documents each side of 0.5
    }
    with pytest.raises(ConfigError, match="quality.sources: no source web \\(one corpus, named corpus\\)"):
        parse_config({**raw, "quality": {**raw["quality"], "sources": ["web"]}}, "test")
    cfg = parse_config(raw, "test")
    result = Pipeline(cfg).run(until="tokenize")
    assert result.stages["quality_classifier"].index["counters"]["negatives"] == 50
    out = result.stages["quality"].index
    assert out["counters"]["kept"] == 50 and out["counters"]["rejected"] == 0 and "sources" not in out
    tier_of = {}
    for row in read_table(result.stages["quality"].store).to_pylist():
        meta = dict(row["meta"])
        score = np.float32(meta[SCORE])
        assert meta[TIER] == int(score >= np.float32(0.3)) + int(score >= np.float32(0.5))
        tier_of[row["id"]] = meta[TIER]
    tokens = result.stages["tokenize"]
    shards = [s for split in tokens.index["splits"].values() for s in split["shards"]]
    assert {s["tier"] for s in shards} == set(tier_of.values()) and len(set(tier_of.values())) > 1
    for shard in shards:
        ids = pa.ipc.open_file(tokens.out_dir / shard["docs_path"]).read_all().column("doc_id").to_pylist()
        assert all(tier_of[d] == shard["tier"] for d in ids)
    assert sum(s["documents"] for s in shards) == 50
    assert list(out["quality"]["histograms"]) == ["corpus"]
    assert build_report(cfg.workdir)["ok"]
    page, _ = build_html(cfg.workdir)
    assert "after quality selection" in page and "corpus: quality score (50 documents)" in page


@pytest.mark.integration
def test_an_annotated_file_trains_the_classifier_decontaminated_as_the_clean_stage_is(ray_session, tmp_path):
    """FineWeb-Edu's recipe: scores 0-5 on a sample, positive from 3; a row holding an ARC-Easy question
    is left out of the classifier's training data, as clean.decontaminate leaves it out of the corpus."""
    from evaluation.tasks import resolve_task

    requests = (r for e in resolve_task("arc_easy").load() for r in e.requests())
    context, continuation = next(r for r in requests if len((r[0] + r[1]).split()) >= 20)  # 13-grams
    rng = random.Random(8)
    rows = [{"text": prose(rng), "score": rng.choice([3, 4, 5])} for _ in range(30)]
    rows += [{"text": spam(rng), "score": rng.choice([0, 1, 2])} for _ in range(30)]
    rows.append({"text": f"{prose(rng)} {context}{continuation}", "score": 5})
    (tmp_path / "annotated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _write(tmp_path / "web.jsonl", {f"good{i}": prose(rng) for i in range(20)})
    raw = _raw(tmp_path)
    del raw["sources"]
    raw["read"] = {"paths": [str(tmp_path / "web.jsonl")]}
    raw["clean"] = {**raw["clean"], "decontaminate": {"tasks": ["arc_easy"]}}
    labeled = {"paths": [str(tmp_path / "annotated.jsonl")], "label_field": "score", "min_score": 3}
    raw["quality"] = {
        "classifier": {"labeled": labeled, "test_fraction": 0.2, "fasttext": {"dim": 16, "bucket": 20000}},
        "select": {"threshold": 0.5},
    }
    with pytest.raises(ConfigError, match="set one of positive \\(labels\\) or min_score"):
        parse_config({**raw, "quality": {"classifier": {"labeled": {"paths": ["x.jsonl"]}}}}, "test")
    result = Pipeline(parse_config(raw, "test")).run(until="quality")
    counters = result.stages["quality_classifier"].index["counters"]
    assert counters["positives"] == 30 and counters["negatives"] == 30  # the contaminated row left out
    assert counters["f1"] > 0.9  # prose against spam
