"""The evaluation stage's config: light to import (no torch), as every config model is for the command line."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from core.stage import StageConfig


class EvalConfig(StageConfig):
    """What to evaluate on."""

    split: str = Field("val", description="Token split to evaluate.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    max_batches: int | None = Field(
        None, ge=1, description="Stop after this many batches (None: whole split)."
    )
    tasks: list[str] = Field(
        default_factory=list,
        description="Benchmark tasks after training: built-in names (arc_easy, hellaswag, piqa, "
        "lambada_openai, ...) or .jsonl/.yaml task files; scored as lm-evaluation-harness does.",
    )
    task_limit: int | None = Field(None, ge=1, description="First N examples of each task (None: all).")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        """An unknown name is refused with the config, not after training."""
        from evaluation.tasks import BUILTIN_TASKS, TASK_FILE_SUFFIXES

        for name in tasks:
            if name not in BUILTIN_TASKS and Path(name).suffix not in TASK_FILE_SUFFIXES:
                raise ValueError(
                    f"unknown task {name!r}: use one of {', '.join(BUILTIN_TASKS)} or a "
                    f"{'/'.join(TASK_FILE_SUFFIXES)} task file"
                )
        return tasks

    pseudo_perplexity_sequences: int = Field(
        16,
        ge=0,
        description="Masked LMs: held-out sequences scored for pseudo-perplexity (a forward per token).",
    )
    batch_tokens: int | None = Field(
        None,
        ge=64,
        description="Tokens per forward pass when scoring tasks (None: 1,024 on CPU, 8,192 on GPU).",
    )
