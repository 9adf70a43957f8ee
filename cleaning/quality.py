"""Learned quality scores: a fastText classifier trained as DCLM trains its filter (a reference corpus of the
text wanted against a random sample of the crawl, word bigrams, hashed buckets), the scoring of documents
with it, and the selection by score (a threshold, the corpus-wide top fraction, or quality tiers).

The classifier is fastText's own (``fasttext-community``: fastText's C++ behind the original Python API, a
maintained fork with wheels for current Python and numpy). A document's text is one fastText line: its
newlines become spaces (fastText reads one line per example), the same for training and for scoring.

Scores go to each document's ``meta``: ``quality.score`` (the classifier's probability of the positive
label), ``quality.label`` (1 where the positive label is the likelier) and, with tiers, ``quality.tier``. A
document removed by the selection is rejected with filter ``quality``, the signal ``quality.score@<digest>``
(naming the classifier), its score and the cut.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.schema import QUALITY_TIER, append_meta
from core.stage import Stage, StageConfig, StageContext

POSITIVE, NEGATIVE = "__label__hq", "__label__lq"
#: How the classifier's sides and ``quality.sources`` name the one corpus of a config without sources.
ONE_CORPUS = "corpus"
SCORE, LABEL, TIER = "quality.score", "quality.label", QUALITY_TIER


def fasttext_line(text: str) -> str:
    """A document as the one line fastText reads (training and scoring alike): its line breaks spaces
    (fastText splits words at any ASCII whitespace, and reads a newline as the end of the example)."""
    return text.replace("\n", " ")


class FastTextConfig(BaseModel):
    """fastText's supervised training. fastText's defaults, with word bigrams as DCLM's classifier; one
    thread, so the same data and seed give the same model (the cache key stands for it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lr: float = Field(0.1, gt=0, description="Learning rate.")
    dim: int = Field(100, ge=1, description="Size of the word vectors.")
    epoch: int = Field(5, ge=1, description="Passes over the training data.")
    word_ngrams: int = Field(2, ge=1, description="Word n-grams (2: unigrams and bigrams, as DCLM).")
    min_count: int = Field(1, ge=1, description="Words seen fewer times are dropped.")
    bucket: int = Field(
        2_000_000,
        ge=1,
        description="Hashed n-gram buckets (the model holds dim x bucket floats: 800 MB at the default; "
        "200,000 is 80 MB)",
    )
    seed: int = Field(0, description="fastText's random seed.")


class FileSide(BaseModel):
    """Documents of one class from files: any corpus ``read.paths`` reads (HTML pages are extracted)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    paths: list[str] = Field(min_length=1, description="Files, directories or globs.")
    text_field: str = "text"
    id_field: str = "id"
    url_field: str = "url"


class SourceSide(BaseModel):
    """Documents of one class from a source of the pipeline, as its own chain left them (cleaned and
    deduplicated)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(min_length=1, description="A name in ``sources`` (without sources: corpus).")


Side = SourceSide | FileSide


class LabeledFile(BaseModel):
    """Annotated documents (FineWeb-Edu's recipe): a JSONL or Parquet file with a text and a label column;
    a document is positive where its label is in ``positive`` or, numeric, at least ``min_score``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    paths: list[str] = Field(min_length=1)
    text_field: str = "text"
    label_field: str = "label"
    positive: list[str] = Field(default_factory=list, description="Labels that mark a positive document.")
    min_score: float | None = Field(
        None, description="A numeric label at least this is positive (FineWeb-Edu: 3)."
    )

    @model_validator(mode="after")
    def _one_rule(self) -> LabeledFile:
        if bool(self.positive) == (self.min_score is not None):
            raise ValueError("set one of positive (labels) or min_score (a numeric label's cut)")
        return self

    def is_positive(self, label: Any) -> bool:
        if self.min_score is not None:
            return label is not None and float(label) >= self.min_score
        return str(label) in self.positive


class ClassifierConfig(BaseModel):
    """Where the classifier's training data comes from, and how it is trained."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["fasttext", "encoder"] = Field(
        "fasttext",
        description="fasttext: DCLM's bigram classifier; encoder: a fine-tuned sequence classifier.",
    )
    positive: list[Side] = Field(default_factory=list, description="Text wanted: sources or files.")
    negative: list[Side] = Field(default_factory=list, description="Text not wanted (a crawl's sample).")
    labeled: LabeledFile | None = Field(None, description="Annotated documents instead of two sides.")
    max_documents: int = Field(
        100_000, ge=2, description="At most this many documents per class (those of the lowest id hash)."
    )
    test_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="Share of each class (lowest id hash) held out to measure the classifier.",
    )
    fasttext: FastTextConfig = Field(default_factory=FastTextConfig)
    encoder: dict[str, Any] | None = Field(
        None,
        description="kind encoder: lmforge's fine-tuning settings for the classifier (the finetune section's "
        "fields: init_from, an encoder's Hugging Face directory, is required; seq_len, steps, lr, ...)",
    )
    scoring_batch_size: int = Field(
        64, ge=1, description="kind encoder: texts per forward pass when scoring."
    )

    @model_validator(mode="after")
    def _data(self) -> ClassifierConfig:
        if self.kind == "encoder" and not (self.encoder or {}).get("init_from"):
            raise ValueError("kind encoder fine-tunes a model: set encoder.init_from to its directory")
        if self.kind == "fasttext" and self.encoder is not None:
            raise ValueError("encoder is for kind encoder (kind is fasttext)")
        sides = bool(self.positive) and bool(self.negative)
        if self.labeled is None and not sides:
            raise ValueError("name positive and negative documents, or a labeled file")
        if self.labeled is not None and (self.positive or self.negative):
            raise ValueError("labeled replaces positive and negative: set one or the other")
        return self

    def sources(self) -> list[str]:
        return [s.source for s in [*self.positive, *self.negative] if isinstance(s, SourceSide)]


