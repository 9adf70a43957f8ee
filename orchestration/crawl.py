"""Distributed crawl: one Ray actor per host, so per-host politeness holds across the cluster.

The driver routes URLs to the actor that owns their host and keeps at most ``max_concurrent_hosts``
crawl calls running, each with a share of the page budget reserved up front (so ``max_pages`` is never
exceeded). Hosts are remembered in ``hosts.json``: a crawl started again on the same output directory
brings every host's actor back, which resumes from its WARC files and journal (ingestion/crawler.py).
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from core.files import atomic_write_bytes, file_entry
from ingestion.crawler import CrawlConfig, HostCrawler, host_key

# Crawling waits on the network, not the CPU: actors take no CPU slot so they never starve stages.
_HostCrawlerActor = ray.remote(num_cpus=0)(HostCrawler)
PAGES_PER_CALL = 50  # a host reports back (links to route, progress) at least this often
HOSTS_FILE = "hosts.json"


def run_crawl(
    config: CrawlConfig, out_dir: str | Path, on_progress: Callable[[int], None] | None = None
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Crawl from the seeds until no URL is left or ``max_pages`` pages are in the output.

    Returns the WARC file entries and counters (pages fetched, failures by reason, retries, hosts, URLs
    left unfetched).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    actors: dict[str, Any] = {}

    def actor(host: str) -> Any:
        if host not in actors:
            actors[host] = _HostCrawlerActor.remote(host, config, str(out_dir))
            atomic_write_bytes(out_dir / HOSTS_FILE, json.dumps(sorted(actors)).encode())
        return actors[host]

    counters: Counter = Counter()
    waiting: set[str] = set()  # hosts with URLs queued inside their actor
    deferred: dict[str, float] = {}  # host -> when its unreachable robots.txt may be asked again
    unreachable: set[str] = set()  # hosts whose robots.txt stayed unreachable: their URLs wait
    hosts_file = out_dir / HOSTS_FILE
    for host in json.loads(hosts_file.read_text()) if hosts_file.exists() else []:
        state = ray.get(actor(host).state.remote())
        counters["pages_restored"] += state["fetched"]
        if state["pending"]:
            waiting.add(host)
    new: dict[str, list[tuple[str, int]]] = defaultdict(list)  # URLs to hand to each host
    routed: set[str] = set()
    for seed in config.all_seeds():
        routed.add(seed)
        new[host_key(seed)].append((seed, 0))
    unreserved = config.max_pages - counters["pages_restored"]
    running: dict[ray.ObjectRef, tuple[str, int]] = {}
    while running or (unreserved > 0 and (new or waiting or deferred)):
        now = time.monotonic()
        for host in [h for h, at in deferred.items() if at <= now]:
            del deferred[host]
            waiting.add(host)
        if not running and not new and not waiting:  # only hosts waiting for their robots.txt
            time.sleep(max(0.0, min(deferred.values()) - now))
            continue
        busy = {host for host, _ in running.values()}
        ready = sorted(h for h in set(new) | waiting if h not in busy)
        for host in ready[: max(0, config.max_concurrent_hosts - len(running))]:
            if unreserved <= 0:
                break
            grant = max(1, min(PAGES_PER_CALL, unreserved // max(1, len(ready))))
            unreserved -= grant
            running[actor(host).crawl.remote(new.pop(host, []), grant)] = (host, grant)
            waiting.discard(host)
        if not running:
            break
        (done,), _ = ray.wait(list(running), num_returns=1)
        host, grant = running.pop(done)
        result = ray.get(done)
        unreserved += grant - result["fetched"]
        counters["pages_fetched"] += result["fetched"]
        counters["retries"] += result["retries"]
        counters["fetch_failures"] += result["failures"]
        counters.update({f"failed.{k}": v for k, v in result["failure_reasons"].items()})
        if "robots_unreachable" in result:  # nothing fetched: RFC 9309 disallows the host meanwhile
            if result["robots_unreachable"] < config.robots_attempts:
                deferred[host] = time.monotonic() + result["robots_retry_in"]
            else:
                unreachable.add(host)
        elif result["pending"]:
            waiting.add(host)
        for url, depth in result["external"]:
            if url not in routed:
                routed.add(url)
                new[host_key(url)].append((url, depth))
        if on_progress:
            on_progress(counters["pages_restored"] + counters["pages_fetched"])
    states = ray.get([a.state.remote() for a in actors.values()])
    left = sum(s["pending"] for s in states if s["host"] not in unreachable | set(deferred))
    counters["urls_not_fetched_max_pages"] = left + sum(map(len, new.values()))
    if unreachable or deferred:
        counters["hosts_robots_unreachable"] = len(unreachable | set(deferred))
        counters["urls_not_fetched_robots_unreachable"] = sum(
            s["pending"] for s in states if s["host"] in unreachable | set(deferred)
        )
    counters["hosts"] = len(actors)
    warc_files = {
        name: n for files in ray.get([a.close.remote() for a in actors.values()]) for name, n in files.items()
    }
    for a in actors.values():
        ray.kill(a)
    return [file_entry(out_dir / name, rows=n) for name, n in sorted(warc_files.items())], dict(counters)
