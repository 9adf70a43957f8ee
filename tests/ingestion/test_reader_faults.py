"""Readers under faults: random truncations and byte flips of every format never end in an error that does
not name the file, and a plain JSONL file accounts for every line (read or reported malformed)."""

import gzip
import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from ingestion.readers import CorruptInputError, ReadReport, read_corpus

pytestmark = pytest.mark.unit

N = 40
TEXT = "The mill by the river grinds the grain of the valley, day after day. "


def _jsonl() -> bytes:
    return b"".join(
        json.dumps({"id": f"r{i}", "text": TEXT * (1 + i % 3)}).encode() + b"\n" for i in range(N)
    )


def _warc(kind: str, n: int = N, gz: bool = True, repeat: int = 3) -> bytes:
    out = io.BytesIO()
    writer = WARCWriter(out, gzip=gz)
    for i in range(n):
        body = f"<html><body><p>{TEXT * repeat} {i}</p></body></html>".encode()
        if kind == "warc":
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
            record = writer.create_warc_record(
                f"http://x/{i}", "response", payload=io.BytesIO(body), http_headers=headers
            )
        else:
            record = writer.create_warc_record(
                f"http://x/{i}", "conversion", payload=io.BytesIO(body), warc_content_type="text/plain"
            )
        writer.write_record(record)
    return out.getvalue()


def _zstd(data: bytes) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(data)
    return sink.getvalue().to_pybytes()


def _parquet() -> bytes:
    sink = io.BytesIO()
    table = pa.table({"id": [f"p{i}" for i in range(N)], "text": [TEXT * (1 + i % 3) for i in range(N)]})
    pq.write_table(table, sink, row_group_size=10, compression="zstd")
    return sink.getvalue()


FILES = {
    "corpus.jsonl": _jsonl,
    "corpus.jsonl.gz": lambda: gzip.compress(_jsonl(), mtime=0),
    "corpus.jsonl.zst": lambda: _zstd(_jsonl()),
    "corpus.warc.gz": lambda: _warc("warc"),
    "corpus.warc.wet.gz": lambda: _warc("wet"),
    "corpus.parquet": _parquet,
}


def _mutations(data: bytes, seed: int, count: int = 12) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        cut = rng.randrange(1, len(data))
        out.append((f"truncated at {cut}", data[:cut]))
        flipped = bytearray(data)
        at = rng.randrange(len(data))
        flipped[at] ^= 1 << rng.randrange(8)
        out.append((f"bit flip at {at}", bytes(flipped)))
    return out


def _read(path):
    report = ReadReport()
    rows = sum(b.num_rows for b in read_corpus(str(path), 16, report))
    return rows, report.counters["malformed"]


@pytest.mark.parametrize("name", list(FILES))
def test_faults_are_named_or_accounted_for(tmp_path, name):
    data = FILES[name]()
    path = tmp_path / name
    path.write_bytes(data)
    assert _read(path) == (N, 0)  # the intact file reads whole
    for seed, (what, mutated) in enumerate(_mutations(data, seed=len(name))):
        path.write_bytes(mutated)
        try:
            rows, malformed = _read(path)
        except CorruptInputError as e:
            assert str(path) in str(e) and "re-download" in str(e), what
            continue
        except Exception as e:  # noqa: BLE001  (anything else is the failure under test)
            pytest.fail(f"{name}, {what}: {type(e).__name__} does not name the file: {e}")
        assert rows + malformed <= N + 1, (what, seed)
        if name == "corpus.jsonl":
            # Each non-blank line of what is on disk is either a document or a reported malformed record.
            lines = [ln for ln in mutated.decode("utf-8", "replace").split("\n") if ln.strip()]
            assert rows + malformed == len(lines), what
        if name == "corpus.parquet":
            assert rows == N, what  # a Parquet file that still reads has every row


def _plain_warc(kind: str, n: int = 6) -> tuple[bytes, list[int]]:
    """An uncompressed WARC (or WET) of ``n`` records and each record's offset (found by hand: where each
    line "WARC/1.0" begins)."""
    data = _warc(kind, n, gz=False, repeat=1)
    starts = [
        i for i in range(len(data)) if data.startswith(b"WARC/1.0\r\n", i) and (i == 0 or data[i - 1] == 10)
    ]
    assert len(starts) == n
    return data, starts


@pytest.mark.parametrize("kind", ["warc", "wet"])
@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("bad", [(2,), (2, 3), (5,), (0,)], ids=["one", "two-in-a-row", "last", "first"])
def test_a_malformed_warc_record_is_reported_with_its_offset_and_the_others_are_kept(tmp_path, kind, gz, bad):
    data, starts = _plain_warc(kind)
    damaged = bytearray(data)
    for i in bad:  # the record's first line no longer says WARC/1.0
        damaged[starts[i] : starts[i] + 4] = b"XARC"
    name = "corpus.warc" + (".wet" if kind == "wet" else "") + (".gz" if gz else "")
    path = tmp_path / name
    path.write_bytes(gzip.compress(bytes(damaged), mtime=0) if gz else bytes(damaged))
    sink = []
    report = ReadReport(sink=sink.append)
    docs = [r for b in read_corpus(str(path), 4, report) for r in b.to_pylist()]
    kept = [i for i in range(len(starts)) if i not in bad]
    assert [d["url"] for d in docs] == [f"http://x/{i}" for i in kept]
    if kind == "warc":  # offsets in the decompressed stream: those found by hand
        assert [dict(d["meta"])["warc_offset"] for d in docs] == [float(starts[i]) for i in kept]
    # Adjacent bad records are one damaged stretch, reported once, at its start.
    stretches = [i for i in bad if i - 1 not in bad]
    assert report.counters["malformed"] == len(stretches)
    assert [(m.source, m.where) for m in sink] == [(name, f"offset {starts[i]}") for i in stretches]
    for m, i in zip(sink, stretches):
        assert m.raw.startswith(b"XARC/1.0") and "ArchiveLoadFailed" in m.error
        end = next((starts[j] for j in range(i + 1, len(starts)) if j not in bad), len(data))
        assert len(m.raw) == min(end - starts[i], 4096)
