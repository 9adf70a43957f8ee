"""Pseudo-perplexity against a plain loop that masks one position per forward pass (Salazar et al. 2020)."""

import math

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from evaluation.masked import pseudo_perplexity

pytestmark = pytest.mark.unit


def test_pseudo_perplexity_matches_one_mask_per_forward_pass():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = BertForMaskedLM(config).eval()
    cls, sep, mask = 1, 2, 3
    rng = np.random.default_rng(0)
    seqs = np.concatenate([np.full((3, 1), cls), rng.integers(4, 50, (3, 10)), np.full((3, 1), sep)], axis=1)
    got = pseudo_perplexity(model, seqs, mask, np.array([0, cls, sep, mask]), chunk=7)

    total, n = 0.0, 0
    with torch.no_grad():
        for row in seqs:
            for i in range(1, len(row) - 1):
                masked = torch.tensor(row)[None].clone()
                masked[0, i] = mask
                logp = torch.log_softmax(model(input_ids=masked).logits[0, i], dim=-1)
                total += logp[row[i]].item()
                n += 1
    assert got["scored_tokens"] == n == 30
    assert got["pseudo_log_likelihood"] == pytest.approx(total, rel=1e-5)
    assert got["pseudo_perplexity"] == pytest.approx(math.exp(-total / n), rel=1e-5)
