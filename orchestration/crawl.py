"""Distributed crawl: a bounded pool of crawl workers serves any number of hosts, one host at a time each.

Hosts wait in the driver's queue; a free worker takes one (workers start as hosts become ready, up to
the cap: a crawl of one site runs one worker), crawls it for a share of the page budget
(reserved up front, so ``max_pages`` is never exceeded) and reports back the links to other hosts, which
the driver routes to their host's queue. A host is only ever in one worker's hands, so per-host politeness
holds across the cluster; a worker keeps the last few hosts it crawled open and gets them back first.

Every report is appended to ``hosts.jsonl`` (pages fetched, URLs waiting, WARC files with their records):
a crawl started again on the same output directory reads it and opens only the hosts with URLs waiting,
each resuming from its WARC files and frontier (ingestion/crawler.py), lazily, when a worker takes it.
Links to other hosts wait in ``routes.sqlite`` until the host's crawler has queued them: neither the
routed-set nor the waiting links sit in the driver's memory, and a kill loses none of them.
"""

from __future__ import annotations

import json
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from core.files import file_entry
from ingestion.crawler import CrawlConfig, HostCrawler, host_key
from ingestion.frontier import RouteBook

PAGES_PER_CALL = 50  # a host reports back (links to route, progress) at least this often
HOSTS_LOG = "hosts.jsonl"
LEGACY_HOSTS_FILE = "hosts.json"  # work dirs of the one-actor-per-host crawl: a list of hosts
ROUTES = "routes.sqlite"  # the driver's links to other hosts (ingestion/frontier.py's RouteBook)
OPEN_HOSTS_PER_WORKER = 8  # hosts a worker keeps open (their seen-sets and files) between calls


class CrawlWorker:
    """One crawl process: crawls the host it is handed, keeping the last ``OPEN_HOSTS_PER_WORKER`` open."""

    def __init__(self, config: CrawlConfig, out_dir: str):
        self.config, self.out_dir = config, out_dir
        self.hosts: OrderedDict[str, HostCrawler] = OrderedDict()

    def crawl(self, host: str, urls: list[tuple[str, int]], budget: int) -> dict[str, Any]:
        """``HostCrawler.crawl`` on ``host`` (opened, and restored from its files, if it is not open),
        plus what the driver needs: pages restored on opening, and the hosts closed to make room."""
        crawler = self.hosts.pop(host, None)
        restored = None
        if crawler is None:
            crawler = HostCrawler(host, self.config, self.out_dir)
            restored = crawler.fetched
        self.hosts[host] = crawler
        closed = []
        while len(self.hosts) > OPEN_HOSTS_PER_WORKER:
            old, evicted = self.hosts.popitem(last=False)
            evicted.close()
            closed.append(old)
        result = crawler.crawl(urls, budget)
        if not result["pending"] and "robots_unreachable" not in result:
            crawler.close()  # done unless other hosts link here later: then it is opened again
            del self.hosts[host]
            closed.append(host)
        return {**result, "restored": restored, "total_fetched": crawler.fetched, "closed": closed}

    def close(self) -> None:
        for crawler in self.hosts.values():
            crawler.close()
        self.hosts.clear()


# Crawling waits on the network, not the CPU: workers take no CPU slot so they never starve stages.
_CrawlWorkerActor = ray.remote(num_cpus=0)(CrawlWorker)


def default_workers(config: CrawlConfig) -> int:
    """The most crawl workers: ``crawl.workers``, else 4 per CPU of the cluster; never more than
    ``max_concurrent_hosts``."""
    workers = config.workers or 4 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(workers, config.max_concurrent_hosts))


