"""Readers that turn stored corpora into document batches, streaming, from local paths or pyarrow
filesystem URIs (``s3://``, ``gs://``, ``hdfs://``, ``file://``...).

- WARC / WARC.gz responses -> ``HTML_SCHEMA`` (``read_warc``);
- WET (text conversions of WARC) -> ``DOCUMENT_SCHEMA`` (``read_wet``);
- JSONL, plain or .gz / .zst / .bz2 compressed -> ``DOCUMENT_SCHEMA`` (``read_jsonl``);
- Parquet -> ``DOCUMENT_SCHEMA`` (``read_parquet``);
- a directory of .html files -> ``HTML_SCHEMA``, of .txt / .md files -> ``DOCUMENT_SCHEMA`` (``read_directory``).

``read_corpus`` picks the reader from the name. Malformed records (bad JSON, no text, undecodable
bytes) are counted in ``report.counters`` and the first ones kept in ``report.malformed``; they never stop
a read. Memory stays bounded by ``batch_size`` documents, whatever the file size.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import glob
import io
import json
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import charset_normalizer
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from w3lib.encoding import html_body_declared_encoding, http_content_type_encoding, read_bom
from warcio.archiveiterator import ArchiveIterator
from warcio.exceptions import ArchiveLoadFailed
from warcio.recordloader import ArcWarcRecord

from core.schema import DOCUMENT_SCHEMA, HTML_SCHEMA, document_id
from core.storage import filesystem, split_uri, uri_scheme

#: Encodings detection may choose for a page that declares none and is not UTF-8: those of scripts
#: windows-1252 cannot be (CJK, Cyrillic, Greek, Hebrew, Arabic, Thai). Any other guess (a Latin code page, or
#: one of the DOS/Mac/rare pages a short Latin text is easily mistaken for: cp775, cp1006...) means
#: windows-1252, as browsers decode such pages.
_OTHER_SCRIPTS = frozenset(
    codecs.lookup(name).name
    for name in ("shift_jis", "cp932", "euc_jp", "iso2022_jp", "gb2312", "gbk", "gb18030", "big5", "big5hkscs",
                 "euc_kr", "cp949", "johab", "koi8_r", "koi8_u", "cp1251", "iso8859_5", "cp866", "mac_cyrillic",
                 "cp1253", "iso8859_7", "cp1255", "iso8859_8", "cp1256", "iso8859_6", "cp874", "tis_620")
)  # fmt: skip


def decode_html(body: bytes, content_type: str) -> str:
    """Decode as browsers do where w3lib does it (a byte-order mark wins; then the HTTP header's charset,
    then the page's own <meta> or XML declaration, with WHATWG's labels: iso-8859-1 means cp1252), but a
    declaration the bytes do not decode under is not trusted: UTF-8 next, then detection, then cp1252."""
    encoding, bom = read_bom(body)
    if encoding is not None:
        return body[len(bom) :].decode(encoding, errors="replace")
    declared = [http_content_type_encoding(content_type), html_body_declared_encoding(body[:4096])]
    candidates = [c for c in declared if c] + ["utf-8"]
    for charset in candidates:
        try:
            return body.decode(charset)
        except (LookupError, UnicodeDecodeError):
            continue
    # Declared wrong or not at all, and not UTF-8: windows-1252 (WHATWG's fallback for Latin-script pages),
    # unless detection finds a script it cannot be; detection alone where windows-1252 cannot decode it.
    best = charset_normalizer.from_bytes(body[:65536]).best()
    guess = codecs.lookup(best.encoding).name if best is not None else "cp1252"
    for charset in (guess, "cp1252") if guess in _OTHER_SCRIPTS else ("cp1252", guess):
        try:
            return body.decode(charset)
        except (LookupError, UnicodeDecodeError):
            continue
    return body.decode("utf-8", errors="replace")


#: How much of a malformed record's bytes is kept with it.
RAW_PREFIX = 4096


@dataclass(frozen=True)
class Malformed:
    """A record that could not be read as a document: where it was, why, and (a prefix of) its bytes."""

    source: str
    where: str
    error: str
    raw: bytes


@dataclass
class ReadReport:
    """What a read met: counters, and the malformed records: the first ``keep`` of them kept here, every
    one handed to ``sink`` when given (the stage writes them to its rejected dataset)."""

    counters: Counter = field(default_factory=Counter)
    malformed: list[dict[str, str | bytes]] = field(default_factory=list)  # Malformed records as dicts
    keep: int = 1000
    sink: Callable[[Malformed], None] | None = None

    def bad(self, source: str, where: str, error: str, raw: bytes = b"") -> None:
        self.counters["malformed"] += 1
        record = Malformed(source, where, error, raw[:RAW_PREFIX])
        if len(self.malformed) < self.keep:
            self.malformed.append(dataclasses.asdict(record))
        if self.sink is not None:
            self.sink(record)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """UTF-8 text and the number of undecodable bytes, each replaced by U+FFFD."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="surrogateescape")
        bad = len(_ESCAPED.findall(text))
        return _ESCAPED.sub("\ufffd", text), bad


