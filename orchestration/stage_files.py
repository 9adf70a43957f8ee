"""Files of stage outputs that the engine and several stages share: the key file of a prepared output, small
files written whole with their manifest entry, an exported model's manifest entries, a stage's scratch
directory on this node, and the content digest of the files a config field names."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from core.files import file_entry, file_sha256, resolve_path
from core.manifest import read_index, read_table
from core.storage import Store, local_copy, node_dir

#: The key of the run that last prepared a stage output, finished or not.
KEY_FILE = ".cache_key"
#: A stage output's rejected documents (or rows), a dataset with its own index, beside the kept ones.
REJECTED_DIR = "rejected"
#: The MLflow LoggedModel (and registered version) of a model output, once logged.
MODEL_RECORD = "mlflow_model.json"


def key_of_output(out: Store) -> str | None:
    """The key of the run that last prepared a stage output (finished or not), if any."""
    try:
        return out.read_text(KEY_FILE)
    except (FileNotFoundError, NotADirectoryError):
        return None


def scratch(out: Store, key: str) -> Path:
    """This machine's directory for a stage that works on a local disk: the output itself, or for a remote
    one a node-cache directory, kept for a resumed run of the same key and emptied for any other."""
    if out.local is not None:
        return out.local
    work = node_dir(out, "stages")
    if not (work / KEY_FILE).is_file() or (work / KEY_FILE).read_text() != key:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / KEY_FILE).write_text(key)
    return work


def write_file(out: Store, name: str, data: bytes, rows: int = 0) -> dict[str, Any]:
    """Write one small file of a stage output; its manifest entry."""
    out.write_bytes(name, data)
    return {"path": name, "rows": rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_json(out: Store, name: str, value: Any) -> dict[str, Any]:
    return write_file(out, name, json.dumps(value, indent=2).encode())


def model_files(out: Store) -> list[dict[str, Any]]:
    """The manifest entries of the exported model under ``out/model`` (read from a local copy)."""
    model_dir = local_copy(out, "model")
    return [
        {**file_entry(p, 0), "path": f"model/{p.name}"} for p in sorted(model_dir.iterdir()) if p.is_file()
    ]


def tree_digest(paths: list[str]) -> str:
    """sha256 over the files under ``paths`` (names and contents): keys a stage by what the files hold."""
    h = hashlib.sha256()
    for root in paths:
        root_path = resolve_path(root)
        files = sorted(f for f in root_path.rglob("*") if f.is_file()) if root_path.is_dir() else [root_path]
        for f in files:
            h.update(
                f"{f.relative_to(root_path) if root_path.is_dir() else f.name}\0{file_sha256(f)}\n".encode()
            )
    return h.hexdigest()[:16]


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics mapping, as floats (booleans left out)."""
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def init_from_problems(model_dir: Path, seq_len: int, section: str = "train") -> list[str]:
    """Problems of a base model directory ``section.init_from``: a Hugging Face directory with a tokenizer and
    at least ``seq_len`` positions."""
    field = f"{section}.init_from: {str(model_dir)!r}"
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return [f"{field} is not a Hugging Face model directory (no config.json there)"]
    problems = []
    if not (model_dir / "tokenizer.json").is_file():
        problems.append(
            f"{field} has no tokenizer.json; fine-tuning tokenizes with the model's own tokenizer"
        )
    config: dict[str, Any] = json.loads(config_file.read_text())
    positions = config.get("n_positions") or config.get("max_position_embeddings")
    if positions is not None and config.get("model_type") == "roberta":
        positions -= 2  # RoBERTa's first two positions are the padding offset
    if positions is not None and seq_len > positions:
        problems.append(
            f"{section}.seq_len: {seq_len} is longer than the {positions} positions of {model_dir}; "
            f"set {section}.seq_len <= {positions}"
        )
    return problems


def document_figures(out_dir: Store, index: dict[str, Any]) -> dict[str, Any]:
    """A document stage's report section: in, kept, rejected (and whether they add up), the rejections by
    filter and signal, three examples of each."""
    c = index["counters"]
    rejected_dir = out_dir / REJECTED_DIR
    by_reason: Counter = Counter()
    examples: dict[str, list[dict[str, Any]]] = {}
    if read_index(rejected_dir) is not None:
        table = read_table(rejected_dir)
        if table.num_rows:
            rows = table.select(["url", "filter", "signal", "value", "threshold", "duplicate_of"]).to_pylist()
            for row in rows:
                reason = f"{row['filter']}:{row['signal']}"
                by_reason[reason] += 1
                if len(examples.setdefault(reason, [])) < 3:
                    examples[reason].append(row)
    return {
        "documents_in": c["documents_in"],
        "kept": c["kept"],
        "rejected": c["rejected"],
        "quarantined": c.get("quarantined", 0),
        "conserved": c["documents_in"] == c["kept"] + c["rejected"],
        "rejected_by_reason": dict(by_reason.most_common()),
        "examples": examples,
    }
