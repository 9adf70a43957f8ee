import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from warcio.archiveiterator import ArchiveIterator

from ingestion.crawler import CrawlConfig, HostCrawler, canonical_url, extract_links, host_key
from ingestion.demo_site import DemoSiteServer
from ingestion.readers import read_warc


class _Site(BaseHTTPRequestHandler):
    """A tiny programmable site: pages by path, robots.txt, request times recorded."""

    pages: dict[str, tuple[int, str, bytes]] = {}
    hits: list[tuple[str, float]] = []

    def do_GET(self):  # noqa: N802 - stdlib name
        self.hits.append((self.path, time.monotonic()))
        status, ctype, body = self.pages.get(self.path, (404, "text/plain", b"missing"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def site():
    handler = type("H", (_Site,), {"pages": {}, "hits": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _html(*links: str, text: str = "hello") -> bytes:
    return (
        "<html><body><p>" + text + "</p>" + "".join(f'<a href="{u}">x</a>' for u in links) + "</body></html>"
    ).encode()


def test_canonical_url_one_spelling_per_page():
    assert canonical_url("HTTP://Example.COM:80/a#frag") == "http://example.com/a"
    assert canonical_url("https://example.com:443") == "https://example.com/"
    assert canonical_url("http://example.com:8080/a?b=1") == "http://example.com:8080/a?b=1"


def test_extract_links_resolves_and_dedups():
    body = _html("b.html", "/c.html#x", "b.html", "mailto:a@b.c", "http://other.org/")
    assert extract_links("http://h/a/index.html", body) == [
        "http://h/a/b.html",
        "http://h/c.html",
        "http://other.org/",
    ]


def test_robots_disallow_and_crawl_delay_are_honoured(site, tmp_path):
    handler, base = site
    handler.pages.update(
        {
            "/robots.txt": (200, "text/plain", b"User-agent: *\nDisallow: /secret/\nCrawl-delay: 0.3\n"),
            "/": (200, "text/html", _html("/a.html", "/secret/x.html", "/b.html")),
            "/a.html": (200, "text/html", _html("/b.html")),
            "/b.html": (200, "text/html", _html()),
            "/secret/x.html": (200, "text/html", _html()),
        }
    )
    cfg = CrawlConfig(seeds=[base + "/"], min_delay_s=0.0, allow_private_addresses=True)
    crawler = HostCrawler(host_key(cfg.seeds[0]), cfg, str(tmp_path))
    result = crawler.crawl([(cfg.seeds[0], 0)], budget=100)
    crawler.close()
    paths = [p for p, _ in handler.hits]
    assert "/secret/x.html" not in paths
    assert sorted(paths) == ["/", "/a.html", "/b.html", "/robots.txt"]
    assert result["fetched"] == 3
    times = [t for _, t in handler.hits]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.3 - 0.02, gaps  # Crawl-delay from robots.txt beats min_delay_s=0
    log = [
        json.loads(line) for line in (tmp_path / f"crawl-log-{crawler.slug}.jsonl").read_text().splitlines()
    ]
    assert any(e["error"] == "disallowed by robots.txt" and e["url"].endswith("/secret/x.html") for e in log)


def test_private_addresses_refused_by_default(site, tmp_path):
    handler, base = site
    handler.pages["/"] = (200, "text/html", _html())
    cfg = CrawlConfig(seeds=[base + "/"], min_delay_s=0.0)
    crawler = HostCrawler(host_key(cfg.seeds[0]), cfg, str(tmp_path))
    result = crawler.crawl([(cfg.seeds[0], 0)], budget=10)
    crawler.close()
    assert result["fetched"] == 0 and result["failures"] == 1
    assert handler.hits == []  # not even robots.txt was requested
    log = (tmp_path / f"crawl-log-{crawler.slug}.jsonl").read_text()
    assert "allow_private_addresses" in log


def test_oversized_body_and_wrong_content_type_are_recorded_not_written(site, tmp_path):
    handler, base = site
    handler.pages.update(
        {
            "/": (200, "text/html", _html("/big.html", "/data.bin")),
            "/big.html": (200, "text/html", b"x" * 5000),
            "/data.bin": (200, "application/octet-stream", b"\0" * 10),
        }
    )
    cfg = CrawlConfig(seeds=[base + "/"], min_delay_s=0.0, max_body_bytes=1000, allow_private_addresses=True)
    crawler = HostCrawler(host_key(cfg.seeds[0]), cfg, str(tmp_path))
    result = crawler.crawl([(cfg.seeds[0], 0)], budget=10)
    files = crawler.close()
    assert result["fetched"] == 1 and result["failures"] == 2
    log = (tmp_path / f"crawl-log-{crawler.slug}.jsonl").read_text()
    assert "max_body_bytes=1000" in log and "application/octet-stream" in log
    assert sum(files.values()) == 1


def test_demo_site_crawl_writes_warc_that_reads_back(small_site, tmp_path):
    with DemoSiteServer(small_site.root) as server:
        cfg = CrawlConfig(seeds=[server.url], min_delay_s=0.0, allow_private_addresses=True)
        crawler = HostCrawler(host_key(cfg.seeds[0]), cfg, str(tmp_path))
        result = crawler.crawl([(cfg.seeds[0], 0)], budget=1000)
        files = crawler.close()
        served_ok = sorted(p for p, status in server.served if status == 200 and p != "/robots.txt")
    # Every page a polite crawler may fetch was fetched once; disallowed ones never.
    expected = sorted(["/"] + [p for p in small_site.pages if p != "/index.html"])
    assert served_ok == expected
    assert not any(p.startswith("/private/") for p, _ in server.served)
    assert result["fetched"] == len(expected) == sum(files.values())
    (name,) = files
    with gzip.open(tmp_path / name) as f:
        types = [r.rec_type for r in ArchiveIterator(f)]
    assert types.count("request") == types.count("response") == types.count("metadata") == len(expected)
    docs = [b for b in read_warc(tmp_path / name)]
    urls = [u for b in docs for u in b.column("url").to_pylist()]
    assert len(urls) == len(set(urls)) == len(expected)
    html = {u: h for b in docs for u, h in zip(b.column("url").to_pylist(), b.column("html").to_pylist())}
    original = (small_site.root / f"{small_site.modules[0]}.html").read_text(encoding="utf-8")
    assert html[server.url + f"{small_site.modules[0]}.html"] == original


def test_robots_crawl_delay_parsing_prefers_own_group():
    from ingestion.crawler import robots_crawl_delay

    lines = ["User-agent: *", "Crawl-delay: 2", "", "User-agent: lmforge-crawler", "Crawl-delay: 0.5"]
    assert robots_crawl_delay(lines, "lmforge-crawler/0.1 (+x)") == 0.5
    assert robots_crawl_delay(lines, "other-bot/1.0") == 2.0
    assert robots_crawl_delay(["User-agent: *", "Disallow: /x"], "a/1") == 0.0
