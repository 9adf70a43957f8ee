"""The quarantine rule (core/quarantine.py): a document is poison only if the stage raises on it while the
machine is fine. An error of the machine's kind, or one that a document which went through before now
raises too, is an infrastructure fault; a partition where nothing went through is never committed as
rejects."""

import errno
import os

import pytest

from core.quarantine import QUARANTINE_LIMIT, InfrastructureFault, Quarantine, StageCrash

pytestmark = pytest.mark.unit


def _raise(error: BaseException):
    try:
        raise error
    except BaseException as e:
        return e


def test_a_document_the_stage_raises_on_while_a_good_one_still_passes_is_quarantined():
    q = Quarantine("clean", "p0")
    q.passed(3, retry=lambda: None)
    trace = q.crashed("d3", _raise(ValueError("cannot parse this table")))
    assert "ValueError: cannot parse this table" in trace and q.traces == {"d3": trace}
    q.passed()
    q.finish()  # three went through before it, one after: nothing to say
    assert (q.seen, q.crashes) == (5, 1)


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        ConnectionResetError(errno.ECONNRESET, "reset by peer"),
        TimeoutError("read timed out"),
        MemoryError(),
    ],
    ids=["disk-full", "connection", "timeout", "memory"],
)
def test_an_error_of_the_machine_is_a_fault_never_poison(error):
    q = Quarantine("tokenize", "p7")
    q.passed(5, retry=lambda: None)
    with pytest.raises(InfrastructureFault, match="stage tokenize, partition p7: .*on document d5") as raised:
        q.crashed("d5", _raise(error))
    assert raised.value.__cause__ is error and "a fault of the machine, not of the document" in str(
        raised.value
    )
    assert q.traces == {} and q.crashes == 0  # nothing set aside


def test_a_document_that_went_through_before_and_now_raises_too_makes_it_a_fault():
    down = []
    q = Quarantine("clean", "p0")

    def good_again():
        if down:
            raise RuntimeError("the service went away")

    q.passed(retry=good_again)
    down.append(True)
    with pytest.raises(InfrastructureFault, match="now raises too \\(RuntimeError: the service went away\\)"):
        q.crashed("d1", _raise(RuntimeError("the service went away")))
    assert q.traces == {}


def test_a_partition_where_nothing_went_through_is_not_committed_as_rejects():
    one = Quarantine("clean", "p0")
    one.crashed("d0", _raise(ValueError("bad")))
    one.finish()  # one document, and it raised: poison, as far as anyone can tell
    assert list(one.traces) == ["d0"]

    q = Quarantine("clean", "p1")
    for i in range(4):
        q.crashed(f"d{i}", _raise(ValueError("bad")))
    with pytest.raises(InfrastructureFault, match="4 of 4 documents raised, none went through"):
        q.finish()


def test_many_crashes_fail_the_stage_as_a_bug_or_as_a_fault_if_none_went_through():
    bug = Quarantine("dedup", "p0")
    bug.passed(QUARANTINE_LIMIT * 10, retry=lambda: None)
    for i in range(QUARANTINE_LIMIT):
        bug.crashed(f"d{i}", _raise(KeyError("meta")))
    with pytest.raises(StageCrash, match=f"{QUARANTINE_LIMIT + 1} of {11 * QUARANTINE_LIMIT + 1} documents"):
        bug.crashed("dx", _raise(KeyError("meta")))

    none = Quarantine("dedup", "p1")
    for i in range(QUARANTINE_LIMIT):
        none.crashed(f"d{i}", _raise(KeyError("meta")))
    with pytest.raises(
        InfrastructureFault, match="11 of 11 documents raised, too many to quarantine, and none"
    ):
        none.crashed("dx", _raise(KeyError("meta")))


class Once:
    """Raises ``error`` on its first call only (a service that blinked), then returns None."""

    def __init__(self, error: BaseException):
        self.error, self.calls = error, 0

    def __call__(self):
        self.calls += 1
        if self.calls == 1:
            raise self.error


def _crashed_once(q: Quarantine, doc_id: str, error: BaseException) -> Once:
    """``doc_id`` raised ``error`` in ``q``, with a retry that goes through."""
    blink = Once(error)
    try:
        blink()
    except type(error) as e:
        q.crashed(doc_id, e, retry=blink)
    return blink


def test_a_document_that_raised_before_any_went_through_is_tried_again_at_the_end():
    # It goes through when run again: the error was a passing fault, not poison.
    q = Quarantine("clean", "p0")
    blink = _crashed_once(q, "d0", RuntimeError("the language service is restarting"))
    q.passed(4, retry=lambda: None)
    with pytest.raises(InfrastructureFault, match="on document d0") as raised:
        q.finish()
    assert "goes through when run again" in str(raised.value) and blink.calls == 2

    # It raises again: poison, quarantined as it was.
    q = Quarantine("clean", "p1")
    error = _raise(ValueError("cannot parse this table"))

    def poison():
        raise ValueError("cannot parse this table")

    q.crashed("d0", error, retry=poison)
    q.passed(4, retry=lambda: None)
    q.finish()
    assert list(q.traces) == ["d0"]

    # A partition of one document that blinked: the same.
    q = Quarantine("tokenize", "p2")
    _crashed_once(q, "only", RuntimeError("blink"))
    with pytest.raises(InfrastructureFault, match="on document only"):
        q.finish()
