import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

from tests.fixtures import batches, corpus
from training.data.shards import (
    DistributedBatchSampler,
    ShardError,
    TokenSequences,
    TokenShardWriter,
    split_of,
    token_dtype,
)
from training.data.tokenize import TokenizeConfig, tokenize_documents
from training.data.tokenizer import EOS_TOKEN, TokenizerConfig, load_tokenizer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    texts = corpus(200)
    out = tmp_path_factory.mktemp("tokens")
    cfg = TokenizeConfig(
        tokenizer=TokenizerConfig(vocab_size=300, min_frequency=1),
        val_fraction=0.2,
        max_tokens_per_shard=3000,
    )
    index = tokenize_documents(lambda: batches(texts), out, cfg)
    return texts, out, index


def test_token_counts_match_the_tokenizer_and_eos_ends_each_document(tokenized):
    texts, out, index = tokenized
    tok = load_tokenizer(out / "tokenizer.json")
    eos = tok.token_to_id(EOS_TOKEN)
    assert index["tokenizer"]["eos_id"] == eos
    expected = {k: tok.encode(t, add_special_tokens=False).ids + [eos] for k, t in texts.items()}
    assert index["total_tokens"] == sum(len(v) for v in expected.values())
    seen = {}
    for split in ("train", "val"):
        assert len(index["splits"][split]["shards"]) >= 1
        for shard in index["splits"][split]["shards"]:
            tokens = pa.ipc.open_file(pa.memory_map(str(out / shard["path"]))).read_all().column("tokens")
            assert tokens.type == pa.uint16()
            docs = pa.ipc.open_file(pa.memory_map(str(out / shard["docs_path"]))).read_all().to_pylist()
            flat = tokens.to_numpy()
            for d in docs:
                seen[d["doc_id"]] = (split, flat[d["offset"] : d["offset"] + d["length"]].tolist())
    assert {k: v for k, (_, v) in seen.items()} == expected
    assert all(split == split_of(k, 0.2) for k, (split, _) in seen.items())
    assert len(index["splits"]["train"]["shards"]) > 1  # rotated at max_tokens_per_shard


def test_split_is_stable_when_documents_are_added():
    before = {k: split_of(k, 0.1) for k in corpus(100)}
    after = {k: split_of(k, 0.1) for k in corpus(300)}
    assert all(after[k] == v for k, v in before.items())
    share = sum(v == "val" for v in after.values()) / len(after)
    assert 0.04 < share < 0.18


def test_dtype_switches_at_the_uint16_boundary():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    assert token_dtype(2**17) == np.uint32


def test_uint32_shards_round_trip(tmp_path):
    writer = TokenShardWriter(tmp_path, "train", vocab_size=100_000)
    writer.add("a", np.array([70_000, 99_999, 5]))
    (shard,) = writer.close()
    column = pa.ipc.open_file(pa.memory_map(str(tmp_path / shard["path"]))).read_all().column("tokens")
    assert column.type == pa.uint32() and column.to_pylist() == [70_000, 99_999, 5]


