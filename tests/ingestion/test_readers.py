"""Corpus readers: every format, compression, URI form, malformed records and bounded memory."""

import gzip
import io
import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from core.schema import DOCUMENT_SCHEMA, HTML_SCHEMA, document_id
from ingestion.readers import ReadReport, read_corpus, read_jsonl

pytestmark = pytest.mark.unit

LINES = [
    {"id": "a", "text": "first document", "url": "http://x/a"},
    {"text": "second, no id"},
    "{not json",
    {"id": "c"},  # no text
    {"id": "d", "text": 42},  # text not a string
    {"id": "e", "text": "fifth, ünïcödé"},
]


def _jsonl_bytes():
    return b"".join((line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in LINES)


def _rows(uri, **kw):
    report = ReadReport()
    batches = list(read_corpus(uri, report=report, **kw))
    return [r for b in batches for r in b.to_pylist()], batches, report


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_any_compression_with_malformed_lines_recorded(tmp_path, suffix):
    path = tmp_path / f"corpus{suffix}"
    data = _jsonl_bytes()
    if suffix.endswith(".gz"):
        data = gzip.compress(data)
    elif suffix.endswith(".zst"):
        sink = pa.BufferOutputStream()
        with pa.CompressedOutputStream(sink, "zstd") as out:
            out.write(data)
        data = sink.getvalue().to_pybytes()
    path.write_bytes(data)
    rows, batches, report = _rows(path)
    assert all(b.schema.equals(DOCUMENT_SCHEMA) for b in batches)
    assert [(r["id"], r["text"], r["url"]) for r in rows] == [
        ("a", "first document", "http://x/a"),
        (document_id(f"corpus{suffix}#2", "second, no id"), "second, no id", None),
        ("e", "fifth, ünïcödé", None),
    ]
    assert report.counters["malformed"] == 3 and report.counters["jsonl.records"] == 3
    assert [m["where"] for m in report.malformed] == ["line 3", "line 4", "line 5"]


def test_jsonl_custom_fields_and_file_uri(tmp_path):
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"key": "k1", "content": "hello", "link": "http://y/"}) + "\n"
    )
    rows, _, _ = _rows(f"file://{tmp_path}/c.jsonl", text_field="content", id_field="key", url_field="link")
    assert [(r["id"], r["text"], r["url"]) for r in rows] == [("k1", "hello", "http://y/")]


def test_parquet_in_row_batches(tmp_path):
    texts = [f"doc {i}" for i in range(25)] + [None]
    pq.write_table(
        pa.table({"text": texts, "id": [str(i) for i in range(26)]}),
        tmp_path / "c.parquet",
        row_group_size=10,
    )
    rows, batches, report = _rows(tmp_path / "c.parquet", batch_size=7)
    assert [r["text"] for r in rows] == texts[:25] and rows[3]["id"] == "3"
    assert max(b.num_rows for b in batches) <= 7 and report.counters["malformed"] == 1
    with pytest.raises(ValueError, match="no column 'body'"):
        list(read_corpus(tmp_path / "c.parquet", text_field="body"))


