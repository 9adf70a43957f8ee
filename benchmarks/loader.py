"""Random batch reads from lmforge's token shards vs a numpy.memmap of the same tokens.

Both sides read the same random sample indices; a batch is 32 sequences of 1024 tokens (+1 for the
shifted targets), returned as one (32, 1025) array. Ours: ``TokenSequences.batch`` over the Arrow IPC
shards (memory-mapped, zero-copy, split across several shards). Peer: ``np.stack`` of slices of one
``np.memmap`` over a flat ``.bin`` file holding the same token stream (the nanoGPT loader).
Goal (issue 7): >= 0.9x of the peer's batches/s.

Mixture case (issue 38): the same shards as three sources (50/30/20% of the documents) drawn 60/30/10 by
``MixtureSampler`` and read by ``MixedSequences``, against ``DistributedBatchSampler`` and
``TokenSequences`` over the one pool: >= 0.9x of its batches/s.

    .venv/bin/python benchmarks/loader.py [--quick | --smoke] [--tokens 200000000]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import median_time, median_times, result, summary  # noqa: E402
from training.data.shards import TokenSequences, TokenShardWriter  # noqa: E402
from training.data.tokenize import Prepared, TokenizeConfig, write_token_index  # noqa: E402
from training.data.tokenizer import TokenizerConfig, save_tokenizer, train_bpe  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="20M tokens and 500 batches")
parser.add_argument("--smoke", action="store_true", help="seconds: 200k tokens and 20 batches")
parser.add_argument("--tokens", type=int, default=200_000_000)
parser.add_argument("--batches", type=int, default=3000)
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--seq-len", type=int, default=1024)
args = parser.parse_args()
if args.quick:
    args.tokens, args.batches = 20_000_000, 500
if args.smoke:
    args.tokens, args.batches = 200_000, 20

VOCAB = 50_257  # GPT-2's: uint16 tokens
SOURCES = {"web": 0.6, "docs": 0.3, "code": 0.1}  # the mixture case's weights


def build(work: Path) -> tuple[np.ndarray, Path]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, size=args.tokens, dtype=np.uint16)
    lengths = rng.integers(200, 4000, size=args.tokens // 1000)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), args.tokens)]
    lengths = np.append(lengths, args.tokens - lengths.sum())
    chunk = 100_000  # documents per add_many call
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    # Three sources of 50%, 30% and 20% of the documents, in stream order, each in shards of its own.
    bounds = [0, len(lengths) // 2, len(lengths) * 4 // 5, len(lengths)]
    shards = []
    for source, lo, hi in zip(SOURCES, bounds, bounds[1:]):
        writer = TokenShardWriter(work / "shards", "train", VOCAB, 2**25, prefix=f"train-{source}")
        for i in range(lo, hi, chunk):
            ids = [f"d{j}" for j in range(i, min(i + chunk, hi))]
            writer.add_many(ids, tokens[offsets[i] : offsets[i + len(ids)]], lengths[i : i + len(ids)])
        shards += [shard | {"source": source} for shard in writer.close()]
    # The index lists the tokenizer among its files (size, sha256): a small real one stands in for GPT-2's.
    path, tok_id = save_tokenizer(
        train_bpe(["lmforge benchmark text"] * 10, TokenizerConfig(vocab_size=300)), work / "shards"
    )
    prepared = Prepared(path.name, tok_id, VOCAB, 50_256, "<|endoftext|>")
    part = {"shards": {"train": shards, "val": shards[:1]}, "documents": len(lengths)}
    write_token_index(work / "shards", prepared, TokenizeConfig(), [part])
    tokens.tofile(work / "tokens.bin")
    return tokens, work / "tokens.bin"


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="lmf-bench-loader-"))
    try:
        tokens, bin_path = build(work)
        seqs = TokenSequences(work / "shards", "train", args.seq_len)
        mm = np.memmap(bin_path, dtype=np.uint16, mode="r")
        n_shards = len(seqs.index["splits"]["train"]["shards"])
        print(f"{args.tokens:,} tokens in {n_shards} shards, {len(seqs):,} sequences", flush=True)
        rng = np.random.default_rng(1)
        picks = rng.integers(0, len(seqs), size=(args.batches, args.batch_size))
        window = args.seq_len + 1
        L = args.seq_len
        for row in picks[:3]:  # both sides read the same samples
            np.testing.assert_array_equal(
                seqs.batch(row), np.stack([mm[i * L : i * L + window] for i in row])
            )

        def peer() -> None:
            for row in picks:
                np.stack([mm[i * L : i * L + window] for i in row])

        def ours() -> None:
            for row in picks:
                seqs.batch(row)

        t_peer = median_time(peer)
        t_ours = median_time(ours)
        line = result(
            "loader.random_batches",
            "batches/s",
            args.batches / t_ours,
            "numpy.memmap + np.stack of slices",
            args.batches / t_peer,
            0.9,
            batch=f"{args.batch_size}x{args.seq_len}",
            tokens=args.tokens,
            shards=n_shards,
        )
        summary("loader", [line, mixture(work / "shards", len(seqs))])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def mixture(shards: Path, sequences: int) -> dict:
    """Batches drawn by a three-source mixture (its sampler and reader) against the one-pool sampler and
    reader over the same shards: the cost of mixing."""
    from training.data.mixture import MixtureConfig, MixturePlan, MixtureSampler
    from training.data.shards import DistributedBatchSampler, MixedSequences

    pool = TokenSequences(shards, "train", args.seq_len)
    mixed = MixedSequences([TokenSequences(shards, "train", args.seq_len, source=s) for s in sorted(SOURCES)])
    assert len(mixed) == sequences or len(mixed) >= sequences - len(SOURCES)
    plan = MixturePlan(MixtureConfig(weights=SOURCES, max_repetition=100.0), args.batches, args.batch_size)

    def peer() -> None:
        sampler = DistributedBatchSampler(len(pool), args.batch_size, seed=1)
        for _ in range(args.batches):
            pool.batch(sampler.next_indices())

    def ours() -> None:
        sampler = MixtureSampler(plan, mixed.sizes, args.batch_size, seed=1)
        for _ in range(args.batches):
            mixed.batch(sampler.next_indices())

    # Interleaved runs (a slow spell of the shared machine falls on both); the warm-up run compiles the
    # sampler's kernel (numba, cached on disk after).
    t_peer, t_ours = median_times([peer, ours], repeats=5)
    return result(
        "loader.mixture_batches",
        "batches/s",
        args.batches / t_ours,
        "one-pool sampler and reader over the same shards",
        args.batches / t_peer,
        0.9,
        batch=f"{args.batch_size}x{args.seq_len}",
        sources="web 0.6, docs 0.3, code 0.1",
    )


if __name__ == "__main__":
    main()
