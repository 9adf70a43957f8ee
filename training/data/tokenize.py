"""Tokenize cleaned documents into train/validation token shards with an index.json manifest.

The work is split in three so that the middle part runs in parallel (orchestration/pipeline.py maps it
over Ray tasks; :func:`tokenize_documents` runs all three in one process):

1. :func:`prepare_tokenizer`: one streaming pass trains the byte-level BPE (or loads the configured
   tokenizer) and finds the document with the lowest split hash (the forced validation document of a
   corpus too small for the split fraction to pick any).
2. :func:`tokenize_partition`: encode one partition of the documents (``encode_batch`` in batches), append
   EOS to every document, and write that partition's shards of each split.
3. :func:`write_token_index`: gather the partitions' shards, in partition order, into ``index.json``.

The output depends only on the documents and the config, never on how many workers ran step 2.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field
from tokenizers import Tokenizer

from core.manifest import write_index
from core.quarantine import Quarantine
from core.schema import DEDUP_COPIES, QUALITY_TIER
from core.stage import StageConfig
from core.storage import Store
from training.data.shards import SPLITS, TokenShardWriter, split_hash, split_of, token_dtype
from training.data.tokenizer import (
    TokenizerConfig,
    canonical_id,
    eos_id,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
)

Batches = Callable[[], Iterable[pa.RecordBatch]]
PREPARED = "_done/tokenizer.json"


class TokenizeConfig(StageConfig):
    """Tokenizer choice, split rule, shard size and parallelism."""

    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    val_fraction: float = Field(0.05, gt=0, lt=1, description="Share of documents (by id hash) held out.")
    max_tokens_per_shard: int = Field(
        2**27, gt=0, description="Rotate shards past this many tokens (2**27 uint16 tokens = 256 MiB)."
    )
    batch_size: int = Field(1024, gt=0, description="Documents per encode_batch call.")
    partition_mb: float = Field(
        16, gt=0, description="Text (MiB, uncompressed Parquet) per parallel tokenize task."
    )


@dataclass(frozen=True)
class Prepared:
    """Outcome of the tokenizer pass: where the tokenizer is, its identity, and the split override."""

    path: str
    id: str
    vocab_size: int
    eos_id: int
    eos_token: str
    #: Documents held out whatever their hash: the lowest-hash one of the corpus, or of each source,
    #: where none falls in the validation split (so each has one to measure on).
    forced_val: tuple[str, ...] = ()

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    @classmethod
    def from_result(cls, result: dict) -> Prepared:
        """From the tokenizer task's result (its marker), which carries the runner's fields as well."""
        fields = {f.name: result[f.name] for f in dataclasses.fields(cls)}
        return cls(**fields | {"forced_val": tuple(fields["forced_val"])})


def prepare_tokenizer(
    texts: Callable[[], Iterable[str]],
    ids: Callable[[], Iterable[str]],
    out_dir: str | Path,
    config: TokenizeConfig,
    text_bytes: int | None = None,
    source_ids: dict[str, Callable[[], Iterable[str]]] | None = None,
) -> Prepared:
    """Train (or load) the tokenizer, save it as ``out_dir/tokenizer.json``, find the forced val document.

    ``texts`` streams every document's text, ``ids`` every document id, in the same order (each called
    once, or twice when the tokenizer trains on a sample). ``text_bytes``: the corpus's text size if known
    (Parquet metadata), else it is counted in a pass. As a stage task its result is the marker
    ``_done/tokenizer.json`` (see :func:`load_prepared`). ``source_ids``: each source's ids, when the
    documents come from several, to force one validation document per source.
    """
    out_dir = Path(out_dir)
    tcfg = config.tokenizer
    tokenizer = (
        load_tokenizer(tcfg.path)
        if tcfg.path
        else train_bpe(_training_texts(texts, ids, tcfg, text_bytes), tcfg)
    )
    forced, documents = [], 0
    for group in source_ids.values() if source_ids else [ids]:
        hashes = [(split_hash(i), i) for i in group()]
        documents += len(hashes)
        lowest = min(hashes, default=None)
        # A source of one document keeps it for training; the corpus's one document is held out.
        if lowest is not None and lowest[0] >= config.val_fraction and (len(hashes) > 1 or not source_ids):
            forced.append(lowest[1])
    if not documents:
        raise ValueError("no documents to tokenize: every document was filtered or deduplicated away")
    path, tok_id = save_tokenizer(tokenizer, out_dir)
    prepared = Prepared(
        path=path.name,
        id=tok_id,
        vocab_size=tokenizer.get_vocab_size(),
        eos_id=eos_id(tokenizer, tcfg.special_tokens[0]),
        eos_token=tcfg.special_tokens[0],
        forced_val=tuple(forced),
    )
    return prepared


def in_training_sample(doc_id: str, fraction: float) -> bool:
    """Whether a document is in the tokenizer's training sample of ``fraction`` of the corpus: the split
    rule's hash, salted so that the sample and the validation split are independent."""
    return split_hash("tokenizer-sample:" + doc_id) < fraction


