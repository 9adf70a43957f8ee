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

import numba
import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from core.stage import Stage, StageConfig, StageContext

#: Varieties the model tells apart that users mostly mean as one language.
MACRO_LANGUAGES = {"yue": "zh", "wuu": "zh", "cmn": "zh", "nb": "no", "nn": "no"}
_SPACES = re.compile(r"\s+")


@numba.njit(cache=True)
def _visits(
    nextmove: np.ndarray, rowbase: np.ndarray, output: np.ndarray, data: np.ndarray, slot: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """py3langid's ``visit_counts`` compiled: the features the byte DFA emits over ``data`` in order of
    first visit, and how often each was visited. ``slot`` (-1 for every feature) is scratch, left as it was."""
    found = np.empty(data.size, np.intp)
    counts = np.zeros(data.size, np.float32)
    n, state = 0, 0
    for letter in data:
        state = nextmove[rowbase[state] + letter]
        feature = output[state]
        if feature >= 0:
            if slot[feature] < 0:
                slot[feature] = n
                found[n] = feature
                n += 1
            counts[slot[feature]] += 1
    for i in range(n):
        slot[found[i]] = -1
    return found[:n], counts[:n]


def _identifier_class():
    from py3langid.langid import LanguageIdentifier

    class Identifier(LanguageIdentifier):
        """py3langid's identifier with its byte walk compiled (its Python loop was a third of the clean
        stage's time); the scores are the same numbers (``tests/cleaning/test_langid_pii.py``)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._walk = (
                np.frombuffer(self.tk_nextmove, dtype=np.uint32),
                np.asarray(self._rowbase, dtype=np.int64),
                np.asarray(self.tk_output, dtype=np.int64),
            )
            self._slot = np.full(max(self.tk_output) + 1, -1, dtype=np.int64)
            # float16 rows are cast to float32 before the product anyway; cast once (57 MB instead of 28)
            self._table = self.nb_ptc.astype(np.float32)

        def _raw_score(self, text: bytes) -> np.ndarray:
            found, counts = _visits(*self._walk, np.frombuffer(text, dtype=np.uint8), self._slot)
            if found.size:
                return np.log1p(counts) @ self._table[found] + self.nb_pc
            return super()._raw_score(b"")

    return Identifier


@cache
def _identifier():
    from py3langid.langid import MODEL_FILE

    return _identifier_class().from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str, max_chars: int = 10_000, merge_varieties: bool = True) -> tuple[str, float]:
    """(language code, probability) of the text's first ``max_chars`` characters."""
    lang, score = _identifier().classify(_SPACES.sub(" ", text[:max_chars]).strip())
    if merge_varieties:
        lang = MACRO_LANGUAGES.get(lang, lang)
    return lang, float(score)


_ISO_639 = re.compile(r"[a-z]{2,3}")


class LanguageFilterConfig(StageConfig):
    """Which languages to keep and how sure the model must be."""

    languages: list[str] | None = Field(
        ["en"], description="ISO 639 codes to keep; null keeps every language (documents are only labelled)."
    )
    min_score: float = Field(0.65, ge=0, le=1, description="Probability the language must exceed (FineWeb).")
    max_chars: int = Field(10_000, ge=100, description="Characters of each document the model reads.")
    merge_varieties: bool = Field(True, description="Report yue/wuu/cmn as zh and nb/nn as no.")

    @field_validator("languages")
    @classmethod
    def _iso_codes(cls, languages: list[str] | None) -> list[str] | None:
        """A name (``english``) instead of a code would reject every document: refused here."""
        for lang in languages or []:
            if not _ISO_639.fullmatch(lang):
                raise ValueError(
                    f"{lang!r} is not an ISO 639 language code (two or three lowercase letters: en, de, zh, yue)"
                )
        return languages

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
