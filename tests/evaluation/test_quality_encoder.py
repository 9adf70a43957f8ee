"""The encoder quality scorer (evaluation/quality_encoder.py) against the plain transformers route."""

import random

import numpy as np
import pytest
import torch

from benchmarks.common import encoder_classifier
from evaluation.quality_encoder import EncoderScorer
from tests.fixtures import prose

pytestmark = pytest.mark.unit


def test_length_sorted_batches_score_as_a_plain_transformers_forward(tmp_path):
    rng = random.Random(4)
    texts = [" ".join(prose(rng).split()[: rng.randint(3, 120)]) for _ in range(40)]
    model_dir = encoder_classifier(tmp_path / "clf", texts, layers=2, hidden=32, positions=64)
    ours = EncoderScorer(model_dir, seq_len=64, batch_size=8).scores(texts)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    expected = []
    with torch.inference_mode():
        for start in range(0, len(texts), 8):  # in corpus order, each batch padded to its longest
            enc = tokenizer(
                texts[start : start + 8], padding=True, truncation=True, max_length=64, return_tensors="pt"
            )
            expected += model(**enc).logits.softmax(-1)[:, 1].tolist()
    assert ours.dtype == np.float32 and ours.shape == (40,)
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)
    assert len(set(ours.tolist())) > 30  # each text its own score: the comparison is of 40 values