_ESCAPED = re.compile("[\udc80-\udcff]")


class CorruptInputError(ValueError):
    """An input file that cannot be read to its end: truncated or corrupt. Names the file and how far the
    read got."""


_READ_ERRORS = (OSError, EOFError, zlib.error, pa.ArrowException, ArchiveLoadFailed, UnicodeDecodeError)


def _names_its_file(
    reader: Callable[..., Iterator[pa.RecordBatch]],
) -> Callable[..., Iterator[pa.RecordBatch]]:
    """A reader whose low-level read errors (a truncated gzip stream, a bad Parquet footer...) come out as
    a CorruptInputError naming the file, the records read before it and what to do."""

    @functools.wraps(reader)
    def read(path: str | Path, *args, **kwargs) -> Iterator[pa.RecordBatch]:
        records = 0
        try:
            for batch in reader(path, *args, **kwargs):
                records += batch.num_rows
                yield batch
        except FileNotFoundError:
            raise
        except _READ_ERRORS as e:
            raise CorruptInputError(
                f"{path}: truncated or corrupt, unreadable after {records} record(s) "
                f"({type(e).__name__}: {e}); re-download or re-crawl it, or remove it from the inputs"
            ) from e

    return read


class _Batches:
    """Rows in the given schema, yielded as record batches of ``size``."""

    def __init__(self, schema: pa.Schema, size: int):
        self.schema, self.size = schema, size
        self.rows: dict[str, list] = {f.name: [] for f in schema}

    def add(self, **row) -> pa.RecordBatch | None:
        for name, values in self.rows.items():
            values.append(row.get(name, [] if name == "meta" else None))
        return self.flush() if len(self.rows["id"]) >= self.size else None

    def flush(self) -> pa.RecordBatch | None:
        if not self.rows["id"]:
            return None
        batch = pa.RecordBatch.from_pydict(self.rows, schema=self.schema)
        self.rows = {k: [] for k in self.rows}
        return batch


#: The first line of a WARC record (WARC 1.0 and 1.1), where a reader picks up after a malformed record.
_WARC_START = re.compile(rb"\nWARC/1\.[01]\r?\n")
_SCAN_CHUNK = 1 << 20


def warc_records(path: str | Path, report: ReadReport) -> Iterator[tuple[ArcWarcRecord, int]]:
    """Each record of a WARC/WARC.gz file with its byte offset in the decompressed stream, its content
    to be read before the next one is asked for.

    A record whose header cannot be parsed (warcio's ``ArchiveLoadFailed``) is reported as malformed,
    with its offset and its first bytes, and reading resumes at the next line that starts a record
    ("WARC/1.0" or "WARC/1.1"), as a reader of a damaged archive would: the good records before and after
    it are kept. A stream that cannot be decompressed (a truncated gzip member) is not resynchronised:
    that error ends the file (``CorruptInputError``, through the reader that calls this)."""
    source = Path(str(path)).name
    fs, where = filesystem(path)
    start = 0
    while start is not None:
        with fs.open_input_stream(where) as stream:
            _skip(stream, start)
            records = ArchiveIterator(stream)
            try:
                for record in records:
                    yield record, start + records.offset  # the start of this record
                return
            except ArchiveLoadFailed as e:
                bad = start + records.offset
                error = str(e).strip()
        start, raw = _next_record_start(fs, where, bad)
        report.bad(source, f"offset {bad}", f"ArchiveLoadFailed: {error}", raw)