def test_sequences_span_shards_and_documents(tokenized):
    _, out, index = tokenized
    seqs = TokenSequences(out, "train", seq_len=64)
    stream = np.concatenate(
        [
            pa.ipc.open_file(pa.memory_map(str(out / s["path"]))).read_all().column("tokens").to_numpy()
            for s in index["splits"]["train"]["shards"]
        ]
    )
    assert len(seqs) == (stream.size - 1) // 64
    for i in (0, 1, len(seqs) // 2, len(seqs) - 1):
        np.testing.assert_array_equal(seqs[i], stream[i * 64 : i * 64 + 65])


def test_sampler_resume_sees_exactly_the_uninterrupted_samples():
    def run(n_batches, state=None):
        s = DistributedBatchSampler(100, batch_size=4, rank=1, world_size=2, seed=3)
        if state:
            s.load_state_dict(state)
        return [s.next_indices().tolist() for _ in range(n_batches)], s.state_dict()

    straight, _ = run(30)  # crosses two epoch boundaries (12 steps per epoch)
    first, state = run(17)
    rest, _ = run(13, json.loads(json.dumps(state)))
    assert first + rest == straight


def test_ranks_partition_each_global_batch():
    samplers = [DistributedBatchSampler(64, 4, rank=r, world_size=4, seed=1) for r in range(4)]
    for _ in range(4):
        batch = np.concatenate([s.next_indices() for s in samplers])
        assert len(set(batch.tolist())) == 16
    assert {s.state.epoch for s in samplers} == {0}


def test_mismatched_tokenizer_and_corrupt_shards_fail_clearly(tokenized, tmp_path):
    _, out, index = tokenized
    with pytest.raises(ShardError, match="tokenizer"):
        TokenSequences(out, "train", 16, tokenizer_id="0" * 64)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / index["splits"]["train"]["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=shard.name + ".*sha256"):
        TokenSequences(copy, "train", 16, verify="always")
    shard.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ShardError, match=shard.name):
        TokenSequences(copy, "train", 16)


def test_tiny_corpus_still_gets_a_validation_document(tmp_path):
    from training.data.shards import split_hash

    texts = corpus(3, seed=1)
    fraction = min(split_hash(k) for k in texts) / 2  # no document falls under it
    cfg = TokenizeConfig(tokenizer=TokenizerConfig(vocab_size=300, min_frequency=1), val_fraction=fraction)
    index = tokenize_documents(lambda: batches(texts), tmp_path, cfg)
    lowest = min(texts, key=split_hash)
    assert index["split_rule"]["forced_val_documents"] == [lowest]
    assert (index["splits"]["val"]["documents"], index["splits"]["train"]["documents"]) == (1, 2)


def test_each_source_gets_a_validation_document_unless_it_has_one_document(tmp_path):
    from training.data.shards import split_hash
    from training.data.tokenize import prepare_tokenizer

    groups = {"web": corpus(6, seed=1), "docs": corpus(4, seed=2), "one": {"solo": "a single document"}}
    groups["docs"] = {f"docs-{k}": t for k, t in groups["docs"].items()}
    fraction = min(split_hash(k) for g in groups.values() for k in g) / 2  # no document falls under it
    cfg = TokenizeConfig(tokenizer=TokenizerConfig(vocab_size=300, min_frequency=1), val_fraction=fraction)
    every = {k: t for g in groups.values() for k, t in g.items()}
    ids = {name: (lambda g=g: iter(g)) for name, g in groups.items()}
    prepared = prepare_tokenizer(lambda: every.values(), lambda: every.keys(), tmp_path, cfg, source_ids=ids)
    # web's and docs' lowest-hash document each; the one-document source keeps its document to train on.
    assert prepared.forced_val == (min(groups["web"], key=split_hash), min(groups["docs"], key=split_hash))


def test_shards_rotate_at_the_token_limit_on_document_boundaries(tmp_path):
    writer = TokenShardWriter(tmp_path, "train", vocab_size=1000, max_tokens_per_shard=10)
    lengths = np.array([4, 4, 4, 25, 3, 7, 1])
    flat = np.arange(lengths.sum()) % 1000
    writer.add_many([f"d{i}" for i in range(len(lengths))], flat, lengths)
    shards = writer.close()
    # Hand-packed: [4,4] | [4] (25 would overflow) | [25] alone | [3,7] | [1]
    assert [s["documents"] for s in shards] == [2, 1, 1, 2, 1]
    assert [s["tokens"] for s in shards] == [8, 4, 25, 10, 1]
    stream = np.concatenate(
        [pa.ipc.open_file(str(tmp_path / s["path"])).read_all().column("tokens").to_numpy() for s in shards]
    )
    np.testing.assert_array_equal(stream, flat)


def test_out_of_vocabulary_ids_are_refused(tmp_path):
    writer = TokenShardWriter(tmp_path, "train", vocab_size=300)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        writer.add_many(["a"], np.array([5, 300], dtype=np.int64), np.array([2]))


def _stream(out, index, split="train"):
    return np.concatenate(
        [
            pa.ipc.open_file(pa.memory_map(str(out / s["path"]))).read_all().column("tokens").to_numpy()
            for s in index["splits"][split]["shards"]
        ]
    )


def test_batch_equals_the_stream_slices(tokenized):
    _, out, index = tokenized
    seqs = TokenSequences(out, "train", seq_len=48)
    stream = _stream(out, index)
    picks = np.random.default_rng(0).integers(0, len(seqs), size=40)
    expected = np.stack([stream[i * 48 : i * 48 + 49] for i in picks])
    batch = seqs.batch(picks)
    assert batch.dtype == np.uint16 and batch.shape == (40, 49)
    np.testing.assert_array_equal(batch, expected)
    with pytest.raises(IndexError):
        seqs.batch([len(seqs)])


def test_document_windows_never_cross_a_document(tokenized):
    _, out, index = tokenized
    seq_len = 24
    seqs = TokenSequences(out, "train", seq_len=seq_len, span_documents=False)
    # Reference: walk every document of every shard by hand.
    expected, dropped = [], 0
    for shard in index["splits"]["train"]["shards"]:
        tokens = pa.ipc.open_file(str(out / shard["path"])).read_all().column("tokens").to_pylist()
        for doc in pa.ipc.open_file(str(out / shard["docs_path"])).read_all().to_pylist():
            doc_tokens = tokens[doc["offset"] : doc["offset"] + doc["length"]]
            k = 0
            while (k + 1) * seq_len + 1 <= len(doc_tokens):
                expected.append(doc_tokens[k * seq_len : (k + 1) * seq_len + 1])
                k += 1
            dropped += len(doc_tokens) - k * seq_len
    assert len(seqs) == len(expected) > 0
    np.testing.assert_array_equal(seqs.batch(np.arange(len(seqs))), np.array(expected))
    assert seqs.dropped_tokens == dropped
    eos = index["tokenizer"]["eos_id"]
    assert not (seqs.batch(np.arange(len(seqs)))[:, :-1] == eos).any()  # EOS only ever ends a window


def test_loader_resume_reproduces_the_uninterrupted_batches(tokenized):
    _, out, _ = tokenized

    def loader(rank):
        seqs = TokenSequences(out, "train", seq_len=32)
        return seqs, DistributedBatchSampler(len(seqs), 4, rank=rank, world_size=2, seed=7)

    for rank in (0, 1):
        seqs, sampler = loader(rank)
        straight = [seqs.batch(sampler.next_indices()) for _ in range(3 * sampler.steps_per_epoch)]
        seqs, sampler = loader(rank)
        first = [seqs.batch(sampler.next_indices()) for _ in range(sampler.steps_per_epoch + 5)]
        state = json.loads(json.dumps(sampler.state_dict()))  # as it travels in a checkpoint
        seqs, sampler = loader(rank)
        sampler.load_state_dict(state)
        rest = [seqs.batch(sampler.next_indices()) for _ in range(len(straight) - len(first))]
        for a, b in zip(straight, first + rest, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="world_size"):
        DistributedBatchSampler(100, 4, rank=0, world_size=4, seed=7).load_state_dict(state)


def test_first_open_verification_hashes_once_then_only_changed_shards(tokenized, tmp_path):
    _, out, index = tokenized
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    TokenSequences(copy, "train", 16, verify="first_open")
    record = json.loads((copy / ".verified.json").read_text())
    train_files = {s[k] for s in index["splits"]["train"]["shards"] for k in ("path", "docs_path")}
    assert set(record) == train_files
    shard = copy / index["splits"]["train"]["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0xFF  # same size; a rewrite changes the mtime
    stat = shard.stat()
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=shard.name + ".*sha256"):
        TokenSequences(copy, "train", 16, verify="first_open")
    # A change that restores its mtime is still caught: the write moved the ctime, which nothing sets back.
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shard.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(ShardError, match=shard.name + ".*sha256.*re-run the pipeline"):
        TokenSequences(copy, "train", 16, verify="first_open")
    with pytest.raises(ShardError, match=shard.name):
        TokenSequences(copy, "train", 16, verify="always")


def test_missing_shard_and_foreign_format_version_fail_clearly(tokenized, tmp_path):
    _, out, index = tokenized
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    victim = index["splits"]["val"]["shards"][0]["path"]
    (copy / victim).unlink()
    with pytest.raises(ShardError, match=f"{victim}: listed in index.json but missing"):
        TokenSequences(copy, "val", 8)
    meta = json.loads((copy / "index.json").read_text())
    meta["format_version"] = 99
    (copy / "index.json").write_text(json.dumps(meta))
    with pytest.raises(ShardError, match="format_version=99"):
        TokenSequences(copy, "train", 8)


def test_the_tokenizer_trains_on_a_deterministic_sample(tmp_path):
    """train_sample_mb bounds what the BPE trainer sees: the documents whose sha256('tokenizer-sample:' +
    id) is below budget / corpus size, picked here by hand with hashlib, give the very same tokenizer."""
    import hashlib
    import random

    from tokenizers import Tokenizer

    from training.data.tokenize import TokenizeConfig, prepare_tokenizer
    from training.data.tokenizer import TokenizerConfig, train_bpe

    rng = random.Random(5)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
        for _ in range(300)
    ]
    texts = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(400)]
    ids = [f"doc-{i}" for i in range(len(texts))]
    total = sum(len(t.encode()) for t in texts)
    budget_mb = total / 4 / 2**20
    cfg = TokenizeConfig(tokenizer=TokenizerConfig(vocab_size=400, train_sample_mb=budget_mb))
    prepared = prepare_tokenizer(lambda: iter(texts), lambda: iter(ids), tmp_path / "a", cfg)
    picked = [
        t
        for i, t in zip(ids, texts)
        if int.from_bytes(hashlib.sha256(b"tokenizer-sample:" + i.encode()).digest()[:8], "big") / 2**64
        < 0.25
    ]
    assert 0.15 < len(picked) / len(texts) < 0.35
    ours = Tokenizer.from_file(str(tmp_path / "a" / prepared.path)).to_str()
    assert ours == train_bpe(picked, TokenizerConfig(vocab_size=400)).to_str()
    assert ours != train_bpe(texts, TokenizerConfig(vocab_size=400)).to_str()  # the sample mattered
    again = prepare_tokenizer(lambda: iter(texts), lambda: iter(ids), tmp_path / "b", cfg)
    assert again.id == prepared.id  # same corpus, same sample, same tokenizer
