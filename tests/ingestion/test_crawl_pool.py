"""The crawl's bounded worker pool on a real local Ray: 200 hosts on loopback addresses served by 4 crawl
processes, every page fetched once, never more than 4 crawl workers alive; a redirect to another host in
scope lands in that host's WARC file; a crawl started again opens only the hosts with URLs waiting."""

import contextlib
import gzip
import threading
import time
from http.server import ThreadingHTTPServer

import psutil
import pytest
from warcio.archiveiterator import ArchiveIterator

from ingestion.crawler import CrawlConfig
from tests.ingestion.sites import Site, html_page

pytestmark = pytest.mark.integration

HOSTS, PAGES = 200, 5


@pytest.fixture
def loopback_hosts():
    """HOSTS servers, each on its own 127.0.0.x address (any 127/8 address binds on Linux), one port."""
    servers, hosts = [], []
    first = ThreadingHTTPServer(("127.0.1.1", 0), Site)
    port = first.server_address[1]
    first.server_close()
    for i in range(HOSTS):
        handler = type("H", (Site,), {"pages": {}, "hits": []})
        server = ThreadingHTTPServer((f"127.0.{1 + i // 250}.{1 + i % 250}", port), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        hosts.append((handler, f"http://127.0.{1 + i // 250}.{1 + i % 250}:{port}"))
    yield hosts
    stopping = [threading.Thread(target=server.shutdown) for server in servers]  # each waits for its poll
    for thread in stopping:
        thread.start()
    for thread, server in zip(stopping, servers):
        thread.join()
        server.server_close()


def crawl_workers_alive() -> int:
    """Processes of this session's Ray (this process started it: its descendants; other test processes
    have their own) titled after the crawl worker actor (ray::CrawlWorker, ray::CrawlWorker.crawl)."""
    count = 0
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            count += " ".join(p.cmdline()).startswith("ray::CrawlWorker")
    return count


def test_two_hundred_hosts_through_four_workers(ray_session, loopback_hosts, tmp_path):
    from orchestration.crawl import run_crawl

    for i, (handler, _) in enumerate(loopback_hosts):
        nxt = loopback_hosts[(i + 1) % HOSTS][1]
        pages = [f"/p{k}.html" for k in range(1, PAGES)]
        handler.pages["/"] = (200, "text/html", html_page(*pages, nxt + "/"))  # every host links the next
        for page in pages:
            handler.pages[page] = (200, "text/html", html_page("/"))
    allowed = [u.split("//")[1].split(":")[0] for _, u in loopback_hosts]
    config = CrawlConfig(
        seeds=[loopback_hosts[0][1] + "/"],
        allowed_domains=allowed,
        min_delay_s=0.0,
        allow_private_addresses=True,
        sitemaps=False,
        max_pages=10_000,
        max_depth=HOSTS + 1,  # each host is one hop further from the seed
        workers=4,
    )
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], crawl_workers_alive())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        files, counters = run_crawl(config, tmp_path)
    finally:
        stop.set()
        watcher.join()
    # Workers start as hosts become ready, never more than four (each host links the next: often one).
    assert 1 <= counters["crawl_workers"] <= 4 and 1 <= peak[0] <= 4
    assert counters["hosts"] == HOSTS and counters["pages_fetched"] == HOSTS * PAGES
    for handler, _ in loopback_hosts:  # every page once, robots.txt once per host
        asked = sorted(p for p, _ in handler.hits)
        assert asked == sorted(["/", "/robots.txt", *(f"/p{k}.html" for k in range(1, PAGES))])
    assert sum(f["rows"] for f in files) == HOSTS * PAGES
    hits = [len(h.hits) for h, _ in loopback_hosts]
    again_files, again = run_crawl(config, tmp_path)  # nothing waits, the seed was routed: no host opened
    assert again["pages_restored"] == HOSTS * PAGES and again["pages_fetched"] == 0
    assert again_files == files
    assert [len(h.hits) for h, _ in loopback_hosts] == hits


def test_a_redirect_to_another_host_in_scope_lands_in_that_hosts_warc(ray_session, three_hosts, tmp_path):
    from orchestration.crawl import run_crawl

    (a, a_url), (b, b_url), (c, c_url) = three_hosts
    a.pages["/"] = (200, "text/html", html_page("/moved", "/away"))

    def moved(h, where):
        h.send_response(301)
        h.send_header("Location", where)
        h.send_header("Content-Length", "0")
        h.end_headers()

    a.pages["/moved"] = lambda h: moved(h, b_url + "/landing")
    a.pages["/away"] = lambda h: moved(h, c_url + "/elsewhere")  # c is out of scope
    b.pages["/landing"] = (200, "text/html", html_page(text="landed"))
    c.pages["/elsewhere"] = (200, "text/html", html_page())
    host = lambda url: url.split("//")[1].split(":")[0]  # noqa: E731
    port = lambda url: url.rsplit(":", 1)[1]  # noqa: E731
    config = CrawlConfig(
        seeds=[a_url + "/"],
        include_patterns=[f":({port(a_url)}|{port(b_url)})/"],
        allowed_domains=[host(a_url)],
        min_delay_s=0.0,
        allow_private_addresses=True,
        sitemaps=False,
    )
    files, counters = run_crawl(config, tmp_path)
    assert counters["pages_fetched"] == 2 and counters["failed.FetchRefused"] == 1  # /away: out of scope
    assert not c.hits
    by_file = {}
    for f in files:
        with gzip.open(tmp_path / f["path"]) as stream:
            by_file[f["path"]] = [r.rec_headers.get_header("WARC-Target-URI") for r in ArchiveIterator(stream)
                                  if r.rec_type == "response"]  # fmt: skip
    slug_b = "http_" + b_url.split("//")[1].replace(":", "_")  # files are named by scheme, host and port
    (b_file,) = [name for name in by_file if name.startswith(slug_b)]
    assert by_file[b_file] == [b_url + "/landing"]
    assert [p for p, _ in b.hits] == ["/robots.txt", "/landing"]  # b's crawler fetched it, after its robots
