import json

import numpy as np
import pyarrow as pa
import pytest

from ingestion.schema import DOCUMENT_SCHEMA
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

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "river",
    "stone",
    "valley",
    "mill",
    "water",
    "light",
    "shadow",
]


def corpus(n: int, seed: int = 0) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    return {f"doc{i:04d}": " ".join(rng.choice(WORDS, size=int(rng.integers(20, 80)))) for i in range(n)}


def batches(texts: dict[str, str]):
    n = len(texts)
    return [
        pa.RecordBatch.from_pydict(
            {
                "id": list(texts),
                "url": [None] * n,
                "text": list(texts.values()),
                "source": ["t"] * n,
                "lang": [None] * n,
                "fetched_at": [None] * n,
                "meta": [[] for _ in range(n)],
            },
            schema=DOCUMENT_SCHEMA,
        )
    ]


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
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    shard = copy / index["splits"]["train"]["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=shard.name + ".*sha256"):
        TokenSequences(copy, "train", 16, verify_checksums=True)
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
    assert index["split_rule"]["forced_val_document"] == lowest
    assert (index["splits"]["val"]["documents"], index["splits"]["train"]["documents"]) == (1, 2)
