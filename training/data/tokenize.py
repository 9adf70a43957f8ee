"""Tokenize cleaned documents into train/validation token shards with an index.json manifest."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from orchestration.datasets import FORMAT_VERSION, atomic_write_bytes
from orchestration.stage import StageConfig
from training.data.shards import SPLITS, TokenShardWriter, split_hash, split_of, token_dtype
from training.data.tokenizer import (
    TokenizerConfig,
    eos_id,
    load_tokenizer,
    save_tokenizer,
    train_bpe,
)


class TokenizeConfig(StageConfig):
    """Tokenizer choice, split rule and shard size."""

    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    val_fraction: float = Field(0.05, gt=0, lt=1, description="Share of documents (by id hash) held out.")
    max_tokens_per_shard: int = Field(2**26, gt=0, description="Rotate shards past this many tokens.")
    batch_size: int = Field(256, gt=0, description="Documents per encode_batch call.")


def tokenize_documents(
    batches: Callable[[], Iterable[pa.RecordBatch]],
    out_dir: str | Path,
    config: TokenizeConfig,
    source_digest: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (or load) the tokenizer, then encode every document + EOS into split shards.

    ``batches`` is called once per pass over the documents (training the tokenizer is one pass).
    ``extra`` (the producer stage and its cache key) is merged into the index.
    Returns the index written to ``out_dir/index.json``.
    """
    out_dir = Path(out_dir)
    tcfg = config.tokenizer
    # One pass trains the tokenizer and finds the document with the lowest split hash: a corpus too
    # small for any document to fall under val_fraction still gets that one document as validation.
    lowest: tuple[float, str] | None = None

    def texts() -> Iterable[str]:
        nonlocal lowest
        for batch in batches():
            for doc_id in batch.column("id").to_pylist():
                candidate = (split_hash(doc_id), doc_id)
                lowest = candidate if lowest is None or candidate < lowest else lowest
            yield from batch.column("text").to_pylist()

    if tcfg.path:
        tokenizer = load_tokenizer(tcfg.path)
        for _ in texts():
            pass
    else:
        tokenizer = train_bpe(texts(), tcfg)
    if lowest is None:
        raise ValueError("no documents to tokenize: every document was filtered or deduplicated away")
    forced_val = lowest[1] if lowest[0] >= config.val_fraction else None
    tok_path, tok_id = save_tokenizer(tokenizer, out_dir)
    vocab_size = tokenizer.get_vocab_size()
    eos = eos_id(tokenizer, tcfg.special_tokens[0])
    writers = {s: TokenShardWriter(out_dir, s, vocab_size, config.max_tokens_per_shard) for s in SPLITS}
    eos_array = np.array([eos], dtype=token_dtype(vocab_size))
    for batch in batches():
        ids = batch.column("id").to_pylist()
        texts = batch.column("text").to_pylist()
        for start in range(0, len(texts), config.batch_size):
            encodings = tokenizer.encode_batch(
                texts[start : start + config.batch_size], add_special_tokens=False
            )
            for doc_id, enc in zip(ids[start : start + config.batch_size], encodings):
                tokens = np.concatenate([np.asarray(enc.ids, dtype=eos_array.dtype), eos_array])
                split = "val" if doc_id == forced_val else split_of(doc_id, config.val_fraction)
                writers[split].add(doc_id, tokens)
    splits = {}
    for split, writer in writers.items():
        shards = writer.close()
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
    index = {
        "format_version": FORMAT_VERSION,
        "kind": "tokens",
        "tokenizer": {
            "id": tok_id,
            "path": tok_path.name,
            "vocab_size": vocab_size,
            "eos_id": eos,
            "eos_token": tcfg.special_tokens[0],
        },
        "dtype": np.dtype(token_dtype(vocab_size)).name,
        "total_tokens": sum(s["tokens"] for s in splits.values()),
        "splits": splits,
        "split_rule": {
            "method": "sha256(doc_id)[:8] as uint64 / 2**64 < val_fraction -> val; if none, the lowest -> val",
            "val_fraction": config.val_fraction,
            "forced_val_document": forced_val,
        },
        "source_digest": source_digest,
        "files": [
            {"path": s[key], "sha256": s[sha]}
            for split in splits.values()
            for s in split["shards"]
            for key, sha in (("path", "sha256"), ("docs_path", "docs_sha256"))
        ]
        + [{"path": tok_path.name, "sha256": tok_id}],
        **(extra or {}),
    }
    atomic_write_bytes(out_dir / "index.json", json.dumps(index, indent=2).encode())
    return index
