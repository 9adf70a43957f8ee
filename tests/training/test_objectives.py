"""Masked-LM and span-corruption batches: the published statistics, exact reconstruction, determinism."""

import numpy as np
import pytest
from tokenizers import Tokenizer

from training.config import TrainConfig
from training.data.tokenizer import EOS_TOKEN, TokenizerConfig, train_bpe
from training.objectives import (
    IGNORE,
    MaskingConfig,
    ObjectiveBatches,
    SpanCorruptionConfig,
    SpecialIds,
    batch_rng,
    corrupt_spans,
    mask_tokens,
    other_documents,
    sentence_pairs,
    span_lengths,
    special_tokens_for,
    word_starts,
)

pytestmark = pytest.mark.unit

VOCAB = 1000
#: Ids 0-4 special (eos pad mask cls sep), 5-104 sentinels, the rest ordinary tokens.
IDS = SpecialIds(vocab_size=VOCAB, eos=0, pad=1, mask=2, cls=3, sep=4, sentinels=tuple(range(5, 105)))


def within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    """``count`` successes of ``n`` Bernoulli(p) trials lies within ``sigmas`` standard deviations."""
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def ordinary(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(105, VOCAB, size=(rows, cols))


def test_masking_selects_15_percent_and_replaces_80_10_10():
    tokens = ordinary(200, 500)  # 100k tokens
    inputs, labels = mask_tokens(tokens, batch_rng(0, 0, 0, 0), IDS, MaskingConfig())
    selected = labels != IGNORE
    n = selected.sum()
    assert within(int(n), tokens.size, 0.15)
    assert np.array_equal(labels[selected], tokens[selected])
    masked = selected & (inputs == IDS.mask)
    kept = selected & (inputs == tokens)
    randomized = selected & ~masked & ~kept
    assert within(int(masked.sum()), int(n), 0.8)
    # A random replacement equals the original with probability 1/VOCAB: counted as kept here.
    assert within(int(randomized.sum()), int(n), 0.1 * (1 - 1 / VOCAB))
    assert within(int(kept.sum()), int(n), 0.1 + 0.1 / VOCAB)
    assert np.array_equal(inputs[~selected], tokens[~selected])  # unselected positions are untouched
    assert inputs[randomized].min() >= 0 and inputs[randomized].max() < VOCAB


def test_special_tokens_are_never_selected():
    tokens = ordinary(50, 200)
    tokens[:, ::7] = IDS.eos
    tokens[:, 0], tokens[:, -1] = IDS.cls, IDS.sep
    _, labels = mask_tokens(tokens, batch_rng(1, 0, 0, 0), IDS, MaskingConfig(probability=0.9))
    special = np.isin(tokens, [IDS.eos, IDS.cls, IDS.sep])
    assert (labels[special] == IGNORE).all()
    assert (labels[~special] != IGNORE).mean() > 0.85


def _tokenizer() -> Tokenizer:
    texts = ["the river runs past the old stone mill and the valley"] * 50
    return train_bpe(texts, TokenizerConfig(vocab_size=400, min_frequency=1))


def test_whole_word_masking_selects_every_piece_of_a_word():
    tok = _tokenizer()
    starts = word_starts(tok)
    enc = tok.encode(" ".join(["millstone riverbank unvalleyed"] * 400))
    tokens = np.array(enc.ids, dtype=np.int64).reshape(1, -1)
    _, labels = mask_tokens(
        tokens,
        batch_rng(2, 0, 0, 0),
        SpecialIds(vocab_size=tok.get_vocab_size(), eos=0, mask=0),
        MaskingConfig(whole_word=True),
        starts,
    )
    # Words by hand: a new word begins at each token whose text starts with the byte-level space.
    words = np.cumsum([t.startswith("Ġ") or i == 0 for i, t in enumerate(enc.tokens)])
    selected = labels[0] != IGNORE
    for w in np.unique(words):
        assert len(set(selected[words == w])) == 1, "a word was partly selected"
    assert any(np.sum(words == w) > 1 and selected[words == w].all() for w in np.unique(words))
    assert within(len(set(words[selected])), int(words[-1]), 0.15)


def reconstruct(inputs: np.ndarray, targets: np.ndarray, sentinels: set[int], eos: int) -> list[int]:
    """Put each sentinel's span (what follows it in the targets) back in place of it in the inputs."""
    spans, current = {}, None
    assert inputs[-1] == targets[-1] == eos
    for t in targets.tolist()[:-1]:
        if t in sentinels:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs.tolist()[:-1]:
        out.extend(spans[t] if t in sentinels else [t])
    return out


def test_span_corruption_lengths_are_the_reference_ones():
    # run_t5_mlm_flax.py with max_seq_length 512 (its README): expanded inputs 568, targets 114.
    assert span_lengths(512, 0.15, 3.0) == (568, 114)
    # By hand for 32: 34 tokens -> 5 noise in 2 spans: 34-5+2+1 = 32 inputs, 5+2+1 = 8 targets; 35 would give 33.
    assert span_lengths(32, 0.15, 3.0) == (34, 8)


def test_span_corruption_reconstructs_the_original_exactly():
    raw, target_len = span_lengths(128, 0.15, 3.0)
    tokens = ordinary(64, raw, seed=3)
    tokens[:, ::50] = IDS.eos  # document ends inside the window stay ordinary text to T5
    inputs, targets = corrupt_spans(tokens, batch_rng(0, 1, 0, 0), IDS, SpanCorruptionConfig())
    assert inputs.shape == (64, 128) and targets.shape == (64, target_len)
    assert (inputs[:, -1] == IDS.eos).all() and (targets[:, -1] == IDS.eos).all()
    sentinels = set(IDS.sentinels)
    noise, spans = 0, 0
    for row in range(64):
        assert reconstruct(inputs[row], targets[row], sentinels, IDS.eos) == tokens[row].tolist()
        used = [t for t in inputs[row] if t in sentinels]
        assert used == list(IDS.sentinels[: len(used)])  # <extra_id_0>, <extra_id_1>, ... in order
        spans += len(used)
        noise += targets.shape[1] - 1 - len(used)
    assert abs(noise / (64 * raw) - 0.15) < 0.005
    assert abs(noise / spans - 3.0) < 0.3


def test_sentence_pairs_are_next_or_from_another_document():
    seq_len = 40
    windows = ordinary(400, seq_len - 3, seed=4)
    others = ordinary(400, seq_len - 3, seed=5)
    pairs, types, random_next = sentence_pairs(windows, others, batch_rng(0, 0, 0, 0), IDS, seq_len)
    assert pairs.shape == types.shape == (400, seq_len)
    assert within(int(random_next.sum()), 400, 0.5)
    for r in range(400):
        seps = np.flatnonzero(pairs[r] == IDS.sep)
        assert pairs[r, 0] == IDS.cls and seps.size == 2 and seps[1] == seq_len - 1
        a, b = pairs[r, 1 : seps[0]], pairs[r, seps[0] + 1 : -1]
        assert np.array_equal(a, windows[r, : a.size]) and a.size >= 1
        source = others[r] if random_next[r] else windows[r, a.size :]
        assert np.array_equal(b, source[: b.size])
        assert (types[r, : seps[0] + 1] == 0).all() and (types[r, seps[0] + 1 :] == 1).all()


def test_random_next_comes_from_another_document():
    documents = np.repeat(np.arange(20), 5)  # 100 windows, 5 per document
    indices = np.arange(100)
    picked = other_documents(batch_rng(0, 0, 0, 0), indices, documents)
    assert (documents[picked] != documents[indices]).all()


@pytest.mark.parametrize(
    "objective,extra",
    [("masked_lm", {}), ("masked_lm", {"next_sentence_prediction": True}), ("span_corruption", {})],
)
def test_batches_are_a_function_of_seed_step_rank_and_micro_batch(objective, extra):
    batches = ObjectiveBatches(objective, 32, IDS, MaskingConfig(**extra))
    samples = ordinary(8, batches.sample_length + 1)
    others = ordinary(8, batches.sample_length + 1, seed=9)
    a = batches.make(samples, batch_rng(0, 5, 1, 0), others)
    b = batches.make(samples, batch_rng(0, 5, 1, 0), others)
    c = batches.make(samples, batch_rng(0, 6, 1, 0), others)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["labels"], c["labels"])
    assert a["input_ids"].shape == (8, 32)


