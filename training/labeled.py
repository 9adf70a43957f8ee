"""Labeled data for fine-tuning: read JSONL / JSON / Parquet / CSV / TSV files or a Hugging Face
``save_to_disk`` directory, pick the configured columns, and split deterministically.

A split is either given (one path per split) or drawn from one source by a hash of each row's content and
the split seed, so the same row always lands in the same split, whichever rows are added or removed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from core.files import resolve_path
from core.stage import StageConfig

SPLITS = ("train", "validation", "test")
Task = Literal["classification", "multi_label", "seq2seq"]


class LabeledDataConfig(StageConfig):
    """Where the labeled examples are, which columns hold what, and how they are split."""

    path: str | None = Field(
        None,
        description="One source to split: a .jsonl/.json/.parquet/.csv/.tsv file, a directory of them, or a "
        "Hugging Face save_to_disk directory (a Dataset, or a DatasetDict whose splits are then used).",
    )
    splits: dict[Literal["train", "validation", "test"], str] = Field(
        default_factory=dict, description="Or a source per split (train required; no hashing then)."
    )
    text_column: str = Field("text", description="Input text.")
    text_pair_column: str | None = Field(None, description="Second input text (RTE, MRPC: sentence2).")
    label_column: str = Field(
        "label", description="Class (an int or a name); multi_label: a list of them per row."
    )
    target_column: str | None = Field(None, description="seq2seq: the target text.")
    label_names: list[str] | None = Field(
        None,
        description="Class names in id order (default: the dataset's ClassLabel names, else the sorted "
        "distinct labels of the train split).",
    )
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="Share of a single source held out for validation."
    )
    test_fraction: float = Field(0.1, ge=0, lt=1, description="Share of a single source held out for test.")
    split_seed: int = Field(0, description="Seed of the deterministic split.")

    @model_validator(mode="after")
    def _one_source(self) -> LabeledDataConfig:
        if bool(self.path) == bool(self.splits):
            raise ValueError(
                "finetune.data: set path (one source, split by hash) or splits (a source per split)"
            )
        if self.splits and "train" not in self.splits:
            raise ValueError("finetune.data.splits needs a train source")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError(
                "finetune.data: validation_fraction + test_fraction must leave training examples"
            )
        return self


def _read_hf_dir(path: Path) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """A save_to_disk Dataset (state.json + Arrow stream files) or DatasetDict (dataset_dict.json)."""
    if (path / "dataset_dict.json").exists():
        names = json.loads((path / "dataset_dict.json").read_text())["splits"]
        tables, features = {}, {}
        for name in names:
            (table,), info = _read_hf_dir(path / name)
            tables[name], features = table, info or features
        return tables, features
    state = json.loads((path / "state.json").read_text())
    parts = [pa.ipc.open_stream(str(path / f["filename"])).read_all() for f in state["_data_files"]]
    info_path = path / "dataset_info.json"
    features = json.loads(info_path.read_text()).get("features", {}) if info_path.exists() else {}
    return {"all": pa.concat_tables(parts)}, features


def _read_file(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path)
    if suffix in (".csv", ".tsv"):
        import pyarrow.csv as pcsv

        return pcsv.read_csv(
            path, parse_options=pcsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
        )
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: not a JSON object ({e.msg})") from None
        return pa.Table.from_pylist(rows)
    raise ValueError(f"{path}: unsupported labeled data format {suffix!r} (jsonl, json, parquet, csv, tsv)")


def read_source(path: str | Path) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Tables by split name ("all" when the source has no splits) and the HF features, if any."""
    path = resolve_path(path)
    if not path.exists():
        raise FileNotFoundError(f"labeled data {path} does not exist")
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        return _read_hf_dir(path)
    if path.is_dir():
        files = sorted(
            f for f in path.iterdir() if f.suffix.lower() in (".jsonl", ".json", ".parquet", ".csv", ".tsv")
        )
        if not files:
            raise ValueError(f"{path}: no .jsonl/.json/.parquet/.csv/.tsv files and no save_to_disk dataset")
        return {"all": pa.concat_tables([_read_file(f) for f in files], promote_options="default")}, {}
    return {"all": _read_file(path)}, {}


