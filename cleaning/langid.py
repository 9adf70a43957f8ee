"""Language identification that works offline: py3langid's naive Bayes model over byte n-grams (140
languages; the model ships inside the package, nothing is downloaded), with normalized probabilities as
the score. Documents get ``lang`` and ``meta['lang_score']``; a filter keeps the listed languages above a
minimum score (FineWeb keeps English above 0.65, with fastText's model).

Accuracy on translated paragraphs of 200+ characters of the Debian Reference in 9 languages:
``benchmarks/langid.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from functools import cache

import numpy as np
import pyarrow as pa
from pydantic import Field

from core.stage import Stage, StageConfig, StageContext

#: Varieties the model tells apart that users mostly mean as one language.
MACRO_LANGUAGES = {"yue": "zh", "wuu": "zh", "cmn": "zh", "nb": "no", "nn": "no"}
_SPACES = re.compile(r"\s+")


@cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str, max_chars: int = 10_000, merge_varieties: bool = True) -> tuple[str, float]:
    """(language code, probability) of the text's first ``max_chars`` characters."""
    lang, score = _identifier().classify(_SPACES.sub(" ", text[:max_chars]).strip())
    if merge_varieties:
        lang = MACRO_LANGUAGES.get(lang, lang)
    return lang, float(score)


class LanguageFilterConfig(StageConfig):
    """Which languages to keep and how sure the model must be."""

    languages: list[str] | None = Field(
        ["en"], description="ISO 639 codes to keep; null keeps every language (documents are only labelled)."
    )
    min_score: float = Field(0.65, ge=0, le=1, description="Probability the language must exceed (FineWeb).")
    max_chars: int = Field(10_000, ge=100, description="Characters of each document the model reads.")
    merge_varieties: bool = Field(True, description="Report yue/wuu/cmn as zh and nb/nn as no.")

    def thresholds(self) -> dict[str, list[float]]:
        return {} if self.languages is None else {"lang_score": [self.min_score]}


class LanguageFilter(Stage):
    """Labels every document's language; rejects other languages (signal ``language``) and unsure
    predictions (signal ``lang_score``), both with the score as value."""

    name = "language"
    config: LanguageFilterConfig

    def run(self, batches: Iterable[pa.RecordBatch], ctx: StageContext) -> Iterator[pa.RecordBatch]:
        cfg = self.config
        wanted = None if cfg.languages is None else frozenset(cfg.languages)
        for batch in batches:
            found = [
                identify(t or "", cfg.max_chars, cfg.merge_varieties)
                for t in batch.column("text").to_pylist()
            ]
            langs = [f[0] for f in found]
            scores = np.array([f[1] for f in found])
            metas = [
                list(m or []) + [("lang_score", s)] for m, s in zip(batch.column("meta").to_pylist(), scores)
            ]
            batch = batch.set_column(
                batch.schema.get_field_index("lang"), "lang", pa.array(langs, pa.string())
            )
            batch = batch.set_column(
                batch.schema.get_field_index("meta"), "meta", pa.array(metas, batch.schema.field("meta").type)
            )
            for lang in langs:
                ctx.counters[f"language.{lang}"] += 1
            other = np.array([wanted is not None and lang not in wanted for lang in langs], dtype=bool)
            unsure = ~other & (scores <= cfg.min_score) if wanted is not None else np.zeros(len(langs), bool)
            for mask, signal in ((other, "language"), (unsure, "lang_score")):
                if mask.any():
                    ctx.reject(
                        batch.filter(pa.array(mask)),
                        filter=self.name,
                        signal=signal,
                        values=scores[mask].tolist(),
                        threshold=cfg.min_score,
                    )
            yield batch.filter(pa.array(~(other | unsure)))
