"""Held-out loss, perplexity and bits per token of a causal LM on a token split."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from pydantic import Field
from transformers import AutoModelForCausalLM

from core.stage import StageConfig
from training.data.shards import TokenSequences
from training.data.tokenizer import tokenizer_id


class EvalConfig(StageConfig):
    """What to evaluate on."""

    split: str = Field("val", description="Token split to evaluate.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    max_batches: int | None = Field(
        None, ge=1, description="Stop after this many batches (None: whole split)."
    )


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module, sequences: TokenSequences, batch_size: int = 8, max_batches: int | None = None
) -> dict[str, float]:
    """Mean next-token cross-entropy over non-overlapping sequences of the split, in order."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    n = len(sequences)
    for b, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        seqs = torch.from_numpy(
            sequences.batch(np.arange(start, min(start + batch_size, n))).astype(np.int64)
        ).to(device)
        logits = model(input_ids=seqs[:, :-1]).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), seqs[:, 1:].reshape(-1), reduction="sum")
        total_loss += loss.item()
        total_tokens += seqs[:, 1:].numel()
    mean = total_loss / total_tokens
    return {
        "loss": mean,
        "perplexity": math.exp(mean),
        "bits_per_token": mean / math.log(2),
        "tokens": total_tokens,
    }


def evaluate_model_dir(
    model_dir: str | Path, data_dir: str | Path, config: EvalConfig, seq_len: int
) -> dict[str, Any]:
    """Load an exported Hugging Face model directory and evaluate it on the token dataset."""
    transformers.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer_file = Path(model_dir) / "tokenizer.json"
    expected = tokenizer_id(tokenizer_file) if tokenizer_file.exists() else None
    sequences = TokenSequences(data_dir, config.split, seq_len, tokenizer_id=expected)
    return evaluate_perplexity(model, sequences, config.batch_size, config.max_batches)
