"""One task runner for every stage: tasks are pure functions of their inputs, the runner commits them.

A task is called as ``fn(staging, *args)``: it writes its output files under ``staging`` (a private
directory, with the paths they will have under the stage's root) and returns a JSON-able result. The runner
then moves every file into place (each by an atomic rename) and writes the task's completion marker last,
holding the result. A task killed midway leaves no marker and is redone on the next run; a task with a
marker is not run again and its result is read back from the marker.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.files import atomic_write_bytes

DONE_DIR = "_done"
STAGING_DIR = "_staging"

TaskFn = Callable[..., dict[str, Any]]


@dataclass(frozen=True, order=True)
class TaskId:
    """Which task of a stage this is: its phase and its place in it (partition, components step, shard).

    ``name`` names the task's marker: ``{phase}{step:03d}-{shard:04d}`` / ``{phase}-{part}`` with the parts
    it has (a task with only ``part`` is named by it).
    """

    phase: str = ""
    part: str | None = None
    step: int | None = None
    shard: int | None = None

    @property
    def name(self) -> str:
        head = self.phase + (f"{self.step:03d}" if self.step is not None else "")
        tail = [self.part] if self.part is not None else []
        tail += [f"{self.shard:04d}"] if self.shard is not None else []
        return "-".join(([head] if head else []) + tail)


def read_marker(markers: Path, task: TaskId) -> dict[str, Any] | None:
    """The result of a task committed by an earlier run, or None if it never completed."""
    path = markers / f"{task.name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_task(fn: TaskFn, task: TaskId, root: str | Path, markers: str | Path, *args: Any) -> dict[str, Any]:
    """Run ``fn(staging, *args)`` and commit its files under ``root``, then its marker in ``markers``."""
    root, markers = Path(root), Path(markers)
    staging = root / STAGING_DIR / f"{task.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        result = fn(staging, *args)
        for src in sorted(p for p in staging.rglob("*") if p.is_file()):
            dst = root / src.relative_to(staging)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        atomic_write_bytes(markers / f"{task.name}.json", json.dumps(result).encode())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