class SelectConfig(BaseModel):
    """Which scored documents are kept: those at or above a score, the corpus-wide top fraction (ties by
    id), or all of them, bucketed into tiers by score (for a mixture to weigh)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float | None = Field(None, description="Keep documents whose score is at least this.")
    top_fraction: float | None = Field(
        None, gt=0, le=1, description="Keep this share of the scored documents, the highest scores."
    )
    tiers: list[float] | None = Field(
        None, min_length=1, description="Keep all; tier i holds scores in [tiers[i-1], tiers[i])."
    )

    @model_validator(mode="after")
    def _one(self) -> SelectConfig:
        chosen = [n for n in ("threshold", "top_fraction", "tiers") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError(f"set exactly one of threshold, top_fraction, tiers (got {chosen or 'none'})")
        if self.tiers is not None and list(self.tiers) != sorted(set(self.tiers)):
            raise ValueError(f"tiers must increase: {self.tiers}")
        return self


class QualityConfig(BaseModel):
    """The quality classifier, what it scores and what it keeps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    classifier: ClassifierConfig
    select: SelectConfig = Field(default_factory=lambda: SelectConfig(threshold=0.5))
    sources: list[str] | None = Field(
        None, description="The sources scored (None: all); the others pass through unscored."
    )
    batch_size: int = Field(1024, ge=1, description="Documents scored per batch.")


# -- training ----------------------------------------------------------------------------------------------


