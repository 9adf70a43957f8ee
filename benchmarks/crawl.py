"""Crawl throughput: pages/s crawling 8 local hosts with no delay, and the per-host concurrency that held.

Eight HTTP servers on 127.0.0.1 (different ports, so eight hosts), served from two separate processes,
each host a site of ``--pages`` pages of ~5 KB HTML linking to the next five pages. lmforge's distributed
crawl (``orchestration.crawl.run_crawl``: the crawl worker pool, robots.txt, WARC + metadata records, crawl
log, frontier journal) runs with ``min_delay_s: 0``; the servers count the requests in flight per host and
report the most seen at once. Peer, for scale: a bare ``requests.Session`` loop fetching the same URLs
one after another (no robots, parsing, WARC or politeness). Goal (issue 4): >= 300 pages/s on this 2-core
machine, per-host concurrency 1.

    .venv/bin/python benchmarks/crawl.py [--quick | --smoke] [--pages 500]

``--many`` (issue 19): 100 and then 1,000 hosts (``--host-counts``), each on its own loopback address
(127.0.x.y; every 127/8 address binds on Linux) with ``--pages`` (default 20) pages, crawled by the bounded
worker pool: pages/s, the most crawl worker processes alive at once (sampled), and the peak RSS of the
driver and of any crawl worker. Goal: >= 300 pages/s, at most the configured workers alive, and worker
memory flat (peak RSS at the largest count <= 1.2x the smallest).

    .venv/bin/python benchmarks/crawl.py --many [--smoke] [--host-counts 100,1000] [--workers 8]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

import psutil  # noqa: E402
import ray  # noqa: E402
import requests  # noqa: E402

from ingestion.crawler import CrawlConfig  # noqa: E402
from orchestration.crawl import run_crawl  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="100 pages per host")
parser.add_argument("--pages", type=int, default=500, help="pages per host")
parser.add_argument("--hosts", type=int, default=8)
parser.add_argument("--many", action="store_true", help="many hosts on loopback addresses, the worker pool")
parser.add_argument("--host-counts", default="100,1000", help="--many: host counts, smallest first")
parser.add_argument("--workers", type=int, default=None, help="--many: crawl.workers (default: 4 per CPU)")
parser.add_argument(
    "--smoke",
    action="store_true",
    help="seconds: 2 hosts x 10 pages; --many: 4 then 8 hosts x 5 pages, 2 workers",
)
args = parser.parse_args()
if args.quick:
    args.pages = 100
elif args.many and "--pages" not in sys.argv:
    args.pages = 20
if args.smoke:
    args.hosts, args.pages = 2, 10
    if args.many:
        args.host_counts, args.pages, args.workers = "4,8", 5, 2
FILLER = "<p>" + "Lorem words of a page that people wrote for other people to read. " * 70 + "</p>"


def page(i: int, pages: int) -> bytes:
    links = "".join(f'<a href="/p{(i + k) % pages}.html">next {k}</a>' for k in range(1, 6))
    return f"<html><head><title>Page {i}</title></head><body>{FILLER}{links}</body></html>".encode()


def serve(
    ports: multiprocessing.Queue,
    stats: multiprocessing.Queue,
    stop,
    hosts: int,
    pages: int,
    addresses: list[str] | None = None,
    port: int = 0,
) -> None:
    """``hosts`` servers in this process (on ``addresses`` at ``port``, else on 127.0.0.1 at free ports);
    the most requests in flight per host go to ``stats`` at stop."""
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

        address = addresses[len(servers)] if addresses else "127.0.0.1"
        server = ThreadingHTTPServer((address, port), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        ports.put(f"http://{address}:{server.server_address[1]}")
    stop.wait()
    stats.put([p["peak"] for p in peaks])
    stopping = [threading.Thread(target=server.shutdown) for server in servers]
    for thread in stopping:
        thread.start()
    for thread in stopping:
        thread.join()


def main() -> None:
    ctx = multiprocessing.get_context("spawn")
    ports, stats, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    per_process = [args.hosts // 2, args.hosts - args.hosts // 2]
    procs = [
        ctx.Process(target=serve, args=(ports, stats, stop, n, args.pages), daemon=True) for n in per_process
    ]
    for p in procs:
        p.start()
    bases = [ports.get(timeout=30) for _ in range(args.hosts)]
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


def crawl_processes() -> tuple[int, float]:
    """Crawl worker processes alive now (Ray titles them ray::CrawlWorker...) and their largest RSS (MB)."""
    alive, rss = 0, 0.0
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        if " ".join(p.info["cmdline"] or []).startswith("ray::CrawlWorker") and p.info["memory_info"]:
            alive += 1
            rss = max(rss, p.info["memory_info"].rss / 2**20)
    return alive, rss


def many_hosts(count: int) -> dict:
    """One crawl of ``count`` hosts on their own loopback addresses, ``args.pages`` pages each."""
    ctx = multiprocessing.get_context("spawn")
    ports, stats, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    addresses = [f"127.{1 + i // 62500}.{1 + i // 250 % 250}.{1 + i % 250}" for i in range(count)]
    with socket.socket() as probe:  # one port for every address: a free one on the first
        probe.bind((addresses[0], 0))
        port = probe.getsockname()[1]
    halves = [addresses[: count // 2], addresses[count // 2 :]]
    procs = [
        ctx.Process(target=serve, args=(ports, stats, stop, len(h), args.pages, h, port), daemon=True)
        for h in halves
    ]
    for p in procs:
        p.start()
    bases = [ports.get(timeout=120) for _ in range(count)]
    config = CrawlConfig(
        seeds=[b + "/" for b in bases],
        allowed_domains=addresses,
        min_delay_s=0.0,
        max_pages=count * args.pages,
        max_depth=args.pages,
        allow_private_addresses=True,
        sitemaps=False,
        workers=args.workers,
        max_concurrent_hosts=max(64, args.workers or 0),
    )
    peak = {"alive": 0, "rss_mb": 0.0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            alive, rss = crawl_processes()
            peak["alive"], peak["rss_mb"] = max(peak["alive"], alive), max(peak["rss_mb"], rss)
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    with tempfile.TemporaryDirectory() as out:
        watcher.start()
        start = time.perf_counter()
        files, counters = run_crawl(config, out)
        seconds = time.perf_counter() - start
        done.set()
        watcher.join()
    stop.set()
    for p in procs:
        stats.get(timeout=60)
        p.join(timeout=60)
    return {
        "hosts": count,
        "pages": counters["pages_fetched"],
        "pages_in_warc": sum(f["rows"] for f in files),
        "pages_per_s": round(counters["pages_fetched"] / seconds, 1),
        "seconds": round(seconds, 2),
        "workers": counters["crawl_workers"],
        "workers_alive_max": peak["alive"],
        "worker_peak_rss_mb": round(peak["rss_mb"], 1),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "failures": counters.get("fetch_failures", 0),
    }


def main_many() -> None:
    counts = [int(c) for c in args.host_counts.split(",")]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    ray.get(ray.remote(lambda: 0).remote())
    runs = [many_hosts(c) for c in counts]
    ray.shutdown()
    for run in runs:
        print(json.dumps({"bench": f"crawl.many.{run['hosts']}", **run}), flush=True)
    first, last = runs[0], runs[-1]
    growth = last["worker_peak_rss_mb"] / first["worker_peak_rss_mb"]
    line = {
        "bench": "crawl.many",
        "unit": "pages/s",
        "ours": last["pages_per_s"],
        "peer": "goal (issue 19)",
        "peer_value": 300.0,
        "ratio": round(last["pages_per_s"] / 300.0, 3),
        "goal": 1.0,
        "hosts": [r["hosts"] for r in runs],
        "pages_per_s": [r["pages_per_s"] for r in runs],
        "workers_alive_max": [r["workers_alive_max"] for r in runs],
        "worker_peak_rss_mb": [r["worker_peak_rss_mb"] for r in runs],
        "worker_rss_growth": round(growth, 3),
        "ok": last["pages_per_s"] >= 300
        and all(
            r["workers_alive_max"] <= r["workers"] and r["pages_in_warc"] == r["hosts"] * args.pages
            for r in runs
        )
        and growth <= 1.2,
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main_many() if args.many else main()
