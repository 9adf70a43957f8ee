"""Quality filters with the published thresholds as defaults: Gopher quality and repetition (Rae et al.
2021), C4 (Raffel et al. 2020), FineWeb (Penedo et al. 2024), and a URL block list. DataTrove 0.10.1's
implementations are the reference for every rule's details; ``benchmarks/filters.py`` measures the
agreement and the speed against them on real documents.

Every filter rejects with its name, the signal that broke a rule, its value and the threshold; a filter
checks its rules in the reference's order and reports the first one broken. ``None`` switches a rule off.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
from pydantic import Field

from cleaning.signals import FineWebSignals, RepetitionSignals, c4_lines
from cleaning.signals import gopher_quality_signals as gopher_signals
from core.stage import Stage, StageConfig, StageContext

#: A filter's decision on one document: None (kept) or (signal, value, threshold) of the rule it broke.
Verdict = tuple[str, float, float] | None


class TextFilter(Stage):
    """A filter judging one document at a time: ``judge`` returns the verdict and, for a kept document,
    its text if the filter rewrote it, and puts the signals it computed into ``signals``; they go to the
    document's ``meta`` as ``<signal_prefix>.<name>`` (a rejected document has those computed up to the
    rule it broke). Rejections are grouped by rule; counters go to the stage stats."""

    signal_prefix = ""

    def judge(self, text: str, signals: dict[str, float]) -> tuple[Verdict, str | None]:
        raise NotImplementedError

    def run(self, batches: Iterable[pa.RecordBatch], ctx: StageContext) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            texts = batch.column("text").to_pylist()
            verdicts, rewritten, computed = [], {}, []
            for i, text in enumerate(texts):
                signals: dict[str, float] = {}
                verdict, new_text = self.judge(text or "", signals)
                verdicts.append(verdict)
                computed.append(signals)
                if verdict is None and new_text is not None and new_text != text:
                    rewritten[i] = new_text
            yield self._apply(
                _with_signals(batch, computed, self.signal_prefix), texts, verdicts, rewritten, ctx
            )

    def _apply(
        self,
        batch: pa.RecordBatch,
        texts: list[str],
        verdicts: list[Verdict],
        rewritten: dict[int, str],
        ctx: StageContext,
    ) -> pa.RecordBatch:
        rules: dict[tuple[str, float], list[int]] = {}
        for i, v in enumerate(verdicts):
            if v is not None:
                rules.setdefault((v[0], v[2]), []).append(i)
        for (signal, threshold), rows in sorted(rules.items()):
            ctx.reject(
                batch.take(pa.array(rows)),
                filter=self.name,
                signal=signal,
                values=[verdicts[i][1] for i in rows],
                threshold=threshold,
            )
            ctx.counters[f"{self.name}.{signal}"] += len(rows)
        if rewritten:
            ctx.counters[f"{self.name}.rewritten"] += len(rewritten)
            new = [rewritten.get(i, t) for i, t in enumerate(texts)]
            batch = batch.set_column(batch.schema.get_field_index("text"), "text", pa.array(new, pa.string()))
        keep = np.array([v is None for v in verdicts], dtype=bool)
        ctx.counters[f"{self.name}.kept"] += int(keep.sum())
        return batch.filter(pa.array(keep))


def _with_signals(batch: pa.RecordBatch, signals: list[dict[str, float]], prefix: str) -> pa.RecordBatch:
    """The batch with each document's signals appended to its ``meta`` as ``prefix.name``."""
    if not any(signals):
        return batch
    metas = [
        list(m or []) + [(f"{prefix}.{k}", float(v)) for k, v in s.items()]
        for m, s in zip(batch.column("meta").to_pylist(), signals)
    ]
    field = batch.schema.get_field_index("meta")
    return batch.set_column(field, "meta", pa.array(metas, batch.schema.field("meta").type))


def _first_broken(rules: Iterable[tuple[str, float | None, float | None, bool]]) -> Verdict:
    """The first (signal, value, threshold) whose rule is on (threshold not None) and broken."""
    for signal, value, threshold, broken in rules:
        if threshold is not None and broken:
            return signal, float(value), float(threshold)
    return None


def _cuts(prefix: str, cuts: dict[str, list[float | None]]) -> dict[str, list[float]]:
    """``{prefix.signal: [thresholds]}`` for the rules that are on."""
    on = {f"{prefix}.{name}": [float(v) for v in values if v is not None] for name, values in cuts.items()}
    return {name: values for name, values in on.items() if values}


# -- Gopher quality -------------------------------------------------------------------------------------