def _skip(stream: pa.NativeFile, n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, _SCAN_CHUNK))
        if not chunk:
            return
        n -= len(chunk)


def _next_record_start(fs: pafs.FileSystem, where: str, bad: int) -> tuple[int | None, bytes]:
    """The offset of the first record start after ``bad`` (None at the end of the file) and the first
    bytes of what lies between."""
    with fs.open_input_stream(where) as stream:
        _skip(stream, bad)
        seen, tail, raw = bad, b"", b""
        while chunk := stream.read(_SCAN_CHUNK):
            window = tail + chunk
            if len(raw) < RAW_PREFIX:
                raw += chunk[: RAW_PREFIX - len(raw)]
            # A match must start after the malformed record's own first byte (its line may be "WARC/1.0").
            found = _WARC_START.search(window, 1 if seen == bad else 0)
            if found:
                at = seen - len(tail) + found.start() + 1
                return at, raw[: at - bad]
            tail = window[-16:]
            seen += len(chunk)
    return None, raw


@_names_its_file
def read_warc(
    path: str | Path, batch_size: int = 256, report: ReadReport | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream HTML responses (status 200) from a WARC/WARC.gz file as document batches; ``meta`` holds
    the response's size (``http_bytes``) and the record's byte offset in the decompressed WARC stream
    (``warc_offset``). pyarrow decompresses (a truncated gzip member is an error here, where warcio's
    own reader ends the file silently), so offsets count uncompressed bytes. A malformed record goes to
    ``report`` (``warc_records``); the reading goes on after it."""
    report = report if report is not None else ReadReport()
    counters = report.counters
    out = _Batches(HTML_SCHEMA, batch_size)
    source = Path(str(path)).name
    for record, offset in warc_records(path, report):
        if record.rec_type != "response":
            continue
        counters["warc.responses"] += 1
        status = record.http_headers.get_statuscode() if record.http_headers else None
        if status != "200":
            counters["warc.skipped_status"] += 1
            continue
        url = record.rec_headers.get_header("WARC-Target-URI")
        body = record.content_stream().read()
        ctype = record.http_headers.get_header("Content-Type") or ""
        fetched = record.rec_headers.get_header("WARC-Date")
        batch = out.add(
            id=document_id(url, body),
            url=url,
            html=decode_html(body, ctype),
            source=source,
            fetched_at=datetime.fromisoformat(fetched.replace("Z", "+00:00")) if fetched else None,
            meta=[("http_bytes", float(len(body))), ("warc_offset", float(offset))],
        )
        if batch:
            yield batch
    if batch := out.flush():
        yield batch


def find_html(path: str | Path, doc_id: str, offset: int | None = None) -> str | None:
    """The raw HTML of document ``doc_id`` in a WARC file (its ``source``): every document downstream
    keeps its id, source and ``meta['warc_offset']``, so a cleaned or rejected text leads back to the
    page it came from. With the offset, only that record is parsed and the scan stops there."""
    return find_htmls(path, {doc_id: offset}).get(doc_id)


def find_htmls(path: str | Path, wanted: dict[str, int | None]) -> dict[str, str]:
    """The raw HTML of each wanted document id (with its ``warc_offset`` where known) in one pass over a
    WARC file, stopping once every one is found; an id whose offset holds another record is not found."""
    found: dict[str, str] = {}
    by_offset = {o: i for i, o in wanted.items() if o is not None}
    scan = {i for i, o in wanted.items() if o is None}
    last = max(by_offset, default=-1)
    fs, where = filesystem(path)
    with fs.open_input_stream(where) as stream:
        records = ArchiveIterator(stream)
        for record in records:
            body = record.content_stream().read() if record.rec_type == "response" else b""
            offset = records.get_record_offset()  # (warcio reads the record to its end for this)
            if record.rec_type == "response" and (offset in by_offset or scan):
                doc_id = document_id(record.rec_headers.get_header("WARC-Target-URI") or "", body)
                if by_offset.get(offset) == doc_id or doc_id in scan:
                    ctype = record.http_headers.get_header("Content-Type") or ""
                    found[doc_id] = decode_html(body, ctype)
                    scan.discard(doc_id)
            if not scan and offset >= last:
                break
    return found


@_names_its_file
def read_wet(
    path: str | Path, batch_size: int = 256, report: ReadReport | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream the text ``conversion`` records of a WET file (Common Crawl's extracted text)."""
    report = report if report is not None else ReadReport()
    source = Path(str(path)).name
    out = _Batches(DOCUMENT_SCHEMA, batch_size)
    for record, _ in warc_records(path, report):
        if record.rec_type != "conversion":
            continue
        url = record.rec_headers.get_header("WARC-Target-URI")
        body = record.content_stream().read()
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            report.bad(source, url or "?", f"not UTF-8: {e}", body)
            continue
        report.counters["wet.records"] += 1
        fetched = record.rec_headers.get_header("WARC-Date")
        date = datetime.fromisoformat(fetched.replace("Z", "+00:00")) if fetched else None
        if batch := out.add(
            id=document_id(url or "", text), url=url, text=text, source=source, fetched_at=date
        ):
            yield batch
    if batch := out.flush():
        yield batch


def _text_row(
    source: str, number: int, text, doc_id, url, report: ReadReport, problem: str, raw: bytes = b""
) -> dict | None:
    """A text document's columns from a record's fields, or None (recorded as malformed) without text.
    A record without an id gets one from its URL (or its place in the file) and its text."""
    if not isinstance(text, str):
        where, _, error = problem.partition(": ")
        report.bad(source, where, error, raw)
        return None
    url = url if isinstance(url, str) else None
    doc_id = str(doc_id) if doc_id is not None else document_id(url or f"{source}#{number}", text)
    return {"id": doc_id, "url": url, "text": text, "source": source}


@_names_its_file
def read_jsonl(
    path: str | Path,
    batch_size: int = 1024,
    report: ReadReport | None = None,
    text_field: str = "text",
    id_field: str = "id",
    url_field: str = "url",
) -> Iterator[pa.RecordBatch]:
    """Stream JSON lines (compression from the name: .gz, .zst, .bz2, .lz4) with a text field, and
    optionally an id and a URL; a line without a usable text is malformed."""
    report = report if report is not None else ReadReport()
    source = Path(str(path)).name
    out = _Batches(DOCUMENT_SCHEMA, batch_size)
    fs, where = filesystem(path)
    with fs.open_input_stream(where, compression="detect") as stream:
        for number, raw in enumerate(io.BufferedReader(stream), 1):
            line, replaced = decode_utf8(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                report.bad(source, f"line {number}", f"bad JSON: {e.msg}", raw)
                continue
            record = record if isinstance(record, dict) else {}
            fields = (record.get(text_field), record.get(id_field), record.get(url_field))
            problem = f"line {number}: no string {text_field!r}"
            if row := _text_row(source, number, *fields, report, problem, raw):
                report.counters["jsonl.records"] += 1
                if replaced:  # undecodable bytes became U+FFFD: counted, per document and in all
                    row["meta"] = [("decode_replacements", float(replaced))]
                    report.counters["decode_replacements"] += replaced
                if batch := out.add(**row):
                    yield batch
    if batch := out.flush():
        yield batch


@_names_its_file
def read_parquet(
    path: str | Path,
    batch_size: int = 1024,
    report: ReadReport | None = None,
    text_field: str = "text",
    id_field: str = "id",
    url_field: str = "url",
) -> Iterator[pa.RecordBatch]:
    """Stream a Parquet file's text (and id, URL) columns, row group by row group."""
    report = report if report is not None else ReadReport()
    source = Path(str(path)).name
    fs, where = filesystem(path)
    with fs.open_input_file(where) as handle:
        parquet = pq.ParquetFile(handle)
        names = set(parquet.schema_arrow.names)
        if text_field not in names:
            raise ValueError(f"{path}: no column {text_field!r} (columns: {sorted(names)})")
        columns = [c for c in (text_field, id_field, url_field) if c in names]
        row = 0
        for chunk in parquet.iter_batches(batch_size=batch_size, columns=columns):
            batch = _parquet_documents(chunk, row, source, report, text_field, id_field, url_field)
            row += chunk.num_rows
            report.counters["parquet.records"] += chunk.num_rows
            if batch.num_rows:
                yield batch


def _is_text(column: pa.Array | None) -> bool:
    return column is not None and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type))