def _replay(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The last report of each host in ``hosts.jsonl`` (a line cut by a kill is skipped); hosts a legacy
    ``hosts.json`` names without a report are listed as unknown (opened to find out)."""
    hosts: dict[str, dict[str, Any]] = {}
    log = out_dir / HOSTS_LOG
    if log.exists():
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            hosts[entry["host"]] = entry
    legacy = out_dir / LEGACY_HOSTS_FILE
    for host in json.loads(legacy.read_text()) if legacy.exists() else []:
        hosts.setdefault(host, {"host": host, "fetched": 0, "pending": None, "files": {}})
    return hosts


def run_crawl(
    config: CrawlConfig,
    out_dir: str | Path,
    on_progress: Callable[[int], None] | None = None,
    on_this_node: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Crawl from the seeds until no URL is left or ``max_pages`` pages are in the output.

    Returns the WARC file entries and counters (pages fetched, failures by reason, retries, hosts, workers,
    URLs left unfetched). ``on_this_node`` keeps the crawl workers on the driver's node: ``out_dir`` is
    then a disk of this node only (the pipeline uploads it to a remote work dir when the crawl ends).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    driver = _Driver(config, out_dir, on_this_node)
    log = open(out_dir / HOSTS_LOG, "a", encoding="utf-8")
    try:
        while driver.running or (
            driver.unreserved > 0 and (driver.book.hosts or driver.waiting or driver.deferred)
        ):
            if not driver.dispatch():
                continue
            (done,), _ = ray.wait(list(driver.running), num_returns=1)
            log.write(json.dumps(driver.take(done)) + "\n")
            log.flush()
            if on_progress:
                on_progress(driver.counters["pages_restored"] + driver.counters["pages_fetched"])
    finally:
        log.close()
        driver.close()
    return driver.finish()


class _Driver:
    """The driver's side of a crawl: the hosts waiting, the workers (started as hosts become ready, up to
    ``default_workers``), which worker holds which host open, and the page budget not yet handed out."""

    def __init__(self, config: CrawlConfig, out_dir: Path, on_this_node: bool):
        self.config, self.out_dir = config, out_dir
        self.hosts = _replay(out_dir)  # host -> its last report
        self.counters: Counter = Counter()
        self.counters["pages_restored"] = sum(h["fetched"] for h in self.hosts.values())
        self.counters["pages_fetched"] = 0
        self.waiting = {h for h, s in self.hosts.items() if s["pending"] is None or s["pending"] > 0}
        self.deferred: dict[str, float] = {}  # host -> when its unreachable robots.txt may be asked again
        self.beyond: dict[
            str, int
        ] = {}  # host -> in-scope links seen on its pages at max_depth, not followed
        self.unreachable: set[str] = set()  # hosts whose robots.txt stayed unreachable: their URLs wait
        # Links to hand to each host, on disk; seeds are routed like links.
        self.book = RouteBook(out_dir / ROUTES)
        self.book.route((seed, host_key(seed), 0) for seed in config.all_seeds())
        self.n_workers = default_workers(config)
        self.actor = _CrawlWorkerActor
        if on_this_node:
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self.actor = self.actor.options(scheduling_strategy=here)
        self.workers: list[Any] = []
        self.free: list[int] = []
        self.owner: dict[str, int] = {}  # host -> the worker that holds it open
        self.unreserved = config.max_pages - self.counters["pages_restored"]
        self.running: dict[
            ray.ObjectRef, tuple[str, int, int, int]
        ] = {}  # call -> (host, worker, grant, route)

    def dispatch(self) -> bool:
        """Hand each ready host (up to the free workers and the budget) to a worker; False when nothing
        runs yet (after waiting a little: the caller loops)."""
        now = time.monotonic()
        for host in [h for h, at in self.deferred.items() if at <= now]:
            del self.deferred[host]
            self.waiting.add(host)
        busy = {host for host, *_ in self.running.values()}
        ready = sorted(h for h in self.book.hosts | self.waiting if h not in busy)
        if not self.running and not ready:  # only hosts waiting for their robots.txt
            time.sleep(max(0.0, min(self.deferred.values()) - now))
            return False
        for host in ready:
            if self.unreserved <= 0:
                break
            # A host open on a worker goes back to it (never to two workers at once).
            if host in self.owner and self.owner[host] not in self.free:
                continue
            if host not in self.owner and not self.free:
                if len(self.workers) == self.n_workers:
                    break
                self.workers.append(self.actor.remote(self.config, str(self.out_dir)))
                self.free.append(len(self.workers) - 1)
            worker = self.owner.get(host, self.free[-1])
            self.free.remove(worker)
            self.owner[host] = worker
            grant = max(1, min(PAGES_PER_CALL, self.unreserved // max(1, len(ready))))
            self.unreserved -= grant
            urls, last = self.book.waiting(host)
            self.running[self.workers[worker].crawl.remote(host, urls, grant)] = (host, worker, grant, last)
            self.waiting.discard(host)
        if not self.running:
            time.sleep(0.05)  # every ready host waits for its busy owner
            return False
        return True

    def take(self, done: ray.ObjectRef) -> dict[str, Any]:
        """Account for one finished call: the host's new report (returned, for the hosts log), the budget
        it left, its counters, its links to other hosts routed."""
        host, worker, grant, last = self.running.pop(done)
        self.free.append(worker)
        result = ray.get(done)
        self.book.handed(host, last)  # in the host's frontier now
        for closed in result["closed"]:
            self.owner.pop(closed, None)
        if result["restored"] is not None:  # opened: its files are the truth, the log may lag a kill
            lag = result["restored"] - self.hosts.get(host, {}).get("fetched", 0)
            self.counters["pages_restored"] += lag
            self.unreserved -= lag
        self.hosts[host] = {
            "host": host,
            "fetched": result["total_fetched"],
            "pending": result["pending"],
            "files": result["warc_files"],
        }
        self.unreserved += grant - result["fetched"]
        counters = self.counters
        counters["pages_fetched"] += result["fetched"]
        counters["retries"] += result["retries"]
        counters["fetch_failures"] += result["failures"]
        self.beyond[host] = result["beyond_max_depth"]
        counters["urls_not_fetched_max_depth"] = sum(self.beyond.values())
        counters.update({f"failed.{k}": v for k, v in result["failure_reasons"].items()})
        if "robots_unreachable" in result:  # nothing fetched: RFC 9309 disallows the host meanwhile
            if result["robots_unreachable"] < self.config.robots_attempts:
                self.deferred[host] = time.monotonic() + result["robots_retry_in"]
            else:
                self.unreachable.add(host)
        elif result["pending"]:
            self.waiting.add(host)
        self.book.route((url, host_key(url), depth) for url, depth in result["external"])
        return self.hosts[host]

    def close(self) -> None:
        self.counters["crawl_workers"] = len(self.workers)
        ray.get([w.close.remote() for w in self.workers])
        for w in self.workers:
            ray.kill(w)

    def finish(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """The WARC files' entries and the counters, with the URLs left and why."""
        hosts, counters = self.hosts, self.counters
        dead = self.unreachable | set(self.deferred)
        left = sum(s["pending"] or 0 for h, s in hosts.items() if h not in dead)
        counters["urls_not_fetched_max_pages"] = left + self.book.count_waiting()
        self.book.close()
        if dead:
            counters["hosts_robots_unreachable"] = len(dead)
            counters["urls_not_fetched_robots_unreachable"] = sum(hosts[h]["pending"] or 0 for h in dead)
        counters["hosts"] = len(hosts)
        files = {name: n for s in hosts.values() for name, n in s["files"].items()}
        return [file_entry(self.out_dir / name, rows=n) for name, n in sorted(files.items())], dict(counters)
