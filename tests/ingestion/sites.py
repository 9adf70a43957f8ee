"""Programmable HTTP sites on 127.0.0.1 for the crawler tests: pages by path, robots.txt, every request
recorded with its time."""

import time
from http.server import BaseHTTPRequestHandler


class Site(BaseHTTPRequestHandler):
    """A tiny programmable site: pages by path, robots.txt, request times recorded."""

    pages: dict[str, tuple[int, str, bytes]] = {}
    hits: list[tuple[str, float]] = []

    def do_GET(self):  # noqa: N802 - stdlib name
        self.hits.append((self.path, time.monotonic()))
        page = self.pages.get(self.path, (404, "text/plain", b"missing"))
        if callable(page):  # a behaviour, not a page: it writes the whole response itself
            return page(self)
        status, ctype, body = page
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def html_page(*links: str, text: str = "hello") -> bytes:
    """A page with ``text`` and a link to each of ``links``."""
    return (
        "<html><body><p>" + text + "</p>" + "".join(f'<a href="{u}">x</a>' for u in links) + "</body></html>"
    ).encode()
