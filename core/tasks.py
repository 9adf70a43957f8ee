"""One task runner for every stage: tasks are pure functions of their inputs, the runner commits them.

A task is called as ``fn(staging, *args)``: it writes its output files under ``staging`` (a private
directory, with the paths they will have under the stage's root) and returns a JSON-able result. The runner
then moves every file into place (each by an atomic rename) and writes the task's completion marker last,
holding the result. A task killed midway leaves no marker and is redone on the next run; a task with a
marker is not run again and its result is read back from the marker.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from core.storage import Store

DONE_DIR = "_done"
STAGING_DIR = "_staging"
LOG_DIR = "_logs"

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


def read_marker(markers: str | Path | Store, task: TaskId) -> dict[str, Any] | None:
    """The result of a task committed by an earlier run, or None if it never completed."""
    return Store(markers).read_object(f"{task.name}.json")


class _Tee(io.TextIOBase):
    """Writes to a stream and to the task's log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()


@contextlib.contextmanager
def task_log(path: Path) -> Iterator[None]:
    """What the task prints and logs goes to ``path`` too (appended: a retried task keeps each attempt),
    with its traceback if it raises; the streams it wrote to get it as before."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        log.write(
            f"--- start {datetime.now(timezone.utc).isoformat()} pid {os.getpid()} on {socket.gethostname()}\n"
        )
        handler = logging.StreamHandler(log)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        try:
            with (
                contextlib.redirect_stdout(_Tee(sys.stdout, log)),
                contextlib.redirect_stderr(_Tee(sys.stderr, log)),
            ):
                yield
        except BaseException:
            log.write(traceback.format_exc())
            raise
        finally:
            logging.getLogger().removeHandler(handler)
            log.write(f"--- end {datetime.now(timezone.utc).isoformat()}\n")


def _reset_peak_rss() -> None:
    """Start this process's peak resident set (Linux's VmHWM) over, so a task's own peak can be read at
    its end although the worker process ran other tasks before (a no-op where /proc does not allow it)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """This process's peak resident set in MiB since it started or since :func:`_reset_peak_rss`."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_task(
    fn: TaskFn, task: TaskId, root: str | Path | Store, markers: str | Path | Store, *args: Any
) -> dict[str, Any]:
    """Run ``fn(staging, *args)`` and commit its files under ``root``, then its marker in ``markers``.
    The task's output and log records are kept in ``root/_logs/<task>.log``; its result gains
    ``peak_rss_mb``, the worker's peak resident memory while it ran (what ``ray.resources`` memory_mb
    should allow for).

    ``root`` may be on any pyarrow filesystem (core/storage.py): the task then writes on this node's disk
    and its files are uploaded, the marker last."""
    root, markers = Store(root), Store(markers)
    scratch = root.local / STAGING_DIR if root.local is not None else Path(tempfile.gettempdir()) / "lmforge"
    staging = scratch / f"{task.name}-{os.getpid()}"
    log = f"{LOG_DIR}/{task.name}.log"
    log_path = root.local / log if root.local is not None else scratch / f"{task.name}-{os.getpid()}.log"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with task_log(log_path):
            _reset_peak_rss()
            result = fn(staging, *args)
            if isinstance(result, dict):
                result["peak_rss_mb"] = peak_rss_mb()
                print(f"peak RSS {result['peak_rss_mb']} MiB")
        for src in sorted(p for p in staging.rglob("*") if p.is_file()):
            root.put(src, src.relative_to(staging).as_posix())
        markers.write_bytes(f"{task.name}.json", json.dumps(result).encode())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if root.local is None and log_path.exists():  # an object store has no append: this attempt's log
            root.append_bytes(log, log_path.read_bytes())  # is added to the earlier ones' in one upload
            log_path.unlink()
    return result