def _texts(column: pa.Array | None, rows: int) -> pa.Array:
    """A text column as strings, nulls for a missing or non-text column (as ``isinstance(v, str)`` reads it)."""
    return column.cast(pa.string()) if _is_text(column) else pa.nulls(rows, pa.string())


def _strings(column: pa.Array | None, rows: int) -> pa.Array:
    """A column as strings (numbers as str() writes them), nulls for a missing column."""
    if column is None or _is_text(column):
        return _texts(column, rows)
    if pa.types.is_integer(column.type):
        return column.cast(pa.string())
    return pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())


def _parquet_documents(
    chunk: pa.RecordBatch,
    first_row: int,
    source: str,
    report: ReadReport,
    text_field: str,
    id_field: str,
    url_field: str,
) -> pa.RecordBatch:
    """One Parquet record batch as documents, column by column: rows without a string text are
    recorded as malformed; a row without an id gets one from its URL (or its row number) and its text."""

    def column(name: str) -> pa.Array | None:
        return chunk.column(name) if name in chunk.schema.names else None

    text = _texts(column(text_field), chunk.num_rows)  # no string text in any row: every row malformed
    ids = _strings(column(id_field), chunk.num_rows)
    urls = _texts(column(url_field), chunk.num_rows)
    valid = pc.is_valid(text)
    if not pc.all(valid).as_py():
        for i in pc.indices_nonzero(pc.invert(valid)).to_pylist():
            record = {"text": None, "id": ids[i].as_py(), "url": urls[i].as_py()}
            report.bad(
                source, f"row {first_row + i + 1}", f"no string {text_field!r}", json.dumps(record).encode()
            )
    if ids.null_count:  # derived as _text_row derives them, so a file read either way gets the same ids
        texts, urls_py = text.to_pylist(), urls.to_pylist()
        ids = pa.array(
            [
                doc_id
                if doc_id is not None
                else (
                    document_id(urls_py[i] or f"{source}#{first_row + i + 1}", texts[i])
                    if texts[i] is not None
                    else ""
                )
                for i, doc_id in enumerate(ids.to_pylist())
            ],
            pa.string(),
        )
    n = chunk.num_rows
    columns = {
        "id": ids,
        "url": urls,
        "text": text,
        "source": pa.array([source] * n, pa.string()),
        "lang": pa.nulls(n, pa.string()),
        "fetched_at": pa.nulls(n, DOCUMENT_SCHEMA.field("fetched_at").type),
        "meta": pa.array([[]] * n, DOCUMENT_SCHEMA.field("meta").type),
    }
    batch = pa.RecordBatch.from_arrays([columns[f.name] for f in DOCUMENT_SCHEMA], schema=DOCUMENT_SCHEMA)
    return batch.filter(valid)


