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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numba
import numpy as np
import pyarrow as pa

from core.files import file_sha256, id_sum, write_ipc
from core.manifest import INDEX, IntegrityError, ManifestError, Verify, read_index, verify_files

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


class TokenShardWriter:
    """Appends tokenized documents to one split's shards ``{prefix}-{n:04d}.arrow``, rotating by token count."""

    def __init__(
        self,
        out_dir: str | Path,
        split: str,
        vocab_size: int,
        max_tokens_per_shard: int = 2**27,
        prefix: str | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix or split
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.max_tokens = max_tokens_per_shard
        self.shards: list[dict[str, Any]] = []
        self._reset()

    def _reset(self) -> None:
        self._tokens: list[np.ndarray] = []
        self._ids: list[str] = []
        self._lengths: list[np.ndarray] = []
        self._copies: list[np.ndarray] = []
        self._count = 0

    def add(self, doc_id: str, tokens: np.ndarray) -> None:
        """Add one document's tokens (EOS already appended)."""
        self.add_many([doc_id], np.asarray(tokens), np.array([len(tokens)], dtype=np.int64))

    def add_many(
        self, doc_ids: list[str], tokens: np.ndarray, lengths: np.ndarray, copies: np.ndarray | None = None
    ) -> None:
        """Add documents given as one flat token array and their lengths (EOS already appended);
        ``copies``: how many copies of each the corpus held before dedup (the docs table keeps them)."""
        if len(doc_ids) != len(lengths) or int(lengths.sum()) != tokens.size:
            raise ValueError(
                f"{len(doc_ids)} ids, {len(lengths)} lengths summing to {lengths.sum()}, {tokens.size} tokens"
            )
        if tokens.dtype != self.dtype:
            if tokens.size and int(tokens.max()) >= self.vocab_size:
                raise ValueError(
                    f"token id {int(tokens.max())} is outside the vocabulary of {self.vocab_size}"
                )
            tokens = tokens.astype(self.dtype)
        lengths = np.asarray(lengths, dtype=np.int64)
        ends = np.cumsum(lengths)
        first = 0  # documents [first, n) still to place
        while first < len(doc_ids):
            base = ends[first - 1] if first else 0
            # Documents that fit in the current shard; at least one, so an oversized document gets its own.
            fit = int(np.searchsorted(ends, base + self.max_tokens - self._count, side="right")) - first
            take = max(fit, 1 if self._count == 0 else 0)
            if take:
                stop = first + take
                self._tokens.append(tokens[base : ends[stop - 1]])
                self._ids.extend(doc_ids[first:stop])
                self._lengths.append(lengths[first:stop])
                self._copies.append(
                    np.ones(stop - first, np.int32)
                    if copies is None
                    else np.asarray(copies[first:stop], np.int32)
                )
                self._count += int(ends[stop - 1] - base)
                first = stop
            if self._count >= self.max_tokens or first < len(doc_ids):
                self.flush()

    def flush(self) -> None:
        if not self._ids:
            return
        name = f"{self.prefix}-{len(self.shards):04d}"
        tokens = np.concatenate(self._tokens)
        lengths = np.concatenate(self._lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        write_ipc(self.out_dir / f"{name}.arrow", pa.table({"tokens": tokens}))
        docs = pa.table({"doc_id": pa.array(self._ids, pa.string()), "offset": offsets, "length": lengths})
        copies = np.concatenate(self._copies)
        if (copies != 1).any():  # dedup survivors with their cluster sizes (rehydration reads them)
            docs = docs.append_column("copies", pa.array(copies, pa.int32()))
        write_ipc(self.out_dir / f"{name}.docs.arrow", docs)
        self.shards.append(
            {
                "path": f"{name}.arrow",
                "docs_path": f"{name}.docs.arrow",
                "tokens": int(tokens.size),
                "documents": len(self._ids),
                "sha256": file_sha256(self.out_dir / f"{name}.arrow"),
                "docs_sha256": file_sha256(self.out_dir / f"{name}.docs.arrow"),
                "id_sum": f"{id_sum(self._ids):016x}",
            }
        )
        self._reset()

    def close(self) -> list[dict[str, Any]]:
        self.flush()
        return self.shards


class ShardError(ValueError):
    """A token dataset that does not match what the reader was told to expect."""


def read_token_index(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a completed token dataset (ShardError, naming the file, if there is none)."""
    try:
        index = read_index(data_dir, kind="tokens")
    except ManifestError as e:
        raise ShardError(str(e)) from None
    if index is None:
        raise ShardError(f"{Path(data_dir) / INDEX} not found: {data_dir} is not a completed token dataset")
    return index


class TokenSequences:
    """Fixed-length training sequences over the memory-mapped token stream of one split.

    With ``span_documents`` (the default, as GPT-2/Megatron pack), sample ``i`` is tokens
    ``[i*L, i*L + L + 1)`` of the packed stream (inputs and shifted targets): documents, separated by EOS,
    run across sequence boundaries and no token is wasted. Without it, samples are windows inside one
    document (``[d + k*L, d + k*L + L + 1)`` for each document starting at ``d``); a document's tail
    shorter than a window is not trained on (``dropped_tokens`` counts it).

    ``source``, ``tier``: only the shards of that source (tokenize tags each source's shards), of that
    quality tier (and each tier's, where quality scoring bucketed the documents into tiers).

    ``verify``: ``always`` hashes every shard against index.json at open; ``first_open`` does so once and
    records each verified shard's size, mtime and ctime in ``.verified.json`` beside the index, re-hashing
    only shards whose stamp changed since (core.manifest.verify_files); ``never`` checks sizes, types and
    counts only (always done).
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        seq_len: int,
        *,
        tokenizer_id: str | None = None,
        span_documents: bool = True,
        verify: Verify = "never",
        source: str | None = None,
        tier: int | None = None,
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
        self.split, self.seq_len, self.span_documents = split, seq_len, span_documents
        self.dtype = np.dtype(self.index["dtype"])
        shards = self.index["splits"][split]["shards"]
        if source is not None or tier is not None:
            shards = [
                s for s in shards if s.get("source") == source and (tier is None or s.get("tier") == tier)
            ]
            if not shards:
                every = self.index["splits"][split]["shards"]
                known = sorted(
                    {f"{s.get('source')}" + (f" tier {s['tier']}" if "tier" in s else "") for s in every}
                )
                what = f"source {source!r}" + (f" tier {tier}" if tier is not None else "")
                raise ShardError(
                    f"{data_dir} split {split!r}: no shards of {what} (there are: {', '.join(known)})"
                )
        self.source, self.tier = source, tier
        self._shards = shards
        if verify != "never":
            self._verify(shards, verify)
        self._arrays = [self._map(self.data_dir / shard["path"], shard["tokens"]) for shard in shards]
        self._starts = np.cumsum([0] + [a.size for a in self._arrays])
        self.total_tokens = int(self._starts[-1])
        if self.total_tokens < seq_len + 1:
            raise ShardError(
                f"{data_dir} split {split!r}{f' of source {source!r}' if source else ''} has {self.total_tokens} tokens, fewer than seq_len+1={seq_len + 1}"
            )
        self._sample_starts: np.ndarray | None = None
        #: Without span_documents: the document (index in the split) each sample lies in.
        self.sample_documents: np.ndarray | None = None
        self.dropped_tokens = 0
        if not span_documents:
            self._sample_starts = self._document_windows(shards)
            if not self._sample_starts.size:
                raise ShardError(
                    f"{data_dir} split {split!r}: no document has seq_len+1={seq_len + 1} tokens; "
                    "use a shorter seq_len or span_documents"
                )

    def _verify(self, shards: list[dict[str, Any]], policy: Verify) -> None:
        mine = {shard[key] for shard in shards for key in ("path", "docs_path")}
        files = [f for f in self.index["files"] if f["path"] in mine]
        try:
            verify_files(self.data_dir, {"files": files}, policy)
        except IntegrityError as e:
            raise ShardError(f"{e}: re-run the pipeline (the tokenize stage is rebuilt)") from None

    def _map(self, path: Path, expected_tokens: int) -> np.ndarray:
        try:
            table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        except FileNotFoundError:
            raise ShardError(f"{path}: listed in index.json but missing") from None
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardError(f"{path}: not a readable Arrow IPC shard, truncated or corrupt ({e})") from e
        column = table.column("tokens")
        if column.type != pa.from_numpy_dtype(self.dtype):
            raise ShardError(f"{path}: token type {column.type}, index.json says {self.dtype}")
        if column.num_chunks != 1:
            raise ShardError(f"{path}: expected one record batch, found {column.num_chunks}")
        array = column.chunk(0).to_numpy(zero_copy_only=True)
        if array.size != expected_tokens:
            raise ShardError(f"{path}: holds {array.size} tokens, index.json says {expected_tokens}")
        return array

    def _document_windows(self, shards: list[dict[str, Any]]) -> np.ndarray:
        window = self.seq_len + 1
        starts, documents, first_doc = [], [], 0
        for base, shard in zip(self._starts, shards):
            docs = self._docs_table(shard)
            offsets = docs.column("offset").to_numpy() + base
            lengths = docs.column("length").to_numpy()
            counts = np.where(lengths >= window, (lengths - 1) // self.seq_len, 0)
            self.dropped_tokens += int((lengths - counts * self.seq_len).sum())
            doc_of_window = np.repeat(np.arange(len(offsets)), counts)
            k = np.arange(doc_of_window.size) - np.repeat(np.cumsum(counts) - counts, counts)
            starts.append(offsets[doc_of_window] + k * self.seq_len)
            documents.append(doc_of_window + first_doc)
            first_doc += len(offsets)
        self.sample_documents = np.concatenate(documents).astype(np.int64)
        return np.concatenate(starts).astype(np.int64)

    def _docs_table(self, shard: dict[str, Any]) -> pa.Table:
        """A shard's document table (doc_id, offset, length, and copies where dedup found any)."""
        path = self.data_dir / shard["docs_path"]
        try:
            return pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise ShardError(f"{path}: not a readable Arrow IPC document table ({e})") from e

    def multiplicity(self, cap: int) -> np.ndarray:
        """How many times each sample counts under FineWeb-2's rehydration: the copies its document had
        before dedup (the docs tables' ``copies``; 1 where none), at most ``cap``. A packed sample is its
        middle token's document's."""
        starts, copies = [], []
        for base, shard in zip(self._starts, self._shards):
            docs = self._docs_table(shard)
            starts.append(docs.column("offset").to_numpy() + base)
            have = "copies" in docs.column_names
            copies.append(docs.column("copies").to_numpy() if have else np.ones(docs.num_rows, np.int32))
        doc_starts, doc_copies = np.concatenate(starts), np.minimum(np.concatenate(copies), cap)
        if self.sample_documents is not None:
            return doc_copies[self.sample_documents].astype(np.int64)
        middle = np.arange(len(self), dtype=np.int64) * self.seq_len + self.seq_len // 2
        return doc_copies[np.searchsorted(doc_starts, middle, side="right") - 1].astype(np.int64)

    def __len__(self) -> int:
        if self._sample_starts is not None:
            return int(self._sample_starts.size)
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

    def _start_of(self, indices: np.ndarray) -> np.ndarray:
        if self._sample_starts is not None:
            return self._sample_starts[indices]
        return indices.astype(np.int64) * self.seq_len

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = int(self._start_of(np.array([i]))[0])
        return self.tokens(start, start + self.seq_len + 1)

    def batch(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """Samples ``indices`` as one ``(len(indices), seq_len + 1)`` array (one copy, no per-sample arrays)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample indices must lie in [0, {len(self)})")
        return gather(self._arrays, self._starts, self._start_of(indices), self.seq_len + 1, self.dtype)


def gather(
    arrays: list[np.ndarray], array_starts: np.ndarray, starts: np.ndarray, window: int, dtype: np.dtype
) -> np.ndarray:
    """Windows ``[start, start + window)`` of the stream that ``arrays`` (beginning at ``array_starts``)
    make end to end, as one ``(len(starts), window)`` array: one copy per row, joined across arrays."""
    shard = np.searchsorted(array_starts, starts, side="right") - 1
    local = starts - array_starts[shard]
    out = np.empty((starts.size, window), dtype=dtype)
    for row, (s, lo) in enumerate(zip(shard.tolist(), local.tolist())):
        array = arrays[s]
        if lo + window <= array.size:
            out[row] = array[lo : lo + window]
        else:  # the window runs into the next array
            first, got = s, 0
            while got < window:
                take = min(window - got, arrays[first].size - lo)
                out[row, got : got + take] = arrays[first][lo : lo + take]
                got, first, lo = got + take, first + 1, 0
    return out


@numba.njit(cache=True, nogil=True)
def _packed_starts(indices, offsets, stream, seq_len, out):  # pragma: no cover
    """``out[j]``: where sample ``indices[j]`` starts in the parts' joined stream (part ``p``'s samples
    are ``offsets[p]...``, its stream begins at ``stream[p]``). Compiled: numpy's searchsorted and fancy
    indexing cost more than the batch's copy at 32 rows."""
    for j in range(indices.size):
        p = 0
        while offsets[p + 1] <= indices[j]:
            p += 1
        out[j] = stream[p] + (indices[j] - offsets[p]) * seq_len


class MixedSequences:
    """Several sources' :class:`TokenSequences` laid end to end: sample ``offsets[s] + i`` is source
    ``s``'s ``i``-th (what :class:`training.data.mixture.MixtureSampler` indexes)."""

    def __init__(self, parts: list[TokenSequences], repeats: list[np.ndarray | None] | None = None):
        self.parts = parts
        self.index = parts[0].index
        counts = [len(p) for p in parts]
        self._sample_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        # With repeats (rehydration), part p's sample i appears repeats[p][i] times in the index space.
        self._to_sample: np.ndarray | None = None
        if repeats is not None and any(r is not None for r in repeats):
            self._to_sample = np.concatenate(
                [
                    self._sample_offsets[p] + (np.arange(n) if r is None else np.repeat(np.arange(n), r))
                    for p, (n, r) in enumerate(zip(counts, repeats))
                ]
            ).astype(np.int64)
            counts = [n if r is None else int(r.sum()) for n, r in zip(counts, repeats)]
        self.sizes = counts
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        # Every part's arrays as one stream (a part's windows stay inside it): one gather per batch.
        self._arrays = [a for p in parts for a in p._arrays]
        self._starts = np.cumsum([0] + [a.size for a in self._arrays])
        self._stream = np.concatenate([[0], np.cumsum([p.total_tokens for p in parts])]).astype(np.int64)
        self._packed = all(p._sample_starts is None for p in parts)
        self.dropped_tokens = sum(p.dropped_tokens for p in parts)
        self.sample_documents: np.ndarray | None = None
        if all(p.sample_documents is not None for p in parts):
            first, docs = 0, []
            for p in parts:
                assert p.sample_documents is not None
                docs.append(p.sample_documents + first)
                first += int(p.sample_documents.max()) + 1 if p.sample_documents.size else 0
            self.sample_documents = np.concatenate(docs)
            if self._to_sample is not None:  # by index of the (repeated) sample space
                self.sample_documents = self.sample_documents[self._to_sample]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch(self, indices: np.ndarray | list[int]) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"sample indices must lie in [0, {len(self)})")
        if self._to_sample is not None:
            indices = self._to_sample[indices]
        offsets = self._sample_offsets
        if self._packed:  # sample i of a part starts at i * seq_len of its stream
            starts = np.empty(indices.size, dtype=np.int64)
            _packed_starts(indices, offsets, self._stream, self.parts[0].seq_len, starts)
        else:
            part = np.searchsorted(offsets, indices, side="right") - 1
            starts = np.empty(indices.size, dtype=np.int64)
            for p in np.unique(part).tolist():
                rows = np.flatnonzero(part == p)
                starts[rows] = self.parts[p]._start_of(indices[rows] - offsets[p]) + self._stream[p]
        return gather(self._arrays, self._starts, starts, self.parts[0].seq_len + 1, self.parts[0].dtype)


class BatchSampler(Protocol):
    """What the training loop draws micro-batches from (a plain shuffle or a mixture), resumable."""

    def next_indices(self) -> np.ndarray: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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
        self._cached_order: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached_order is None or self._cached_order[0] != epoch:
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
                if self.shuffle
                else np.arange(self.num_samples)
            )
            self._cached_order = (epoch, order)
        return self._cached_order[1]

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
