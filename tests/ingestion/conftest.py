"""Fixtures of the crawler tests: programmable HTTP sites on 127.0.0.1 that record every request."""

import threading
from http.server import ThreadingHTTPServer

import pytest

from tests.ingestion.sites import Site


@pytest.fixture
def site():
    handler = type("H", (Site,), {"pages": {}, "hits": []})
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
        handler = type("H", (Site,), {"pages": {}, "hits": []})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        hosts.append((handler, f"http://127.0.0.1:{server.server_address[1]}"))
    yield hosts
    for server in servers:
        server.shutdown()
        server.server_close()
