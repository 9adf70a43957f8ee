"""Scoring against hand computations: a bigram model whose log-probabilities are known in closed form."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from evaluation.loglikelihood import CausalScorer
from evaluation.tasks import load_user_task, mean_stderr, score_task, score_texts

pytestmark = pytest.mark.unit


class Bigram(torch.nn.Module):
    """Logits at each position depend only on the token there: log p(next | cur) = log_softmax(W[cur])."""

    def __init__(self, vocab: int, window: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g) * 3)
        self.config = SimpleNamespace(n_positions=window)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture(scope="module")
def bigram(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = Bigram(len(tokenizer), window=8)
    logp = torch.log_softmax(model.table.detach().double(), -1).numpy()
    return CausalScorer(model, tokenizer), tokenizer, logp


def hand_ll(logp: np.ndarray, previous: int, tokens: list[int]) -> float:
    total = 0.0
    for t in tokens:
        total += logp[previous, t]
        previous = t
    return total


def test_rolling_bits_per_byte_and_perplexities_by_hand(bigram):
    scorer, tokenizer, logp = bigram
    texts = [
        "A short one.",
        "Plants need sunlight and water to grow; " * 6 + "the end.",
        "é ü 漢字 mixed bytes",
    ]
    got = score_texts(scorer, texts)
    prefix = tokenizer.bos_token_id
    ll, tokens = 0.0, 0
    for text in texts:  # every token predicted once: the first from the prefix token, each next from its left
        ids = tokenizer(text)["input_ids"]
        ll += hand_ll(logp, prefix, ids)
        tokens += len(ids)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(len(t.split()) for t in texts)  # no leading/trailing whitespace in these texts
    assert got["tokens"] == tokens and tokens > 3 * 8  # longer than the 8-token window: several windows
    assert got["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-6)
    assert got["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-6)
    assert got["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-6)
    assert got["token_perplexity"] == pytest.approx(math.exp(-ll / tokens), rel=1e-6)
    assert got["bytes"] == n_bytes and got["documents"] == 3


def test_multiple_choice_acc_and_acc_norm_by_hand(bigram, tmp_path):
    short, tokenizer, logp = bigram
    scorer = CausalScorer(short.model, tokenizer, max_length=64)
    rng = np.random.default_rng(0)
    words = ["sun", "water", "rock", "photosynthesis", "a", "the plant grows", "energy", "gravity pulls down"]
    records = []
    for i in range(40):
        choices = list(rng.choice(words, size=int(rng.integers(2, 5)), replace=False))
        records.append(
            {
                "context": f"Question {i}: what is it?\nAnswer:",
                "choices": choices,
                "gold": int(rng.integers(len(choices))),
            }
        )
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    got = score_task(scorer, load_user_task(path))
    acc, acc_norm = [], []
    for r in records:
        ctx = tokenizer(r["context"])["input_ids"]
        lls = []
        for c in r["choices"]:  # the continuation is what the whole string adds after the context's tokens
            cont = tokenizer(r["context"] + " " + c)["input_ids"][len(ctx) :]
            lls.append(hand_ll(logp, ctx[-1], cont))
        acc.append(float(np.argmax(lls) == r["gold"]))
        acc_norm.append(float(np.argmax(np.array(lls) / [len(c) for c in r["choices"]]) == r["gold"]))
    assert got["examples"] == 40
    assert got["acc"] == pytest.approx(np.mean(acc)) and got["acc_norm"] == pytest.approx(np.mean(acc_norm))
    assert got["acc_stderr"] == pytest.approx(np.std(acc, ddof=1) / math.sqrt(40))
    assert got["acc"] != got["acc_norm"] or np.mean(acc) == np.mean(acc_norm)


def test_stderr_is_the_sample_standard_error():
    values = np.array([1.0, 0.0, 0.0, 1.0, 1.0])
    mean = values.mean()
    by_hand = math.sqrt(sum((v - mean) ** 2 for v in values) / 4) / math.sqrt(5)
    assert mean_stderr(values) == pytest.approx(by_hand)


def test_yaml_task_gold_by_text_and_errors_name_the_place(tmp_path):
    (tmp_path / "t.yaml").write_text(
        "name: capitals\nexamples:\n  - {context: 'Capital of France:', choices: [Paris, Rome], gold: Paris}\n"
    )
    task = load_user_task(tmp_path / "t.yaml")
    [example] = list(task.load())
    assert task.name == "capitals" and example.gold == 0 and example.continuations == (" Paris", " Rome")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"context": "x", "choices": ["a", "b"], "gold": 0}\n{"context": "y", "choices": ["a"], "gold": 0}\n'
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:2: 'choices' must be a list of at least two"):
        load_user_task(bad)
    bad.write_text('{"context": "x", "choices": ["a", "b"], "gold": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: 'gold' must be a choice's index"):
        load_user_task(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: not JSON"):
        load_user_task(bad)
    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        load_user_task(tmp_path / "nothere.jsonl")


def test_shared_context_rows_equal_one_request_at_a_time(tiny_model):
    from evaluation.harness import load_model

    model, tokenizer = load_model(tiny_model)
    requests = [
        ("The sun is a", " star"),
        ("The sun is a", " planet and more"),
        ("The sun is a ", "moon"),
        ("", "Hello world"),
        ("x " * 600, " long"),
    ]
    packed = CausalScorer(model, tokenizer).loglikelihood(requests)
    alone = [CausalScorer(model, tokenizer, batch_tokens=1).loglikelihood([r])[0] for r in requests]
    for (a, ga), (b, gb) in zip(packed, alone):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


@pytest.mark.parametrize("vocab_slice", [None, 1, 7, 64])
def test_sliced_head_equals_a_full_log_softmax(tiny_model, vocab_slice):
    """The head projected a vocabulary slice at a time gives plain PyTorch's log-softmax of the full
    logits at the wanted tokens, and its argmax (ties included: the first maximal index)."""
    from evaluation.harness import load_model

    model, tokenizer = load_model(tiny_model)
    scorer = CausalScorer(model, tokenizer)
    scorer.vocab_slice = vocab_slice
    torch.manual_seed(0)
    hidden = torch.randn(50, model.config.n_embd)
    logits = hidden @ model.lm_head.weight.T
    wanted = logits.argmax(-1)
    wanted[::2] = torch.randint(0, logits.shape[1], (25,))
    with torch.no_grad():
        lp, greedy = scorer._head_scores(hidden, wanted)
    reference = torch.log_softmax(logits, -1).gather(1, wanted[:, None]).squeeze(1)
    assert torch.allclose(lp, reference, atol=1e-5)
    assert torch.equal(greedy, logits.argmax(-1) == wanted) and greedy[1::2].all()
    # A tie between two slices: the earlier index is the argmax, as torch.argmax picks it.
    tied = torch.zeros(2, model.config.n_embd)
    scorer._head = torch.nn.Linear(model.config.n_embd, 130, bias=True)
    with torch.no_grad():
        scorer._head.weight.zero_()
        scorer._head.bias.zero_()
        scorer._head.bias[[3, 100]] = 1.0
        _, greedy = scorer._head_scores(tied, torch.tensor([3, 100]))
    assert greedy.tolist() == [True, False]


def test_token_bytes_sum_to_the_texts_utf8_length(tiny_model):
    from evaluation.perplexity import token_bytes

    sizes = token_bytes(tiny_model / "tokenizer.json")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for text in ["Plain ASCII text.", "é ü 漢字 — emoji 🙂 and\ttabs\n", "x" * 50]:
        ids = tokenizer(text)["input_ids"]
        assert int(sizes[ids].sum()) == len(text.encode("utf-8"))
    assert sizes[tokenizer.eos_token_id] == 0


def test_examples_longer_than_the_window_are_skipped_and_counted(bigram, tmp_path):
    scorer, tokenizer, logp = bigram  # an 8-token window
    path = tmp_path / "t.jsonl"
    long_choice = "photosynthesis converts light energy into chemical energy stored in glucose"
    path.write_text(
        json.dumps({"context": "Q: sky?", "choices": ["blue", "green"], "gold": 0})
        + "\n"
        + json.dumps({"context": "Q: plants?", "choices": ["rock", long_choice], "gold": 1})
        + "\n"
    )
    got = score_task(scorer, load_user_task(path))
    assert got["examples"] == 1 and got["skipped"] == 1
    ctx = tokenizer("Q: sky?")["input_ids"]
    lls = [
        hand_ll(logp, ctx[-1], tokenizer("Q: sky? " + c)["input_ids"][len(ctx) :]) for c in ("blue", "green")
    ]
    assert got["acc"] == float(np.argmax(lls) == 0)
