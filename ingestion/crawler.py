"""A polite crawler that writes gzip WARC files.

``HostCrawler`` owns exactly one host: it fetches robots.txt once, keeps the per-host delay between
requests, and crawls breadth-first within the host. Links to other hosts are handed back to the caller,
which routes them to the crawler that owns that host (orchestration wraps each in a Ray actor), so
politeness holds however many workers run.
"""

from __future__ import annotations

import io
import ipaddress
import json
import socket
import time
import urllib.robotparser
from collections import Counter, deque
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit, urlunsplit

import lxml.html
import requests
from pydantic import Field, field_validator
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from orchestration.stage import StageConfig


class CrawlConfig(StageConfig):
    """Scope, politeness and limits of a crawl."""

    seeds: list[str] = Field(default_factory=list, description="Start URLs (http or https).")
    allowed_domains: list[str] = Field(
        default_factory=list, description="Hosts that may be crawled; empty means the seeds' hosts."
    )
    max_pages: int = Field(1000, ge=1, description="Stop after this many successful page fetches.")
    max_depth: int = Field(10, ge=0, description="Link hops from a seed.")
    min_delay_s: float = Field(1.0, ge=0, description="Minimum gap between requests to one host.")
    user_agent: str = Field("lmforge-crawler/0.1 (+https://github.com/lmforge/lmforge)", min_length=1)
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP connect timeout per request.")
    read_timeout_s: float = Field(30.0, gt=0, description="Timeout between received bytes.")
    total_timeout_s: float = Field(60.0, gt=0, description="Wall-clock limit for one fetch.")
    max_body_bytes: int = Field(10 * 2**20, gt=0, description="Bodies larger than this are cut and recorded.")
    max_redirects: int = Field(5, ge=0, description="Redirect hops followed per URL.")
    content_types: list[str] = Field(default_factory=lambda: ["text/html", "application/xhtml+xml"])
    allow_private_addresses: bool = Field(
        False, description="Allow loopback/private/link-local targets (local sites and tests only)."
    )
    warc_max_bytes: int = Field(256 * 2**20, gt=0, description="Rotate WARC files past this size.")

    @field_validator("seeds")
    @classmethod
    def _seeds_are_http(cls, seeds: list[str]) -> list[str]:
        for url in seeds:
            if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
                raise ValueError(f"seed {url!r} is not an absolute http(s) URL")
        return [canonical_url(u) for u in seeds]

    def hosts_allowed(self) -> set[str]:
        return {h.lower() for h in self.allowed_domains} or {urlsplit(u).hostname for u in self.seeds}


def canonical_url(url: str) -> str:
    """One spelling per page: lower-case scheme and host, no default port, no fragment, '/' for empty path."""
    url, _ = urldefrag(url.strip())
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    port = parts.port
    netloc = host if port is None or (scheme, port) in (("http", 80), ("https", 443)) else f"{host}:{port}"
    return urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))