def _training_texts(
    texts: Callable[[], Iterable[str]],
    ids: Callable[[], Iterable[str]],
    config: TokenizerConfig,
    text_bytes: int | None,
) -> Iterable[str]:
    """Every text, or the deterministic sample of about ``train_sample_mb`` (by id hash)."""
    if config.train_sample_mb is None:
        return texts()
    total = text_bytes if text_bytes is not None else sum(len(t.encode()) for t in texts())
    fraction = config.train_sample_mb * 2**20 / max(1, total)
    if fraction >= 1:
        return texts()
    return (t for i, t in zip(ids(), texts(), strict=True) if in_training_sample(i, fraction))


def load_prepared(out_dir: str | Path | Store) -> Prepared | None:
    """The tokenizer pass of an interrupted run, if it completed and its tokenizer is intact."""
    out = Store(out_dir)
    try:
        result = out.read_object(PREPARED)
        if result is None:
            return None
        prepared = Prepared.from_result(result)
        tokenizer = out.read_bytes(prepared.path)
    except (FileNotFoundError, ValueError):  # its tokenizer gone, or a damaged marker: the pass runs again
        return None
    return prepared if canonical_id(tokenizer) == prepared.id else None


def encode_documents(
    tokenizer: Tokenizer, texts: list[str], eos: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch: the flat token array (each document followed by EOS) and per-document lengths.

    ``encode_batch_fast`` (tokenizers >= 0.20) gives the same ids as ``encode_batch`` without tracking
    character offsets, which packing never needs.
    """
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    for doc in ids:
        doc.append(eos)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def tokenize_partition(
    batches: Iterable[pa.RecordBatch],
    out_dir: str | Path,
    prepared: Prepared,
    config: TokenizeConfig,
    part: str = "p00000",
    tokenizer: Tokenizer | None = None,
    quarantine: Quarantine | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Encode one partition into shards ``{split}-{part}-{n}.arrow`` in ``out_dir``; return its shards per
    split (the tokenizer is read from ``out_dir`` unless given).

    With a ``quarantine``, a batch the tokenizer raises on is encoded again one document at a time and the
    documents it raises on are left out and recorded there (with their tracebacks); without one it raises.
    ``on_chunk(documents, tokens)`` is told of each chunk as it is written (a progress bar's counts).
    """
    out_dir = Path(out_dir)
    tokenizer = tokenizer or load_tokenizer(out_dir / prepared.path)
    writers: dict[tuple[str, int | None], TokenShardWriter] = {}

    def writer(split: str, tier: int | None) -> TokenShardWriter:
        if (split, tier) not in writers:
            prefix = f"{split}-{part}" + (f"-tier{tier}" if tier is not None else "")
            writers[split, tier] = TokenShardWriter(
                out_dir, split, prepared.vocab_size, config.max_tokens_per_shard, prefix=prefix
            )
        return writers[split, tier]

    for split in SPLITS:
        writer(split, None)
    documents = 0
    for batch in batches:
        ids = batch.column("id").to_pylist()
        texts = batch.column("text").to_pylist()
        tiers, copies = meta_values(batch, QUALITY_TIER), meta_values(batch, DEDUP_COPIES)
        if tiers is not None:  # None where a document has no tier
            tiers = [None if t is None else int(t) for t in tiers.to_pylist()]
        if copies is not None:  # 1 where a document had no copy
            copies = copies.fill_null(1.0).to_numpy().astype(np.int32)
        for start in range(0, len(ids), config.batch_size):
            window = slice(start, start + config.batch_size)
            chunk_ids, chunk = ids[window], texts[window]
            chunk_tiers = tiers[window] if tiers is not None else None
            chunk_copies = copies[window] if copies is not None else None
            try:
                flat, lengths = encode_documents(tokenizer, chunk, prepared.eos_id, prepared.dtype)
            except Exception:
                if quarantine is None:
                    raise
                encoded, flat, lengths = _encode_each(tokenizer, chunk_ids, chunk, prepared, quarantine)
                done = set(encoded)  # the tiers and copies of the documents that encoded
                kept = [d in done for d in chunk_ids]
                chunk_tiers = [t for t, k in zip(chunk_tiers, kept) if k] if chunk_tiers is not None else None
                chunk_copies = chunk_copies[np.array(kept)] if chunk_copies is not None else None
                chunk_ids = encoded
                if not chunk_ids:
                    continue
            else:
                if quarantine is not None:
                    again = partial(encode_documents, tokenizer, chunk[:1], prepared.eos_id, prepared.dtype)
                    quarantine.passed(len(chunk_ids), retry=again)
            is_val = np.array(
                [d in prepared.forced_val or split_of(d, config.val_fraction) == "val" for d in chunk_ids]
            )
            if chunk_tiers is None and not is_val.any():
                writers["train", None].add_many(chunk_ids, flat, lengths, chunk_copies)
            else:
                keys = list(
                    zip(np.where(is_val, "val", "train").tolist(), chunk_tiers or [None] * len(chunk_ids))
                )
                for key in dict.fromkeys(keys):
                    mask = np.array([k == key for k in keys])
                    selected = [d for d, m in zip(chunk_ids, mask) if m]
                    mine = chunk_copies[mask] if chunk_copies is not None else None
                    writer(*key).add_many(selected, flat[np.repeat(mask, lengths)], lengths[mask], mine)
            documents += len(chunk_ids)
            if on_chunk is not None:
                on_chunk(len(chunk_ids), int(lengths.sum()))
    if quarantine is not None:
        quarantine.finish()
    shards: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for (split, tier), w in sorted(
        writers.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])
    ):
        shards[split] += [shard | ({"tier": tier} if tier is not None else {}) for shard in w.close()]
    return {"part": part, "documents": documents, "shards": shards}


