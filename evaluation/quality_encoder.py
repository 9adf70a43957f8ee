"""Quality scores from a fine-tuned encoder classifier (the quality classifier of ``kind: encoder``): each
text's probability of the ``positive`` label, or a regression head's value.

Inputs are built as lmforge's fine-tuning builds them (``[CLS] text [SEP]``, truncated to ``seq_len``,
training/finetune.py ``input_rows``), so a model scores text as it was trained on it. The texts of a call
are tokenized once, sorted by length and batched, so that each batch pads to its own longest row instead of
the longest of whatever came next to it (bf16 autocast on a GPU)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np

#: The label whose probability is the score (the classifier stage names its classes so).
POSITIVE_LABEL = "positive"


class EncoderScorer:
    def __init__(self, model_dir: str | Path, seq_len: int = 512, batch_size: int = 64):
        import torch
        from transformers import AutoModelForSequenceClassification

        from training.finetune import load_tokenizer_of

        self.tokenizer = load_tokenizer_of(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device)
        config = self.model.config
        positions = getattr(config, "max_position_embeddings", None) or seq_len
        self.seq_len, self.batch_size = min(seq_len, positions), batch_size
        labels = config.label2id or {}
        self.positive = None if config.num_labels == 1 else labels.get(POSITIVE_LABEL, config.num_labels - 1)

    def scores(self, texts: list[str]) -> np.ndarray:
        import torch

        from training.finetune import input_rows, pad_rows

        # unpadded, and cut to seq_len by input_rows (verbose=False: no warning about the longer ones)
        ids = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        rows, types = input_rows(self.tokenizer, ids, [None] * len(ids), self.seq_len, self.model.config)
        order = np.argsort([len(r) for r in rows], kind="stable")
        out = np.empty(len(texts), np.float32)
        autocast = torch.autocast("cuda", torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        with torch.inference_mode(), autocast:
            for start in range(0, len(order), self.batch_size):
                chosen = order[start : start + self.batch_size]
                width = max(len(rows[i]) for i in chosen)
                batch = pad_rows([rows[i] for i in chosen], [types[i] for i in chosen], width,
                                 self.tokenizer, self.model.config)  # fmt: skip
                tensors = {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()}
                logits = self.model(**tensors).logits.float()
                values = logits[:, 0] if self.positive is None else logits.softmax(-1)[:, self.positive]
                out[chosen] = values.cpu().numpy()
        return out


def encoder_scorer(model_dir: str, seq_len: int = 512, batch_size: int = 64):
    """The scoring function of an encoder classifier directory (local or a URI: a node-local copy)."""
    from core.storage import local_copy

    return EncoderScorer(local_copy(model_dir), seq_len, batch_size).scores
