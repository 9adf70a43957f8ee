"""A polite crawler that writes gzip WARC files.

``HostCrawler`` owns exactly one host: it reads robots.txt as RFC 9309 says (through Protego), keeps
the per-host delay between requests, and crawls breadth-first within the host. Links to other hosts are
handed back to the caller, which routes them to that host's queue (orchestration's crawl workers hold
each host in one worker at a time), so politeness holds however many workers run.
"""

from __future__ import annotations

import email.utils
import io
import ipaddress
import json
import os
import re
import socket
import threading
import time
import zlib
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

import lxml.etree
import lxml.html
import requests
import requests.adapters
import urllib3
import urllib3.util.connection
from protego import Protego
from pydantic import Field, field_validator
from w3lib.url import canonicalize_url
from warcio.archiveiterator import ArchiveIterator
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from core.stage import StageConfig
from ingestion.frontier import Frontier


class CrawlConfig(StageConfig):
    """Scope, politeness and limits of a crawl."""

    seeds: list[str] = Field(default_factory=list, description="Start URLs (http or https).")
    seeds_file: Path | None = Field(None, description="A file of start URLs, one per line (# comments).")
    allowed_domains: list[str] = Field(
        default_factory=list, description="Hosts that may be crawled; empty means the seeds' hosts."
    )
    include_patterns: list[str] = Field(
        default_factory=list, description="Regexes; when set, only URLs matching one are crawled."
    )
    exclude_patterns: list[str] = Field(default_factory=list, description="Regexes of URLs never crawled.")
    sitemaps: bool = Field(
        True, description="Queue the URLs of each host's sitemap.xml (and robots.txt Sitemap:)."
    )
    max_pages: int = Field(1000, ge=1, description="Stop after this many successful page fetches.")
    max_depth: int = Field(10, ge=0, description="Link hops from a seed.")
    min_delay_s: float = Field(1.0, ge=0, description="Minimum gap between requests to one host.")
    host_concurrency: int = Field(1, ge=1, le=16, description="Requests in flight to one host at most.")
    user_agent: str = Field("lmforge-crawler/0.1 (+https://github.com/lmforge/lmforge)", min_length=1)
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP connect timeout per request.")
    read_timeout_s: float = Field(30.0, gt=0, description="Timeout between received bytes.")
    total_timeout_s: float = Field(60.0, gt=0, description="Wall-clock limit for one fetch.")
    max_body_bytes: int = Field(10 * 2**20, gt=0, description="Bodies larger than this are cut and recorded.")
    max_redirects: int = Field(5, ge=0, description="Redirect hops followed per URL.")
    max_retries: int = Field(3, ge=0, description="Retries after a connection error, 429 or 5xx.")
    backoff_base_s: float = Field(1.0, ge=0, description="First retry wait; doubles each retry.")
    backoff_max_s: float = Field(
        60.0, ge=0, description="Longest wait between retries (Retry-After included)."
    )
    max_concurrent_hosts: int = Field(64, ge=1, description="Hosts crawled at once across the cluster.")
    workers: int | None = Field(
        None,
        ge=1,
        description="The most crawl worker processes serving all hosts, one host at a time each, started as "
        "hosts become ready (null: 4 per CPU of the cluster, at most max_concurrent_hosts).",
    )
    robots_attempts: int = Field(
        3,
        ge=1,
        description="Fetches of an unreachable robots.txt (5xx or network error: the host is disallowed "
        "meanwhile, RFC 9309 2.3.1.4) before its URLs are left waiting for a later crawl.",
    )
    robots_retry_s: float = Field(
        60.0, ge=0, description="Wait before asking an unreachable robots.txt again; doubles each time."
    )
    content_types: list[str] = Field(default_factory=lambda: ["text/html", "application/xhtml+xml"])
    allow_private_addresses: bool = Field(
        False, description="Allow loopback/private/link-local targets (local sites and tests only)."
    )
    warc_max_bytes: int = Field(256 * 2**20, gt=0, description="Rotate WARC files past this size.")

    @field_validator("seeds")
    @classmethod
    def _seeds_are_http(cls, seeds: list[str]) -> list[str]:
        return [_checked_seed(u) for u in seeds]

    @field_validator("include_patterns", "exclude_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"bad URL pattern {pattern!r}: {e}") from e
        return patterns

    def all_seeds(self) -> list[str]:
        """The seeds and the seeds file's URLs, canonical, without repeats."""
        seeds = list(self.seeds)
        if self.seeds_file is not None:
            if not self.seeds_file.is_file():
                raise FileNotFoundError(f"crawl.seeds_file {self.seeds_file} does not exist")
            for line in self.seeds_file.read_text(encoding="utf-8").splitlines():
                if url := line.split("#", 1)[0].strip():
                    seeds.append(_checked_seed(url))
        return list(dict.fromkeys(seeds))

    def hosts_allowed(self) -> set[str]:
        return {h.lower() for h in self.allowed_domains} or {urlsplit(u).hostname for u in self.all_seeds()}

    def in_scope(self, url: str, hosts: set[str]) -> bool:
        """An allowed host (``hosts_allowed()``), and the include / exclude patterns agree."""
        if urlsplit(url).hostname not in hosts:
            return False
        if self.include_patterns and not any(re.search(p, url) for p in self.include_patterns):
            return False
        return not any(re.search(p, url) for p in self.exclude_patterns)


def _checked_seed(url: str) -> str:
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
        raise ValueError(f"seed {url!r} is not an absolute http(s) URL")
    return canonical_url(url)


def canonical_url(url: str) -> str:
    """One spelling per page: w3lib's canonicalize_url (lower-case scheme and host, no fragment, '/' for an
    empty path, query arguments sorted, one percent-encoding, dot segments resolved), then what it leaves
    alone: no default port and no user info."""
    url = canonicalize_url(url.strip())
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if ":" in host:  # an IPv6 literal keeps its brackets: http://[::1]:8000/
        host = f"[{host}]"
    port = parts.port
    netloc = host if port is None or (scheme, port) in (("http", 80), ("https", 443)) else f"{host}:{port}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def host_key(url: str) -> str:
    """The politeness unit: scheme://host[:port]."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class Redirected(Exception):
    """A redirect to another host in scope: that host's crawler fetches the target."""

    def __init__(self, target: str):
        super().__init__(target)
        self.target = target


class FetchRefused(Exception):
    """A URL the crawler will not fetch (scope, robots, address policy)."""


def checked_address(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to for ``host``: resolved once, refused if any of its addresses is loopback,
    private, link-local, reserved or multicast (unless ``allow_private``). The crawler connects to exactly
    this address (``pinned_adapter``), so a DNS answer that changes between check and connect (rebinding)
    never reaches a private address."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FetchRefused(f"dns: {e}") from e
    if not allow_private:
        for info in infos:
            ip = ipaddress.ip_address(info[4][0])
            if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
                raise FetchRefused(
                    f"address {ip} of {host} is not public; set crawl.allow_private_addresses: true for local sites"
                )
    return infos[0][4][0]


class _PinnedConnection:
    """A urllib3 connection that dials a fixed, already checked address; the Host header, TLS server
    name and certificate check keep the URL's host name."""

    pinned_address = ""

    def _new_conn(self) -> socket.socket:
        try:
            return urllib3.util.connection.create_connection(
                (self.pinned_address, self.port),
                self.timeout,
                source_address=self.source_address,
                socket_options=self.socket_options,
            )
        except TimeoutError as e:
            raise urllib3.exceptions.ConnectTimeoutError(self, f"connection to {self.host} timed out") from e
        except OSError as e:
            raise urllib3.exceptions.NewConnectionError(self, f"failed to connect to {self.host}: {e}") from e


def pinned_adapter(address: str) -> requests.adapters.HTTPAdapter:
    """A requests adapter whose connections all go to ``address``."""
    pools = {}
    for scheme, pool_cls in (("http", urllib3.HTTPConnectionPool), ("https", urllib3.HTTPSConnectionPool)):
        conn = type(
            "Pinned" + pool_cls.ConnectionCls.__name__, (_PinnedConnection, pool_cls.ConnectionCls), {}
        )
        conn.pinned_address = address
        pools[scheme] = type("Pinned" + pool_cls.__name__, (pool_cls,), {"ConnectionCls": conn})
    adapter = requests.adapters.HTTPAdapter()
    adapter.poolmanager.pool_classes_by_scheme = pools
    return adapter


class HostCrawler:
    """Crawls one host politely into rotating gzip WARC files and a JSONL crawl log.

    Every URL it queues and finishes is a row of its frontier on disk (``frontier-<host>.sqlite``,
    ingestion/frontier.py: the queue and the seen-set, so a host with millions of URLs queued costs no
    memory) and every page goes to the WARC files, so a crawler started again on the same output directory
    resumes: it re-reads the WARC files (cutting a record left half-written by a kill), marks the pages
    they hold done, and goes on with the URLs still queued.
    """

    def __init__(self, host: str, config: CrawlConfig, out_dir: str):
        self.host = host
        self.config = config
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()  # one requests.Session per fetching thread
        self._sessions: list[requests.Session] = []
        self._adapters: dict[str, requests.adapters.HTTPAdapter] = {}  # host key -> its pinned address
        self._lock = threading.RLock()  # queue, seen, counters and output, with host_concurrency > 1
        self._turn = threading.Lock()  # request starts, one at a time, spaced by the delay
        # One file name per scheme + host + port: https://a.com:8000 -> https_a.com_8000 (http and https of
        # one host are two politeness units with files of their own).
        self.slug = re.sub(r"[^A-Za-z0-9.-]", "_", f"{urlsplit(host).scheme}_{urlsplit(host).netloc}")
        self._beyond_depth: set[str] = set()  # in-scope links on pages at max_depth, never queued
        self.allowed = config.hosts_allowed()
        self.fetched = 0
        self.retries = 0
        self._last_request = 0.0
        self._pause_until = 0.0
        self._robots: Robots | None = None
        self._robots_attempts = 0
        self._robots_retry_at = 0.0
        self._warc_index = 0
        self._warc_files: dict[str, int] = {}  # file name -> response records
        self._warc_name = ""
        self._warc = None
        self.frontier = Frontier(
            self.out_dir / f"frontier-{self.slug}.sqlite",
            legacy_journal=self.out_dir / f"frontier-{self.slug}.jsonl",  # earlier versions' journal
        )
        self._restore()
        self._log = open(self.out_dir / f"crawl-log-{self.slug}.jsonl", "a", encoding="utf-8")

    def _restore(self) -> None:
        """Resume from an earlier run's WARC files: their pages are done, whatever the frontier says (a
        kill can fall between writing a page and committing it done)."""
        own = re.compile(rf"{re.escape(self.slug)}-\d{{5,}}\.warc\.gz")  # not another host's "a.com-b.org"
        for path in sorted(p for p in self.out_dir.glob(f"{self.slug}-*.warc.gz") if own.fullmatch(p.name)):
            urls = _warc_responses(path)
            self.frontier.mark_done(urls)
            self._warc_files[path.name] = len(urls)
            self._warc_index = max(self._warc_index, int(path.name.rsplit("-", 1)[1].split(".")[0]) + 1)
        self.fetched = sum(self._warc_files.values())
        self.frontier.commit()

    def state(self) -> dict:
        """Pages already in the WARC files and URLs waiting, as restored."""
        return {"host": self.host, "fetched": self.fetched, "pending": self.frontier.pending()}

    # -- politeness ---------------------------------------------------------------------------------
    def _delay(self) -> float:
        return max(self.config.min_delay_s, self._robots.delay if self._robots else 0.0)

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            session = requests.Session()
            session.headers["User-Agent"] = self.config.user_agent
            # The environment's settings once per session, not per request (requests scans os.environ
            # for proxies on every call: a tenth of a crawl worker's time); no ~/.netrc credentials sent
            # to crawled sites.
            session.trust_env = False
            session.proxies = requests.utils.get_environ_proxies(self.host)
            session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return self._local.session

    def _pin(self, url: str) -> None:
        """Resolve and check the URL's host once per crawler; this thread's session then connects to
        that address only (robots.txt redirects may name other hosts: each gets its own)."""
        key = host_key(url)
        with self._lock:
            adapter = self._adapters.get(key)
            if adapter is None:
                parts = urlsplit(url)
                port = parts.port or (443 if parts.scheme == "https" else 80)
                address = checked_address(parts.hostname or "", port, self.config.allow_private_addresses)
                adapter = self._adapters[key] = pinned_adapter(address)
        if self.session.get_adapter(url) is not adapter:
            self.session.mount(key + "/", adapter)

    def _wait_turn(self) -> None:
        """Sleep until ``delay`` after the last request ended (and any Retry-After pause is over)."""
        with self._turn:
            wait = max(self._last_request + self._delay(), self._pause_until) - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last_request = time.monotonic()

    def _load_robots(self) -> None:
        """robots.txt as RFC 9309 reads it: 2xx rules apply (after up to 5 redirects, to any host);
        4xx means no rules; 5xx or a network error means unreachable: nothing is fetched, and it is asked
        again after ``robots_retry_s`` (doubling), ``robots_attempts`` times in all."""
        url = self.host + "/robots.txt"
        self._robots_attempts += 1
        try:
            for _ in range(ROBOTS_REDIRECTS + 1):
                status, _, body, resp = self._get(url)
                if status not in REDIRECT_STATUSES or "Location" not in resp.headers:
                    break
                url = canonical_url(urljoin(url, resp.headers["Location"]))
            else:  # more than five redirects: RFC 9309 lets a crawler read that as unavailable (4xx)
                status, body = 404, b""
        except FetchRefused as e:  # address policy or limits: every page of the host meets them too
            self._record(url, None, 0, 0.0, f"robots.txt refused: {e}")
            status, body = 404, b""
        except requests.RequestException as e:
            self._record(url, None, 0, 0.0, f"robots.txt unreachable: {type(e).__name__}: {e}")
            status = 599
        if status >= 500:
            self._record(url, status, 0, 0.0, "robots.txt unreachable: the host is disallowed meanwhile")
            self._robots_retry_at = time.monotonic() + self.config.robots_retry_s * 2 ** (
                self._robots_attempts - 1
            )
            return
        self._robots = Robots(body if 200 <= status < 300 else b"", self.config.user_agent, self.host)

    # -- fetching -----------------------------------------------------------------------------------
    def _get(self, url: str) -> tuple[int, str, bytes, requests.Response]:
        """One GET (no redirects followed) with address policy, per-host delay, size and time limits,
        retried with exponential backoff after a connection error, 429 or 5xx (Retry-After honoured:
        the whole host waits)."""
        self._pin(url)
        cfg = self.config
        for attempt in range(cfg.max_retries + 1):
            self._wait_turn()
            retry_after = None
            try:
                status, ctype, body, resp = self._get_once(url)
            except (requests.ConnectionError, requests.Timeout):
                if attempt == cfg.max_retries:
                    raise
            else:
                if status != 429 and status < 500 or attempt == cfg.max_retries:
                    return status, ctype, body, resp
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            wait = (
                min(cfg.backoff_max_s, cfg.backoff_base_s * 2**attempt)
                if retry_after is None
                else retry_after
            )
            if wait > cfg.backoff_max_s:
                raise FetchRefused(f"Retry-After {wait:.0f}s exceeds backoff_max_s={cfg.backoff_max_s}")
            with self._lock:
                self.retries += 1
                self._pause_until = max(self._pause_until, time.monotonic() + wait)
        raise AssertionError("unreachable")

    def _get_once(self, url: str) -> tuple[int, str, bytes, requests.Response]:
        try:
            return self._read_response(url)
        finally:  # the delay runs from the end of every fetch, whatever its outcome: never closer
            self._last_request = time.monotonic()

    def _read_response(self, url: str) -> tuple[int, str, bytes, requests.Response]:
        cfg = self.config
        start = time.monotonic()
        resp = self.session.get(
            url,
            stream=True,
            allow_redirects=False,
            timeout=(cfg.connect_timeout_s, min(cfg.read_timeout_s, cfg.total_timeout_s)),
        )
        with resp:
            chunks, size = [], 0
            while True:
                # read1: whatever has arrived (decoded, at most 64 KiB), so a server dripping bytes
                # meets the total time limit and a compressed bomb meets the size limit chunk by chunk.
                try:
                    chunk = resp.raw.read1(64 * 1024, decode_content=True)
                except urllib3.exceptions.HTTPError as e:
                    raise requests.ConnectionError(f"reading the body: {e}") from e
                if not chunk:
                    break
                size += len(chunk)
                if size > cfg.max_body_bytes:
                    raise FetchRefused(f"body exceeds max_body_bytes={cfg.max_body_bytes}")
                if time.monotonic() - start > cfg.total_timeout_s:
                    raise FetchRefused(f"fetch exceeded total_timeout_s={cfg.total_timeout_s}")
                chunks.append(chunk)
        return resp.status_code, resp.headers.get("Content-Type", ""), b"".join(chunks), resp

    def _fetch(self, url: str) -> tuple[str, int, str, bytes, requests.Response]:
        """GET following redirects within scope, re-checking policy on every hop."""
        for _ in range(self.config.max_redirects + 1):
            status, ctype, body, resp = self._get(url)
            if status in REDIRECT_STATUSES and "Location" in resp.headers:
                target = canonical_url(urljoin(url, resp.headers["Location"]))
                if host_key(target) != self.host:
                    if not self.config.in_scope(target, self.allowed):
                        raise FetchRefused(f"redirect to {target}, out of scope")
                    raise Redirected(target)  # the target host's crawler fetches it, politely
                with self._lock:
                    if target in self.frontier:
                        raise FetchRefused(f"redirect to {target} (already seen)")
                    self.frontier.seen(target)
                url = target
                continue
            return url, status, ctype, body, resp
        raise FetchRefused(f"more than max_redirects={self.config.max_redirects} redirects")

    # -- output -------------------------------------------------------------------------------------
    def _writer(self) -> WARCWriter:
        if self._warc is not None and self._warc.tell() > self.config.warc_max_bytes:
            self._warc.close()
            self._warc = None
        if self._warc is None:
            name = self._warc_name = f"{self.slug}-{self._warc_index:05d}.warc.gz"
            self._warc_index += 1
            self._warc_files[name] = 0
            self._warc = open(self.out_dir / name, "xb")  # never truncate a file that exists
        return WARCWriter(self._warc, gzip=True)

    def _write_records(self, url: str, resp: requests.Response, body: bytes, depth: int) -> None:
        writer = self._writer()
        req = resp.request
        path = urlsplit(url).path or "/"
        req_headers = StatusAndHeaders(
            f"GET {path} HTTP/1.1", list(req.headers.items()), is_http_request=True
        )
        writer.write_record(
            writer.create_warc_record(url, "request", payload=io.BytesIO(b""), http_headers=req_headers)
        )
        # Bodies are stored decoded, so drop the transfer headers that described the encoded form.
        headers = [
            (k, v)
            for k, v in resp.headers.items()
            if k.lower() not in ("content-encoding", "transfer-encoding", "content-length")
        ]
        headers.append(("Content-Length", str(len(body))))
        http_headers = StatusAndHeaders(f"{resp.status_code} {resp.reason}", headers, protocol="HTTP/1.1")
        writer.write_record(
            writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http_headers)
        )
        meta = json.dumps({"depth": depth, "user_agent": self.config.user_agent}).encode()
        writer.write_record(
            writer.create_warc_record(
                url, "metadata", payload=io.BytesIO(meta), warc_content_type="application/json"
            )
        )
        self._warc.flush()
        self._warc_files[self._warc_name] += 1

    def _record(self, url: str, status: int | None, size: int, seconds: float, error: str | None) -> None:
        entry = {"url": url, "status": status, "bytes": size, "seconds": round(seconds, 4), "error": error}
        entry["time"] = datetime.now(timezone.utc).isoformat()
        with self._lock:
            self._log.write(json.dumps(entry) + "\n")
            self._log.flush()

    # -- crawl --------------------------------------------------------------------------------------
    def _queue_new(self, urls: list[tuple[str, int]]) -> None:
        """Queue the URLs of this host that are in scope and were not seen before; committed."""
        with self._lock:
            for url, depth in urls:
                if host_key(url) == self.host and self.config.in_scope(url, self.allowed):
                    self.frontier.add(url, depth)
            self.frontier.commit()

    def _sitemap_urls(self) -> list[str]:
        """<loc> URLs of the host's sitemaps (robots.txt Sitemap: lines, else /sitemap.xml), following
        sitemap indexes one level; failures are logged, never fatal."""
        found: list[str] = []
        todo = self._robots.sitemaps or [self.host + "/sitemap.xml"]
        for level in range(2):
            nested: list[str] = []
            for sitemap in todo[:50]:
                if host_key(sitemap) != self.host or not self._robots.allows(sitemap):
                    continue
                try:
                    status, _, body, _ = self._get(sitemap)
                except (requests.RequestException, FetchRefused) as e:
                    self._record(sitemap, None, 0, 0.0, f"sitemap: {type(e).__name__}: {e}")
                    continue
                if status != 200:
                    continue
                for kind, loc in sitemap_locations(body):
                    (nested if kind == "sitemap" and level == 0 else found).append(loc)
            todo = nested
        return found

    def crawl(self, urls: list[tuple[str, int]], budget: int) -> dict:
        """Fetch the waiting URLs and ``urls`` (url, depth), and everything they link to on this host,
        up to ``budget`` pages. Returns counts, the failures, the URLs still waiting, and links to other
        hosts for the caller to route."""
        cfg = self.config
        self._queue_new(urls)
        external: list[tuple[str, int]] = []
        failures: Counter = Counter()
        fetched_before, retries_before = self.fetched, self.retries
        if self._robots is None:
            if time.monotonic() >= self._robots_retry_at:
                self._load_robots()
            if self._robots is None:  # unreachable: the URLs wait in the frontier for the next ask
                return {
                    **self._result(fetched_before, retries_before, failures, external),
                    "robots_unreachable": self._robots_attempts,
                    "robots_retry_in": max(0.0, self._robots_retry_at - time.monotonic()),
                }
            if cfg.sitemaps:
                self._queue_new([(u, 1) for u in self._sitemap_urls()])
        in_flight = 0
        ready = threading.Condition(self._lock)

        def worker() -> None:
            nonlocal in_flight
            while True:
                with ready:
                    while True:
                        if self.fetched - fetched_before + in_flight >= budget:
                            return
                        if (taken := self.frontier.take()) is not None:
                            break
                        if not in_flight:
                            return
                        ready.wait()  # others may still queue links
                    url, depth = taken
                    in_flight += 1
                try:
                    outcome = self._visit(url, depth, external)
                except BaseException:
                    with ready:
                        in_flight -= 1
                        ready.notify_all()
                    raise
                with ready:
                    in_flight -= 1
                    if outcome is not None:
                        failures[outcome] += 1
                    self.frontier.done(url)
                    self.frontier.commit()
                    ready.notify_all()

        if cfg.host_concurrency == 1:
            worker()
        else:
            threads = [threading.Thread(target=worker) for _ in range(cfg.host_concurrency)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        with self._lock:
            self.frontier.release()  # a URL taken by a call that raised is queued again
            self.frontier.commit()
        return self._result(fetched_before, retries_before, failures, external)

    def _result(self, fetched_before: int, retries_before: int, failures: Counter, external: list) -> dict:
        return {
            "host": self.host,
            "fetched": self.fetched - fetched_before,
            "retries": self.retries - retries_before,
            "failures": sum(failures.values()),
            "failure_reasons": dict(failures),
            "pending": self.frontier.pending(),
            "external": external,
            "warc_files": dict(sorted(self._warc_files.items())),  # name -> response records
            "beyond_max_depth": len(self._beyond_depth),  # so far, this host
        }

    def _visit(self, url: str, depth: int, external: list[tuple[str, int]]) -> str | None:
        """Fetch one URL, write it, queue its links; the failure reason, or None."""
        if not self._robots.allows(url):
            self._record(url, None, 0, 0.0, "disallowed by robots.txt")
            return "robots_disallowed"
        start = time.monotonic()
        try:
            final_url, status, ctype, body, resp = self._fetch(url)
        except Redirected as e:
            self._record(
                url, None, 0, time.monotonic() - start, f"redirect to {e.target}: handed to its host"
            )
            with self._lock:
                external.append((e.target, depth))
            return None
        except (requests.RequestException, FetchRefused) as e:
            self._record(url, None, 0, time.monotonic() - start, f"{type(e).__name__}: {e}")
            return type(e).__name__
        elapsed = time.monotonic() - start
        mime = ctype.split(";")[0].strip().lower()
        if status != 200 or mime not in self.config.content_types:
            error = f"http {status}" if status != 200 else f"content-type {mime!r} not allowed"
            self._record(final_url, status, len(body), elapsed, error)
            return f"http_{status}" if status != 200 else "content_type"
        links = extract_links(final_url, body)
        with self._lock:
            self._write_records(final_url, resp, body, depth)
            self._record(final_url, status, len(body), elapsed, None)
            self.fetched += 1
            for link in links:
                if not self.config.in_scope(link, self.allowed):
                    continue
                if depth >= self.config.max_depth:  # counted (once), not followed
                    if link not in self.frontier:
                        self._beyond_depth.add(link)
                    continue
                if host_key(link) == self.host:
                    self.frontier.add(link, depth + 1)
                else:
                    external.append((link, depth + 1))
        return None

    def close(self) -> dict[str, int]:
        """Flush and close output; returns the WARC files written with their response-record counts."""
        if self._warc is not None:
            self._warc.close()
            self._warc = None
        self._log.close()
        self.frontier.close()
        for session in self._sessions:
            session.close()
        return dict(self._warc_files)


def _complete_gzip_members(path: Path) -> int:
    """Bytes of the file made of whole gzip members (one WARC record each): what a kill left intact."""
    end = position = 0
    inflate = zlib.decompressobj(31)
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            while chunk:
                try:
                    inflate.decompress(chunk)
                except zlib.error:
                    return end
                if inflate.eof:
                    position += len(chunk) - len(inflate.unused_data)
                    end, chunk = position, inflate.unused_data
                    inflate = zlib.decompressobj(31)
                else:
                    position += len(chunk)
                    chunk = b""
    return end


def _warc_responses(path: Path) -> list[str]:
    """URLs of the response records of a crawler WARC file, after cutting a record left incomplete."""
    complete = _complete_gzip_members(path)
    if complete < path.stat().st_size:
        with open(path, "r+b") as stream:
            stream.truncate(complete)
    with open(path, "rb") as stream:
        return [
            r.rec_headers.get_header("WARC-Target-URI")
            for r in ArchiveIterator(stream)
            if r.rec_type == "response"
        ]


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def sitemap_locations(body: bytes) -> list[tuple[str, str]]:
    """("url" | "sitemap", canonical <loc>) of a sitemap or sitemap index."""
    try:
        root = lxml.etree.fromstring(
            body, parser=lxml.etree.XMLParser(resolve_entities=False, no_network=True)
        )
    except lxml.etree.XMLSyntaxError:
        return []
    out = []
    for element in root.iter("{*}loc"):
        parent = element.getparent()
        kind = "sitemap" if parent is not None and lxml.etree.QName(parent).localname == "sitemap" else "url"
        loc = (element.text or "").strip()
        if urlsplit(loc).scheme in ("http", "https"):
            out.append((kind, canonical_url(loc)))
    return out


ROBOTS_REDIRECTS = 5  # RFC 9309 2.3.1.2: follow at least five consecutive redirects
REDIRECT_STATUSES = (301, 302, 303, 307, 308)


class Robots:
    """One host's robots.txt rules for our user agent, by Protego (Scrapy's RFC 9309 parser): the group
    of our product token (else ``*``), ``*`` and ``$`` patterns, the longest match between Allow and
    Disallow (Allow on a tie), Crawl-delay (fractional) and Sitemap lines. Empty rules allow everything."""

    def __init__(self, body: bytes, user_agent: str, host: str):
        self.user_agent = user_agent
        self._parser = Protego.parse(body.decode("utf-8", errors="replace"))
        self.delay = float(self._parser.crawl_delay(user_agent) or 0.0)
        self.sitemaps = [canonical_url(urljoin(host + "/", u)) for u in self._parser.sitemaps]

    def allows(self, url: str) -> bool:
        return self._parser.can_fetch(url, self.user_agent)


def extract_links(base_url: str, body: bytes) -> list[str]:
    """Absolute, canonical http(s) links of <a href> elements, in document order, without repeats."""
    try:
        doc = lxml.html.fromstring(body)
    except (lxml.etree.ParserError, ValueError):
        return []
    links: dict[str, None] = {}
    for element, attribute, link, _ in doc.iterlinks():
        if element.tag != "a" or attribute != "href":
            continue
        absolute = urljoin(base_url, link.strip())
        if urlsplit(absolute).scheme in ("http", "https"):
            links[canonical_url(absolute)] = None
    return list(links)
