"""Poison documents: one that makes a stage raise is set aside with its traceback, not retried forever and
not dropped; a stage that raises on many documents has a bug and fails.

Each stage decides what running "one document at a time" means (the clean chain reruns a partition per
document, the tokenizer re-encodes a batch per document); this module holds the rule they share and the
record of what was set aside.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass, field

#: A partition where more documents than this crash a stage (and more than QUARANTINE_FRACTION of them)
#: has a bug, not poison documents: the stage fails with the first traceback instead of rejecting them all.
QUARANTINE_LIMIT = 10
QUARANTINE_FRACTION = 0.01

_log = logging.getLogger(__name__)


class StageCrash(RuntimeError):
    """Too many documents of one partition crashed a stage to quarantine them."""


@dataclass
class Quarantine:
    """The documents of one partition that crashed ``stage``, by id, with their tracebacks."""

    stage: str
    part: str
    seen: int = 0
    crashes: int = 0  # every document that raised (two may share an id)
    traces: dict[str, str] = field(default_factory=dict)

    def passed(self, documents: int = 1) -> None:
        """Count documents that went through."""
        self.seen += documents

    def crashed(self, doc_id: str, error: BaseException) -> str:
        """Record the document ``error`` (being handled) was raised on and return its traceback; raise
        StageCrash, chained to it, when so many crashed that the stage has a bug."""
        self.seen += 1
        self.crashes += 1
        trace = "".join(traceback.format_exception(error))
        self.traces.setdefault(doc_id, trace)
        if self.crashes > QUARANTINE_LIMIT and self.crashes > QUARANTINE_FRACTION * self.seen:
            first = next(iter(self.traces.values()))
            raise StageCrash(
                f"stage {self.stage}, partition {self.part}: {self.crashes} of {self.seen} documents raised, too "
                f"many to quarantine (a bug, not poison documents); the first:\n{first}"
            ) from error
        _log.warning(
            "stage %s, partition %s: document %s raised %s: quarantined",
            self.stage, self.part, doc_id, type(error).__name__,
        )  # fmt: skip
        return trace
