"""Document-stage tasks on real Ray: a document that makes a stage raise is quarantined to the rejected
dataset with its traceback, a stage that raises on most documents still fails, a fault of the machine (a
full disk, a service gone mid-partition) fails the task and commits nothing, and ray.resources caps the
tasks in flight."""

import contextlib
import json
import os
import subprocess

import pytest

from cleaning.normalize import TextNormalizer, TextNormalizerConfig
from core.manifest import read_index, read_table
from core.quarantine import FAULT_RETRIES, InfrastructureFault
from core.stage import Stage, StageConfig
from ingestion.readers import ReadConfig
from orchestration.executors import corpus_source, run_document_stage
from tests.fixtures import exploding_stage

pytestmark = pytest.mark.integration


def _corpus(tmp_path, texts, name="dump.jsonl", part="read-00000"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"id": f"d{i:02d}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return [(part, corpus_source(str(path), ReadConfig(batch_size=8)))]


def test_a_document_that_crashes_a_stage_is_quarantined_with_its_traceback(ray_session, tmp_path):
    texts = [f"document number {i} is fine" for i in range(30)]
    texts[13] = "document 13 holds the POISON marker"
    out = tmp_path / "clean"
    stages = [TextNormalizer(TextNormalizerConfig()), exploding_stage("POISON")]
    index = run_document_stage("clean", stages, _corpus(tmp_path, texts), out, cache_key="k", inputs={})
    c = index["counters"]
    assert (c["documents_in"], c["kept"], c["rejected"], c["quarantined"]) == (30, 29, 1, 1)
    kept = read_table(out).column("id").to_pylist()
    assert kept == [f"d{i:02d}" for i in range(30) if i != 13]  # the others, in order, none lost
    (bad,) = read_table(out / "rejected").to_pylist()
    assert (bad["id"], bad["filter"], bad["stage"]) == ("d13", "quarantined", "clean")
    assert bad["text"] == texts[13]
    assert bad["signal"].startswith("Traceback (most recent call last):")
    assert "ValueError: cannot handle a document with 'POISON'" in bad["signal"]
    assert read_index(out / "rejected")["files"][0]["rows"] == 1
    # The task's log in the work dir says so too (it ran in a Ray worker).
    log = (out / "_logs" / "read-00000.log").read_text()
    assert "document d13 raised ValueError: quarantined" in log and log.startswith("--- start ")


def test_a_stage_that_raises_on_most_documents_fails_with_the_first_traceback(ray_session, tmp_path):
    texts = [f"every document {i} trips it" for i in range(30)]
    with pytest.raises(Exception, match="11 of 11 documents raised, too many to quarantine"):
        run_document_stage(
            "clean",
            [exploding_stage("trips")],
            _corpus(tmp_path, texts),
            tmp_path / "clean",
            cache_key="k",
            inputs={},
        )


def spooling_stage(spool: str):
    """A stage that spools each document to a file on a local disk and removes it (as one calling a tool
    that reads files would)."""

    class Spools(Stage):  # local: Ray pickles it by value into the workers
        name = "spool"

        def run(self, batches, ctx):
            for batch in batches:
                for doc_id, text in zip(batch.column("id").to_pylist(), batch.column("text").to_pylist()):
                    path = os.path.join(spool, f"{doc_id}.txt")
                    with open(path, "w") as f:
                        f.write(text)
                    os.remove(path)
                yield batch

    return Spools(StageConfig())


def service_stage(state: str):
    """A stage calling a service: a document with POISON is one it cannot handle (ValueError); while
    ``state/trigger`` exists the service goes away after its fifth call and stays away (``state/down``)."""

    class UsesService(Stage):
        name = "service"
        calls = 0

        def run(self, batches, ctx):
            for batch in batches:
                if os.path.exists(os.path.join(state, "down")):
                    raise RuntimeError("the service this stage calls went away")
                self.calls += 1
                if self.calls >= 5 and os.path.exists(os.path.join(state, "trigger")):
                    open(os.path.join(state, "down"), "w").close()
                if any("POISON" in t for t in batch.column("text").to_pylist()):
                    raise ValueError("the service cannot handle this document")
                yield batch

    return UsesService(StageConfig())


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs mounted for the test and filled up: every write there fails with ENOSPC."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode:
        pytest.skip(f"no tmpfs can be mounted here: {mounted.stderr.strip()}")
    try:
        with open(disk / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _run_clean(stage, parts, out):
    return run_document_stage("clean", [stage], parts, out, cache_key="k", inputs={})


def _same_output(index: dict, out, reference: dict, ref_out) -> None:
    assert index["counters"] == reference["counters"]
    assert [(f["path"], f["sha256"]) for f in index["files"]] == [
        (f["path"], f["sha256"]) for f in reference["files"]
    ]
    assert read_table(out).equals(read_table(ref_out))


def test_a_full_disk_fails_the_task_commits_nothing_and_a_rerun_after_matches(
    ray_session, full_disk, tmp_path
):
    """The issue's case: every document of a partition raised ENOSPC and was quarantined, the stage
    committed 0 kept. Now the task fails (Ray runs it again, FAULT_RETRIES times), the stage fails naming
    the cause, and nothing is committed; with space freed the rerun writes what a run that never failed
    writes."""
    texts = [f"document {i} " + "words of a page " * 100 for i in range(8)]
    parts = _corpus(tmp_path, texts)
    (tmp_path / "roomy").mkdir()
    ref_out = tmp_path / "reference"
    reference = _run_clean(spooling_stage(str(tmp_path / "roomy")), parts, ref_out)

    out = tmp_path / "clean"
    with pytest.raises(
        InfrastructureFault, match=r"OSError: \[Errno 28\] No space left on device on document d00"
    ):
        _run_clean(spooling_stage(str(full_disk)), parts, out)
    assert not (out / "index.json").exists() and not list(out.glob("*.parquet"))
    assert not (out / "_done").exists() or not list((out / "_done").iterdir())
    log = (out / "_logs" / "read-00000.log").read_text()
    assert log.count("--- start ") == 1 + FAULT_RETRIES  # Ray ran it again before the stage gave up

    (full_disk / "filler").unlink()
    _same_output(_run_clean(spooling_stage(str(full_disk)), parts, out), out, reference, ref_out)
    assert "quarantined" not in reference["counters"]


def test_a_service_gone_mid_partition_is_a_fault_not_poison(ray_session, tmp_path):
    """A poison document (d06) sends the partition through the chain one document at a time; the service
    goes away after d03: d04 raises, and so does d03 (known good) when run again, so d04 is not poison and
    the task fails; on Ray's retries nothing goes through at all. Nothing is committed; once the service is
    back the rerun writes the reference output (d06 alone quarantined)."""
    texts = [f"document number {i} is fine" for i in range(8)]
    texts[6] = "document 6 holds the POISON marker"
    parts = _corpus(tmp_path, texts)
    state = tmp_path / "service"
    state.mkdir()
    ref_out = tmp_path / "reference"
    reference = _run_clean(service_stage(str(state)), parts, ref_out)
    assert reference["counters"]["quarantined"] == 1

    (state / "trigger").touch()
    out = tmp_path / "clean"
    with pytest.raises(InfrastructureFault, match="8 of 8 documents raised, none went through") as raised:
        _run_clean(service_stage(str(state)), parts, out)
    assert "the service this stage calls went away" in str(raised.value)
    log = (out / "_logs" / "read-00000.log").read_text()
    first = log.split("--- start ")[1]  # the first attempt: d04 was not taken for poison
    assert "on document d04; a document that went through before now raises too" in first
    assert "raised RuntimeError: quarantined" not in first and not (out / "index.json").exists()

    (state / "trigger").unlink()
    (state / "down").unlink()
    _same_output(_run_clean(service_stage(str(state)), parts, out), out, reference, ref_out)


def test_max_in_flight_caps_the_tasks_running_at_once(ray_session, tmp_path):
    """ray.resources' cap on real Ray tasks: each task writes its start and end time; with a cap of one
    no two intervals overlap, with two CPUs and no cap some do."""
    import time

    log = tmp_path / "spans"
    log.mkdir()

    class Slow(Stage):
        name = "slow"

        def run(self, batches, ctx):
            start = time.time()
            time.sleep(0.5)
            yield from batches
            (log / f"{start}-{time.time()}").touch()

    parts = [p for i in range(4) for p in _corpus(tmp_path, [f"text {i}"], f"{i}.jsonl", f"read-{i:05d}")]

    def spans():
        out = sorted(tuple(map(float, f.name.split("-"))) for f in log.iterdir())
        for f in log.iterdir():
            f.unlink()
        return out

    def overlaps(s):
        return any(b[0] < a[1] for a, b in zip(s, s[1:]))

    stage = Slow(StageConfig())
    run_document_stage("clean", [stage], parts, tmp_path / "one", cache_key="k", inputs={}, max_in_flight=1)
    one = spans()
    assert len(one) == 4 and not overlaps(one)
    run_document_stage(
        "clean", [stage], parts, tmp_path / "two", cache_key="k", inputs={}, options={"num_cpus": 1}
    )
    assert overlaps(spans())


def test_running_tasks_report_the_documents_read_so_far(ray_session, tmp_path):
    """The driver hears of documents while the tasks still run (every REPORT_EVERY_S), the counts never
    go back, end at the corpus' size, and a rerun served from the markers starts from that size."""
    import time

    class Slow(Stage):
        name = "slow"

        def run(self, batches, ctx):
            for batch in batches:
                time.sleep(0.4)
                yield batch

    texts = [f"document {i} of a slow stage" for i in range(48)]
    parts = _corpus(tmp_path, texts)  # one task, six batches of eight: about 2.4 s
    seen: list[int] = []
    index = run_document_stage(
        "clean", [Slow(StageConfig())], parts, tmp_path / "out", cache_key="k", inputs={},
        on_counts=lambda counts: seen.append(counts.get("documents", 0)),
    )  # fmt: skip
    assert index["counters"]["documents_in"] == 48
    assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == 48
    assert any(0 < n < 48 for n in seen), seen  # heard of before the task ended
    again: list[int] = []
    run_document_stage(
        "clean", [Slow(StageConfig())], parts, tmp_path / "out", cache_key="k", inputs={},
        on_counts=lambda counts: again.append(counts.get("documents", 0)),
    )  # fmt: skip
    assert again == [48]  # from the marker, before anything runs
