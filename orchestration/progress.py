"""A stage's progress on the console: on a terminal a rich bar with the count, rate and time left; elsewhere
(CI logs, a file) a line at most every few seconds and at the end, so logs stay readable."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

LINE_EVERY_S = 5.0


class _Rate(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {task.fields['unit']}/s" if speed else "", style="cyan")


class StageProgress:
    """``update(done, total)`` as work ends; ``phase`` renames what is counted (dedup's phases)."""

    def __init__(self, console: Console, stage: str, unit: str, total: int | None = None):
        self.console, self.stage, self.unit, self.total = console, stage, unit, total
        self.done, self.phase = 0, stage
        self._bar: Progress | None = None
        self._task = None
        self._start = self._last_line = 0.0

    def __enter__(self) -> StageProgress:
        self._start = time.perf_counter()
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("  {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                _Rate(),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.stage, total=self.total, unit=self.unit)
        return self

    def update(self, done: int, total: int | None = None, phase: str | None = None) -> None:
        if phase is not None and phase != self.phase:
            self.phase = phase
            if self._bar is not None:
                self._bar.reset(self._task, description=f"{self.stage}: {phase}")
        self.done, self.total = done, total if total is not None else self.total
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=self.total)
            return
        now = time.perf_counter()
        if done == self.total or now - self._last_line >= LINE_EVERY_S:
            self._last_line = now
            of = f"/{self.total}" if self.total is not None else ""
            where = f"{self.stage}: {self.phase}" if self.phase != self.stage else self.stage
            self.console.print(f"  {where}: {done}{of} {self.unit}", highlight=False)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        seconds = time.perf_counter() - self._start
        if exc[0] is None and self.done:
            rate = f", {self.done / seconds:,.1f} {self.unit}/s" if seconds > 0 else ""
            self.console.print(
                f"  {self.stage}: {self.done} {self.unit} in {seconds:.1f}s{rate}", highlight=False
            )
