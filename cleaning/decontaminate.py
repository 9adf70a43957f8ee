"""Benchmark decontamination: remove documents that share an n-gram (13 words by default) with the
evaluation tasks in use, as GPT-3 (Brown et al. 2020, appendix C) and DataTrove's n-gram decontamination do.

Text is compared as lowercase words with punctuation dropped (``\\w+`` runs), so formatting does not hide
an overlap. The index maps the 64-bit hash of each task n-gram to the task and the n-gram itself; a
removed document's rejection names both (``signal``: ``<task>: <n-gram>``) and counts its matches
(``value``). The index is built by orchestration from the tasks' own text (cleaning does not know tasks).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator

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

    def _match(self, text: str) -> tuple[int, str | None]:
        entries = self.index.entries
        hit = [h for h in ngram_hashes(words(text), self.config.n).tolist() if h in entries]
        if not hit:
            return 0, None
        task, gram = entries[hit[0]]
        return len(hit), f"{task}: {gram}"

    def run(self, batches: Iterable[pa.RecordBatch], ctx: StageContext) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            found = [self._match(t or "") for t in batch.column("text").to_pylist()]
            for i, (count, signal) in enumerate(found):
                if count:  # one rejection per document: each names its own task and n-gram
                    ctx.counters[f"{self.name}.{signal.split(':', 1)[0]}"] += 1  # type: ignore[union-attr]
                    ctx.reject(
                        batch.slice(i, 1),
                        filter=self.name,
                        signal=signal,
                        values=[float(count)],
                        threshold=1.0,
                    )
            yield batch.filter(pa.array([count == 0 for count, _ in found], type=pa.bool_()))
