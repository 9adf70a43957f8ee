"""A stage's progress on the console: on a terminal a rich bar with the count, rate and time left; elsewhere
(CI logs, a file) a line at most every few seconds and at the end, so logs stay readable."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
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


def _amount(n: float) -> str:
    for cut, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= 10 * cut:
            return f"{n / cut:,.1f}{suffix}"
    return f"{n:,.0f}" if n == int(n) else f"{n:,.1f}"


class StageProgress:
    """``update(done, total)`` as work ends; ``phase`` renames what is counted (dedup's phases).

    ``count({"documents": n, "tokens": t})`` gives what the running tasks have done so far: a count named
    like the unit moves the bar (its total known up front), the others are shown beside it with their rate.
    """

    def __init__(self, console: Console, stage: str, unit: str, total: int | None = None):
        stage = escape(stage)  # printed as console markup: clean[web] is text
        self.console, self.stage, self.unit, self.total = console, stage, unit, total
        self.done, self.phase, self.note = 0, stage, ""
        self.counts: dict[str, int] = {}
        self._counts_at_start: dict[str, int] | None = None
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
                TextColumn("{task.fields[counts]}"),
                console=self.console,
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.stage, total=self.total, unit=self.unit, counts="")
        return self

    def count(self, counts: dict[str, int]) -> None:
        """What the stage's tasks have done so far (finished ones and the running ones' latest reports)."""
        if self._counts_at_start is None:  # what earlier runs did: not part of this run's rate
            self._counts_at_start = dict(counts)
            if self._bar is not None and self.unit in counts:
                self._bar.reset(self._task, completed=counts[self.unit], total=self.total)
        self.counts = dict(counts)
        if self.unit in counts:
            self.update(counts[self.unit])
        elif self._bar is not None:
            self._bar.update(self._task, counts=self._counts_text())
        else:
            self._maybe_line()

    def _counts_text(self, seconds: float | None = None) -> str:
        seconds = seconds if seconds is not None else time.perf_counter() - self._start
        shown = []
        for name, n in self.counts.items():
            if name == self.unit:
                continue
            new = n - (self._counts_at_start or {}).get(name, 0)
            rate = f" ({_amount(new / seconds)}/s)" if seconds > 0 and new > 0 else ""
            shown.append(f"{_amount(n)} {name}{rate}")
        return ", ".join(shown + ([self.note] if self.note else []))

    def update(
        self, done: int, total: int | None = None, phase: str | None = None, note: str | None = None
    ) -> None:
        """``done`` of ``total``; ``note``: the latest figures worth showing beside it (training's loss)."""
        if note is not None:
            self.note = note
        if phase is not None and phase != self.phase:
            self.phase = phase
            if self._bar is not None:
                self._bar.reset(self._task, description=f"{self.stage}: {phase}")
        total = total if total is not None else self.total
        finished = done != self.done and done == total
        self.done, self.total = done, total
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=self.total, counts=self._counts_text())
            return
        self._maybe_line(force=finished)

    def _maybe_line(self, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self._last_line >= LINE_EVERY_S:
            self._last_line = now
            of = f"/{self.total:,}" if self.total is not None else ""
            where = f"{self.stage}: {self.phase}" if self.phase != self.stage else self.stage
            counts = self._counts_text()
            self.console.print(
                f"  {where}: {self.done:,}{of} {self.unit}" + (f"; {counts}" if counts else ""),
                highlight=False,
                soft_wrap=True,
            )

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        seconds = time.perf_counter() - self._start
        if exc[0] is None and self.done:
            rate = f", {self.done / seconds:,.1f} {self.unit}/s" if seconds > 0 else ""
            counts = self._counts_text(seconds)
            self.console.print(
                f"  {self.stage}: {self.done:,} {self.unit} in {seconds:.1f}s{rate}"
                + (f"; {counts}" if counts else ""),
                highlight=False,
                soft_wrap=True,
            )
