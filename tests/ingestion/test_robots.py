"""robots.txt as RFC 9309 says, against a real local server's request log: the RFC's own examples (groups,
wildcards, ``$``, longest match), unreachable (5xx) means disallowed until it answers, 4xx means allowed,
and redirects are followed up to five hops. Expected sets are read off the RFC's text by hand."""

import json
import time

import pytest

from ingestion.crawler import CrawlConfig, HostCrawler, Robots, host_key
from tests.ingestion.sites import html_page

# RFC 9309 section 5.1, verbatim but for the EOF marker.
RFC_EXAMPLE = b"""User-Agent: *
Disallow: *.gif$
Disallow: /example/
Allow: /publications/

User-Agent: foobot
Disallow:/
Allow:/example/page.html
Allow:/example/allowed.gif

User-Agent: barbot
User-Agent: bazbot
Disallow: /example/page.html

User-Agent: quxbot
"""
# Section 5.2: the longest match wins.
RFC_LONGEST = b"""User-Agent: foobot
Allow: /example/page/
Disallow: /example/page/disallowed.gif
"""
PATHS = [
    "/",
    "/example/page.html",
    "/example/allowed.gif",
    "/example/other.html",
    "/publications/paper.html",
    "/a.gif",
    "/a.gif?size=2",
    "/example/page/",
    "/example/page/disallowed.gif",
]


def crawl_paths(handler, base, tmp_path, robots, agent="lmforge-crawler/0.1", close=True, **config):
    """Seeds every path (links play no part), crawls, returns the paths the server was asked for."""
    handler.pages.update({p: (200, "text/html", html_page()) for p in PATHS})
    if robots is not None:
        handler.pages["/robots.txt"] = robots
    cfg = CrawlConfig(
        seeds=[base + p for p in PATHS],
        min_delay_s=0.0,
        allow_private_addresses=True,
        sitemaps=False,
        user_agent=agent,
        max_retries=0,
        **config,
    )
    crawler = HostCrawler(host_key(base), cfg, str(tmp_path))
    result = crawler.crawl([(u, 0) for u in cfg.seeds], budget=100)
    if close:
        crawler.close()
    return result, crawler, [p for p, _ in handler.hits if p != "/robots.txt"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("robots", "agent", "allowed"),
    [
        # foobot's own group: everything disallowed but its two Allow lines.
        (RFC_EXAMPLE, "foobot/2.1", {"/example/page.html", "/example/allowed.gif"}),
        # barbot and bazbot share one group; the product token matches case-insensitively.
        (RFC_EXAMPLE, "BazBot/1.0", set(PATHS) - {"/example/page.html"}),
        # quxbot's group has no rules: everything allowed, the * group does not apply to it.
        (RFC_EXAMPLE, "quxbot", set(PATHS)),
        # Any other agent: the * group. "*.gif$" ends at .gif only; "/example/" covers its subtree.
        (RFC_EXAMPLE, "lmforge-crawler/0.1", {"/", "/publications/paper.html", "/a.gif?size=2"}),
        # The longest match between Allow and Disallow decides; no group for us means everything allowed.
        (RFC_LONGEST, "foobot", set(PATHS) - {"/example/page/disallowed.gif"}),
        (RFC_LONGEST, "lmforge-crawler/0.1", set(PATHS)),
    ],
    ids=["own-group", "shared-group", "empty-group", "star-group", "longest-match", "no-group"],
)
def test_rfc9309_examples_against_the_request_log(site, tmp_path, robots, agent, allowed):
    handler, base = site
    result, crawler, asked = crawl_paths(handler, base, tmp_path, (200, "text/plain", robots), agent)
    assert sorted(asked) == sorted(allowed)  # each allowed page once, no disallowed page ever
    assert result["fetched"] == len(allowed)
    assert result["failure_reasons"].get("robots_disallowed", 0) == len(PATHS) - len(allowed)


@pytest.mark.unit
def test_allow_and_disallow_of_equal_length_allow():
    """RFC 9309 2.2.2: when an Allow and a Disallow rule match equally, Allow is used."""
    robots = Robots(b"User-agent: *\nAllow: /folder\nDisallow: /folder\n", "a", "http://h")
    assert robots.allows("http://h/folder/page")
    robots = Robots(b"User-agent: *\nAllow: /$\nDisallow: /\n", "a", "http://h")
    assert robots.allows("http://h/") and not robots.allows("http://h/page")


@pytest.mark.unit
@pytest.mark.parametrize("status", [401, 403, 404, 410])
def test_an_unavailable_robots_txt_allows_everything(site, tmp_path, status):
    handler, base = site
    _, _, asked = crawl_paths(handler, base, tmp_path, (status, "text/plain", b"Disallow: /"))
    assert sorted(asked) == sorted(PATHS)


