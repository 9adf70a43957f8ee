import random

import ftfy
import pyarrow as pa
import pytest

from cleaning.extract import HtmlExtractor, HtmlExtractorConfig
from cleaning.normalize import _FTFY, TextNormalizer, TextNormalizerConfig, normalize_text, repair_encoding
from core.schema import HTML_SCHEMA
from core.stage import StageContext, run_chain

pytestmark = pytest.mark.unit


def test_normalize_text():
    raw = "Caf\u0065\u0301\u00a0au\u2009lait\x07\r\n\r\n\r\n\r\nnext\u200b  line  "
    assert normalize_text(raw) == "Caf\u00e9 au lait\n\nnext line"


def html_docs(*pages: str) -> pa.RecordBatch:
    n = len(pages)
    return pa.RecordBatch.from_pydict(
        {
            "id": [f"h{i}" for i in range(n)],
            "url": [f"http://x/{i}" for i in range(n)],
            "html": list(pages),
            "source": ["t"] * n,
            "lang": [None] * n,
            "fetched_at": [None] * n,
            "meta": [[] for _ in range(n)],
        },
        schema=HTML_SCHEMA,
    )


def test_extract_then_normalize_keeps_main_text_and_rejects_empty_pages():
    article = " ".join(["The river\u00a0flows past the old mill and into the valley."] * 8)
    page = (
        f"<html><body><nav>Home | About</nav><article><h1>Mill</h1><p>{article}</p></article></body></html>"
    )
    ctx = StageContext("clean")
    stages = [HtmlExtractor(HtmlExtractorConfig()), TextNormalizer(TextNormalizerConfig())]
    out = list(run_chain(stages, [html_docs(page, "<html><body></body></html>", "")], ctx))
    texts = [t for b in out for t in b.column("text").to_pylist()]
    assert len(texts) == 1 and "The river flows past the old mill" in texts[0] and "\u00a0" not in texts[0]
    rejected = [r for b in ctx.rejected for r in b.to_pylist()]
    assert sorted(r["id"] for r in rejected) == ["h1", "h2"]
    assert {r["filter"] for r in rejected} == {"extract_empty"}
    assert ctx.counters["extract.in"] == 3 == ctx.counters["extract.out"] + len(rejected)


def test_normalize_repairs_broken_encodings_and_keeps_good_text():
    # UTF-8 bytes that were decoded as cp1252 (mojibake)
    assert normalize_text("The Mona Lisa doesnâ€™t have eyebrows.") == "The Mona Lisa doesn’t have eyebrows."
    assert normalize_text("CafÃ© crÃ¨me") == "Café crème"
    good = "“Quoted” text, ｆｕｌｌ-width and 日本語 stay as they are."
    assert normalize_text(good) == good
    assert normalize_text("doesnâ€™t", fix_encoding=False) == "doesnâ€™t"


def test_cleaned_text_leads_back_to_its_raw_html(tmp_path):
    import io

    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    from ingestion.readers import find_html, read_warc

    pages = {
        "http://x/a": "<html><body><article><p>"
        + "First page words here. " * 30
        + "</p></article></body></html>",
        "http://x/b": "<html><body><article><p>"
        + "Second page text now. " * 30
        + "</p></article></body></html>",
    }
    path = tmp_path / "crawl-00000.warc.gz"
    with open(path, "wb") as out:
        writer = WARCWriter(out, gzip=True)
        for url, html in pages.items():
            headers = StatusAndHeaders(
                "200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1"
            )
            writer.write_record(
                writer.create_warc_record(
                    url, "response", payload=io.BytesIO(html.encode()), http_headers=headers
                )
            )
    ctx = StageContext("clean")
    stages = [HtmlExtractor(HtmlExtractorConfig()), TextNormalizer(TextNormalizerConfig())]
    docs = [r for b in run_chain(stages, read_warc(path), ctx) for r in b.to_pylist()]
    assert [d["text"][:12] for d in docs] == ["First page w", "Second page "]
    offsets = []
    for doc in docs:
        assert find_html(tmp_path / doc["source"], doc["id"]) == pages[doc["url"]]
        offset = int(dict(doc["meta"])["warc_offset"])
        assert find_html(tmp_path / doc["source"], doc["id"], offset) == pages[doc["url"]]
        offsets.append(offset)
    assert offsets[0] == 0 < offsets[1]  # in the decompressed stream
    assert find_html(path, docs[0]["id"], offsets[1]) is None  # another record sits there
    assert find_html(path, "no-such-id") is None


def test_ascii_texts_skip_ftfy_and_normalize_as_through_it():
    """The ASCII fast path: every ASCII character but '&' and ESC (controls, CR, tabs, '<'), in random
    texts and in runs of each, normalizes exactly as it does through ftfy; '&' and ESC still go through it."""
    rng = random.Random(5)
    alphabet = [chr(i) for i in range(128) if chr(i) not in "&\x1b"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(5000)]
    texts += [c * 3 + "a b\r\nc" + c for c in alphabet] + [
        "Plain English text.\r\n\r\n\tWith\x0ccontrols\x7f."
    ]
    for text in texts:
        for form in ("NFC", "NFKC"):
            expected = normalize_text(ftfy.fix_text(text, _FTFY), form, fix_encoding=False)
            assert normalize_text(text, form) == expected, repr(text)
    assert repair_encoding("fish &amp; chips") == "fish & chips"
    assert repair_encoding("\x1b[31mred\x1b[0m") == "red"
    assert repair_encoding("doesn\u00e2\u20ac\u2122t") == "doesn\u2019t"
