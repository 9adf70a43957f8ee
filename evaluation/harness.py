"""Evaluate a model: benchmark tasks and bits per byte / perplexity on text, from one entry point.

A model is an exported Hugging Face directory (what training writes, or any causal LM saved with
``save_pretrained`` and its tokenizer). MLflow URIs are resolved to such a directory by orchestration
(the only layer that talks to MLflow).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from evaluation.loglikelihood import CausalScorer, Progress
from evaluation.tasks import resolve_task, score_task, score_texts
from ingestion.readers import read_corpus


def load_model(model_dir: str | Path, threads: int | None = None) -> tuple[torch.nn.Module, Any]:
    """An exported causal LM and its tokenizer, fp32, in eval mode."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    if threads:
        torch.set_num_threads(threads)
    transformers.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return fuse_activations(model).eval(), tokenizer


class _TanhGELU(torch.nn.Module):
    """GPT-2's tanh-approximated GELU as torch's one fused kernel (the same function; the Python form
    runs five elementwise passes over the MLP activations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh")


def fuse_activations(model: torch.nn.Module) -> torch.nn.Module:
    """Swap transformers' Python ``NewGELUActivation`` modules for the fused kernel, in place."""
    from transformers.activations import NewGELUActivation

    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, _TanhGELU())
    return model


def read_texts(uri: str | Path, limit: int | None = None, text_field: str = "text") -> list[str]:
    """Texts of any corpus the readers know (JSONL, Parquet, WARC/WET, directories of text or HTML),
    including an lmforge documents output directory (its Parquet files)."""
    path = Path(str(uri))
    sources: Iterator[str | Path] = (
        iter(sorted(path.glob("*.parquet"))) if path.is_dir() and any(path.glob("*.parquet")) else iter([uri])
    )
    texts: list[str] = []
    for source in sources:
        for batch in read_corpus(source, text_field=text_field):
            texts.extend(t for t in batch.column("text").to_pylist() if t)
            if limit is not None and len(texts) >= limit:
                return texts[:limit]
    return texts


@dataclass
class Evaluation:
    """What one task or text dataset scored, and what it was (for lineage: source and content digest)."""

    name: str
    source: str
    digest: str
    metrics: dict[str, float]


def score_named_task(
    scorer: CausalScorer, name: str, limit: int | None = None, progress: Progress | None = None
) -> Evaluation:
    """A built-in task or task file, scored, with its data's source and digest."""
    task = resolve_task(name)
    return Evaluation(task.name, task.source, task.digest(), score_task(scorer, task, limit, progress))


def evaluate(
    model_dir: str | Path,
    tasks: Sequence[str] = (),
    data: Sequence[str] = (),
    limit: int | None = None,
    batch_tokens: int | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Evaluation]:
    """``{task name or data path: Evaluation}``; metrics also carry ``seconds`` and ``examples_per_s``."""
    model, tokenizer = load_model(model_dir, threads)
    scorer = CausalScorer(model, tokenizer, batch_tokens=batch_tokens)
    results: dict[str, Evaluation] = {}
    for name in tasks:
        start = time.perf_counter()
        ev = score_named_task(scorer, name, limit, progress)
        ev.metrics = _timed(ev.metrics, "examples", start)
        results[ev.name] = ev
    for uri in data:
        start = time.perf_counter()
        texts = read_texts(uri, limit)
        metrics = _timed(score_texts(scorer, texts, progress), "documents", start)
        digest = hashlib.sha256()
        for text in texts:
            digest.update(hashlib.sha256(text.encode("utf-8")).digest())
        results[str(uri)] = Evaluation(Path(str(uri)).name, str(uri), digest.hexdigest(), metrics)
    return results


def _timed(metrics: dict[str, float], unit: str, start: float) -> dict[str, float]:
    seconds = time.perf_counter() - start
    return metrics | {"seconds": seconds, "examples_per_s": metrics[unit] / seconds}
