"""The frontiers on disk: a host's queue and seen-set, the driver's routed links; memory that does not
follow the number of URLs."""

import json
import tracemalloc

import psutil
import pytest

from ingestion.frontier import Frontier, RouteBook

pytestmark = pytest.mark.unit


def test_the_frontier_queues_each_url_once_in_order_and_survives_a_kill(tmp_path):
    path = tmp_path / "frontier-a.sqlite"
    frontier = Frontier(path)
    assert frontier.add("http://a/1", 0) and frontier.add("http://a/2", 1) and frontier.add("http://a/3", 1)
    assert not frontier.add("http://a/1", 5)  # seen: not queued again, depth kept
    assert "http://a/2" in frontier and "http://a/9" not in frontier
    assert frontier.take() == ("http://a/1", 0)
    frontier.done("http://a/1")
    assert frontier.take() == ("http://a/2", 1)  # taken, not done, when the process dies
    frontier.commit()
    assert frontier.pending() == 2
    frontier._db.close()  # no close(): as a kill leaves it

    again = Frontier(path)
    assert again.pending() == 2
    assert again.take() == ("http://a/2", 1)  # queued again, still first in line
    assert again.take() == ("http://a/3", 1)
    assert again.take() is None
    again.release()
    assert again.pending() == 2
    again.mark_done(["http://a/2", "http://a/7"])  # pages found in the WARC files
    assert again.pending() == 1 and "http://a/7" in again
    again.close()


def test_an_earlier_versions_journal_is_taken_over(tmp_path):
    journal = tmp_path / "frontier-a.jsonl"
    lines = [
        {"url": "http://a/", "depth": 0},
        {"url": "http://a/x", "depth": 1},
        {"done": "http://a/"},
        {"url": "http://a/y", "depth": 1},
    ]
    journal.write_text("\n".join(map(json.dumps, lines)) + '\n{"url": "http://a/cut')
    frontier = Frontier(tmp_path / "frontier-a.sqlite", legacy_journal=journal)
    assert frontier.pending() == 2 and "http://a/" in frontier
    assert [frontier.take(), frontier.take(), frontier.take()] == [("http://a/x", 1), ("http://a/y", 1), None]


def test_a_million_urls_queued_cost_no_memory(tmp_path):
    frontier = Frontier(tmp_path / "frontier-big.sqlite")
    rss_before = psutil.Process().memory_info().rss
    tracemalloc.start()
    for i in range(300_000):
        frontier.add(f"http://big.example/page/{i:07d}?q=1", 1)
        if i % 10_000 == 0:
            frontier.commit()
    frontier.commit()
    for i in range(0, 300_000, 1000):  # lookups of seen URLs
        assert f"http://big.example/page/{i:07d}?q=1" in frontier
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # 300k URLs as a Python set and deque would be ~50 MB; here only SQLite's page cache (8 MiB, not
    # traced by tracemalloc: allocated by SQLite) and a few rows in flight.
    assert peak < 2 * 2**20
    assert psutil.Process().memory_info().rss - rss_before < 25 * 2**20  # SQLite's own memory included
    assert frontier.pending() == 300_000
    assert frontier.take() == ("http://big.example/page/0000000?q=1", 1)
    frontier.close()


def test_routes_are_handed_once_and_links_routed_meanwhile_keep_waiting(tmp_path):
    path = tmp_path / "routes.sqlite"
    book = RouteBook(path)
    book.route([("http://b/1", "http://b", 1), ("http://c/1", "http://c", 2), ("http://b/1", "http://b", 1)])
    assert book.hosts == {"http://b", "http://c"}
    urls, last = book.waiting("http://b")
    assert urls == [("http://b/1", 1)]
    book.route([("http://b/2", "http://b", 3)])  # while b's crawl call runs
    book.handed("http://b", last)
    assert book.hosts == {"http://b", "http://c"}  # b/2 still waits
    assert book.waiting("http://b")[0] == [("http://b/2", 3)]
    book.route([("http://b/1", "http://b", 1)])  # routed before: never again
    assert book.count_waiting() == 2
    book.close()
    reopened = RouteBook(path)  # a killed driver's links are all still there
    assert reopened.hosts == {"http://b", "http://c"} and reopened.count_waiting() == 2
    reopened.close()


def test_a_file_an_os_crash_left_unreadable_is_set_aside_and_the_host_starts_over(tmp_path):
    path = tmp_path / "frontier-a.sqlite"
    path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)  # a header, then garbage
    frontier = Frontier(path)
    assert frontier.add("http://a/", 0) and frontier.take() == ("http://a/", 0)
    frontier.close()
    assert (tmp_path / "frontier-a.sqlite.corrupt").read_bytes().endswith(b"\xff" * 100)
