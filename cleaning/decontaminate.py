"""Benchmark decontamination: remove documents that share an n-gram (13 words by default) with the
evaluation tasks in use, as GPT-3 (Brown et al. 2020, appendix C) and DataTrove's n-gram decontamination do.

Text is compared as lowercase words with punctuation dropped (``\\w+`` runs), so formatting does not hide
an overlap. The index maps the 64-bit hash of each task n-gram to the task and the n-gram itself; a
removed document's rejection names both (``signal``: ``<task>: <n-gram>``) and counts its matches
(``value``). With ``action: flag`` the document stays, its meta counting the matching n-grams of each
task (``decontaminate.<task>``), for studies of contamination. The index is built by orchestration from the tasks' own text (cleaning does not know tasks).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from core.stage import Stage, StageConfig, StageContext

_WORD = re.compile(r"\w+")


class DecontaminateConfig(StageConfig):
    """Remove documents sharing an n-gram with the evaluation tasks."""

    tasks: list[str] | None = Field(
        None, description="Tasks whose text to remove (built-in names or task files); null: evaluate.tasks."
    )
    n: int = Field(13, ge=3, le=50, description="N-gram length in words (13 as in GPT-3).")
    action: Literal["remove", "flag"] = Field(
        "remove",
        description="remove: reject the document (the rejection names the task and first n-gram); flag: keep "
        "it, with meta decontaminate.<task> = its matching n-grams.",
    )


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngram_hashes(tokens: list[str], n: int) -> np.ndarray:
    """64-bit hashes of every n-gram of ``tokens`` (blake2b of the words joined by spaces)."""
    if len(tokens) < n:
        return np.zeros(0, dtype=np.uint64)
    out = np.empty(len(tokens) - n + 1, dtype=np.uint64)
    for i in range(len(out)):
        digest = hashlib.blake2b(" ".join(tokens[i : i + n]).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little")
    return out


class NgramIndex:
    """Hash of each task n-gram -> (task, n-gram text)."""

    def __init__(self, n: int):
        self.n = n
        self.entries: dict[int, tuple[str, str]] = {}

    def add(self, task: str, texts: Iterable[str]) -> None:
        for text in texts:
            tokens = words(text)
            for i, h in enumerate(ngram_hashes(tokens, self.n).tolist()):
                self.entries.setdefault(h, (task, " ".join(tokens[i : i + self.n])))

    def __len__(self) -> int:
        return len(self.entries)


class Decontaminator(Stage):
    name = "decontaminate"
    config: DecontaminateConfig

    def __init__(self, config: DecontaminateConfig, index: NgramIndex):
        super().__init__(config)
        if index.n != config.n:
            raise ValueError(f"the n-gram index holds {index.n}-grams, decontaminate.n is {config.n}")
        self.index = index

    def _match(self, text: str) -> tuple[Counter[str], str | None]:
        """Matching n-grams per task, and ``<task>: <first matching n-gram>``."""
        entries = self.index.entries
        hit = [entries[h] for h in ngram_hashes(words(text), self.config.n).tolist() if h in entries]
        if not hit:
            return Counter(), None
        return Counter(task for task, _ in hit), f"{hit[0][0]}: {hit[0][1]}"

    def run(self, batches: Iterable[pa.RecordBatch], ctx: StageContext) -> Iterator[pa.RecordBatch]:
        flag = self.config.action == "flag"
        for batch in batches:
            found = [self._match(t or "") for t in batch.column("text").to_pylist()]
            for i, (per_task, signal) in enumerate(found):
                if not per_task:
                    continue
                for task in per_task:
                    ctx.counters[f"{self.name}.{'flagged.' if flag else ''}{task}"] += 1
                if not flag:  # one rejection per document: it names its first task and n-gram
                    ctx.reject(
                        batch.slice(i, 1),
                        filter=self.name,
                        signal=signal,
                        values=[float(per_task.total())],
                        threshold=1.0,
                    )
            if flag:
                metas = [
                    list(m or [])
                    + [(f"{self.name}.{task}", float(n)) for task, n in sorted(per_task.items())]
                    for m, (per_task, _) in zip(batch.column("meta").to_pylist(), found)
                ]
                meta_type = batch.schema.field("meta").type
                yield batch.set_column(
                    batch.schema.get_field_index("meta"), "meta", pa.array(metas, meta_type)
                )
            else:
                yield batch.filter(pa.array([not per_task for per_task, _ in found], type=pa.bool_()))