def host_key(url: str) -> str:
    """The politeness unit: scheme://host[:port]."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class FetchRefused(Exception):
    """A URL the crawler will not fetch (scope, robots, address policy)."""


def check_address(host: str, allow_private: bool) -> None:
    """Refuse hosts that resolve to loopback, private, link-local, reserved or metadata addresses."""
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        raise FetchRefused(f"dns: {e}") from e
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
            raise FetchRefused(
                f"address {ip} of {host} is not public; set crawl.allow_private_addresses: true for local sites"
            )


class HostCrawler:
    """Crawls one host politely into rotating gzip WARC files and a JSONL crawl log."""

    def __init__(self, host: str, config: CrawlConfig, out_dir: str):
        self.host = host
        self.config = config
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.session = requests.Session()
        self.session.headers["User-Agent"] = config.user_agent
        self.slug = urlsplit(host).netloc.replace(":", "_")
        self.seen: set[str] = set()
        self.fetched = 0
        self._last_request = 0.0
        self._robots: urllib.robotparser.RobotFileParser | None = None
        self._robots_delay = 0.0
        self._warc_index = 0
        self._warc_files: dict[str, int] = {}  # file name -> response records
        self._warc_name = ""
        self._warc = None
        self._log = open(self.out_dir / f"crawl-log-{self.slug}.jsonl", "a", encoding="utf-8")

    # -- politeness ---------------------------------------------------------------------------------
    def _delay(self) -> float:
        return max(self.config.min_delay_s, self._robots_delay)

    def _wait_turn(self) -> None:
        gap = time.monotonic() - self._last_request
        if gap < self._delay():
            time.sleep(self._delay() - gap)
        self._last_request = time.monotonic()

    def _load_robots(self) -> None:
        parser = urllib.robotparser.RobotFileParser()
        try:
            status, _, body, _ = self._get(urljoin(self.host + "/", "robots.txt"))
        except (requests.RequestException, FetchRefused) as e:
            self._record(self.host + "/robots.txt", None, 0, 0.0, f"robots unavailable: {e}")
            status, body = 404, b""
        if status in (401, 403):
            parser.disallow_all = True
        elif 200 <= status < 300:
            lines = body.decode("utf-8", errors="replace").splitlines()
            parser.parse(lines)
            self._robots_delay = robots_crawl_delay(lines, self.config.user_agent)
        else:
            parser.allow_all = True
        self._robots = parser

    # -- fetching -----------------------------------------------------------------------------------
    def _get(self, url: str) -> tuple[int, str, bytes, requests.Response]:
        """One GET with address policy, per-host delay, size and time limits (no redirects followed)."""
        check_address(urlsplit(url).hostname or "", self.config.allow_private_addresses)
        self._wait_turn()
        start = time.monotonic()
        resp = self.session.get(
            url,
            stream=True,
            allow_redirects=False,
            timeout=(self.config.connect_timeout_s, self.config.read_timeout_s),
        )
        with resp:
            chunks, size = [], 0
            for chunk in resp.iter_content(64 * 1024):
                size += len(chunk)
                if size > self.config.max_body_bytes:
                    raise FetchRefused(f"body exceeds max_body_bytes={self.config.max_body_bytes}")
                if time.monotonic() - start > self.config.total_timeout_s:
                    raise FetchRefused(f"fetch exceeded total_timeout_s={self.config.total_timeout_s}")
                chunks.append(chunk)
        return resp.status_code, resp.headers.get("Content-Type", ""), b"".join(chunks), resp

    def _fetch(self, url: str) -> tuple[str, int, str, bytes, requests.Response]:
        """GET following redirects within scope, re-checking policy on every hop."""
        for _ in range(self.config.max_redirects + 1):
            status, ctype, body, resp = self._get(url)
            if status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                target = canonical_url(urljoin(url, resp.headers["Location"]))
                if target in self.seen or host_key(target) != self.host:
                    raise FetchRefused(f"redirect to {target} (already seen or another host)")
                self.seen.add(target)
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
            self._warc = open(self.out_dir / name, "wb")
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
        self._log.write(json.dumps(entry) + "\n")
        self._log.flush()

    # -- crawl --------------------------------------------------------------------------------------
    def crawl(self, urls: list[tuple[str, int]], budget: int) -> dict:
        """Fetch ``urls`` (url, depth) and everything they link to on this host, up to ``budget`` pages.

        Returns counts, the failures, and links to other hosts for the caller to route.
        """
        if self._robots is None:
            self._load_robots()
        allowed = self.config.hosts_allowed()
        queue = deque((u, d) for u, d in urls if u not in self.seen)
        self.seen.update(u for u, _ in queue)
        external: list[tuple[str, int]] = []
        failures: Counter = Counter()
        fetched_before = self.fetched
        while queue and self.fetched - fetched_before < budget:
            url, depth = queue.popleft()
            if not self._robots.can_fetch(self.config.user_agent, url):
                self._record(url, None, 0, 0.0, "disallowed by robots.txt")
                failures["robots_disallowed"] += 1
                continue
            start = time.monotonic()
            try:
                final_url, status, ctype, body, resp = self._fetch(url)
            except (requests.RequestException, FetchRefused) as e:
                self._record(url, None, 0, time.monotonic() - start, f"{type(e).__name__}: {e}")
                failures[type(e).__name__] += 1
                continue
            elapsed = time.monotonic() - start
            mime = ctype.split(";")[0].strip().lower()
            if status != 200 or mime not in self.config.content_types:
                error = f"http {status}" if status != 200 else f"content-type {mime!r} not allowed"
                self._record(final_url, status, len(body), elapsed, error)
                failures[f"http_{status}" if status != 200 else "content_type"] += 1
                continue
            self._write_records(final_url, resp, body, depth)
            self._record(final_url, status, len(body), elapsed, None)
            self.fetched += 1
            if depth >= self.config.max_depth:
                continue
            for link in extract_links(final_url, body):
                if link in self.seen:
                    continue
                if host_key(link) == self.host:
                    self.seen.add(link)
                    queue.append((link, depth + 1))
                elif urlsplit(link).hostname in allowed:
                    external.append((link, depth + 1))
        return {
            "host": self.host,
            "fetched": self.fetched - fetched_before,
            "failures": sum(failures.values()),
            "failure_reasons": dict(failures),
            "pending": list(queue),
            "external": external,
            "warc_files": sorted(self._warc_files),
        }

    def close(self) -> dict[str, int]:
        """Flush and close output; returns the WARC files written with their response-record counts."""
        if self._warc is not None:
            self._warc.close()
            self._warc = None
        self._log.close()
        self.session.close()
        return dict(self._warc_files)


def robots_crawl_delay(lines: list[str], user_agent: str) -> float:
    """Crawl-delay for ``user_agent`` (its own group first, else '*'), fractional seconds allowed.

    The standard library's parser only accepts whole seconds, so '0.5' would be lost.
    """
    token = user_agent.split("/")[0].lower()
    delays: dict[str, float] = {}
    agents: list[str] = []
    in_rules = False
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if ":" not in line:
            continue
        key, value = (part.strip() for part in line.split(":", 1))
        key = key.lower()
        if key == "user-agent":
            if in_rules:
                agents, in_rules = [], False
            agents.append(value.lower())
        else:
            in_rules = True
            if key == "crawl-delay":
                try:
                    delay = float(value)
                except ValueError:
                    continue
                for agent in agents:
                    delays.setdefault(agent, delay)
    for agent, delay in delays.items():
        if agent != "*" and agent in token:
            return delay
    return delays.get("*", 0.0)


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
