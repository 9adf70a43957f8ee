"""Masked-LM and span-corruption pipelines end to end: the tokenizer gets the objective's special tokens,
the evaluate stage scores the held-out split with the objective, MLflow records the model's type."""

import json
import random

import mlflow
import pytest

from orchestration.config import ConfigError, parse_config
from orchestration.pipeline import Pipeline
from orchestration.plan import Selection
from tests.fixtures import copy_of, prose
from training.data.tokenizer import TokenizerConfig, load_tokenizer, save_tokenizer, train_bpe


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    rng = random.Random(3)
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    lines = [json.dumps({"id": f"d{i:03d}", "text": prose(rng, 12)}) for i in range(60)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _config(path, workdir, objective, arch, **train):
    return parse_config(
        {
            "name": objective,
            "workdir": str(workdir),
            "read": {"paths": [str(path)]},
            "clean": {"gopher_repetition": None},
            "tokenize": {"tokenizer": {"vocab_size": 512, "min_frequency": 1}, "val_fraction": 0.2},
            "train": {
                "objective": objective,
                "model": {"arch": arch, "n_embd": 64, "n_head": 2},
                "seq_len": 48,
                "micro_batch_size": 4,
                "steps": 16,
                "warmup_steps": 2,
                "lr": 5e-3,
                **train,
            },
            "evaluate": {"pseudo_perplexity_sequences": 4},
        },
        "test",
    )


@pytest.mark.system
@pytest.mark.parametrize(
    "objective,arch,model_type",
    [("masked_lm", "bert", "masked-lm"), ("span_corruption", "t5", "seq2seq-lm")],
)
def test_pretraining_pipeline_trains_evaluates_and_logs(
    request, texts, tmp_path, objective, arch, model_type
):
    if objective == "masked_lm":  # the shared BERT pipeline (tests/fixtures.py), which also fine-tunes
        _, cfg, result = request.getfixturevalue("masked_pipeline")
    else:
        request.getfixturevalue("ray_session")
        cfg = _config(texts, tmp_path / "work", objective, arch)
        result = Pipeline(cfg).run()
    tokens = result.stages["tokenize"]
    tok = load_tokenizer(tokens.out_dir / tokens.index["tokenizer"]["path"])
    needed = ["<mask>", "<cls>", "<sep>"] if objective == "masked_lm" else ["<extra_id_0>", "<extra_id_99>"]
    assert all(tok.token_to_id(t) is not None for t in ["<|endoftext|>", "<pad>", *needed])

    summary = result.stages["train"].index["summary"]
    assert summary["objective"] == objective
    assert summary["losses"][-1] < summary["losses"][0]
    metrics = json.loads((result.stages["evaluate"].out_dir / "metrics.json").read_text())
    vocab = tok.get_vocab_size()
    assert 0 < metrics["loss"] < summary["losses"][0] and metrics["predicted_tokens"] > 0
    if objective == "masked_lm":
        assert 1 < metrics["pseudo_perplexity"] < vocab and metrics["scored_tokens"] > 100

    mlflow.set_tracking_uri(cfg.tracking_uri)
    model = mlflow.get_logged_model(result.model_id)
    assert model.model_type == model_type
    assert model.metrics and {m.key for m in model.metrics} >= {"val_loss"}

    if objective == "masked_lm":
        # Train alone from the existing shards (forced, on a copy of the work dir): the token dataset is
        # used as it is and the same seed gives the same losses; then evaluate alone gives the same metrics.
        cfg = cfg.model_copy(update={"workdir": copy_of(cfg.workdir, tmp_path / "copy")})
        trained = Pipeline(cfg).run(selection=Selection(only=("train",), force=("train",)))
        actions = {e.stage: e.action for e in trained.plan}
        assert actions == {"clean": "use", "dedup": "use", "tokenize": "use", "train": "run"}
        assert trained.stages["train"].index["summary"]["losses"] == summary["losses"]
        evaluated = Pipeline(cfg).run(selection=Selection(only=("evaluate",), force=("evaluate",)))
        actions = {e.stage: e.action for e in evaluated.plan}
        assert actions.pop("evaluate") == "run" and set(actions.values()) == {"use"} and "train" in actions
        assert not evaluated.stages["evaluate"].cached
        again = json.loads((evaluated.stages["evaluate"].out_dir / "metrics.json").read_text())
        assert again == metrics


@pytest.mark.unit
def test_objective_config_errors_name_the_field(texts, tmp_path):
    with pytest.raises(ConfigError, match=r"evaluate.tasks are scored as causal LMs"):
        parse_config(
            {
                "read": {"paths": [str(texts)]},
                "train": {"objective": "masked_lm", "model": {"arch": "bert"}},
                "evaluate": {"tasks": ["arc_easy"]},
            },
            "test",
        )
    plain, _ = save_tokenizer(
        train_bpe(["some text"] * 3, TokenizerConfig(vocab_size=300, min_frequency=1)), tmp_path
    )
    with pytest.raises(ConfigError, match=rf"tokenize.tokenizer.path {plain} lacks .*<mask>"):
        parse_config(
            {
                "read": {"paths": [str(texts)]},
                "tokenize": {"tokenizer": {"path": str(plain)}},
                "train": {"objective": "masked_lm", "model": {"arch": "bert"}},
            },
            "test",
        )