def row_split(keys: list[str], seed: int, validation: float, test: float) -> np.ndarray:
    """Split name per row from sha1(seed, row content): the same row always gets the same split."""
    u = np.array(
        [int.from_bytes(hashlib.sha1(f"{seed}\x00{k}".encode()).digest()[:8], "big") / 2**64 for k in keys]
    )
    return np.where(u < test, "test", np.where(u < test + validation, "validation", "train"))


def _columns(cfg: LabeledDataConfig, task: Task) -> list[str]:
    wanted = [cfg.text_column, cfg.text_pair_column]
    wanted.append(cfg.target_column if task == "seq2seq" else cfg.label_column)
    return [c for c in wanted if c]


def _check(table: pa.Table, cfg: LabeledDataConfig, task: Task, where: str) -> pa.Table:
    if task == "seq2seq" and not cfg.target_column:
        raise ValueError("finetune.task=seq2seq needs finetune.data.target_column")
    missing = [c for c in _columns(cfg, task) if c not in table.column_names]
    if missing:
        raise ValueError(
            f"{where}: no column {', '.join(missing)}; its columns are {', '.join(table.column_names)}"
        )
    return table


def _row_problem(row: dict[str, Any], cfg: LabeledDataConfig, task: Task) -> str | None:
    """Why a labeled row cannot be trained or scored on (no text, no label), or None."""
    texts = [cfg.text_column, cfg.text_pair_column] + ([cfg.target_column] if task == "seq2seq" else [])
    for column in filter(None, texts):
        value = row.get(column)
        if value is None:
            return f"{column} is null"
        if not str(value).strip():
            return f"{column} is empty" if value == "" else f"{column} is only whitespace"
    if task != "seq2seq":
        label = row.get(cfg.label_column)
        if label is None:
            return f"{cfg.label_column} is null"
        if isinstance(label, str) and not label.strip():
            return f"{cfg.label_column} is empty"
    return None


#: The columns of the rows left out of a labeled dataset (the labeled stage's rejected set).
REJECTED_LABELED_SCHEMA = pa.schema(
    [("split", pa.string()), ("source", pa.string()), ("row", pa.int64()), ("reason", pa.string()),
     ("example", pa.string())]
)  # fmt: skip