def id_hash(doc_id: str) -> int:
    """The 64-bit hash that orders documents for sampling and splitting (sha256 of the id)."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big")


def held_out(examples: list[tuple[str, bool]], fraction: float) -> list[bool]:
    """Which (id, label) examples are held out: per class, the ``round(fraction * n)`` of lowest id hash,
    at least one and never all of a class of two or more. Stratified so that a small class (a dozen
    pages of a demo site) cannot miss from either split by chance; the same whatever order the examples
    come in."""
    out = [False] * len(examples)
    for label in (True, False):
        members = sorted((id_hash(i), i, k) for k, (i, y) in enumerate(examples) if y == label)
        n = len(members)
        count = min(max(round(fraction * n), 1), n - 1) if n > 1 else 0
        for _, _, k in members[:count]:
            out[k] = True
    return out


def sample(docs: Iterable[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """The ``n`` (id, text) pairs of the lowest id hash, in that order: a random sample that is the same
    whatever order the documents come in (a repeated id counts once there)."""
    import heapq

    lowest = heapq.nsmallest(n, ((id_hash(i), i, t) for i, t in docs), key=lambda e: e[:2])
    return list({i: (i, t) for _, i, t in lowest}.values())


def write_training_file(path: Path, examples: list[tuple[str, bool]], seed: int) -> int:
    """fastText's training file: one ``__label__hq``/``__label__lq`` line per example, in an order shuffled
    by ``seed`` (fastText learns in file order). Returns the lines written."""
    order = np.random.default_rng(seed).permutation(len(examples))
    with path.open("w", encoding="utf-8") as f:
        for i in order:
            text, positive = examples[i]
            f.write(f"{POSITIVE if positive else NEGATIVE} {fasttext_line(text)}\n")
    return len(examples)


def train_fasttext(train_file: Path, model_file: Path, cfg: FastTextConfig) -> None:
    import fasttext

    model = fasttext.train_supervised(
        str(train_file),
        lr=cfg.lr,
        dim=cfg.dim,
        epoch=cfg.epoch,
        wordNgrams=cfg.word_ngrams,
        minCount=cfg.min_count,
        bucket=cfg.bucket,
        seed=cfg.seed,
        thread=1,
        verbose=0,
    )
    model.save_model(str(model_file))


def binary_metrics(truth: list[bool], predicted: list[bool]) -> dict[str, float]:
    """Precision, recall and F1 of the positive class, and accuracy."""
    tp = sum(t and p for t, p in zip(truth, predicted))
    fp = sum(p and not t for t, p in zip(truth, predicted))
    fn = sum(t and not p for t, p in zip(truth, predicted))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    correct = sum(t == p for t, p in zip(truth, predicted))
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": correct / len(truth) if truth else 0.0,
    }


# -- scoring -----------------------------------------------------------------------------------------------


class FastTextScorer:
    """A trained fastText classifier: each text's probability of the positive label."""

    def __init__(self, model_file: str | Path):
        import fasttext

        self.model = fasttext.load_model(str(model_file))
        if set(self.model.get_labels()) != {POSITIVE, NEGATIVE}:
            raise ValueError(
                f"{model_file}: labels {self.model.get_labels()}, expected {POSITIVE}, {NEGATIVE}"
            )

    def scores(self, texts: list[str]) -> np.ndarray:
        # what model.predict(list, k=2) calls, each line built once (predict copies every line again to
        # check it has no newline and to append one)
        lines = [fasttext_line(t) + "\n" for t in texts]
        labels, probs = self.model.f.multilinePredict(lines, 2, 0.0, "strict")
        # each row: both labels, likelier first; the positive one's probability (fastText's float32)
        return np.array(
            [p[0] if ls[0] == POSITIVE else p[1] for ls, p in zip(labels, probs)], dtype=np.float32
        )


#: A classifier as the quality stage uses it: texts -> their scores (float32).
Scorer = Callable[[list[str]], np.ndarray]


def fasttext_scorer(model_dir: str) -> Scorer:
    """A fastText classifier directory's scoring function (a node-local copy of a remote one)."""
    from core.storage import local_copy

    return FastTextScorer(local_copy(model_dir) / MODEL_FILE).scores


class Cut(BaseModel):
    """Keep a document where (score, id) ranks at or above (score, last_id): a higher score, or the same
    score and an id not after ``last_id`` (None: every document at ``score`` is kept)."""

    model_config = ConfigDict(frozen=True)

    score: float
    last_id: str | None = None


#: The classifier's file in its directory.
MODEL_FILE = "model.bin"


class QualityScoreConfig(StageConfig):
    digest: str = Field(description="The classifier's digest, named in each rejection's signal.")
    model_dir: str = Field("", description="The classifier's directory or URI; empty: documents come scored.")
    passthrough: bool = Field(False, description="Pass the documents on unscored (a source not scored).")
    threshold: float | None = None
    cut: Cut | None = None
    tiers: list[float] | None = None
    batch_size: int = 1024