HTML_SUFFIXES = (".html", ".htm", ".xhtml")
TEXT_SUFFIXES = (".txt", ".md", ".text")


def read_directory(
    path: str | Path, kind: str = "html", batch_size: int = 256, report: ReadReport | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream the ``kind`` ('html' or 'text') files below a directory, in path order: HTML files as
    ``HTML_SCHEMA`` (charset from <meta>, else detected), text files as ``DOCUMENT_SCHEMA`` (UTF-8).
    A document's URL is ``file://`` plus its path, its id from that URL and its bytes."""
    report = report if report is not None else ReadReport()
    fs, where = filesystem(path)
    suffixes = HTML_SUFFIXES if kind == "html" else TEXT_SUFFIXES
    infos = fs.get_file_info(pafs.FileSelector(where, recursive=True))
    files = sorted(
        i.path for i in infos if i.type == pafs.FileType.File and i.path.lower().endswith(suffixes)
    )
    out = _Batches(HTML_SCHEMA if kind == "html" else DOCUMENT_SCHEMA, batch_size)
    for name in files:
        with fs.open_input_stream(name) as stream:
            body = stream.read()
        url = f"file://{name}" if isinstance(fs, pafs.LocalFileSystem) else f"{fs.type_name}://{name}"
        relative = name[len(where) :].lstrip("/")
        if kind == "html":
            row = {"html": decode_html(body, "")}
        else:
            try:
                row = {"text": body.decode("utf-8")}
            except UnicodeDecodeError as e:
                report.bad(relative, "file", f"not UTF-8: {e}", body)
                continue
        report.counters[f"directory.{kind}_files"] += 1
        if batch := out.add(id=document_id(url, body), url=url, source=relative, **row):
            yield batch
    if batch := out.flush():
        yield batch


def read_corpus(
    uri: str | Path, batch_size: int = 1024, report: ReadReport | None = None, **fields: str
) -> Iterator[pa.RecordBatch]:
    """Any supported corpus, by its name: a directory (its HTML files, then its text files), WARC,
    WET, JSONL (any compression) or Parquet. ``fields`` renames text_field / id_field / url_field."""
    report = report if report is not None else ReadReport()
    fs, where = filesystem(uri)
    if fs.get_file_info(where).type == pafs.FileType.Directory:
        yield from read_directory(uri, "html", batch_size, report)
        yield from read_directory(uri, "text", batch_size, report)
        return
    kind = corpus_format(where)
    if kind == "wet":
        yield from read_wet(uri, batch_size, report)
    elif kind == "warc":
        yield from read_warc(uri, batch_size, report)
    elif kind == "jsonl":
        yield from read_jsonl(uri, batch_size, report, **fields)
    elif kind == "parquet":
        yield from read_parquet(uri, batch_size, report, **fields)
    else:
        raise ValueError(f"{uri}: unknown corpus format (WARC, WET, JSONL[.gz|.zst], Parquet or a directory)")


_FORMATS = [  # the first name pattern that matches decides
    ("wet", re.compile(r"\.wet(\.gz)?$")),
    ("warc", re.compile(r"\.(warc|warc\.gz|arc\.gz)$")),
    ("jsonl", re.compile(r"\.(jsonl|ndjson|json)(\.(gz|zst|bz2|lz4))?$")),
    ("parquet", re.compile(r"\.parquet$")),
]


def corpus_format(name: str) -> str | None:
    """'wet', 'warc', 'jsonl' or 'parquet' from a file name, or None for anything else."""
    name = name.lower()
    return next((kind for kind, pattern in _FORMATS if pattern.search(name)), None)


class ReadConfig(BaseModel):
    """Corpora to read instead of (or besides) crawling: files, directories, glob patterns or
    filesystem URIs. A directory stands for its corpus files (each read on its own) and its HTML and
    text files (read together)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    paths: list[str] = Field(default_factory=list, description="Files, directories, globs or URIs to read.")
    text_field: str = Field("text", description="JSONL / Parquet field holding the text.")
    id_field: str = Field("id", description="JSONL / Parquet field holding the id (else one is derived).")
    url_field: str = Field("url", description="JSONL / Parquet field holding the URL.")
    batch_size: int = Field(1024, ge=1, description="Documents per batch read.")

    def inputs(self) -> list[str]:
        """Every input to read, in a stable order: globs and directories expanded, local or on any
        pyarrow filesystem (``s3://bucket/dir/``, ``s3://bucket/*.parquet``; a URI's query, such as
        ``?endpoint_override=...``, is kept on every file it expands to)."""
        out: list[str] = []
        for entry in self.paths:
            out += _expand_remote(entry) if uri_scheme(entry) else _expand_local(entry)
        return list(dict.fromkeys(out))

    def fingerprint(self) -> list[tuple[str, int, int]]:
        """(input, bytes, mtime ns) of every input, local or remote (an object store's size and
        last-modified time): a changed file changes the clean stage's key."""
        prints = []
        for entry in self.inputs():
            if uri_scheme(entry):
                prints.append(_remote_fingerprint(entry))
                continue
            path = Path(entry)
            if path.is_file():
                stat = path.stat()
                prints.append((entry, stat.st_size, stat.st_mtime_ns))
            elif path.is_dir():
                files = sorted(f for f in path.rglob("*") if f.is_file())
                prints.append(
                    (
                        entry,
                        sum(f.stat().st_size for f in files),
                        max((f.stat().st_mtime_ns for f in files), default=0),
                    )
                )
            else:
                prints.append((entry, -1, -1))
        return prints


def _expand_local(entry: str) -> list[str]:
    matches = sorted(glob.glob(entry, recursive=True)) if glob.has_magic(entry) else [entry]
    if not matches:
        raise FileNotFoundError(f"read.paths: nothing matches {entry!r}")
    out = []
    for match in matches:
        path = Path(match)
        if not path.exists():
            raise FileNotFoundError(f"read.paths: {match} does not exist")
        if path.is_dir():
            out += _directory_inputs(sorted(str(f) for f in path.rglob("*") if f.is_file()), str, str(path))
        else:
            out.append(str(path))
    return out


def _remote_files(fs: pafs.FileSystem, where: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(where, recursive=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def _expand_remote(entry: str) -> list[str]:
    """A filesystem URI's files, as URIs: a directory's corpus files (and the directory itself when it
    holds HTML or text files, read together), a glob's matches, or the file itself."""
    scheme, path, query = split_uri(entry)
    if glob.has_magic(path):
        root = "/".join(
            path.split("/")[: next(i for i, p in enumerate(path.split("/")) if glob.has_magic(p))]
        )
        fs, where = pafs.FileSystem.from_uri(f"{scheme}://{root}{query}")
        pattern = where.rstrip("/") + path[len(root.rstrip("/")) :]
        wanted = _glob_regex(pattern)
        matches = [i.path for i in _remote_files(fs, where) if wanted.match(i.path)]
        if not matches:
            raise FileNotFoundError(f"read.paths: nothing matches {entry!r}")
        return [f"{scheme}://{m}{query}" for m in matches]
    fs, where = pafs.FileSystem.from_uri(entry)
    info = fs.get_file_info(where)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"read.paths: {entry} does not exist")
    if info.type != pafs.FileType.Directory:
        return [entry]
    files = [i.path for i in _remote_files(fs, where)]
    return _directory_inputs(files, lambda f: f"{scheme}://{f}{query}", entry)


def _directory_inputs(files: list[str], name: Callable[[str], str], directory: str) -> list[str]:
    """A directory's inputs: each corpus file (named by ``name``), then the directory itself when it holds
    HTML or text files, which are read together."""
    out = [name(f) for f in files if corpus_format(f)]
    if any(f.lower().endswith(HTML_SUFFIXES + TEXT_SUFFIXES) for f in files):
        out.append(directory)
    return out


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob as ``glob.glob(recursive=True)`` reads it: ``*`` and ``?`` stay within a path segment,
    ``**/`` spans any number of directories (none included)."""
    out = []
    for part in re.split(r"(\*\*/|\*\*|\*|\?|\[[^\]]+\])", pattern):
        if part == "**/":
            out.append("(?:.*/)?")
        elif part == "**":
            out.append(".*")
        elif part == "*":
            out.append("[^/]*")
        elif part == "?":
            out.append("[^/]")
        elif part.startswith("[") and part.endswith("]") and len(part) > 2:
            out.append("[^" + part[2:] if part.startswith("[!") else part)
        else:
            out.append(re.escape(part))
    return re.compile("".join(out) + r"\Z")


def _remote_fingerprint(entry: str) -> tuple[str, int, int]:
    """(uri, bytes, mtime ns) from the filesystem: an object store's size and last-modified time."""
    fs, where = pafs.FileSystem.from_uri(entry)
    info = fs.get_file_info(where)
    if info.type == pafs.FileType.Directory:
        files = _remote_files(fs, where)
        return entry, sum(f.size for f in files), max((f.mtime_ns or 0 for f in files), default=0)
    if info.type == pafs.FileType.NotFound:
        return entry, -1, -1
    return entry, info.size, info.mtime_ns or 0