class GopherQualityConfig(StageConfig):
    """Gopher quality rules (Rae et al. 2021, appendix A)."""

    min_doc_words: int | None = Field(50, description="Fewer non-symbol words than this: rejected.")
    max_doc_words: int | None = Field(100_000, description="More non-symbol words than this: rejected.")
    min_avg_word_length: float | None = Field(3, description="Mean word length below this: rejected.")
    max_avg_word_length: float | None = Field(10, description="Mean word length above this: rejected.")
    max_symbol_word_ratio: float | None = Field(
        0.1, description="'#' or ellipses per word above this: rejected."
    )
    max_bullet_lines_ratio: float | None = Field(0.9, description="Share of lines starting with a bullet.")
    max_ellipsis_lines_ratio: float | None = Field(0.3, description="Share of lines ending with an ellipsis.")
    min_alpha_words_ratio: float | None = Field(0.8, description="Share of words with a letter, at least.")
    min_stop_words: int | None = Field(
        2, description="Distinct English stop words required (the, be, to, of, and, that, have, with)."
    )

    def thresholds(self) -> dict[str, list[float]]:
        cuts = {
            "words": [self.min_doc_words, self.max_doc_words],
            "avg_word_length": [self.min_avg_word_length, self.max_avg_word_length],
            "hash_ratio": [self.max_symbol_word_ratio],
            "ellipsis_ratio": [self.max_symbol_word_ratio],
            "bullet_lines_ratio": [self.max_bullet_lines_ratio],
            "ellipsis_lines_ratio": [self.max_ellipsis_lines_ratio],
            "alpha_words_ratio": [self.min_alpha_words_ratio],
            "stop_words": [self.min_stop_words],
        }
        return _cuts("gopher", cuts)


def gopher_verdict(signals: dict[str, float], cfg: GopherQualityConfig) -> Verdict:
    """The first rule a document breaks as (signal, value, threshold), or None when it passes."""
    s = signals
    return _first_broken(
        [
            ("words", s["words"], cfg.min_doc_words, s["words"] < (cfg.min_doc_words or 0)),
            ("words", s["words"], cfg.max_doc_words, s["words"] > (cfg.max_doc_words or math.inf)),
            ("avg_word_length", s["avg_word_length"], cfg.min_avg_word_length,
             s["avg_word_length"] < (cfg.min_avg_word_length or 0)),
            ("avg_word_length", s["avg_word_length"], cfg.max_avg_word_length,
             s["avg_word_length"] > (cfg.max_avg_word_length or math.inf)),
            ("hash_ratio", s["hash_ratio"], cfg.max_symbol_word_ratio,
             s["hash_ratio"] > (cfg.max_symbol_word_ratio or math.inf)),
            ("ellipsis_ratio", s["ellipsis_ratio"], cfg.max_symbol_word_ratio,
             s["ellipsis_ratio"] > (cfg.max_symbol_word_ratio or math.inf)),
            ("bullet_lines_ratio", s["bullet_lines_ratio"], cfg.max_bullet_lines_ratio,
             s["bullet_lines_ratio"] > (cfg.max_bullet_lines_ratio or math.inf)),
            ("ellipsis_lines_ratio", s["ellipsis_lines_ratio"], cfg.max_ellipsis_lines_ratio,
             s["ellipsis_lines_ratio"] > (cfg.max_ellipsis_lines_ratio or math.inf)),
            ("alpha_words_ratio", s["alpha_words_ratio"], cfg.min_alpha_words_ratio,
             s["alpha_words_ratio"] < (cfg.min_alpha_words_ratio or 0)),
            ("stop_words", s["stop_words"], cfg.min_stop_words, s["stop_words"] < (cfg.min_stop_words or 0)),
        ]
    )  # fmt: skip


class GopherQualityFilter(TextFilter):
    """Rejects documents that break a Gopher quality rule; kept ones carry the signals in ``meta``."""

    name = "gopher_quality"
    config: GopherQualityConfig

    def run(self, batches: Iterable[pa.RecordBatch], ctx: StageContext) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            texts = batch.column("text").to_pylist()
            signals = [gopher_signals(t or "") for t in texts]
            verdicts = [gopher_verdict(s, self.config) for s in signals]
            yield self._apply(_with_signals(batch, signals, "gopher"), texts, verdicts, {}, ctx)


# -- Gopher repetition ----------------------------------------------------------------------------------


