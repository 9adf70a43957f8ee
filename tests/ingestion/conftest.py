"""Fixtures of the crawler tests: programmable HTTP sites on 127.0.0.1 that record every request."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class _Site(BaseHTTPRequestHandler):
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


@pytest.fixture
def site():
    handler = type("H", (_Site,), {"pages": {}, "hits": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def three_hosts():
    servers, hosts = [], []
    for _ in range(3):
        handler = type("H", (_Site,), {"pages": {}, "hits": []})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        hosts.append((handler, f"http://127.0.0.1:{server.server_address[1]}"))
    yield hosts
    for server in servers:
        server.shutdown()
        server.server_close()