@pytest.mark.unit
def test_an_unreachable_robots_txt_disallows_the_host_until_it_answers(site, tmp_path):
    handler, base = site
    answers = iter([503, 500])

    def robots(h):
        status = next(answers, 200)
        body = b"User-agent: *\nDisallow: /a.gif\n" if status == 200 else b"down"
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    result, crawler, asked = crawl_paths(handler, base, tmp_path, robots, close=False, robots_retry_s=0.3)
    assert asked == [] and result["fetched"] == 0 and result["pending"] == len(PATHS)
    assert result["robots_unreachable"] == 1 and 0.25 < result["robots_retry_in"] <= 0.3
    result = crawler.crawl([], budget=100)
    assert result["robots_unreachable"] == 1  # too early to ask again: no request at all
    time.sleep(0.3)
    result = crawler.crawl([], budget=100)
    assert result["robots_unreachable"] == 2 and result["robots_retry_in"] > 0.5  # doubled
    time.sleep(result["robots_retry_in"])
    result = crawler.crawl([], budget=100)
    crawler.close()
    assert "robots_unreachable" not in result and result["fetched"] == len(PATHS) - 2  # /a.gif, /a.gif?size=2
    robots_at = [i for i, (p, _) in enumerate(handler.hits) if p == "/robots.txt"]
    assert len(robots_at) == 3 and robots_at[-1] < min(
        i for i, (p, _) in enumerate(handler.hits) if p != "/robots.txt"
    )
    assert not {"/a.gif", "/a.gif?size=2"} & {p for p, _ in handler.hits}
    log = [json.loads(x) for x in (tmp_path / f"crawl-log-{crawler.slug}.jsonl").read_text().splitlines()]
    assert sum("robots.txt unreachable" in (e["error"] or "") for e in log) == 2


@pytest.mark.unit
@pytest.mark.parametrize("hops", [5, 6])
def test_robots_txt_redirects_are_followed_five_hops(site, tmp_path, hops):
    """Five redirects reach the rules (RFC 9309 2.3.1.2); a sixth makes it unavailable: allow all."""
    handler, base = site
    chain = ["/robots.txt"] + [f"/robots-{i}.txt" for i in range(1, hops + 1)]
    for here, there in zip(chain, chain[1:]):
        handler.pages[here] = lambda h, there=there: (
            h.send_response(301),
            h.send_header("Location", there),
            h.send_header("Content-Length", "0"),
            h.end_headers(),
        )
    handler.pages[chain[-1]] = (200, "text/plain", b"User-agent: *\nDisallow: /example/\n")
    handler.pages.update({p: (200, "text/html", html_page()) for p in PATHS})
    _, _, asked = crawl_paths(handler, base, tmp_path, None)
    pages = [p for p in asked if not p.startswith("/robots-")]
    followed = [p for p in asked if p.startswith("/robots-")]
    assert followed == chain[1 : 1 + min(hops, 5)]
    if hops == 5:
        assert sorted(pages) == sorted(p for p in PATHS if not p.startswith("/example/"))
    else:
        assert sorted(pages) == sorted(PATHS)


@pytest.mark.integration
def test_the_crawl_waits_for_an_unreachable_robots_txt_and_leaves_a_dead_one_waiting(
    ray_session, three_hosts, tmp_path
):
    """Across actors: a host whose robots.txt answers 503 once is crawled after its retry; one that never
    answers is never fetched from, and its URLs are counted as waiting, not lost or called done."""
    from orchestration.crawl import run_crawl

    (flaky, flaky_url), (dead, dead_url), (fine, fine_url) = three_hosts
    answers = iter([503])

    def flaky_robots(h):
        status = next(answers, 404)
        h.send_response(status)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def dead_robots(h):
        h.send_response(503)
        h.send_header("Content-Length", "0")
        h.end_headers()

    for handler, _ in three_hosts:
        handler.pages["/"] = (200, "text/html", html_page("/a.html"))
        handler.pages["/a.html"] = (200, "text/html", html_page())
    flaky.pages["/robots.txt"], dead.pages["/robots.txt"] = flaky_robots, dead_robots
    config = CrawlConfig(
        seeds=[u + "/" for _, u in three_hosts],
        min_delay_s=0.0,
        allow_private_addresses=True,
        sitemaps=False,
        max_retries=0,
        robots_retry_s=0.2,
        robots_attempts=2,
    )
    files, counters = run_crawl(config, tmp_path)
    assert counters["pages_fetched"] == 4 and sum(f["rows"] for f in files) == 4  # flaky's 2 + fine's 2
    assert [p for p, _ in dead.hits] == ["/robots.txt", "/robots.txt"]
    assert [p for p, _ in flaky.hits] == ["/robots.txt", "/robots.txt", "/", "/a.html"]
    assert counters["hosts_robots_unreachable"] == 1 and counters["urls_not_fetched_robots_unreachable"] == 1
    assert counters["urls_not_fetched_max_pages"] == 0
