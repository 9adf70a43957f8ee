"""The benchmark tasks' n-grams that decontamination removes from the data (the clean stage's corpus and the
quality classifier's training data alike)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from cleaning.decontaminate import DecontaminateConfig, NgramIndex


def task_ngrams(console: Console, cfg: DecontaminateConfig) -> NgramIndex:
    """The n-grams of every request (context + continuation) of the tasks to decontaminate against."""
    from cleaning.decontaminate import NgramIndex
    from evaluation.tasks import resolve_task

    names = cfg.tasks or []  # the config filled them from evaluate.tasks when unset
    index = NgramIndex(cfg.n)
    for name in names:
        task = resolve_task(name)
        index.add(task.name, (c + x for e in task.load() for c, x in e.requests()))
    console.print(f"  decontaminating against {len(index)} {cfg.n}-grams of {', '.join(names)}")
    return index
