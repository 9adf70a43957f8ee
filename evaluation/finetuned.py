"""Score a fine-tuned model directory on its labeled splits, loaded the way users load it (transformers'
Auto classes): classification metrics with the confusion matrix, or seq2seq exact match / BLEU / chrF."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from evaluation.classification import classification_metrics, multilabel_metrics, seq2seq_metrics
from training.finetune import FinetuneConfig, encode_split, load_tokenizer_of
from training.labeled import load_labeled


@torch.no_grad()
def _logits(model: torch.nn.Module, inputs: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    n = next(iter(inputs.values())).shape[0]
    parts = []
    for start in range(0, n, batch_size):
        batch = {k: torch.from_numpy(v[start : start + batch_size]) for k, v in inputs.items()}
        parts.append(model(**batch).logits.float().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, model.config.num_labels), dtype=np.float32)


@torch.no_grad()
def _generate(
    model, tokenizer, inputs: dict[str, np.ndarray], max_new_tokens: int, batch_size: int
) -> list[str]:
    texts = []
    for start in range(0, inputs["input_ids"].shape[0], batch_size):
        ids = torch.from_numpy(inputs["input_ids"][start : start + batch_size])
        mask = torch.from_numpy(inputs["attention_mask"][start : start + batch_size])
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False
        )
        texts += tokenizer.batch_decode(out, skip_special_tokens=True)
    return [t.strip() for t in texts]


def evaluate_finetuned(
    model_dir: str | Path,
    cfg: FinetuneConfig,
    splits: tuple[str, ...] = ("validation", "test"),
    batch_size: int = 64,
) -> dict[str, dict[str, Any]]:
    """Metrics per split (the splits the labeled data has); class names come from the model's id2label."""
    transformers.logging.disable_progress_bar()
    tables, _, _ = load_labeled(cfg.data, cfg.task)
    tokenizer = load_tokenizer_of(model_dir)
    out: dict[str, dict[str, Any]] = {}
    if cfg.task == "seq2seq":
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        for split in (s for s in splits if s in tables and tables[s].num_rows):
            inputs = encode_split(tables[split], cfg, tokenizer, model.config, [], split)
            predictions = _generate(model, tokenizer, inputs, cfg.max_new_tokens, batch_size)
            references = [str(t).strip() for t in tables[split].column(cfg.data.target_column).to_pylist()]
            out[split] = seq2seq_metrics(predictions, references)
        return out
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=torch.float32
    ).eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    for split in (s for s in splits if s in tables and tables[s].num_rows):
        encoded = encode_split(tables[split], cfg, tokenizer, model.config, names, f"{split} split")
        labels = encoded.pop("labels")
        logits = _logits(model, encoded, batch_size)
        if cfg.task == "multi_label":
            predicted = 1 / (1 + np.exp(-logits)) > cfg.threshold
            out[split] = multilabel_metrics(labels, predicted, names)
        else:
            out[split] = classification_metrics(labels, logits.argmax(axis=1), names)
        out[split]["label_names"] = names
    return out
