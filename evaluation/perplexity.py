"""Held-out loss, perplexity, bits per token and bits per byte of a causal LM on a token split, and the
evaluation stage's entry point (the split, then any benchmark tasks; masked-LM and span-corruption models
get their objective's held-out loss and pseudo-perplexity, evaluation/masked.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from evaluation.config import EvalConfig
from evaluation.harness import load_model, score_named_task
from evaluation.loglikelihood import CausalScorer
from evaluation.masked import evaluate_pretrained
from training.data.shards import TokenSequences, read_token_index
from training.data.tokenizer import EOS_TOKEN, load_tokenizer, tokenizer_id
from training.objectives import (
    MaskingConfig,
    Objective,
    ObjectiveBatches,
    SpanCorruptionConfig,
    SpecialIds,
)


def token_bytes(tokenizer_json: str | Path) -> np.ndarray:
    """UTF-8 bytes each token id stands for. A byte-level BPE token string holds one character per byte
    (GPT-2's byte-to-unicode map), so its length is its byte count; special tokens (EOS) stand for none."""
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    sizes = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    for token, i in tokenizer.get_vocab().items():
        sizes[i] = 0 if token in special else len(token)
    return sizes


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module,
    sequences: TokenSequences,
    batch_size: int = 8,
    max_batches: int | None = None,
    byte_sizes: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean next-token cross-entropy over non-overlapping sequences of the split, in order; with
    ``byte_sizes`` also bits per byte: total loss over the bytes the predicted tokens stand for, / ln 2
    (predicted EOS tokens add loss and no bytes, as the document boundary is part of what is modelled)."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens, total_bytes = 0.0, 0, 0
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
        if byte_sizes is not None:
            total_bytes += int(byte_sizes[seqs[:, 1:].cpu().numpy()].sum())
    mean = total_loss / total_tokens
    out = {
        "loss": mean,
        "perplexity": math.exp(mean),
        "bits_per_token": mean / math.log(2),
        "tokens": total_tokens,
    }
    if total_bytes:
        out |= {"bits_per_byte": total_loss / total_bytes / math.log(2), "bytes": total_bytes}
    return out


def evaluate_model_dir(
    model_dir: str | Path,
    data_dir: str | Path,
    config: EvalConfig,
    seq_len: int,
    objective: Objective = "causal_lm",
    masking: MaskingConfig | None = None,
    span: SpanCorruptionConfig | None = None,
) -> dict[str, Any]:
    """Load an exported Hugging Face model directory; evaluate it on the token split (flat metrics) and on
    ``config.tasks`` (under "tasks": name -> {source, digest, metrics})."""
    if objective != "causal_lm":
        return _evaluate_pretrained_dir(model_dir, data_dir, config, seq_len, objective, masking, span)
    model, tokenizer = load_model(model_dir)
    tokenizer_file = Path(model_dir) / "tokenizer.json"
    expected = tokenizer_id(tokenizer_file) if tokenizer_file.exists() else None
    sizes = token_bytes(tokenizer_file) if tokenizer_file.exists() else None

    def score(source: str | None) -> dict[str, Any]:
        sequences = TokenSequences(data_dir, config.split, seq_len, tokenizer_id=expected, source=source)
        return evaluate_perplexity(model, sequences, config.batch_size, config.max_batches, sizes)

    out: dict[str, Any] = score(None) | per_source(data_dir, config.split, seq_len, score)
    if config.tasks:
        scorer = CausalScorer(model, tokenizer, batch_tokens=config.batch_tokens)
        out["tasks"] = {}
        for name in config.tasks:
            ev = score_named_task(scorer, name, config.task_limit)
            out["tasks"][ev.name] = {"source": ev.source, "digest": ev.digest, "metrics": ev.metrics}
    return out


def _evaluate_pretrained_dir(
    model_dir: str | Path,
    data_dir: str | Path,
    config: EvalConfig,
    seq_len: int,
    objective: Objective,
    masking: MaskingConfig | None,
    span: SpanCorruptionConfig | None,
) -> dict[str, Any]:
    """A masked LM or T5 model on the held-out split, corrupted as in training (NSP aside)."""
    import transformers

    auto = (
        transformers.AutoModelForMaskedLM if objective == "masked_lm" else transformers.AutoModelForSeq2SeqLM
    )
    transformers.logging.disable_progress_bar()
    model = auto.from_pretrained(model_dir, dtype=torch.float32).eval()
    info = read_token_index(data_dir)["tokenizer"]
    path = Path(model_dir) / "tokenizer.json"
    ids = SpecialIds.from_tokenizer(
        load_tokenizer(path), objective, info.get("eos_token", EOS_TOKEN), str(path)
    )
    masking = (masking or MaskingConfig()).model_copy(update={"next_sentence_prediction": False})
    batches = ObjectiveBatches(objective, seq_len, ids, masking, span)

    def score(source: str | None) -> dict[str, Any]:
        sequences = TokenSequences(
            data_dir, config.split, batches.sample_length, tokenizer_id=tokenizer_id(path), source=source
        )
        return evaluate_pretrained(
            model,
            sequences,
            batches,
            config.batch_size,
            config.max_batches,
            config.pseudo_perplexity_sequences,
        )

    return score(None) | per_source(data_dir, config.split, batches.sample_length, score)


def per_source(
    data_dir: str | Path, split: str, length: int, score: Callable[[str], dict[str, Any]]
) -> dict[str, Any]:
    """``{"sources": {name: metrics}}``: each source's own held-out split scored apart (tokenize tags
    every source's shards), so a mixture's effect on each domain shows; a source whose split holds less
    than one sequence (``length`` + 1 tokens) is left out. Nothing for a corpus without sources."""
    sources = read_token_index(data_dir).get("sources", {})
    scored = {s: score(s) for s, t in sources.items() if t.get(f"{split}_tokens", 0) >= length + 1}
    return {"sources": scored} if scored else {}