def test_directory_of_html_and_text_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.html").write_bytes("<p>Café crème, très bien: déjà vu à Noël.</p>".encode("latin-1"))
    (tmp_path / "sub" / "b.htm").write_text('<meta charset="utf-8"><p>naïve</p>', encoding="utf-8")
    (tmp_path / "notes.txt").write_text("plain text", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00broken")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    rows, batches, report = _rows(tmp_path)
    assert [b.schema.equals(HTML_SCHEMA) for b in batches] == [True, False]
    html = {r["source"]: r["html"] for r in rows if "html" in r}
    assert html == {
        "a.html": "<p>Café crème, très bien: déjà vu à Noël.</p>",
        "sub/b.htm": '<meta charset="utf-8"><p>naïve</p>',
    }
    assert [r["text"] for r in rows if "text" in r] == ["plain text"]
    assert report.malformed[0]["source"] == "bad.txt"
    assert rows[0]["url"] == f"file://{tmp_path}/a.html"


def test_warc_and_wet(tmp_path):
    warc, wet = tmp_path / "c.warc.gz", tmp_path / "c.warc.wet.gz"
    with open(warc, "wb") as out:
        writer = WARCWriter(out, gzip=True)
        headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        payload = io.BytesIO(b"<p>page</p>")
        writer.write_record(
            writer.create_warc_record("http://x/p", "response", payload=payload, http_headers=headers)
        )
    with open(wet, "wb") as out:
        writer = WARCWriter(out, gzip=True)
        for url, text in (("http://x/1", "one text"), ("http://x/2", "two text")):
            record = writer.create_warc_record(
                url, "conversion", payload=io.BytesIO(text.encode()), warc_content_type="text/plain"
            )
            writer.write_record(record)
    rows, _, _ = _rows(warc)
    assert [(r["url"], r["html"]) for r in rows] == [("http://x/p", "<p>page</p>")]
    rows, batches, _ = _rows(wet)
    assert batches[0].schema.equals(DOCUMENT_SCHEMA)
    assert [(r["url"], r["text"]) for r in rows] == [("http://x/1", "one text"), ("http://x/2", "two text")]


def test_unknown_format_is_a_clear_error(tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unknown corpus format"):
        list(read_corpus(tmp_path / "x.csv"))


def test_reading_streams_in_bounded_memory(tmp_path):
    path = tmp_path / "big.jsonl.gz"
    line = json.dumps({"text": "word " * 200}) + "\n"
    with gzip.open(path, "wt") as out:
        for _ in range(30_000):  # ~30 MB of text
            out.write(line)
    tracemalloc.start()
    n = sum(b.num_rows for b in read_jsonl(path, batch_size=500))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert n == 30_000 and peak < 8 * 2**20, peak  # a few batches' worth, not the file


def test_undecodable_bytes_are_replaced_and_counted_per_document(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"id": "x", "text": "caf\xe9 au lait \xff\xfe"}\n{"id": "y", "text": "plain"}\n')
    rows, _, report = _rows(path)
    by_id = {r["id"]: r for r in rows}
    assert by_id["x"]["text"] == "caf\ufffd au lait \ufffd\ufffd"  # one U+FFFD per undecodable byte
    assert dict(by_id["x"]["meta"]) == {"decode_replacements": 3.0}
    assert by_id["y"]["meta"] == []
    assert report.counters["decode_replacements"] == 3 and report.counters["malformed"] == 0


def test_malformed_records_keep_their_bytes_and_place(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(_jsonl_bytes())
    seen = []
    report = ReadReport(sink=seen.append)
    list(read_corpus(str(path), report=report))
    assert [(m.where, m.raw) for m in seen] == [
        ("line 3", b"{not json\n"),
        ("line 4", b'{"id": "c"}\n'),
        ("line 5", b'{"id": "d", "text": 42}\n'),
    ]
    assert [m["raw"] for m in report.malformed] == [m.raw for m in seen]


def test_parquet_columns_become_documents_as_each_row_would(tmp_path):
    """Read column by column: a missing id comes from the URL (else the row number) and the text, as
    document_id does it by hand here; integer ids become their decimal strings; null texts are malformed."""
    from core.schema import document_id

    table = pa.table(
        {
            "text": ["alpha", None, "gamma", "delta"],
            "id": pa.array([7, None, None, 9], pa.int64()),
            "url": ["http://a/", "http://b/", None, None],
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    rows, _, report = _rows(tmp_path / "d.parquet")
    assert [r["id"] for r in rows] == ["7", document_id("d.parquet#3", "gamma"), "9"]
    assert [r["url"] for r in rows] == ["http://a/", None, None]
    assert report.counters["malformed"] == 1 and report.malformed[0]["where"] == "row 2"
    assert {r["source"] for r in rows} == {"d.parquet"}


def test_html_decoding_follows_the_browsers_rules_and_distrusts_a_wrong_declaration():
    from ingestion.readers import decode_html

    quoted = "\u201cquoted\u201d caf\u00e9"  # “quoted” café
    # A UTF-8 byte-order mark wins over a header that says otherwise.
    assert decode_html(b"\xef\xbb\xbf" + quoted.encode("utf-8"), "text/html; charset=iso-8859-1") == quoted
    # WHATWG: the label iso-8859-1 means windows-1252, so 0x93 / 0x94 are curly quotes, not C1 controls.
    assert decode_html(quoted.encode("cp1252"), "text/html; charset=ISO-8859-1") == quoted
    # The page's own declaration: <meta http-equiv> and the XML declaration.
    page = '<meta http-equiv="Content-Type" content="text/html; charset=koi8-r"><p>Привет</p>'
    assert decode_html(page.encode("koi8-r"), "text/html") == page
    xml = '<?xml version="1.0" encoding="iso-8859-2"?><p>Zażółć</p>'
    assert decode_html(xml.encode("iso-8859-2"), "") == xml
    # A declaration the bytes do not decode under is not trusted: the cp1252 page declared UTF-8.
    prose = (
        "<p>The caf\u00e9 on the corner served cr\u00e8me br\u00fbl\u00e9e; \u201cthe best in town,\u201d said the guide.</p>"
        * 3
    )
    assert decode_html(prose.encode("cp1252"), "text/html; charset=utf-8") == prose


PAGES = {
    "latin_1": "<p>Un caf\u00e9 cr\u00e8me, s'il vous pla\u00eet, et une tarte \u00e0 la fran\u00e7aise.</p>",
    "iso8859_1": "Un caf\u00e9 cr\u00e8me",  # short: detection alone called it cp1006 (Urdu)
    "cp1252": "<p>The caf\u00e9 served cr\u00e8me br\u00fbl\u00e9e \u2013 \u201cthe best in town\u201d, they said.</p>",
    "utf-8": "<p>Gr\u00fc\u00dfe aus K\u00f6ln \u2013 \u201cZa\u017c\u00f3\u0142\u0107 g\u0119\u015bl\u0105 ja\u017a\u0144\u201d</p>",
    "shift_jis": "<p>\u3053\u3093\u306b\u3061\u306f\u3001\u4e16\u754c\u3002\u65e5\u672c\u8a9e\u306e\u30da\u30fc\u30b8\u3067\u3059\u3002\u6771\u4eac\u306f\u96e8\u3067\u3059\u3002</p>",
    "koi8_r": "<p>\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u042d\u0442\u043e \u0441\u0442\u0440\u0430\u043d\u0438\u0446\u0430 \u043d\u0430 \u0440\u0443\u0441\u0441\u043a\u043e\u043c \u044f\u0437\u044b\u043a\u0435 \u043e \u043f\u043e\u0433\u043e\u0434\u0435 \u0432 \u041c\u043e\u0441\u043a\u0432\u0435.</p>",
}


@pytest.mark.parametrize("charset", list(PAGES))
@pytest.mark.parametrize("declared", ["header", "meta", "none"])
def test_pages_decode_as_browsers_decode_them_with_or_without_a_declaration(charset, declared):
    """With no usable declaration: UTF-8 if the bytes are UTF-8, windows-1252 for Latin-script pages (a
    Latin-1 page once came out as cp775: "Un caf\u0137 cr\u0136me"), detection only for the scripts windows-1252
    cannot be (Japanese, Cyrillic)."""
    from ingestion.readers import decode_html

    text = PAGES[charset]
    body = text.encode(charset)
    header = f"text/html; charset={charset}" if declared == "header" else "text/html"
    if declared == "meta":
        page = f'<meta charset="{charset}">' + text
        assert decode_html(page.encode(charset), header) == page
    else:
        assert decode_html(body, header) == text


def test_parquet_large_string_columns_read_as_strings(tmp_path):
    table = pa.table(
        {"text": pa.array(["alpha"], pa.large_string()), "url": pa.array(["http://a/"], pa.large_string())}
    )
    pq.write_table(table, tmp_path / "l.parquet")
    rows, _, _ = _rows(tmp_path / "l.parquet")
    assert [(r["text"], r["url"]) for r in rows] == [("alpha", "http://a/")]
