"""Held-out metrics of masked-LM and span-corruption models: the pretraining loss on the validation split
(with fixed corruption, so two models see the same masks) and masked-LM pseudo-perplexity.

Pseudo-perplexity follows Salazar et al. 2020 ("Masked Language Model Scoring"): each ordinary token of a
sequence is masked in turn, the model scores the true token at that position, and
PPPL = exp(-mean log p(token | rest)).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training.data.shards import TokenSequences
from training.objectives import IGNORE, ObjectiveBatches, batch_rng, bert_sequences


def _loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits, labels = out.logits.float(), batch["labels"].reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels, ignore_index=IGNORE, reduction="sum")
    return total.item(), int((labels != IGNORE).sum())


@torch.no_grad()
def evaluate_objective(
    model: torch.nn.Module,
    sequences: TokenSequences,
    batches: ObjectiveBatches,
    batch_size: int = 8,
    max_batches: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Mean loss per predicted token over the split's samples in order; batch ``b`` is corrupted by
    ``batch_rng(seed, b, 0, 0)``, so the masks depend on the data and the seed only."""
    model.eval()
    device = next(model.parameters()).device
    total, predicted, n = 0.0, 0, len(sequences)
    for b, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        arrays = batches.make(
            sequences.batch(np.arange(start, min(start + batch_size, n))), batch_rng(seed, b, 0, 0)
        )
        loss, count = _loss_sum(model, {k: torch.from_numpy(v).to(device) for k, v in arrays.items()})
        total, predicted = total + loss, predicted + count
    mean = total / max(predicted, 1)
    return {"loss": mean, "perplexity": math.exp(mean), "predicted_tokens": predicted}


@torch.no_grad()
def pseudo_perplexity(
    model: torch.nn.Module,
    sequences: np.ndarray,
    mask_id: int,
    special_ids: np.ndarray,
    chunk: int = 64,
) -> dict[str, float]:
    """Pseudo-log-likelihood scoring of ``(n, length)`` token sequences with a masked LM.

    Every ordinary (non-special) position of every sequence is masked alone; ``chunk`` masked copies go
    through the model per forward pass.
    """
    model.eval()
    device = next(model.parameters()).device
    seqs = torch.as_tensor(np.asarray(sequences, dtype=np.int64))
    ordinary = ~torch.isin(seqs, torch.as_tensor(special_ids))
    rows, cols = ordinary.nonzero(as_tuple=True)
    total = 0.0
    for start in range(0, rows.numel(), chunk):
        r, c = rows[start : start + chunk], cols[start : start + chunk]
        copies = seqs[r].clone()
        truth = copies[torch.arange(r.numel()), c].clone()
        copies[torch.arange(r.numel()), c] = mask_id
        logits = model(input_ids=copies.to(device)).logits.float()
        logp = torch.log_softmax(logits[torch.arange(r.numel()), c.to(device)], dim=-1)
        total += logp.gather(1, truth.to(device)[:, None]).sum().item()
    n = rows.numel()
    return {
        "pseudo_log_likelihood": total,
        "pseudo_perplexity": math.exp(-total / max(n, 1)),
        "scored_tokens": n,
    }


def evaluate_pretrained(
    model: torch.nn.Module,
    sequences: TokenSequences,
    batches: ObjectiveBatches,
    batch_size: int = 8,
    max_batches: int | None = None,
    pppl_sequences: int = 16,
) -> dict[str, Any]:
    """The held-out loss of the model's objective; masked LMs add pseudo-perplexity on the first
    ``pppl_sequences`` samples (its cost is one forward pass per token)."""
    out: dict[str, Any] = evaluate_objective(model, sequences, batches, batch_size, max_batches)
    if batches.objective == "masked_lm" and pppl_sequences:
        take = np.arange(min(pppl_sequences, len(sequences)))
        body = sequences.batch(take)[:, : batches.sample_length]
        seqs = bert_sequences(body, batches.ids)
        out |= pseudo_perplexity(model, seqs, batches.ids.mask, batches.ids.special_array())
    return out