class QualityScorer(Stage):
    """Scores each document into its ``meta`` and keeps those the selection keeps: a threshold, a cut
    (the top fraction's, computed over the whole corpus by :func:`top_cut`), or all (with tiers, or
    scoring only). With ``model_dir`` empty, documents already scored are only cut (``meta`` read)."""

    name = "quality"
    config: QualityScoreConfig

    def __init__(self, config: QualityScoreConfig, load: Callable[[str], Scorer] | None = None):
        """``load``: the classifier directory's scoring function (default: a fastText classifier's); a
        module-level function (or a partial of one), as the stage is sent to Ray tasks."""
        super().__init__(config)
        self._load = load or fasttext_scorer
        self._scorer: Scorer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_scorer": None}  # a loaded classifier stays in its process

    def _score(self, batch: pa.RecordBatch) -> np.ndarray:
        if not self.config.model_dir:
            return scores_of(batch)
        if self._scorer is None:
            self._scorer = self._load(self.config.model_dir)
        return self._scorer(batch.column("text").to_pylist())

    def run(self, batches: Iterable[pa.RecordBatch], ctx: StageContext) -> Iterator[pa.RecordBatch]:
        c = self.config
        if c.passthrough:
            yield from batches
            return
        for big in batches:
            for start in range(0, big.num_rows, c.batch_size):
                batch = big.slice(start, c.batch_size)
                scores = self._score(batch)
                if c.model_dir:
                    extra = {SCORE: scores.astype(np.float64), LABEL: (scores > 0.5).astype(np.float64)}
                    if c.tiers is not None:
                        extra[TIER] = np.searchsorted(np.asarray(c.tiers), scores, side="right").astype(float)
                    batch = append_meta(batch, extra)
                ctx.counters["quality.scored"] += batch.num_rows
                keep = self._keep(batch, scores)
                if keep is None or keep.all():
                    yield batch
                    continue
                threshold = c.threshold if c.threshold is not None else c.cut.score  # type: ignore[union-attr]
                dropped = np.flatnonzero(~keep)
                ctx.reject(
                    batch.take(pa.array(dropped)),
                    filter=self.name,
                    signal=f"{SCORE}@{c.digest[:12]}",
                    values=scores[dropped].astype(np.float64).tolist(),
                    threshold=threshold,
                )
                yield batch.filter(pa.array(keep))

    def _keep(self, batch: pa.RecordBatch, scores: np.ndarray) -> np.ndarray | None:
        c = self.config
        if c.threshold is not None:
            return scores >= np.float32(c.threshold)
        if c.cut is None:
            return None
        at = np.float32(c.cut.score)
        keep = scores > at
        if c.cut.last_id is None:
            return keep | (scores == at)
        ties = np.flatnonzero(scores == at)
        ids = batch.column("id").to_pylist()
        keep[ties] = [ids[i] <= c.cut.last_id for i in ties]
        return keep


def scores_of(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    """The ``quality.score`` of each scored document of a batch (float32, as the classifier gave it)."""
    import pyarrow.compute as pc

    values = pc.map_lookup(batch.column("meta"), SCORE, "first")
    if values.null_count:
        raise ValueError(f"{values.null_count} document(s) have no {SCORE} in meta")
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64).astype(np.float32)


# -- the top fraction: an exact cut without gathering the scores --------------------------------------------


def _keys(scores: np.ndarray) -> np.ndarray:
    """float32 scores as uint32 keys in the same order (the IEEE bits, sign-folded; -0.0 is 0.0)."""
    bits = (np.asarray(scores, dtype=np.float32) + np.float32(0)).view(np.uint32)
    return np.where(bits & 0x80000000, ~bits, bits | 0x80000000).astype(np.uint32)


def _score_of(key: int) -> float:
    bits = key & 0x7FFFFFFF if key & 0x80000000 else ~key & 0xFFFFFFFF
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def top_cut(partitions: Callable[[bool], Iterator[tuple[np.ndarray, list[str] | None]]], k: int) -> Cut:
    """The cut keeping exactly the ``k`` best of all scored documents, ranked by score (highest first)
    then id (lowest first). ``partitions(with_ids)`` streams (scores, ids or None) one partition at a
    time; memory holds one partition, two 65,536-bin histograms and at
    most ``k`` tied ids, never all the scores.

    Three passes: the histogram of the keys' high 16 bits finds the bin holding the k-th score, the low
    16 bits within it the score itself, then the ids at that score the last one kept."""
    if k < 1:
        raise ValueError(f"keep at least one document (k={k})")
    high = np.zeros(1 << 16, np.int64)
    total = 0
    for scores, _ in partitions(False):
        high += np.bincount(_keys(scores) >> 16, minlength=1 << 16)
        total += scores.size
    if k >= total:
        return Cut(score=float("-inf"))
    above = np.cumsum(high[::-1])  # above[j]: documents in the top j+1 bins
    j = int(np.searchsorted(above, k))
    b = (1 << 16) - 1 - j
    better = int(above[j - 1]) if j else 0  # documents in bins above b
    low = np.zeros(1 << 16, np.int64)
    for scores, _ in partitions(False):
        keys = _keys(scores)
        low += np.bincount(keys[keys >> 16 == b] & 0xFFFF, minlength=1 << 16)
    within = np.cumsum(low[::-1])
    i = int(np.searchsorted(within, k - better))
    key = (b << 16) | ((1 << 16) - 1 - i)
    higher = better + (int(within[i - 1]) if i else 0)
    need = k - higher  # of the documents at exactly this score, the lowest ids
    if need == int(low[(1 << 16) - 1 - i]):
        return Cut(score=_score_of(key))
    import heapq

    def tied() -> Iterator[str]:
        for scores, ids in partitions(True):
            assert ids is not None
            for at in np.flatnonzero(_keys(scores) == key):
                yield ids[at]

    return Cut(score=_score_of(key), last_id=heapq.nsmallest(need, tied())[-1])