class GopherRepetitionConfig(StageConfig):
    """Gopher repetition rules (Rae et al. 2021, table A1): fractions above these are rejected."""

    dup_para_frac: float | None = Field(0.3, description="Paragraphs equal to an earlier one.")
    dup_para_char_frac: float | None = Field(0.2, description="Characters in duplicate paragraphs.")
    dup_line_frac: float | None = Field(0.3, description="Lines equal to an earlier one.")
    dup_line_char_frac: float | None = Field(0.2, description="Characters in duplicate lines.")
    top_n_grams: dict[int, float] = Field(
        {2: 0.2, 3: 0.18, 4: 0.16}, description="n -> characters of the most frequent n-gram, at most."
    )
    dup_n_grams: dict[int, float] = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> characters in repeated n-grams, at most.",
    )

    def thresholds(self) -> dict[str, list[float]]:
        fracs = ("dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac")
        cuts = {name: [getattr(self, name)] for name in fracs}
        cuts |= {f"top_{n}_gram": [v] for n, v in self.top_n_grams.items()}
        cuts |= {f"duplicated_{n}_n_grams": [v] for n, v in self.dup_n_grams.items()}
        return _cuts("repetition", cuts)


class GopherRepetitionFilter(TextFilter):
    """Rejects documents with too much repeated text: paragraphs, lines, top n-grams, duplicate n-grams."""

    name = "gopher_repetition"
    signal_prefix = "repetition"
    config: GopherRepetitionConfig

    def judge(self, text: str, signals: dict[str, float]) -> tuple[Verdict, str | None]:
        return repetition_verdict(text, self.config, signals), None


def repetition_verdict(
    text: str, cfg: GopherRepetitionConfig, computed: dict[str, float] | None = None
) -> Verdict:
    """The first Gopher repetition rule ``text`` breaks, in the reference's order, or None; the signals
    computed on the way go into ``computed``."""
    if not text:
        return "empty", 0.0, 1.0
    seen = computed if computed is not None else {}
    signals = RepetitionSignals(text)
    seen["dup_para_frac"], seen["dup_para_char_frac"] = signals.paragraphs()
    for name in ("dup_para_frac", "dup_para_char_frac"):
        if (limit := getattr(cfg, name)) and seen[name] > limit:
            return name, seen[name], limit
    seen["dup_line_frac"], seen["dup_line_char_frac"] = signals.lines()
    for name in ("dup_line_frac", "dup_line_char_frac"):
        if (limit := getattr(cfg, name)) and seen[name] > limit:
            return name, seen[name], limit
    for n, limit in sorted(cfg.top_n_grams.items()):
        value = signals.top_ngram(n)
        if value is not None:
            seen[f"top_{n}_gram"] = value
            if value > limit:
                return f"top_{n}_gram", value, limit
    for n, limit in sorted(cfg.dup_n_grams.items()):
        value = seen[f"duplicated_{n}_n_grams"] = signals.duplicate_ngrams(n)
        if value > limit:
            return f"duplicated_{n}_n_grams", value, limit
    return None


# -- C4 -------------------------------------------------------------------------------------------------


class C4QualityConfig(StageConfig):
    """C4's rules (Raffel et al. 2020, section 2.2, and its code): lines kept only when they end in
    terminal punctuation, have 3+ words, no 1000+-character word, no "javascript", no cookie/terms
    phrases; pages dropped for "lorem ipsum", a curly bracket, or fewer than 5 sentences left."""

    remove_citations: bool = Field(True, description="Strip Wikipedia-style [1], [edit], [citation needed].")
    filter_no_terminal_punct: bool = Field(True, description="Drop lines without terminal punctuation.")
    min_num_sentences: int = Field(5, description="Fewer sentences left: page rejected (-1: off).")
    min_words_per_line: int = Field(3, description="Drop lines with fewer words (-1: off).")
    max_word_length: int = Field(1000, description="Drop lines with a longer word (-1: off).")
    filter_lorem_ipsum: bool = Field(True, description="Reject pages containing 'lorem ipsum'.")
    filter_javascript: bool = Field(True, description="Drop lines mentioning javascript.")
    filter_curly_bracket: bool = Field(True, description="Reject pages containing '{'.")
    filter_policy: bool = Field(True, description="Drop lines with cookie/privacy/terms phrases.")

    def thresholds(self) -> dict[str, list[float]]:
        return _cuts("c4", {"sentences": [self.min_num_sentences if self.min_num_sentences != -1 else None]})


class C4QualityFilter(TextFilter):
    """Applies C4's line rules and rewrites kept pages to their kept lines."""

    name = "c4_quality"
    signal_prefix = "c4"
    config: C4QualityConfig

    def judge(self, text: str, signals: dict[str, float]) -> tuple[Verdict, str | None]:
        cfg = self.config
        dropped, kept, sentences, _ = c4_lines(
            text,
            remove_citations=cfg.remove_citations,
            terminal_punct=cfg.filter_no_terminal_punct,
            min_words_per_line=cfg.min_words_per_line,
            max_word_length=cfg.max_word_length,
            lorem_ipsum=cfg.filter_lorem_ipsum,
            javascript=cfg.filter_javascript,
            curly_bracket=cfg.filter_curly_bracket,
            policy=cfg.filter_policy,
        )
        if dropped is not None:
            return (dropped, 1.0, 1.0), None
        signals["sentences"] = sentences
        if cfg.min_num_sentences != -1 and sentences < cfg.min_num_sentences:
            return ("sentences", float(sentences), float(cfg.min_num_sentences)), None
        return None, "\n".join(kept).strip()


