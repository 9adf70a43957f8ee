"""Evaluation during training on two ZeRO-3 Ray Train workers, logged at the step to MLflow; the last
periodic scores equal those of the exported model evaluated on its own (one process, no ZeRO). The run is
the shared causal LM of tests/fixtures.py, which evaluates every 6 steps."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from evaluation.harness import evaluate

pytestmark = pytest.mark.system  # trains the shared causal LM (Ray Train) on first use


def test_periodic_eval_on_zero3_workers_matches_the_exported_model(trained):
    run = trained("causal_lm")
    assert run.config.zero_stage == 3 and run.config.eval_every == 6 and run.config.steps == 12
    client = MlflowClient(run.tracking_uri)

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run.run_id, key)}

    for name in ("next_word", "copa"):
        assert set(history(f"eval/{name}/acc")) == {6, 12}
    loss = history("eval/val_loss")
    assert set(loss) == {6, 12} and loss[12] < loss[6]
    assert set(history("eval/val_bits_per_byte")) == {6, 12}
    assert set(history("loss")) == set(range(1, 13))

    reference = evaluate(run.model_dir, tasks=[str(run.task), "copa"], limit=24)
    assert set(reference) == {"next_word", "copa"} and "acc_norm" in reference["next_word"].metrics
    for name, ev in reference.items():
        for metric in {"acc", "acc_norm", "acc_stderr"} & set(ev.metrics):
            assert history(f"eval/{name}/{metric}")[12] == pytest.approx(ev.metrics[metric], abs=1e-9)
