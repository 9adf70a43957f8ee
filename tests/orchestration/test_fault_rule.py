"""Dedup and tokenize apply the quarantine rule of core/quarantine.py as clean does
(tests/orchestration/test_document_tasks.py runs clean's faults on Ray): when the code they call starts
failing for every document (a service gone, a disk full), the document that meets it is not poison. The
failure is injected around the real functions (MinHash signatures, a trained BPE tokenizer): these
stages call no user code where a real fault could be planted."""

import errno
import os
from types import SimpleNamespace

import numpy as np
import pytest

from cleaning.dedup_phases import DedupConfig
from core.quarantine import InfrastructureFault, Quarantine
from core.schema import document_table
from orchestration import dedup
from tests.fixtures import corpus
from training.data.tokenize import _encode_each
from training.data.tokenizer import TokenizerConfig, train_bpe

pytestmark = pytest.mark.unit


class Failing:
    """Calls ``fn`` until ``after`` calls were made, then raises ``error`` on every call."""

    def __init__(self, fn, after: int, error: BaseException):
        self.fn, self.after, self.error, self.calls = fn, after, error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.after:
            raise self.error
        return self.fn(*args, **kwargs)


GONE = RuntimeError("the service went away")
FULL = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("error,said", [(GONE, "now raises too"), (FULL, "No space left on device")])
def test_dedup_does_not_quarantine_what_a_fault_makes_fail(monkeypatch, error, said):
    texts = list(corpus(12, seed=2).values())
    batches = document_table(texts).to_batches(max_chunksize=4)
    monkeypatch.setattr(dedup, "signatures", Failing(dedup.signatures, 2, error))  # 2 batches, then down
    quarantine = Quarantine("dedup", "p0")
    with pytest.raises(InfrastructureFault, match="stage dedup, partition p0: ") as raised:
        dedup._poison_rows(batches, 0, DedupConfig(), quarantine)
    assert "on document d8" in str(raised.value) and said in str(raised.value) and quarantine.traces == {}


@pytest.mark.parametrize("error,said", [(GONE, "now raises too"), (FULL, "No space left on device")])
def test_tokenize_does_not_quarantine_what_a_fault_makes_fail(error, said):
    texts = corpus(10, seed=3)
    tokenizer = train_bpe(list(texts.values()), TokenizerConfig(vocab_size=300, min_frequency=1))

    class Flaky:  # the real tokenizer, failing from its fifth call on
        encode_batch = Failing(tokenizer.encode_batch, 4, error)

    prepared = SimpleNamespace(eos_id=0, dtype=np.dtype(np.uint16))
    quarantine = Quarantine("tokenize", "p0")
    ids, kept_texts = list(texts), list(texts.values())
    with pytest.raises(InfrastructureFault, match="stage tokenize, partition p0: ") as raised:
        _encode_each(Flaky(), ids, kept_texts, prepared, quarantine)
    assert f"on document {ids[4]}" in str(raised.value) and said in str(raised.value)
    assert quarantine.traces == {}


def test_tokenize_runs_again_a_document_that_failed_before_any_went_through():
    """The tokenizer fails on its first call only (a fault that passed): the first document is not poison,
    the partition fails as a fault and is run again whole by Ray."""
    texts = corpus(6, seed=4)
    tokenizer = train_bpe(list(texts.values()), TokenizerConfig(vocab_size=300, min_frequency=1))
    calls = []

    class Blinks:  # the real tokenizer, failing on its first call
        @staticmethod
        def encode_batch(batch, *args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("the tokenizer service is restarting")
            return tokenizer.encode_batch(batch, *args, **kwargs)

    prepared = SimpleNamespace(eos_id=0, dtype=np.dtype(np.uint16))
    quarantine = Quarantine("tokenize", "p0")
    ids = list(texts)
    kept, _, _ = _encode_each(Blinks(), ids, list(texts.values()), prepared, quarantine)
    assert kept == ids[1:]  # the first raised, the others went through
    with pytest.raises(InfrastructureFault, match=f"on document {ids[0]}.*goes through when run again"):
        quarantine.finish()
    assert list(quarantine.traces) == [ids[0]] and len(calls) == len(ids) + 1
