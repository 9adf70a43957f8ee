"""Quality filters with the thresholds published by Gopher (Rae et al. 2021, appendix A), as in DataTrove."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
from pydantic import Field

from orchestration.stage import Stage, StageConfig, StageContext

# Words and punctuation runs, close to what spaCy's English tokenizer yields for web text.
_WORDS = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~’‘“”–—…")
_BULLETS = ("•", "-", "*", "‣", "⁃", "◦")


def split_words(text: str) -> list[str]:
    """Word tokenization used by the quality filters."""
    return _WORDS.findall(text)


class GopherQualityConfig(StageConfig):
    """Gopher quality rules; ``None`` switches a rule off."""

    min_doc_words: int | None = Field(50, description="Fewer non-symbol words than this: rejected.")
    max_doc_words: int | None = Field(100_000, description="More non-symbol words than this: rejected.")
    min_avg_word_length: float | None = Field(3, description="Mean word length below this: rejected.")
    max_avg_word_length: float | None = Field(10, description="Mean word length above this: rejected.")
    max_symbol_word_ratio: float | None = Field(
        0.1, description="'#' or '...' per word above this: rejected."
    )
    max_bullet_lines_ratio: float | None = Field(0.9, description="Share of lines starting with a bullet.")
    max_ellipsis_lines_ratio: float | None = Field(0.3, description="Share of lines ending with an ellipsis.")
    min_alpha_words_ratio: float | None = Field(0.8, description="Share of words with a letter, at least.")
    min_stop_words: int | None = Field(2, description="English stop words required (the, be, to, of, ...).")


def gopher_signals(text: str) -> dict[str, float]:
    """All Gopher quality signals of one text."""
    words = split_words(text)
    n = len(words)
    non_symbol = [w for w in words if any(ch not in _PUNCT for ch in w)]
    lines = text.splitlines() or [""]
    return {
        "words": float(len(non_symbol)),
        "avg_word_length": float(np.mean([len(w) for w in non_symbol])) if non_symbol else 0.0,
        "hash_ratio": text.count("#") / n if n else 0.0,
        "ellipsis_ratio": (text.count("...") + text.count("…")) / n if n else 0.0,
        "bullet_lines_ratio": sum(line.lstrip().startswith(_BULLETS) for line in lines) / len(lines),
        "ellipsis_lines_ratio": sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines),
        "alpha_words_ratio": sum(any(c.isalpha() for c in w) for w in words) / n if n else 0.0,
        "stop_words": float(sum(w.lower() in STOP_WORDS for w in words)),
    }


def gopher_verdict(signals: dict[str, float], cfg: GopherQualityConfig) -> tuple[str, float, float] | None:
    """The first rule a document breaks as (signal, value, threshold), or None when it passes."""
    rules = [
        ("words", cfg.min_doc_words, lambda v, t: v < t),
        ("words", cfg.max_doc_words, lambda v, t: v > t),
        ("avg_word_length", cfg.min_avg_word_length, lambda v, t: v < t),
        ("avg_word_length", cfg.max_avg_word_length, lambda v, t: v > t),
        ("hash_ratio", cfg.max_symbol_word_ratio, lambda v, t: v > t),
        ("ellipsis_ratio", cfg.max_symbol_word_ratio, lambda v, t: v > t),
        ("bullet_lines_ratio", cfg.max_bullet_lines_ratio, lambda v, t: v > t),
        ("ellipsis_lines_ratio", cfg.max_ellipsis_lines_ratio, lambda v, t: v > t),
        ("alpha_words_ratio", cfg.min_alpha_words_ratio, lambda v, t: v < t),
        ("stop_words", cfg.min_stop_words, lambda v, t: v < t),
    ]
    for signal, threshold, breaks in rules:
        if threshold is not None and breaks(signals[signal], threshold):
            return signal, signals[signal], float(threshold)
    return None


class GopherQualityFilter(Stage):
    """Rejects documents that break a Gopher quality rule; kept ones carry the signals in ``meta``."""

    name = "gopher_quality"
    config: GopherQualityConfig

    def run(self, batches: Iterable[pa.RecordBatch], ctx: StageContext) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            signals = [gopher_signals(t) for t in batch.column("text").to_pylist()]
            verdicts = [gopher_verdict(s, self.config) for s in signals]
            metas = [
                list(m or []) + [(f"gopher.{k}", v) for k, v in s.items()]
                for m, s in zip(batch.column("meta").to_pylist(), signals)
            ]
            batch = batch.set_column(
                batch.schema.get_field_index("meta"), "meta", pa.array(metas, batch.schema.field("meta").type)
            )
            keep = np.array([v is None for v in verdicts], dtype=bool)
            for signal, threshold in sorted({v[0::2] for v in verdicts if v is not None}):
                idx = [i for i, v in enumerate(verdicts) if v is not None and v[0::2] == (signal, threshold)]
                ctx.reject(
                    batch.take(pa.array(idx)),
                    filter=self.name,
                    signal=signal,
                    values=[verdicts[i][1] for i in idx],
                    threshold=threshold,
                )
            yield batch.filter(pa.array(keep))
