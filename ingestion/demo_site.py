"""A real multi-page HTML site generated on the user's machine, served from 127.0.0.1.

The pages are the HTML that Python's ``pydoc`` renders for standard-library modules, so the text is
real prose and code documentation with links between modules. The site also carries what a crawler and
a cleaning pipeline must cope with: a robots.txt that disallows part of it, exact duplicate pages under a
mirror path, and near-duplicates that differ by a notice and a few edited words.
"""

from __future__ import annotations

import html
import importlib
import json
import pydoc
import random
import re
import threading
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

#: Standard-library modules with substantial pure-Python documentation.
DEFAULT_MODULES = (
    "argparse", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "difflib", "enum", "filecmp", "fnmatch", "fractions", "functools", "getopt",
    "glob", "gzip", "heapq", "hmac", "ipaddress", "json", "logging", "lzma", "netrc", "optparse",
    "pathlib", "pprint", "queue", "random", "reprlib", "sched", "secrets", "shlex", "shutil",
    "socketserver", "statistics", "string", "tarfile", "tempfile", "textwrap", "tokenize", "typing",
    "uuid", "zipfile",
)  # fmt: skip

PRIVATE_DIR = "private"
#: Memory addresses in the reprs pydoc prints for default values ("at 0x7fe1095a4160", "at&nbsp;0x...").
MEMORY_ADDRESS = re.compile(r"(\bat(?:\s|&nbsp;)+)0x[0-9a-fA-F]+")
MIRROR_DIR = "mirror"
NEAR_DIR = "v2"


@dataclass
class DemoSiteManifest:
    """What the generator wrote, so tests can compare the crawl against ground truth."""

    root: Path
    modules: list[str]
    pages: list[str] = field(default_factory=list)  # every path a polite crawler may fetch
    disallowed: list[str] = field(default_factory=list)
    exact_duplicates: dict[str, str] = field(default_factory=dict)  # copy path -> original path
    near_duplicates: dict[str, str] = field(default_factory=dict)


def build_demo_site(
    root: str | Path,
    modules: int | list[str] = 40,
    exact_duplicates: int = 3,
    near_duplicates: int = 3,
    private_pages: int = 3,
    seed: int = 0,
) -> DemoSiteManifest:
    """Render pydoc pages for ``modules`` into ``root`` with an index, robots.txt, duplicates."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = list(DEFAULT_MODULES[:modules]) if isinstance(modules, int) else list(modules)
    if isinstance(modules, int) and modules > len(DEFAULT_MODULES):
        raise ValueError(f"modules={modules}: at most {len(DEFAULT_MODULES)} built-in modules are listed")
    rng = random.Random(seed)
    manifest = DemoSiteManifest(root=root, modules=names)

    for name in names:
        module = importlib.import_module(name)
        page = pydoc.html.page(pydoc.describe(module), pydoc.html.document(module, name))
        page = MEMORY_ADDRESS.sub(r"\g<1>0x0", page)  # '<object object at 0x7f...>' differs on every run
        (root / f"{name}.html").write_text(page, encoding="utf-8")
        manifest.pages.append(f"/{name}.html")

    by_size = sorted(names, key=lambda n: -(root / f"{n}.html").stat().st_size)
    for name in by_size[:exact_duplicates]:
        _write(root / MIRROR_DIR / f"{name}.html", (root / f"{name}.html").read_text(encoding="utf-8"))
        manifest.exact_duplicates[f"/{MIRROR_DIR}/{name}.html"] = f"/{name}.html"
    for name in by_size[exact_duplicates : exact_duplicates + near_duplicates]:
        original = (root / f"{name}.html").read_text(encoding="utf-8")
        _write(root / NEAR_DIR / f"{name}.html", _near_duplicate(original, rng))
        manifest.near_duplicates[f"/{NEAR_DIR}/{name}.html"] = f"/{name}.html"
    for i in range(private_pages):
        body = f"<p>Internal note {i}: this page is disallowed by robots.txt and must not be fetched.</p>"
        _write(root / PRIVATE_DIR / f"note{i}.html", f"<html><body>{body}</body></html>")
        manifest.disallowed.append(f"/{PRIVATE_DIR}/note{i}.html")
    manifest.pages += list(manifest.exact_duplicates) + list(manifest.near_duplicates)

    links = manifest.pages + manifest.disallowed
    items = "\n".join(f'<li><a href="{html.escape(p.lstrip("/"))}">{html.escape(p)}</a></li>' for p in links)
    _write(
        root / "index.html",
        f"<html><head><title>Library docs</title></head><body><ul>{items}</ul></body></html>",
    )
    manifest.pages.insert(0, "/index.html")
    _write(root / "robots.txt", f"User-agent: *\nDisallow: /{PRIVATE_DIR}/\n")
    _write(
        root / "manifest.json",
        json.dumps({k: v for k, v in manifest.__dict__.items() if k != "root"}, indent=1),
    )
    return manifest


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# pydoc joins words with &nbsp;: split on it and on whitespace, keeping the separators.
_TOKENS = re.compile(r"(&nbsp;|\s+)")


def _near_duplicate(page: str, rng: random.Random, edits: int = 8) -> str:
    """A copy with a handful of visible words replaced: text Jaccard stays high but not 1."""
    segments = [m for m in re.finditer(r">([^<>]{60,})<", page) if len(_TOKENS.split(m.group(1))) >= 15]
    chosen = sorted(rng.sample(segments, min(edits, len(segments))), key=lambda m: m.start())
    out, pos = [], 0
    for m in chosen:
        words = _TOKENS.split(m.group(1))
        candidates = [i for i, w in enumerate(words) if w.isalpha() and len(w) > 3]
        if candidates:
            words[rng.choice(candidates)] = "mirrored"
        out += [page[pos : m.start(1)], "".join(words)]
        pos = m.end(1)
    return "".join(out) + page[pos:]


class _QuietHandler(SimpleHTTPRequestHandler):
    served: list[tuple[str, int]]

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
        pass

    def list_directory(self, path):  # a static site, not a file browser
        self.send_error(404, "Not Found")
        return None

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.served.append((self.path, int(code) if str(code).isdigit() else 0))


class DemoSiteServer:
    """A threaded HTTP server on 127.0.0.1 (port chosen by the OS) that records what it served."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0):
        self.served: list[tuple[str, int]] = []
        handler = type("Handler", (_QuietHandler,), {"served": self.served})
        self._server = ThreadingHTTPServer((host, port), partial(handler, directory=str(root)))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    def __enter__(self) -> DemoSiteServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