def test_a_tokenizer_without_the_special_tokens_is_a_clear_error():
    tok = train_bpe(["plain text"] * 5, TokenizerConfig(vocab_size=300, min_frequency=1))
    with pytest.raises(
        ValueError, match=r"tokenizer x.json lacks .*objective=masked_lm needs: <pad>, <mask>, <cls>, <sep>"
    ):
        SpecialIds.from_tokenizer(tok, "masked_lm", EOS_TOKEN, where="tokenizer x.json")
    with pytest.raises(ValueError, match=r"<extra_id_4> and 95 more"):
        SpecialIds.from_tokenizer(tok, "span_corruption", EOS_TOKEN)
    full = train_bpe(
        ["plain text"] * 5,
        TokenizerConfig(
            vocab_size=400,
            min_frequency=1,
            special_tokens=[EOS_TOKEN, *special_tokens_for("span_corruption")],
        ),
    )
    ids = SpecialIds.from_tokenizer(full, "span_corruption", EOS_TOKEN)
    assert ids.sentinels[0] == full.token_to_id("<extra_id_0>") and len(ids.sentinels) == 100


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"objective": "masked_lm"}, "masked_lm trains bert, roberta models, but train.model.arch=gpt2"),
        ({"objective": "span_corruption", "model": {"arch": "bert"}}, "span_corruption trains t5 models"),
        ({"model": {"arch": "t5"}}, "causal_lm trains gpt2, llama models, but train.model.arch=t5"),
        (
            {
                "objective": "masked_lm",
                "model": {"arch": "roberta"},
                "masking": {"next_sentence_prediction": True},
            },
            "needs train.model.arch=bert",
        ),
        (
            {"objective": "masked_lm", "model": {"arch": "bert"}, "eval_every": 5},
            "train.eval_every scores causal",
        ),
    ],
)
def test_objective_and_architecture_must_agree(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.model_validate(fields)