def load_labeled(cfg: LabeledDataConfig, task: Task) -> tuple[dict[str, pa.Table], dict[str, Any], pa.Table]:
    """The train/validation/test tables (only the configured columns), the source's HF features, and the
    rows left out (REJECTED_LABELED_SCHEMA: a null, empty or whitespace-only text or target, a null label;
    ``row`` counts from 1 in its source). A validation or test label the classes do not hold (the train
    split's labels, or the configured/dataset names) is a ValueError naming the file, row and label."""
    sources: dict[str, str] = {}
    rows: dict[str, np.ndarray] = {}
    if cfg.splits:
        tables, features = {}, {}
        for split, source in cfg.splits.items():
            found, info = read_source(source)
            tables[split] = _check(pa.concat_tables(found.values()), cfg, task, source)
            sources[split], rows[split] = str(source), np.arange(1, tables[split].num_rows + 1)
            features = features or info
    else:
        found, features = read_source(cfg.path)
        if set(found) & set(SPLITS) and "train" in found:  # a DatasetDict brings its own splits
            tables = {s: _check(found[s], cfg, task, f"{cfg.path}/{s}") for s in SPLITS if s in found}
            sources = {s: f"{cfg.path}/{s}" for s in tables}
            rows = {s: np.arange(1, t.num_rows + 1) for s, t in tables.items()}
        else:
            table = _check(pa.concat_tables(found.values()), cfg, task, cfg.path)
            columns = _columns(cfg, task)
            keys = [json.dumps(r, sort_keys=True, default=str) for r in table.select(columns).to_pylist()]
            split = row_split(keys, cfg.split_seed, cfg.validation_fraction, cfg.test_fraction)
            numbers = np.arange(1, table.num_rows + 1)
            tables = {s: table.filter(pa.array(split == s)) for s in SPLITS}
            sources = {s: str(cfg.path) for s in SPLITS}
            rows = {s: numbers[split == s] for s in SPLITS}
    out, rejected = {}, []
    for s, t in tables.items():
        t = t.select(_columns(cfg, task))
        examples = t.to_pylist()
        problems = [_row_problem(r, cfg, task) for r in examples]
        for r, n, problem in zip(examples, rows[s], problems):
            if problem is not None:
                example = json.dumps(r, default=str, ensure_ascii=False)
                rejected.append(
                    {"split": s, "source": sources[s], "row": int(n), "reason": problem, "example": example}
                )
        keep = [p is None for p in problems]
        out[s], rows[s] = t.filter(pa.array(keep, pa.bool_())).combine_chunks(), rows[s][keep]
    if not out["train"].num_rows:
        raise ValueError(f"finetune.data: the train split of {cfg.path or cfg.splits['train']} is empty")
    if task != "seq2seq":
        _check_labels(out, rows, sources, label_names(cfg, out["train"], features, task), cfg, task)
    return out, features, pa.Table.from_pylist(rejected, REJECTED_LABELED_SCHEMA)


def _check_labels(
    tables: dict[str, pa.Table],
    rows: dict[str, np.ndarray],
    sources: dict[str, str],
    names: list[str],
    cfg: LabeledDataConfig,
    task: Task,
) -> None:
    """Every label of every split is one of ``names`` (the classes the model is built with)."""
    for split, table in tables.items():
        for n, value in zip(rows[split], table.column(cfg.label_column).to_pylist()):
            for label in value if task == "multi_label" else [value]:
                if _label_id(label, names) is None:
                    known = "the train split's labels" if not cfg.label_names else "finetune.data.label_names"
                    raise ValueError(
                        f"{sources[split]}: row {n} ({split} split): label {label!r} is not one of {known} "
                        f"{names}; fix the row, or list every class in finetune.data.label_names"
                    )


def label_names(cfg: LabeledDataConfig, train: pa.Table, features: dict[str, Any], task: Task) -> list[str]:
    """Class names in id order: configured, the dataset's ClassLabel names, or the sorted train labels."""
    if task == "seq2seq":
        return []
    if cfg.label_names:
        return list(cfg.label_names)
    feature = features.get(cfg.label_column, {})
    if task == "multi_label" and isinstance(feature, dict) and "feature" in feature:
        feature = feature["feature"]
    if isinstance(feature, dict) and feature.get("names"):
        return list(feature["names"])
    values = train.column(cfg.label_column).to_pylist()
    flat = [v for row in values for v in row] if task == "multi_label" else values
    distinct = sorted(set(flat), key=lambda v: (isinstance(v, str), v))
    if all(isinstance(v, int) for v in distinct):
        return [str(i) for i in range(max(distinct) + 1)]
    return [str(v) for v in distinct]


def label_ids(values: list[Any], names: list[str], where: str) -> list[int]:
    """Labels (ints, or names) as class ids, with an error naming the first unknown one."""
    out = []
    for v in values:
        i = _label_id(v, names)
        if i is None:
            raise ValueError(f"{where}: label {v!r} is not one of {names}; set finetune.data.label_names")
        out.append(i)
    return out


def _label_id(value: Any, names: list[str]) -> int | None:
    """A label's class id (an int is one already, a name is looked up), or None if there is no such class."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < len(names) else None
    return names.index(str(value)) if str(value) in names else None
