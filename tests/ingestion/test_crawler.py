import contextlib
import functools
import gzip
import json
import socket
import threading
import time
from http.server import ThreadingHTTPServer

import pytest
from warcio.archiveiterator import ArchiveIterator

from ingestion.crawler import CrawlConfig, HostCrawler, canonical_url, extract_links, host_key
from ingestion.demo_site import DemoSiteServer
from ingestion.readers import read_warc
from tests.ingestion.sites import Site, html_page


def _urls_done(frontier) -> int:
    """URLs the frontier file marks done, read as another process writes it (SQLite's WAL allows it)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(frontier, timeout=5)) as db:
        try:
            return db.execute("SELECT count(*) FROM urls WHERE state = 2").fetchone()[0]
        except sqlite3.OperationalError:  # the table is not created yet
            return 0


@pytest.mark.unit
def test_canonical_url_one_spelling_per_page():
    assert canonical_url("HTTP://Example.COM:80/a#frag") == "http://example.com/a"
    assert canonical_url("https://example.com:443") == "https://example.com/"
    assert canonical_url("http://example.com:8080/a?b=1") == "http://example.com:8080/a?b=1"
    # w3lib's part: sorted query arguments, one percent-encoding, dot segments, no user info kept here.
    assert canonical_url("http://h/a?b=2&a=1") == canonical_url("http://h/a?a=1&b=2") == "http://h/a?a=1&b=2"
    assert canonical_url("http://h/%7euser/a b?q=%e2%82%ac") == "http://h/~user/a%20b?q=%E2%82%AC"
    assert canonical_url("http://user:pw@h:80/x/./y/../z") == "http://h/x/z"


@pytest.mark.unit
def test_extract_links_resolves_and_dedups():
    body = html_page("b.html", "/c.html#x", "b.html", "mailto:a@b.c", "http://other.org/")
    assert extract_links("http://h/a/index.html", body) == [
        "http://h/a/b.html",
        "http://h/c.html",
        "http://other.org/",
    ]


@pytest.mark.unit
def test_robots_disallow_and_crawl_delay_are_honoured(site, tmp_path):
    handler, base = site
    handler.pages.update(
        {
            "/robots.txt": (200, "text/plain", b"User-agent: *\nDisallow: /secret/\nCrawl-delay: 0.3\n"),
            "/": (200, "text/html", html_page("/a.html", "/secret/x.html", "/b.html")),
            "/a.html": (200, "text/html", html_page("/b.html")),
            "/b.html": (200, "text/html", html_page()),
            "/secret/x.html": (200, "text/html", html_page()),
        }
    )
    cfg = CrawlConfig(seeds=[base + "/"], min_delay_s=0.0, allow_private_addresses=True)
    crawler = HostCrawler(host_key(cfg.seeds[0]), cfg, str(tmp_path))
    result = crawler.crawl([(cfg.seeds[0], 0)], budget=100)
    crawler.close()
    paths = [p for p, _ in handler.hits]
    assert "/secret/x.html" not in paths
    assert sorted(paths) == ["/", "/a.html", "/b.html", "/robots.txt", "/sitemap.xml"]
    assert result["fetched"] == 3
    times = [t for _, t in handler.hits]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.3 - 0.02, gaps  # Crawl-delay from robots.txt beats min_delay_s=0
    log = [
        json.loads(line) for line in (tmp_path / f"crawl-log-{crawler.slug}.jsonl").read_text().splitlines()
    ]
    assert any(e["error"] == "disallowed by robots.txt" and e["url"].endswith("/secret/x.html") for e in log)


@pytest.mark.unit
def test_private_addresses_refused_by_default(site, tmp_path):
    handler, base = site
    handler.pages["/"] = (200, "text/html", html_page())
    cfg = CrawlConfig(seeds=[base + "/"], min_delay_s=0.0)
    crawler = HostCrawler(host_key(cfg.seeds[0]), cfg, str(tmp_path))
    result = crawler.crawl([(cfg.seeds[0], 0)], budget=10)
    crawler.close()
    assert result["fetched"] == 0 and result["failures"] == 1
    assert handler.hits == []  # not even robots.txt was requested
    log = (tmp_path / f"crawl-log-{crawler.slug}.jsonl").read_text()
    assert "allow_private_addresses" in log


@pytest.mark.unit
def test_oversized_body_and_wrong_content_type_are_recorded_not_written(site, tmp_path):
    handler, base = site
    handler.pages.update(
        {
            "/": (200, "text/html", html_page("/big.html", "/data.bin")),
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


@pytest.mark.unit
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


@pytest.mark.unit
def test_robots_crawl_delay_comes_from_our_group_and_may_be_fractional():
    from ingestion.crawler import Robots

    body = b"User-agent: *\nCrawl-delay: 2\n\nUser-agent: lmforge-crawler\nCrawl-delay: 0.5\n"
    assert Robots(body, "lmforge-crawler/0.1 (+x)", "http://h").delay == 0.5
    assert Robots(body, "other-bot/1.0", "http://h").delay == 2.0
    assert Robots(b"User-agent: *\nDisallow: /x\n", "a/1", "http://h").delay == 0.0
    sitemaps = Robots(b"Sitemap: /map.xml\n", "a/1", "http://h:8000").sitemaps
    assert sitemaps == ["http://h:8000/map.xml"]


# -- robustness, with real servers on 127.0.0.1 ----------------------------------------------------------


def _write(handler, status, headers=(), body=b""):
    handler.send_response(status)
    for k, v in headers:
        handler.send_header(k, v)
    handler.end_headers()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the crawler hung up, as it should
        handler.wfile.write(body)


def _nth_call(*responses):
    """A page answering the n-th request with the n-th (status, headers, body), the last one after."""
    calls = []

    def page(handler):
        calls.append(1)
        status, headers, body = responses[min(len(calls), len(responses)) - 1]
        _write(
            handler,
            status,
            [("Content-Type", "text/html"), ("Content-Length", str(len(body)))] + headers,
            body,
        )

    return page


def _crawl(base, tmp_path, budget=50, **cfg):
    config = CrawlConfig(seeds=[base + "/"], allow_private_addresses=True, **{"min_delay_s": 0.0, **cfg})
    crawler = HostCrawler(host_key(config.seeds[0]), config, str(tmp_path))
    result = crawler.crawl([(config.seeds[0], 0)], budget=budget)
    files = crawler.close()
    log = [
        json.loads(line) for line in (tmp_path / f"crawl-log-{crawler.slug}.jsonl").read_text().splitlines()
    ]
    return result, files, log


def _times(handler, path):
    return [t for p, t in handler.hits if p == path]


@pytest.mark.unit
def test_retry_after_and_backoff_on_429_and_5xx(site, tmp_path):
    handler, base = site
    handler.pages.update(
        {
            "/": (200, "text/html", html_page("/busy.html", "/flaky.html", "/down.html")),
            "/busy.html": _nth_call(
                (429, [("Retry-After", "1")], b"slow down"), (200, [], html_page(text="ok"))
            ),
            "/flaky.html": _nth_call((503, [], b""), (502, [], b""), (200, [], html_page(text="ok"))),
            "/down.html": _nth_call((500, [], b"")),
        }
    )
    result, files, log = _crawl(base, tmp_path, backoff_base_s=0.2, max_retries=2, sitemaps=False)
    busy, flaky, down = (_times(handler, p) for p in ("/busy.html", "/flaky.html", "/down.html"))
    assert busy[1] - busy[0] >= 1.0 - 0.02  # Retry-After: 1
    assert flaky[1] - flaky[0] >= 0.2 - 0.02 and flaky[2] - flaky[1] >= 0.4 - 0.02  # doubling backoff
    assert len(down) == 3 and result["failure_reasons"] == {"http_500": 1}  # 1 try + 2 retries, recorded
    assert result["fetched"] == 3 and result["retries"] == 1 + 2 + 2
    assert any(e["status"] == 500 and e["url"].endswith("/down.html") for e in log)


@pytest.mark.unit
def test_retry_after_longer_than_the_backoff_limit_gives_up(site, tmp_path):
    handler, base = site
    handler.pages["/"] = _nth_call((503, [("Retry-After", "3600")], b""))
    result, _, log = _crawl(base, tmp_path, backoff_max_s=5, sitemaps=False)
    assert result["failure_reasons"] == {"FetchRefused": 1} and "Retry-After 3600s" in log[-1]["error"]


@pytest.mark.unit
def test_redirect_loop_stops_and_is_recorded(site, tmp_path):
    handler, base = site
    handler.pages.update(
        {
            "/": (200, "text/html", html_page("/loop1")),
            "/loop1": lambda h: _write(h, 302, [("Location", "/loop2"), ("Content-Length", "0")]),
            "/loop2": lambda h: _write(h, 302, [("Location", "/loop1"), ("Content-Length", "0")]),
        }
    )
    result, _, log = _crawl(base, tmp_path, sitemaps=False)
    assert result["fetched"] == 1 and result["failure_reasons"] == {"FetchRefused": 1}
    assert [p for p, _ in handler.hits].count("/loop1") == 1  # the loop is seen, not followed round
    assert any("redirect" in (e["error"] or "") and e["url"].endswith("/loop1") for e in log)


def _drip(handler):
    handler.send_response(200)
    handler.send_header("Content-Type", "text/html")
    handler.end_headers()
    try:
        for _ in range(100):  # 10 s of one byte every 0.1 s
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _endless(handler):
    handler.send_response(200)
    handler.send_header("Content-Type", "text/html")
    handler.end_headers()
    try:
        while True:
            handler.wfile.write(b"<p>more</p>" * 1000)
    except (BrokenPipeError, ConnectionResetError):
        pass


@functools.cache
def _bomb_body() -> bytes:
    return gzip.compress(b"\0" * (64 * 2**20), compresslevel=9)  # 64 MiB in ~64 KiB


def _gzip_bomb(handler):
    body = _bomb_body()
    _write(
        handler,
        200,
        [("Content-Type", "text/html"), ("Content-Encoding", "gzip"), ("Content-Length", str(len(body)))],
        body,
    )


@pytest.mark.unit
def test_slow_drip_endless_body_and_gzip_bomb_are_cut(site, tmp_path):
    handler, base = site
    handler.pages.update(
        {
            "/": (200, "text/html", html_page("/drip.html", "/endless.html", "/bomb.html")),
            "/drip.html": _drip,
            "/endless.html": _endless,
            "/bomb.html": _gzip_bomb,
        }
    )
    _bomb_body()  # made before the clock starts
    start = time.monotonic()
    result, files, log = _crawl(base, tmp_path, total_timeout_s=1.0, max_body_bytes=2**20, sitemaps=False)
    assert time.monotonic() - start < 6
    errors = {e["url"].rsplit("/", 1)[1]: e["error"] for e in log if e["error"]}
    assert "total_timeout_s=1.0" in errors["drip.html"]
    assert "max_body_bytes=1048576" in errors["endless.html"]
    assert "max_body_bytes=1048576" in errors["bomb.html"]  # counted after decompression
    assert result["fetched"] == 1 and sum(files.values()) == 1


@pytest.mark.unit
def test_latin1_page_without_charset_reads_back_correctly(site, tmp_path):
    handler, base = site
    text = "Crème brûlée à la française, très délicieuse. " * 5
    handler.pages["/"] = (200, "text/html", f"<html><body><p>{text}</p></body></html>".encode("latin-1"))
    _, files, _ = _crawl(base, tmp_path, sitemaps=False)
    (html,) = [r["html"] for f in files for b in read_warc(tmp_path / f) for r in b.to_pylist()]
    assert text in html


@pytest.mark.unit
def test_sitemap_urls_are_queued_and_scope_patterns_apply(site, tmp_path):
    handler, base = site
    urlset = "".join(f"<url><loc>{base}/{p}</loc></url>" for p in ("only-in-sitemap.html", "skip/me.html"))
    handler.pages.update(
        {
            "/robots.txt": (200, "text/plain", f"User-agent: *\nSitemap: {base}/index.xml\n".encode()),
            "/index.xml": (
                200,
                "application/xml",
                f'<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9"><sitemap><loc>{base}/s1.xml</loc></sitemap></sitemapindex>'.encode(),
            ),  # fmt: skip
            "/s1.xml": (
                200,
                "application/xml",
                f'<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">{urlset}</urlset>'.encode(),
            ),  # fmt: skip
            "/": (200, "text/html", html_page("/linked.html", "/skip/linked.html")),
            "/linked.html": (200, "text/html", html_page()),
            "/only-in-sitemap.html": (200, "text/html", html_page()),
        }
    )
    result, _, _ = _crawl(base, tmp_path, exclude_patterns=[r"/skip/"])
    paths = [p for p, _ in handler.hits]
    assert "/only-in-sitemap.html" in paths and "/linked.html" in paths
    assert not any(p.startswith("/skip/") for p in paths) and result["fetched"] == 3


@pytest.mark.unit
def test_seeds_file_and_bad_patterns(tmp_path):
    from pydantic import ValidationError

    seeds = tmp_path / "seeds.txt"
    seeds.write_text(
        "# start here\nhttp://Example.com/a#x\n\nhttps://example.org/  # and here\nhttp://example.com/a\n"
    )
    cfg = CrawlConfig(seeds_file=seeds)
    assert cfg.all_seeds() == ["http://example.com/a", "https://example.org/"]
    assert cfg.hosts_allowed() == {"example.com", "example.org"}
    with pytest.raises(ValidationError, match="bad URL pattern"):
        CrawlConfig(include_patterns=["(unclosed"])


def _chain_site(handler, pages: int):
    """Pages 0..n-1, each linking to the next two: breadth-first order is page order."""
    for i in range(pages):
        links = [f"/p{j}.html" for j in (i + 1, i + 2) if j < pages]
        handler.pages[f"/p{i}.html" if i else "/"] = (200, "text/html", html_page(*links, text=f"page {i}"))


def _warc_urls(out_dir):
    urls = []
    for path in sorted(out_dir.glob("*.warc.gz")):
        with open(path, "rb") as stream:
            urls += [
                r.rec_headers.get_header("WARC-Target-URI")
                for r in ArchiveIterator(stream)
                if r.rec_type == "response"
            ]
    return urls


@pytest.mark.unit
def test_killed_crawl_resumes_without_refetching_or_losing_urls(site, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    handler, base = site
    _chain_site(handler, 40)
    out = tmp_path / "crawl"
    script = (
        "import sys\n"
        "from ingestion.crawler import CrawlConfig, HostCrawler, host_key\n"
        f"cfg = CrawlConfig(seeds=[{base + '/'!r}], min_delay_s=0.05, max_depth=100, allow_private_addresses=True)\n"
        f"crawler = HostCrawler(host_key(cfg.seeds[0]), cfg, {str(out)!r})\n"
        "crawler.crawl([(cfg.seeds[0], 0)], budget=1000)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd())
    frontier = out / f"frontier-http_{base.split('//')[1].replace(':', '_')}.sqlite"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if frontier.exists() and _urls_done(frontier) >= 15:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _warc_urls(out)
    assert 10 <= len(before) < 40  # killed midway

    config = CrawlConfig(seeds=[base + "/"], min_delay_s=0.0, max_depth=100, allow_private_addresses=True)
    crawler = HostCrawler(host_key(config.seeds[0]), config, str(out))
    assert crawler.state()["fetched"] == len(before) and crawler.state()["pending"] > 0
    hits_before = len(handler.hits)
    result = crawler.crawl([(config.seeds[0], 0)], budget=1000)
    crawler.close()
    urls = _warc_urls(out)
    expected = {base + "/"} | {f"{base}/p{i}.html" for i in range(1, 40)}
    assert set(urls) == expected and len(urls) == len(expected)  # every page once
    assert result["fetched"] == 40 - len(before)
    refetched = [p for p, _ in handler.hits[hits_before:] if p != "/sitemap.xml"]
    assert len(refetched) <= result["fetched"] + 1  # at most the page cut mid-write again


@pytest.mark.unit
def test_the_delay_runs_from_the_end_of_a_failed_fetch_too(site, tmp_path):
    """A fetch cut at total_timeout_s (or refused for its size) still spaces the next request by the
    delay; it used to follow 2-55 ms after a failure."""
    handler, base = site
    handler.pages.update(
        {
            "/": (200, "text/html", html_page("/drip.html", "/after.html")),
            "/drip.html": _drip,
            "/after.html": (200, "text/html", html_page()),
        }
    )
    _crawl(base, tmp_path, total_timeout_s=0.6, min_delay_s=0.4, sitemaps=False, host_concurrency=1)
    (drip,), (after,) = _times(handler, "/drip.html"), _times(handler, "/after.html")
    assert after - drip >= 0.6 + 0.4 - 0.02, after - drip  # the cut fetch's end, then the whole delay


@pytest.mark.unit
def test_links_beyond_max_depth_are_counted_not_lost_silently(site, tmp_path):
    handler, base = site
    _chain_site(handler, 6)  # depth 0: /; 1: p1, p2; 2: p3, p4, which link to p5
    result, files, _ = _crawl(base, tmp_path, max_depth=2, sitemaps=False)
    assert sum(files.values()) == 5 and result["beyond_max_depth"] == 1


@pytest.mark.unit
def test_http_and_https_of_one_host_write_files_of_their_own(tmp_path):
    config = CrawlConfig(seeds=["http://127.0.0.1:8443/"], allow_private_addresses=True)
    plain = HostCrawler("http://127.0.0.1:8443", config, str(tmp_path))
    secure = HostCrawler("https://127.0.0.1:8443", config, str(tmp_path))
    assert plain.slug != secure.slug
    plain._writer(), secure._writer()
    assert plain._warc_name != secure._warc_name and len(list(tmp_path.glob("*.warc.gz"))) == 2
    plain.close(), secure.close()


@pytest.mark.integration
def test_distributed_crawl_over_hosts_keeps_per_host_delay_and_resumes(ray_session, three_hosts, tmp_path):
    from orchestration.crawl import run_crawl

    for i, (handler, _) in enumerate(three_hosts):
        other = three_hosts[(i + 1) % 3][1]
        handler.pages["/"] = (200, "text/html", html_page("/a.html", "/b.html", other + "/"))
        handler.pages["/a.html"] = (200, "text/html", html_page("/b.html"))
        handler.pages["/b.html"] = (200, "text/html", html_page())
    config = CrawlConfig(
        seeds=[three_hosts[0][1] + "/"], min_delay_s=0.2, allow_private_addresses=True, max_concurrent_hosts=2
    )
    files, counters = run_crawl(config, tmp_path)
    assert counters["pages_fetched"] == 9 and counters["hosts"] == 3 and sum(f["rows"] for f in files) == 9
    for handler, _ in three_hosts:
        times = sorted(t for _, t in handler.hits)
        assert min(b - a for a, b in zip(times, times[1:])) >= 0.2 - 0.02  # politeness per host

    def pages_hit():
        return sum(1 for h, _ in three_hosts for p, _ in h.hits if p not in ("/robots.txt", "/sitemap.xml"))

    hits = pages_hit()
    again_files, again = run_crawl(config, tmp_path)  # nothing left: every host resumes as finished
    assert again["pages_restored"] == 9 and again["pages_fetched"] == 0
    assert pages_hit() == hits and again_files == files


@pytest.mark.unit
@pytest.mark.parametrize("concurrency", [1, 3])
def test_per_host_concurrency_holds(site, tmp_path, concurrency):
    handler, base = site
    active, peak, lock = [0], [0], threading.Lock()

    def slow(h):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.15)
        with lock:
            active[0] -= 1
        body = html_page(text="slow page")
        _write(h, 200, [("Content-Type", "text/html"), ("Content-Length", str(len(body)))], body)

    handler.pages["/"] = (200, "text/html", html_page(*[f"/s{i}.html" for i in range(9)]))
    handler.pages.update({f"/s{i}.html": slow for i in range(9)})
    start = time.monotonic()
    result, files, _ = _crawl(base, tmp_path, host_concurrency=concurrency, sitemaps=False)
    assert result["fetched"] == 10 and sum(files.values()) == 10
    assert peak[0] == concurrency
    assert time.monotonic() - start < 9 * 0.15 / concurrency + 1.0


@pytest.mark.unit
def test_ipv6_literal_seeds_keep_their_host(tmp_path):
    assert canonical_url("http://[::1]:8000/a#x") == "http://[::1]:8000/a"
    assert canonical_url("HTTP://[2001:DB8::1]/") == "http://[2001:db8::1]/"
    assert host_key("http://[2001:db8::1]:81/p") == "http://[2001:db8::1]:81"

    class V6Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6

    handler = type("H", (Site,), {"pages": {}, "hits": []})
    handler.pages.update(
        {"/": (200, "text/html", html_page("/a.html")), "/a.html": (200, "text/html", html_page(text="six"))}
    )
    server = V6Server(("::1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        seed = f"http://[::1]:{server.server_address[1]}/"
        cfg = CrawlConfig(seeds=[seed], min_delay_s=0.0, allow_private_addresses=True)
        assert cfg.all_seeds() == [seed]
        crawler = HostCrawler(host_key(seed), cfg, str(tmp_path))
        result = crawler.crawl([(seed, 0)], budget=10)
        crawler.close()
    finally:
        server.shutdown()
        server.server_close()
    assert result["fetched"] == 2
    urls = [r["url"] for f in sorted(tmp_path.glob("*.warc.gz")) for b in read_warc(f) for r in b.to_pylist()]
    assert sorted(urls) == [seed, seed + "a.html"]


@pytest.mark.unit
def test_the_checked_address_is_the_one_connected_to(tmp_path, monkeypatch):
    """DNS rebinding: the name answers 127.0.0.1 when checked and 127.0.0.2 afterwards. The crawler
    resolves once and dials the checked address, so every page comes from the first server."""
    import socket as socket_module

    servers, handlers = [], []
    for address in ("127.0.0.1", "127.0.0.2"):
        handler = type("H", (Site,), {"pages": {}, "hits": []})
        server = ThreadingHTTPServer((address, servers[0].server_address[1] if servers else 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        handlers.append(handler)
    port = servers[0].server_address[1]
    checked, rebound = handlers
    checked.pages.update(
        {"/": (200, "text/html", html_page("/a.html")), "/a.html": (200, "text/html", html_page())}
    )
    rebound.pages.update(
        {"/": (200, "text/html", html_page("/evil.html")), "/evil.html": (200, "text/html", html_page())}
    )
    real, answers = socket_module.getaddrinfo, iter(["127.0.0.1"])

    def rebinding(host, *args, **kwargs):
        if host == "rebind.test":
            return real(next(answers, "127.0.0.2"), *args, **kwargs)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket_module, "getaddrinfo", rebinding)
    try:
        cfg = CrawlConfig(
            seeds=[f"http://rebind.test:{port}/"], min_delay_s=0.0, allow_private_addresses=True
        )
        crawler = HostCrawler(host_key(cfg.seeds[0]), cfg, str(tmp_path))
        result = crawler.crawl([(cfg.seeds[0], 0)], budget=10)
        crawler.close()
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert rebound.hits == []
    assert sorted(p for p, _ in checked.hits) == ["/", "/a.html", "/robots.txt", "/sitemap.xml"]
    assert result["fetched"] == 2
