"""The shared fixtures (tests/fixtures.py) have the properties the tests that use them rely on: the token
shards hold exactly the corpus's tokens and match their index, and each shared model's loss fell."""

import json

import numpy as np
import pyarrow as pa
import pytest

from core.files import file_sha256
from tests.fixtures import SHARD_CORPUS, corpus


def _check_shards(out):

    from training.data.tokenizer import EOS_TOKEN, load_tokenizer

    index = json.loads((out / "index.json").read_text())
    tokenizer = load_tokenizer(out / "tokenizer.json")
    texts = corpus(**SHARD_CORPUS)
    # Every document's tokens (by the tokenizer itself, EOS after each) are in the shards, nothing else.
    expected = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) + 1 for t in texts.values())
    stored = 0
    for split in index["splits"].values():
        for shard in split["shards"]:
            path = out / shard["path"]
            assert file_sha256(path) == shard["sha256"], shard["path"]
            stored += pa.ipc.open_file(pa.memory_map(str(path))).read_all().num_rows
    assert index["total_tokens"] == stored == expected
    assert sum(s["documents"] for s in index["splits"].values()) == len(texts)
    assert index["tokenizer"]["eos_id"] == tokenizer.token_to_id(EOS_TOKEN)
    assert index["tokenizer"]["vocab_size"] == tokenizer.get_vocab_size()
    return tokenizer


@pytest.mark.unit
def test_the_shared_token_shards_hold_the_corpus_and_match_their_index(token_shards, special_token_shards):
    from training.objectives import special_tokens_for

    assert _check_shards(token_shards).get_vocab_size() <= 320  # BPE stops when no pair repeats
    special = _check_shards(special_token_shards)
    assert all(special.token_to_id(t) is not None for t in special_tokens_for("span_corruption"))
    assert all(special.token_to_id(t) is not None for t in special_tokens_for("masked_lm"))


@pytest.mark.system  # three Ray Train launches
@pytest.mark.parametrize("objective,drop", [("causal_lm", 0.5), ("masked_lm", 1.0), ("span_corruption", 1.0)])
def test_each_shared_model_learned(trained, objective, drop):
    run = trained(objective)
    losses = run.summary["losses"]
    assert run.summary["objective"] == objective and len(losses) == run.config.steps
    assert np.mean(losses[-3:]) < losses[0] - drop
    assert (run.model_dir / "config.json").is_file() and (run.model_dir / "tokenizer.json").is_file()
