"""Evaluation during training on two ZeRO-3 Ray Train workers, logged at the step to MLflow; the last
periodic scores equal those of the exported model evaluated on its own (one process, no ZeRO)."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow import MlflowClient

from evaluation.harness import evaluate
from orchestration.tracking import RunMetricsLogger
from tests.training.test_shards import corpus
from tests.training.test_training_runs import small, tokens  # noqa: F401 (fixture)


def _word_task(path):
    """Next word of a corpus text among three."""
    texts = list(corpus(40, seed=7).values())
    with path.open("w") as f:
        for i, text in enumerate(texts):
            words = text.split()
            wrong = [texts[(i + 1) % len(texts)].split()[0], texts[(i + 2) % len(texts)].split()[-1]]
            gold = i % 3
            choices = wrong[:gold] + [words[6]] + wrong[gold:]
            f.write(json.dumps({"context": " ".join(words[:6]), "choices": choices, "gold": gold}) + "\n")
    return path


@pytest.mark.slow
def test_periodic_eval_on_zero3_workers_matches_the_exported_model(ray_session, tokens, tmp_path):  # noqa: F811
    from orchestration.training_launch import launch_training

    task = _word_task(tmp_path / "next_word.jsonl")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        pass
    cfg = small(zero_stage=3, seq_len=64, eval_every=6, eval_tasks=[str(task), "copa"], eval_limit=24)
    summary = launch_training(
        cfg,
        tokens,
        tmp_path / "train",
        run_name="periodic",
        metrics_logger=RunMetricsLogger(uri, run.info.run_id),
    )
    client = MlflowClient(uri)

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    for name in ("next_word", "copa"):
        assert set(history(f"eval/{name}/acc")) == {6, 12}
    loss = history("eval/val_loss")
    assert set(loss) == {6, 12} and loss[12] < loss[6]
    assert set(history("eval/val_bits_per_byte")) == {6, 12}
    assert set(history("loss")) == set(range(1, 13))

    reference = evaluate(summary["model_dir"], tasks=[str(task), "copa"], limit=24)
    assert set(reference) == {"next_word", "copa"} and "acc_norm" in reference["next_word"].metrics
    for name, ev in reference.items():
        for metric in {"acc", "acc_norm", "acc_stderr"} & set(ev.metrics):
            assert history(f"eval/{name}/{metric}")[12] == pytest.approx(ev.metrics[metric], abs=1e-9)
