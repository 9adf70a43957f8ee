"""Decontamination against benchmark text: a document quoting a task's 13 words is removed, with the task
and the n-gram on its rejection; 12 words are not enough."""

from __future__ import annotations

import re

import pyarrow as pa
import pytest

from cleaning.decontaminate import DecontaminateConfig, Decontaminator, NgramIndex
from core.schema import document_table
from core.stage import StageContext
from evaluation.tasks import resolve_task
from orchestration.config import ConfigError, parse_config

pytestmark = pytest.mark.unit


def _docs(texts: list[str]) -> pa.RecordBatch:
    return document_table(texts, urls=[f"http://x/{i}" for i in range(len(texts))]).to_batches()[0]


def test_a_document_quoting_a_benchmark_question_is_removed_and_named():
    task = resolve_task("arc_easy")
    examples = list(task.load())
    index = NgramIndex(13)
    index.add("arc_easy", (c + x for e in examples for c, x in e.requests()))
    question = next(e.contexts[0] for e in examples if len(e.contexts[0].split()) >= 20)
    by_hand = re.findall(r"\w+", question.lower())  # the published normalization: lowercase words only
    quoted = "Some page text. " + question.upper().replace(" ", "  ") + " More text after."
    twelve = "Intro: " + " ".join(question.split()[1:13]) + " ... and then something else entirely."
    clean = "A page about gardening, soil, water and the seasons of planting tomatoes in spring."
    ctx = StageContext("clean")
    kept = pa.Table.from_batches(
        list(Decontaminator(DecontaminateConfig(), index).run([_docs([quoted, twelve, clean])], ctx))
    )
    assert kept.column("text").to_pylist() == [twelve, clean]
    [rejected] = ctx.rejected
    signal = rejected.column("signal")[0].as_py()
    task_name, gram = signal.split(": ", 1)
    assert task_name == "arc_easy" and gram.split() == by_hand[:13]
    assert rejected.column("value")[0].as_py() == len(by_hand) - 12  # every 13-gram of the question matched
    assert ctx.counters["decontaminate.arc_easy"] == 1


def test_flag_mode_keeps_every_document_and_counts_matches_per_task_in_meta():
    index = NgramIndex(3)
    index.add("t1", ["one two three four"])  # 3-grams: one two three, two three four
    index.add("t2", ["five six seven"])
    texts = ["One, two three four five six seven!", "two three four", "nothing here at all"]
    ctx = StageContext("clean")
    stage = Decontaminator(DecontaminateConfig(n=3, action="flag"), index)
    kept = pa.Table.from_batches(list(stage.run([_docs(texts)], ctx)))
    assert kept.column("text").to_pylist() == texts and not ctx.rejected
    metas = [dict(m) for m in kept.column("meta").to_pylist()]
    assert metas == [{"decontaminate.t1": 2.0, "decontaminate.t2": 1.0}, {"decontaminate.t1": 1.0}, {}]
    assert ctx.counters["decontaminate.flagged.t1"] == 2 and ctx.counters["decontaminate.flagged.t2"] == 1


def test_decontamination_takes_the_evaluated_tasks_or_fails_naming_the_field(tmp_path):
    base = {"workdir": str(tmp_path), "read": {"paths": [str(tmp_path / "x.jsonl")]}}
    cfg = parse_config(base | {"clean": {"decontaminate": {}}, "evaluate": {"tasks": ["arc_easy", "copa"]}})
    assert cfg.clean.decontaminate.tasks == ["arc_easy", "copa"]
    with pytest.raises(ConfigError, match="clean.decontaminate names no tasks"):
        parse_config(base | {"clean": {"decontaminate": {}}})
