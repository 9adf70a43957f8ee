"""The shared contracts: manifests, their verification, id digests and the task runner."""

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from core.files import file_entry, id_sum, write_parquet
from core.manifest import IntegrityError, ManifestError, read_index, verify_files, write_index
from core.schema import DOCUMENT_SCHEMA, document_table
from core.tasks import TaskId, read_marker, run_task

pytestmark = pytest.mark.unit


def _dataset(tmp_path, n=10):
    table = document_table([f"text {i}" for i in range(n)])
    entry = write_parquet(tmp_path / "part.parquet", table.to_batches(max_chunksize=4), DOCUMENT_SCHEMA)
    return write_index(tmp_path, stage="clean", cache_key="k", files=[entry]), entry


def test_a_corrupt_index_names_the_file_and_the_fix(tmp_path):
    (tmp_path / "index.json").write_text('{"format_version": 1, "files": [')
    with pytest.raises(ManifestError, match=f"{tmp_path / 'index.json'}: not a readable manifest .*delete"):
        read_index(tmp_path)


def test_verify_catches_missing_resized_short_and_changed_files(tmp_path):
    index, entry = _dataset(tmp_path)
    path = tmp_path / "part.parquet"
    verify_files(tmp_path, index, "always")
    # Fewer rows, same size: the row count catches it whatever the policy.
    short = {**index, "files": [{**entry, "rows": entry["rows"] + 1}]}
    with pytest.raises(IntegrityError, match="10 rows, index.json says 11"):
        verify_files(tmp_path, short, "never")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    verify_files(tmp_path, index, "never")  # same size, rows from the intact footer: only a hash sees it
    with pytest.raises(IntegrityError, match="part.parquet: sha256 .* differs"):
        verify_files(tmp_path, index, "always")
    path.write_bytes(bytes(data[:-10]))
    with pytest.raises(IntegrityError, match=f"{len(data) - 10} bytes, index.json says {len(data)}"):
        verify_files(tmp_path, index, "never")
    path.unlink()
    with pytest.raises(IntegrityError, match="part.parquet: listed in index.json but missing"):
        verify_files(tmp_path, index, "never")


def test_first_open_rehashes_a_file_whose_mtime_was_put_back(tmp_path):
    index, _ = _dataset(tmp_path)
    path = tmp_path / "part.parquet"
    verify_files(tmp_path, index, "first_open")
    assert set(json.loads((tmp_path / ".verified.json").read_text())) == {"part.parquet"}
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(IntegrityError, match="sha256"):
        verify_files(tmp_path, index, "first_open")


def test_id_sum_is_the_sum_of_blake2b_hashes_whatever_the_order():
    ids = ["a", "b", "c", "b"]
    expected = sum(int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids)
    assert id_sum(ids) == expected % 2**64 == id_sum(reversed(ids))
    assert id_sum(ids[:2], id_sum(ids[2:])) == id_sum(ids)


def _writes(staging, rows, fail=False):
    table = pa.table({"x": list(range(rows))})
    write_parquet(staging / "out" / "data.parquet", table.to_batches(), table.schema)
    (staging / "side.txt").write_text("side")
    if fail:
        raise RuntimeError("task failed midway")
    return {"rows": rows}


def test_the_runner_commits_files_then_the_marker_and_nothing_of_a_failed_task(tmp_path):
    root, markers = tmp_path / "stage", tmp_path / "stage" / "_done"
    task = TaskId("map", part="p00001")
    assert task.name == "map-p00001"
    assert TaskId("cc", step=3, shard=2).name == "cc003-0002" and TaskId(part="p7").name == "p7"
    with pytest.raises(RuntimeError, match="midway"):
        run_task(_writes, task, root, markers, 5, True)
    assert read_marker(markers, task) is None
    assert not (root / "out").exists() and not (root / "side.txt").exists()
    result = run_task(_writes, task, root, markers, 5)
    assert result == read_marker(markers, task) and result.pop("peak_rss_mb") > 0 and result == {"rows": 5}
    marker = markers / "map-p00001.json"
    assert (root / "side.txt").read_text() == "side"
    assert marker.stat().st_mtime_ns >= (root / "out" / "data.parquet").stat().st_mtime_ns
    assert file_entry(root / "out" / "data.parquet", 5)["rows"] == 5
    assert not (root / "_staging").exists() or not any((root / "_staging").iterdir())


def test_a_tasks_prints_logs_and_traceback_are_kept_in_its_log(tmp_path, capsys):
    import logging

    from core.tasks import TaskId, run_task

    def chatty(staging, fail):
        print("reading partition 7")
        logging.getLogger("lmforge.test").warning("a warning from the task")
        if fail:
            raise RuntimeError("the task broke")
        return {"ok": True}

    task = TaskId(part="p7")
    with pytest.raises(RuntimeError):
        run_task(chatty, task, tmp_path, tmp_path / "_done", True)
    assert run_task(chatty, task, tmp_path, tmp_path / "_done", False)["ok"] is True
    log = (tmp_path / "_logs" / "p7.log").read_text()
    assert log.count("reading partition 7") == 2 and log.count("a warning from the task") == 2
    assert "RuntimeError: the task broke" in log and log.count("--- start") == log.count("--- end") == 2
    assert "reading partition 7" in capsys.readouterr().out  # the worker's own stream still gets it


def _allocates(staging, mb):
    import numpy as np

    block = np.ones(mb * 2**20 // 8)  # touched: resident
    return {"sum": float(block[:: 4096 // 8].sum())}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc")
def test_each_task_reports_its_own_peak_memory_not_the_workers_so_far(tmp_path):
    big = run_task(_allocates, TaskId(part="big"), tmp_path, tmp_path / "_done", 400)["peak_rss_mb"]
    small = run_task(_allocates, TaskId(part="small"), tmp_path, tmp_path / "_done", 50)["peak_rss_mb"]
    assert big >= 400
    assert small < big - 300  # the small task's own peak, measured after the big one in the same process
    assert "peak RSS" in (tmp_path / "_logs" / "small.log").read_text()
