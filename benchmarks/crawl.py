"""Crawl throughput: pages/s crawling 8 local hosts with no delay, and the per-host concurrency that held.

Eight HTTP servers on 127.0.0.1 (different ports, so eight hosts), served from two separate processes,
each host a site of ``--pages`` pages of ~5 KB HTML linking to the next five pages. lmforge's distributed
crawl (``orchestration.crawl.run_crawl``: one Ray actor per host, robots.txt, WARC + metadata records, crawl
log, frontier journal) runs with ``min_delay_s: 0``; the servers count the requests in flight per host and
report the most seen at once. Peer, for scale: a bare ``requests.Session`` loop fetching the same URLs
one after another (no robots, parsing, WARC or politeness). Goal (issue 4): >= 300 pages/s on this 2-core
machine, per-host concurrency 1.

    .venv/bin/python benchmarks/crawl.py [--quick] [--pages 500]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import ray  # noqa: E402
import requests  # noqa: E402

from ingestion.crawler import CrawlConfig  # noqa: E402
from orchestration.crawl import run_crawl  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="100 pages per host")
parser.add_argument("--pages", type=int, default=500, help="pages per host")
parser.add_argument("--hosts", type=int, default=8)
args = parser.parse_args()
if args.quick:
    args.pages = 100
FILLER = "<p>" + "Lorem words of a page that people wrote for other people to read. " * 70 + "</p>"


def page(i: int, pages: int) -> bytes:
    links = "".join(f'<a href="/p{(i + k) % pages}.html">next {k}</a>' for k in range(1, 6))
    return f"<html><head><title>Page {i}</title></head><body>{FILLER}{links}</body></html>".encode()


def serve(ports: multiprocessing.Queue, stats: multiprocessing.Queue, stop, hosts: int, pages: int) -> None:
    """``hosts`` servers in this process; the most requests in flight per host go to ``stats`` at stop."""
    bodies = [page(i, pages) for i in range(pages)]
    servers, peaks = [], []
    for _ in range(hosts):
        state = {"active": 0, "peak": 0, "lock": threading.Lock()}
        peaks.append(state)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as production servers do: no 40 ms delayed-ACK stalls
            counts = state

            def do_GET(self):  # noqa: N802 - stdlib name
                with self.counts["lock"]:
                    self.counts["active"] += 1
                    self.counts["peak"] = max(self.counts["peak"], self.counts["active"])
                try:
                    if self.path == "/robots.txt":
                        body, ctype = b"User-agent: *\nAllow: /\n", "text/plain"
                    elif self.path.startswith("/p") and self.path.endswith(".html"):
                        body, ctype = bodies[int(self.path[2:-5]) % pages], "text/html; charset=utf-8"
                    elif self.path == "/":
                        body, ctype = bodies[0], "text/html; charset=utf-8"
                    else:
                        self.send_error(404)
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                finally:
                    with self.counts["lock"]:
                        self.counts["active"] -= 1

            def log_message(self, *a):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        ports.put(server.server_address[1])
    stop.wait()
    stats.put([p["peak"] for p in peaks])
    for server in servers:
        server.shutdown()


def main() -> None:
    ctx = multiprocessing.get_context("spawn")
    ports, stats, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    per_process = [args.hosts // 2, args.hosts - args.hosts // 2]
    procs = [
        ctx.Process(target=serve, args=(ports, stats, stop, n, args.pages), daemon=True) for n in per_process
    ]
    for p in procs:
        p.start()
    bases = [f"http://127.0.0.1:{ports.get(timeout=30)}" for _ in range(args.hosts)]
    total = args.hosts * args.pages

    # Peer: a bare sequential fetch loop over the same URLs.
    session = requests.Session()
    urls = [f"{b}/p{i}.html" for b in bases for i in range(min(args.pages, 200))]
    start = time.perf_counter()
    for url in urls:
        assert session.get(url).content
    peer = len(urls) / (time.perf_counter() - start)

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    config = CrawlConfig(
        seeds=[b + "/" for b in bases],
        min_delay_s=0.0,
        max_pages=total,
        max_depth=args.pages,
        allow_private_addresses=True,
        sitemaps=False,
    )
    with tempfile.TemporaryDirectory() as out:
        ray.get(ray.remote(lambda: 0).remote())  # the cluster is up before the clock starts
        start = time.perf_counter()
        files, counters = run_crawl(config, out)
        seconds = time.perf_counter() - start
        written = sum(f["rows"] for f in files)
    ray.shutdown()
    stop.set()
    peaks = [q for _ in procs for q in stats.get(timeout=30)]
    ours = counters["pages_fetched"] / seconds
    line = {
        "bench": "crawl",
        "unit": "pages/s",
        "ours": round(ours, 1),
        "peer": "bare sequential requests.Session loop (no robots, parsing, WARC or politeness)",
        "peer_value": round(peer, 1),
        "ratio": round(ours / peer, 3),
        "goal": 300.0,
        "hosts": args.hosts,
        "pages": counters["pages_fetched"],
        "pages_in_warc": written,
        "seconds": round(seconds, 2),
        "failures": counters.get("fetch_failures", 0),
        "per_host_concurrency_max": max(peaks),
        "ok": ours >= 300 and max(peaks) == 1 and written == total,
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
