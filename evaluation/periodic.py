"""Evaluation during training: a capped subset of the tasks and of the held-out split, scored on the
training workers every ``train.eval_every`` steps.

The model is the DeepSpeed engine's module as it is at that step (sharded across the ranks under ZeRO-3),
so every rank calls together: the task requests are dealt out across the ranks and gathered back
(``CausalScorer(across_ranks=True)``), the held-out batches are the same on every rank. The numbers
are those the evaluate stage would report for the exported model on the same examples: the same
tokenizer (``hf_tokenizer``), the same scorer, the same first N examples.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import torch

from evaluation.loglikelihood import CausalScorer, default_batch_tokens
from evaluation.perplexity import evaluate_perplexity, token_bytes
from evaluation.tasks import Task, resolve_task, score_task, task_metric_names
from training.config import TrainConfig
from training.data.shards import TokenSequences, read_token_index
from training.trainer import hf_tokenizer

#: Counts, not measurements: the same at every step.
_CONSTANT = ("examples", "skipped", "tokens", "bytes")


class PeriodicEvaluator:
    """``on_eval`` for ``training.trainer.train``: ``{eval/<task>/<metric>: value, eval/val_<metric>: ...}``."""

    def __init__(self, cfg: TrainConfig, data_dir: str | Path):
        self.limit = cfg.eval_limit
        # At most a training micro-batch's tokens: what the worker's memory is sized for.
        self.batch_tokens = cfg.micro_batch_size * cfg.seq_len
        index = read_token_index(data_dir)
        info = index["tokenizer"]
        tokenizer_json = Path(data_dir) / info["path"]
        self.tokenizer = hf_tokenizer(tokenizer_json, info)
        self.byte_sizes = token_bytes(tokenizer_json)
        self.tasks = [self._capped(resolve_task(name)) for name in cfg.eval_tasks]
        has_val = "val" in index.get("splits", {})
        self.val = TokenSequences(data_dir, "val", cfg.seq_len, verify="never") if has_val else None
        self.val_batch = cfg.micro_batch_size

    def _capped(self, task: Task) -> Task:
        """The task with its first ``limit`` examples loaded once (its digest still names all its data)."""
        examples = list(itertools.islice(task.load(), self.limit))
        return dataclasses.replace(task, load=lambda: iter(examples))

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        budget = min(default_batch_tokens(next(model.parameters()).device), self.batch_tokens)
        scorer = CausalScorer(model, self.tokenizer, batch_tokens=budget, across_ranks=True)
        for task in self.tasks:
            metrics = score_task(scorer, task)
            measured = {k: v for k, v in metrics.items() if k not in _CONSTANT}
            out |= task_metric_names(task.name, measured, prefix="eval/")
        if self.val is not None and len(self.val):
            batches = -(-min(self.limit, len(self.val)) // self.val_batch)
            val = evaluate_perplexity(model, self.val, self.val_batch, batches, self.byte_sizes)
            out |= {f"eval/val_{k}": v for k, v in val.items() if k not in _CONSTANT}
        return out