# -- FineWeb --------------------------------------------------------------------------------------------


class FineWebQualityConfig(StageConfig):
    """FineWeb's rules (Penedo et al. 2024)."""

    line_punct_thr: float | None = Field(0.12, description="Share of lines ending in punctuation, at least.")
    line_punct_exclude_zero: bool = Field(False, description="Keep pages where no line ends in punctuation.")
    short_line_thr: float | None = Field(0.67, description="Share of short lines, at most.")
    short_line_length: int = Field(30, description="A line of at most this many characters is short.")
    char_duplicates_ratio: float | None = Field(0.01, description="Characters in duplicate lines, at most.")
    new_line_ratio: float | None = Field(0.3, description="Newlines per word, at most.")

    def thresholds(self) -> dict[str, list[float]]:
        cuts = {
            "line_punct_ratio": [self.line_punct_thr],
            "short_line_ratio": [self.short_line_thr],
            "char_dup_ratio": [self.char_duplicates_ratio],
            "list_ratio": [self.new_line_ratio],
        }
        return _cuts("fineweb", cuts)


class FineWebQualityFilter(TextFilter):
    """Rejects list-like, fragmentary or repetitive pages by FineWeb's line rules."""

    name = "fineweb_quality"
    signal_prefix = "fineweb"
    config: FineWebQualityConfig

    def judge(self, text: str, signals: dict[str, float]) -> tuple[Verdict, str | None]:
        cfg = self.config
        lines = FineWebSignals(text)
        if not lines.lines:
            return ("empty", 0.0, 1.0), None
        if cfg.line_punct_thr is not None:
            ratio = signals["line_punct_ratio"] = lines.line_punct_ratio()
            if ratio < cfg.line_punct_thr and not (ratio == 0 and cfg.line_punct_exclude_zero):
                return ("line_punct_ratio", ratio, cfg.line_punct_thr), None
        rules = (
            ("short_line_ratio", cfg.short_line_thr, lambda: lines.short_line_ratio(cfg.short_line_length)),
            ("char_dup_ratio", cfg.char_duplicates_ratio, lines.char_dup_ratio),
            ("list_ratio", cfg.new_line_ratio, lines.list_ratio),
        )
        for name, limit, compute in rules:
            if limit is not None:
                ratio = signals[name] = compute()
                if ratio > limit:
                    return (name, ratio, limit), None
        return None, None


# -- URL block list -------------------------------------------------------------------------------------


class UrlBlocklistConfig(StageConfig):
    """A user-supplied block list: one domain (blocks it and its subdomains) or URL prefix per line;
    blank lines and ``#`` comments are skipped."""

    path: Path = Field(description="The block list file.")


class UrlBlocklistFilter(Stage):
    """Rejects documents whose URL's host is (a subdomain of) a listed domain, or that start with a
    listed URL prefix."""

    name = "url_blocklist"
    config: UrlBlocklistConfig

    def __init__(self, config: UrlBlocklistConfig):
        super().__init__(config)
        if not config.path.is_file():
            raise FileNotFoundError(f"url block list {config.path} does not exist")
        entries = [line.split("#", 1)[0].strip() for line in config.path.read_text().splitlines()]
        entries = [e for e in entries if e]
        self.prefixes = tuple(e for e in entries if "/" in e)
        self.domains = frozenset(e.lower().strip(".") for e in entries if "/" not in e)

    def blocked(self, url: str | None) -> bool:
        if not url:
            return False
        if self.prefixes and url.startswith(self.prefixes):
            return True
        host = (urlsplit(url).hostname or "").lower()
        parts = host.split(".")
        return any(".".join(parts[i:]) in self.domains for i in range(len(parts)))

    def run(self, batches: Iterable[pa.RecordBatch], ctx: StageContext) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            hit = np.array([self.blocked(u) for u in batch.column("url").to_pylist()], dtype=bool)
            if hit.any():
                n = int(hit.sum())
                ctx.reject(
                    batch.filter(pa.array(hit)),
                    filter=self.name,
                    signal="url",
                    values=[1.0] * n,
                    threshold=1.0,
                )
            yield batch.filter(pa.array(~hit))
