"""Self-describing token shards (Arrow IPC, uncompressed, memory-mappable) and a resumable loader.

Layout of a token dataset directory:
    tokenizer.json
    train-00000.arrow       one flat ``tokens`` column (uint16 when the vocab fits, else uint32)
    train-00000.docs.arrow  ``doc_id``, ``offset``, ``length`` of each document in that shard
    val-00000.arrow ...
    index.json              format version, tokenizer id, dtype, EOS id, per-shard sha256 and counts,
                            total tokens, split rule, source dataset digest
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from orchestration.datasets import FORMAT_VERSION, file_sha256

SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def split_hash(doc_id: str) -> float:
    """A document's position in [0, 1) for the split rule."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64


def split_of(doc_id: str, val_fraction: float) -> str:
    """Deterministic split by document id hash: adding documents never moves existing ones."""
    return "val" if split_hash(doc_id) < val_fraction else "train"


def _write_ipc(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(table.num_rows, 1))
    os.replace(tmp, path)


class TokenShardWriter:
    """Appends tokenized documents to one split's shards, rotating by token count."""

    def __init__(self, out_dir: str | Path, split: str, vocab_size: int, max_tokens_per_shard: int = 2**26):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.dtype = token_dtype(vocab_size)
        self.max_tokens = max_tokens_per_shard
        self.shards: list[dict[str, Any]] = []
        self._reset()

    def _reset(self) -> None:
        self._tokens: list[np.ndarray] = []
        self._ids: list[str] = []
        self._lengths: list[int] = []
        self._count = 0

    def add(self, doc_id: str, tokens: np.ndarray) -> None:
        """Add one document's tokens (EOS already appended)."""
        self._tokens.append(np.asarray(tokens, dtype=self.dtype))
        self._ids.append(doc_id)
        self._lengths.append(len(tokens))
        self._count += len(tokens)
        if self._count >= self.max_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._ids:
            return
        name = f"{self.split}-{len(self.shards):05d}"
        tokens = np.concatenate(self._tokens)
        lengths = np.array(self._lengths, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        _write_ipc(self.out_dir / f"{name}.arrow", pa.table({"tokens": tokens}))
        docs = pa.table({"doc_id": pa.array(self._ids, pa.string()), "offset": offsets, "length": lengths})
        _write_ipc(self.out_dir / f"{name}.docs.arrow", docs)
        self.shards.append(
            {
                "path": f"{name}.arrow",
                "docs_path": f"{name}.docs.arrow",
                "tokens": int(tokens.size),
                "documents": len(self._ids),
                "sha256": file_sha256(self.out_dir / f"{name}.arrow"),
                "docs_sha256": file_sha256(self.out_dir / f"{name}.docs.arrow"),
            }
        )
        self._reset()

    def close(self) -> list[dict[str, Any]]:
        self.flush()
        return self.shards


class ShardError(ValueError):
    """A token dataset that does not match what the reader was told to expect."""


def read_token_index(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / "index.json"
    if not path.exists():
        raise ShardError(f"{path} not found: {data_dir} is not a completed token dataset")
    index = json.loads(path.read_text())
    if index.get("format_version") != FORMAT_VERSION or index.get("kind") != "tokens":
        raise ShardError(
            f"{path}: expected a token index with format_version {FORMAT_VERSION}, "
            f"found kind={index.get('kind')!r} format_version={index.get('format_version')!r}"
        )
    return index


class TokenSequences:
    """Fixed-length training sequences over the memory-mapped token stream of one split.

    Sample ``i`` is tokens ``[i*L, i*L + L + 1)`` of the packed stream (inputs and shifted targets),
    so documents span sequence boundaries, separated by EOS.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        seq_len: int,
        *,
        tokenizer_id: str | None = None,
        verify_checksums: bool = False,
    ):
        self.data_dir = Path(data_dir)
        self.index = read_token_index(data_dir)
        if split not in self.index["splits"]:
            raise ShardError(f"{data_dir}: no split {split!r}; splits are {sorted(self.index['splits'])}")
        if tokenizer_id is not None and tokenizer_id != self.index["tokenizer"]["id"]:
            raise ShardError(
                f"{data_dir}: shards were tokenized with tokenizer {self.index['tokenizer']['id'][:12]}, "
                f"the model expects {tokenizer_id[:12]}; re-tokenize or point the model at this tokenizer"
            )
        self.seq_len = seq_len
        self.dtype = np.dtype(self.index["dtype"])
        self._arrays: list[np.ndarray] = []
        for shard in self.index["splits"][split]["shards"]:
            path = self.data_dir / shard["path"]
            if verify_checksums and file_sha256(path) != shard["sha256"]:
                raise ShardError(f"{path}: sha256 differs from index.json; the shard changed or is corrupt")
            array = self._map(path)
            if array.size != shard["tokens"]:
                raise ShardError(f"{path}: holds {array.size} tokens, index.json says {shard['tokens']}")
            self._arrays.append(array)
        self._starts = np.cumsum([0] + [a.size for a in self._arrays])
        self.total_tokens = int(self._starts[-1])
        if self.total_tokens < seq_len + 1:
            raise ShardError(
                f"{data_dir} split {split!r} has {self.total_tokens} tokens, fewer than seq_len+1={seq_len + 1}"
            )

    def _map(self, path: Path) -> np.ndarray:
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardError(f"{path}: not a readable Arrow IPC shard ({e})") from e
        column = table.column("tokens")
        if column.type != pa.from_numpy_dtype(self.dtype):
            raise ShardError(f"{path}: token type {column.type}, index.json says {self.dtype}")
        if column.num_chunks != 1:
            raise ShardError(f"{path}: expected one record batch, found {column.num_chunks}")
        return column.chunk(0).to_numpy(zero_copy_only=True)

    def __len__(self) -> int:
        return (self.total_tokens - 1) // self.seq_len

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the packed stream, across shard boundaries."""
        first = int(np.searchsorted(self._starts, start, side="right") - 1)
        parts = []
        while start < stop:
            local = start - self._starts[first]
            take = min(stop - start, self._arrays[first].size - local)
            parts.append(self._arrays[first][local : local + take])
            start += take
            first += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.tokens(i * self.seq_len, (i + 1) * self.seq_len + 1)


@dataclass
class SamplerState:
    epoch: int = 0
    step: int = 0


class DistributedBatchSampler:
    """Deterministic per-epoch shuffle, sharded by data-parallel rank, resumable from a state dict.

    Global batch ``s`` of an epoch is permutation[s*B*W : (s+1)*B*W]; rank ``r`` takes its contiguous
    slice of it, so the samples a run sees are independent of when it was interrupted.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"{num_samples} sequences cannot fill one global batch of {batch_size} x {world_size} ranks; "
                "use more data, a shorter seq_len or a smaller micro-batch"
            )
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.state = SamplerState()

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def next_indices(self) -> np.ndarray:
        """Indices of this rank's next micro-batch; advances the state (wrapping into a new epoch)."""
        if self.state.step >= self.steps_per_epoch:
            self.state = SamplerState(self.state.epoch + 1, 0)
        global_batch = self.batch_size * self.world_size
        start = self.state.step * global_batch + self.rank * self.batch_size
        indices = self._order(self.state.epoch)[start : start + self.batch_size]
        self.state.step += 1
        return indices

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.state.epoch,
            "step": self.state.step,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "world_size", "num_samples"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this run has {getattr(self, key)}")
        self.state = SamplerState(state["epoch"], state["step"])
