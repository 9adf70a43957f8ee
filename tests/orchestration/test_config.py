from pathlib import Path

import pytest

from orchestration.config import ConfigError, dotted_overrides, load_config, parse_config

pytestmark = pytest.mark.unit

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def test_demo_config_is_valid():
    cfg = load_config(DEMO)
    assert cfg.train.zero_stage == 2 and cfg.train.num_workers == 2
    assert cfg.tracking_uri == f"sqlite:///{(cfg.workdir.resolve() / 'mlflow.db')}"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"train": {"zero_stage": 4}}, "train.zero_stage: Input should be 0, 1, 2 or 3 (got 4)"),
        ({"train": {"offload_params": True}}, "offload_params needs zero_stage 3"),
        ({"crawl": {"allow_private_addresses": False}}, "set crawl.allow_private_addresses: true"),
        ({"crawl": {"seeds": ["ftp://x"]}}, "crawl.seeds: seed 'ftp://x' is not an absolute http(s) URL"),
        ({"dedup": {"minhash": {"threshold": 1.5}}}, "dedup.minhash.threshold: Input should be less than 1"),
        ({"tokenize": {"vocab_size": 10}}, "tokenize.vocab_size: Extra inputs are not permitted"),
        ({"train": {"steps": "many"}}, "train.steps: Input should be a valid integer"),
        # A language name kept nothing (every document rejected, then "every document was filtered").
        (
            {"clean": {"language": {"languages": ["english"]}}},
            "clean.language.languages: 'english' is not an ISO 639",
        ),
        # An unknown task used to fail after training, without the field.
        (
            {"evaluate": {"tasks": ["arc_eazy"]}},
            "evaluate.tasks: unknown task 'arc_eazy': use one of arc_easy",
        ),
    ],
)
def test_bad_values_name_the_field_value_and_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, override)
    assert expected in str(err.value)
    assert str(DEMO) in str(err.value)


def test_a_config_needs_a_data_source():
    with pytest.raises(ConfigError, match="no data source"):
        parse_config({})


def test_public_seeds_do_not_need_private_addresses_but_loopback_does():
    assert parse_config({"crawl": {"seeds": ["https://example.org/"]}}).crawl.seeds == [
        "https://example.org/"
    ]
    with pytest.raises(ConfigError, match="127.0.0.1.*allow_private_addresses"):
        parse_config({"crawl": {"seeds": ["http://127.0.0.1:8000/"]}})


def test_dotted_overrides_parse_yaml_values():
    assert dotted_overrides(["train.steps=10", "crawl.seeds=[http://a/]", "name=x"]) == {
        "train": {"steps": 10},
        "crawl": {"seeds": ["http://a/"]},
        "name": "x",
    }
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        dotted_overrides(["train.steps"])


@pytest.mark.parametrize("path", sorted(DEMO.parent.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_promotion_rule_needs_exactly_one_bound():
    from orchestration.config import PromoteRule

    assert PromoteRule(alias="prod", metric="arc_easy/acc", above=0.3).passes(0.31)
    assert not PromoteRule(alias="prod", metric="val_bits_per_byte", below=1.0).passes(1.0)
    for bounds in ({}, {"above": 0.1, "below": 0.2}):
        with pytest.raises(ValueError, match="exactly one of 'above' or 'below'"):
            PromoteRule(alias="prod", metric="m", **bounds)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"metric": "arc_easy.acc"}, "tracking.promote.0.metric: 'arc_easy.acc' is not an evaluation metric"),
        (
            {"metric": "hellaswag/acc"},
            "reads task 'hellaswag', which evaluate.tasks (arc_easy, copa, winogrande)",
        ),
    ],
)
def test_promotion_rules_read_metrics_the_evaluation_reports(rule, expected):
    override = {"tracking": {"registered_model": "m", "promote": [{"alias": "prod", "above": 0.3, **rule}]}}
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, override)
    assert expected in str(err.value)
    ok = {"tracking": {"promote": [{"alias": "prod", "metric": "copa/acc", "above": 0.3}]}}
    assert load_config(DEMO, ok).tracking.promote[0].metric == "copa/acc"


def test_periodic_evaluation_defaults_to_the_evaluated_tasks():
    cfg = load_config(DEMO, {"train": {"eval_every": 5}})
    assert cfg.train.eval_tasks == cfg.evaluate.tasks == ["arc_easy", "copa", "winogrande"]
    assert load_config(DEMO).train.eval_tasks == []
