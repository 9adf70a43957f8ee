"""Distributed crawl: one Ray actor per host, so per-host politeness holds across the cluster."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from ingestion.crawler import CrawlConfig, HostCrawler, host_key
from orchestration.datasets import file_entry

# Crawling waits on the network, not the CPU: actors take no CPU slot so they never starve stages.
_HostCrawlerActor = ray.remote(num_cpus=0)(HostCrawler)


def run_crawl(
    config: CrawlConfig, out_dir: str | Path, on_progress: Callable[[int], None] | None = None
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Crawl from the seeds until the frontier is empty or ``max_pages`` pages were fetched.

    Returns the WARC file entries and counters (pages fetched, failures, hosts, URLs left unfetched).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    actors: dict[str, Any] = {}
    routed: set[str] = set()
    frontier: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for seed in config.seeds:
        frontier[host_key(seed)].append((seed, 0))
        routed.add(seed)
    counters: Counter = Counter()
    budget = config.max_pages
    while frontier and budget > 0:
        per_host = max(1, budget // len(frontier))
        calls = {}
        for host, urls in frontier.items():
            if host not in actors:
                actors[host] = _HostCrawlerActor.remote(host, config, str(out_dir))
            calls[actors[host].crawl.remote(urls, per_host)] = host
        frontier = defaultdict(list)
        for result in ray.get(list(calls)):
            budget -= result["fetched"]
            counters["pages_fetched"] += result["fetched"]
            counters["fetch_failures"] += result["failures"]
            counters.update({f"failed.{k}": v for k, v in result["failure_reasons"].items()})
            if result["pending"]:
                frontier[result["host"]].extend(result["pending"])
            for url, depth in result["external"]:
                if url not in routed:
                    routed.add(url)
                    frontier[host_key(url)].append((url, depth))
        if on_progress:
            on_progress(counters["pages_fetched"])
    counters["urls_not_fetched_max_pages"] = sum(len(v) for v in frontier.values())
    counters["hosts"] = len(actors)
    warc_files = {
        name: n for files in ray.get([a.close.remote() for a in actors.values()]) for name, n in files.items()
    }
    for actor in actors.values():
        ray.kill(actor)
    return [file_entry(out_dir / name, rows=n) for name, n in sorted(warc_files.items())], dict(counters)