def meta_values(batch: pa.RecordBatch, key: str) -> pa.Array | None:
    """Each document's ``meta`` value of ``key`` (null where it has none), or None where no document of
    the batch has one."""
    if "meta" not in batch.schema.names:
        return None
    values = pc.map_lookup(batch.column("meta"), pa.scalar(key), "first")
    return None if values.null_count == len(values) else values


def _encode_each(
    tokenizer: Tokenizer, ids: list[str], texts: list[str], prepared: Prepared, quarantine: Quarantine
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``encode_documents`` one document at a time: the ids, tokens and lengths of those that encode; the
    others go to ``quarantine``."""
    kept, flats, lengths = [], [], []
    for doc_id, text in zip(ids, texts):
        again = partial(encode_documents, tokenizer, [text], prepared.eos_id, prepared.dtype)
        try:
            flat, length = again()
        except Exception as e:
            quarantine.crashed(doc_id, e, retry=again)
            continue
        quarantine.passed(retry=again)
        kept.append(doc_id)
        flats.append(flat)
        lengths.append(length)
    if not kept:
        return [], np.empty(0, prepared.dtype), np.empty(0, np.int64)
    return kept, np.concatenate(flats), np.concatenate(lengths)


def write_token_index(
    out_dir: str | Path | Store,
    prepared: Prepared,
    config: TokenizeConfig,
    parts: list[dict[str, Any]],
    *,
    cache_key: str = "",
    inputs: dict[str, str] | None = None,
    quarantined: int = 0,
) -> dict[str, Any]:
    """Gather the partitions' shards (in the order given) into the token dataset's manifest;
    ``quarantined`` documents (in ``rejected/``) were not tokenized."""
    splits = {}
    for split in SPLITS:
        shards = [s for p in parts for s in p["shards"][split]]
        splits[split] = {
            "shards": shards,
            "tokens": sum(s["tokens"] for s in shards),
            "documents": sum(s["documents"] for s in shards),
        }
    if not splits["train"]["documents"]:
        raise ValueError(
            f"tokenize.val_fraction={config.val_fraction} left the training split empty "
            f"({splits['val']['documents']} validation documents); lower val_fraction or add documents"
        )
    files = [
        {"path": s[key], "rows": s["documents"], "sha256": s[sha]}
        | ({"id_sum": s["id_sum"]} if ids and "id_sum" in s else {})
        for split in splits.values()
        for s in split["shards"]
        for key, sha, ids in (("path", "sha256", False), ("docs_path", "docs_sha256", True))
    ]
    out = Store(out_dir)
    files.append({"path": prepared.path, "rows": 0, "sha256": out.sha256(prepared.path)})
    for entry in files:
        entry["bytes"] = out.size(entry["path"])
    total_tokens = sum(s["tokens"] for s in splits.values())
    documents = sum(s["documents"] for s in splits.values())
    counters = {
        "documents": documents,
        "tokens": total_tokens,
        **{f"{k}_tokens": v["tokens"] for k, v in splits.items()},
        **{f"{k}_documents": v["documents"] for k, v in splits.items()},
        "vocab_size": prepared.vocab_size,
    } | ({"quarantined": quarantined} if quarantined else {})
    sources = _source_totals(splits)
    for source, totals in sources.items():
        counters |= {f"documents.{source}": totals["documents"], f"tokens.{source}": totals["tokens"]}
    extra = {
        "tokenizer": {
            "id": prepared.id,
            "path": prepared.path,
            "vocab_size": prepared.vocab_size,
            "eos_id": prepared.eos_id,
            "eos_token": prepared.eos_token,
        },
        "dtype": prepared.dtype.name,
        "total_tokens": total_tokens,
        "documents": documents,
        "splits": splits,
        "split_rule": {
            "method": "sha256(doc_id)[:8] as uint64 / 2**64 < val_fraction -> val; where none (of the corpus, "
            "or of a source), its lowest -> val",
            "val_fraction": config.val_fraction,
            "forced_val_documents": list(prepared.forced_val),
        },
    } | ({"sources": sources} if sources else {})
    return write_index(
        out_dir,
        stage="tokenize",
        kind="tokens",
        cache_key=cache_key,
        files=files,
        inputs=inputs,
        counters=counters,
        extra=extra,
    )


#: Fewer held-out documents than this make the validation loss noise: the console and the report say so.
MIN_VAL_DOCUMENTS = 10


def validation_warning(index: dict[str, Any]) -> str | None:
    """Why a token dataset's validation split is too small to measure a model on, or None."""
    counters = index.get("counters", {})
    documents = counters.get("val_documents")
    if documents is None or documents >= MIN_VAL_DOCUMENTS:
        return None
    return (
        f"the validation split holds {documents} document(s) ({counters.get('val_tokens', 0):,} tokens), fewer "
        f"than {MIN_VAL_DOCUMENTS}: its loss is noise; raise tokenize.val_fraction or add documents"
    )


def _source_totals(splits: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Documents and tokens of each source (shards tagged with one), overall and per split; with quality
    tiers, each tier's as well (``tiers: {"2": {...}}``)."""
    totals: dict[str, dict[str, Any]] = {}
    for split, data in splits.items():
        for shard in data["shards"]:
            if shard.get("source") is None:
                continue
            t = totals.setdefault(shard["source"], {"documents": 0, "tokens": 0})
            groups = [t]
            if "tier" in shard:  # a tier's own totals, under the source's
                tiers = t.setdefault("tiers", {})
                groups.append(tiers.setdefault(str(shard["tier"]), {"documents": 0, "tokens": 0}))
            for group in groups:
                for k in ("documents", "tokens"):
                    group[k] += shard[k]
                    group[f"{split}_{k}"] = group.get(f"{split}_{k}", 0) + shard[k]
    return totals


def tokenize_documents(batches: Batches, out_dir: str | Path, config: TokenizeConfig) -> dict[str, Any]:
    """All three steps in this process, over ``batches()`` (called once per pass) as one partition."""

    def column(name: str) -> Callable[[], Iterator[str]]:
        return lambda: (v for b in batches() for v in b.column(name).to_pylist())

    prepared = prepare_tokenizer(column("text"), column("id"), out_dir, config)
    part = tokenize_partition(batches(), out_dir, prepared, config)
    return write_token_index(out_dir, prepared, config, [part])


def sequential_encoding() -> None:
    """Make ``encode_batch`` single-threaded in this process (one Ray task = one CPU)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
