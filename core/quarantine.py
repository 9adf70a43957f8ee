"""Poison documents: one that makes a stage raise is set aside with its traceback, not retried forever and
not dropped; a stage that raises on many documents has a bug and fails.

Poison is a property of a document, not of the machine. An error that comes from the machine (a full or
failing disk, a lost connection, memory exhausted: ``OSError``, ``MemoryError``, Ray's own errors) or that a
document which went through before now raises too, is an infrastructure fault: nothing is quarantined, the
task fails with ``InfrastructureFault`` naming the cause, Ray retries it, and the stage fails if the fault
stays. Nothing of the partition is committed, so a rerun once the fault is gone writes what a run that
never failed writes.

Each stage decides what running "one document at a time" means (the clean chain reruns a partition per
document, the tokenizer re-encodes a batch per document); this module holds the rule they share and the
record of what was set aside.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

#: A partition where more documents than this crash a stage (and more than QUARANTINE_FRACTION of them)
#: has a bug, not poison documents: the stage fails with the first traceback instead of rejecting them all.
QUARANTINE_LIMIT = 10
QUARANTINE_FRACTION = 0.01

_log = logging.getLogger(__name__)


#: Errors raised by the machine, whatever the document: never a reason to quarantine one.
MACHINE_ERRORS: tuple[type[BaseException], ...] = (OSError, MemoryError)
#: How often Ray runs a task again after an InfrastructureFault before the stage fails with it.
FAULT_RETRIES = 2


class StageCrash(RuntimeError):
    """Too many documents of one partition crashed a stage to quarantine them, while others went through:
    a bug of the stage on some kind of document."""


class InfrastructureFault(RuntimeError):
    """A document raised because the machine failed, not because of what it holds: the task fails (and is
    retried), nothing of its partition is quarantined or committed."""


def is_machine_error(error: BaseException) -> bool:
    """Whether ``error`` comes from the machine (disk, network, memory, Ray) rather than from the data."""
    return isinstance(error, MACHINE_ERRORS) or type(error).__module__.split(".")[0] == "ray"


def _named(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@dataclass
class Quarantine:
    """The documents of one partition that crashed ``stage``, by id, with their tracebacks."""

    stage: str
    part: str
    seen: int = 0
    crashes: int = 0  # every document that raised (two may share an id)
    traces: dict[str, str] = field(default_factory=dict)
    retry_good: Callable[[], object] | None = field(default=None, repr=False)
    # Documents that raised before any document went through (nothing known good to tell a fault from
    # poison yet): (id, error, run it again), tried again when the partition ends.
    unconfirmed: list[tuple[str, BaseException, Callable[[], object]]] = field(
        default_factory=list, repr=False
    )

    def passed(self, documents: int = 1, retry: Callable[[], object] | None = None) -> None:
        """Count documents that went through; ``retry`` runs one of them again (the known-good document
        ``crashed`` tries to tell a fault of the machine from a poison document)."""
        self.seen += documents
        if retry is not None:
            self.retry_good = retry

    def crashed(self, doc_id: str, error: BaseException, retry: Callable[[], object] | None = None) -> str:
        """Record the document ``error`` (being handled) was raised on and return its traceback.

        Raise InfrastructureFault, chained to it, when the error comes from the machine or when the last
        known-good document (``passed(retry=...)``) raises too when run again; raise StageCrash when so many
        documents crashed that the stage has a bug. With no known-good document yet, ``retry`` (this
        document run again) is kept for ``finish``."""
        if is_machine_error(error):
            raise self._fault(doc_id, error) from error
        if self.retry_good is not None:
            try:
                self.retry_good()
            except Exception as again:
                raise self._fault(
                    doc_id, error, f"; a document that went through before now raises too ({_named(again)})"
                ) from error
        elif retry is not None:
            self.unconfirmed.append((doc_id, error, retry))
        self.seen += 1
        self.crashes += 1
        trace = "".join(traceback.format_exception(error))
        self.traces.setdefault(doc_id, trace)
        if self.crashes > QUARANTINE_LIMIT and self.crashes > QUARANTINE_FRACTION * self.seen:
            if self.crashes == self.seen:
                raise self._none_went_through("too many to quarantine, and ") from error
            raise StageCrash(
                f"stage {self.stage}, partition {self.part}: {self.crashes} of {self.seen} documents raised, too "
                f"many to quarantine (a bug, not poison documents); the first:\n{self._first()}"
            ) from error
        _log.warning(
            "stage %s, partition %s: document %s raised %s: quarantined",
            self.stage, self.part, doc_id, type(error).__name__,
        )  # fmt: skip
        return trace

    def _fault(self, doc_id: str, error: BaseException, why: str = "") -> InfrastructureFault:
        """The InfrastructureFault to raise for ``error`` on document ``doc_id``."""
        return InfrastructureFault(
            f"stage {self.stage}, partition {self.part}: {_named(error)} on document {doc_id}{why}: a fault of the machine, not "
            "of the document; nothing is quarantined or committed, the task is run again and the stage fails "
            "if the fault stays"
        )

    def finish(self) -> None:
        """At the partition's end: raise InfrastructureFault when two or more documents raised and none
        went through. No document was known good to tell a fault from poison, and a partition of nothing but
        poison is not believable: the task fails (and is retried) instead of committing only rejects.

        A document that raised before any went through is run again now: if it goes through, what it met
        was a passing fault (a service that came back), not poison; the task fails and is run again, so the
        document is kept where it belongs. If it raises again, it stays quarantined."""
        if self.crashes >= 2 and self.crashes == self.seen:
            raise self._none_went_through("")
        for doc_id, error, retry in self.unconfirmed:
            try:
                retry()
            except Exception:  # noqa: S112 - raised again: poison, as quarantined
                continue
            raise self._fault(
                doc_id, error, "; it raised before any document went through and goes through when run again"
            ) from error

    def _none_went_through(self, why: str) -> InfrastructureFault:
        return InfrastructureFault(
            f"stage {self.stage}, partition {self.part}: {self.crashes} of {self.seen} documents raised, {why}"
            "none went through (a fault of the machine or a bug, not poison documents): nothing is "
            f"quarantined or committed, the task is run again and the stage fails if it stays; the first:\n"
            f"{self._first()}"
        )

    def _first(self) -> str:
        return next(iter(self.traces.values()))
