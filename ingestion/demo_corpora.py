"""The corpora of configs/sources.yaml, written from this Python's standard library (no download):

- ``docs.jsonl``: the plain-text pydoc of some modules, one JSON record per module (id, url, text); four of
  them are modules the demo site renders as HTML too (ingestion/demo_site.py), so the web crawl and this
  corpus share near-duplicate documents for dedup across sources to find;
- ``code.parquet``: the source files of some pure-Python modules (columns id, path, content), as code
  corpora such as The Stack store them.

``python -m ingestion.demo_corpora configs/data`` rewrites the copies that ship in the repository.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pydoc
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ingestion.demo_site import MEMORY_ADDRESS

#: Modules whose pydoc text is the JSONL corpus (the first four are pages of the demo site too).
DOC_MODULES = (
    "filecmp", "fnmatch", "fractions", "functools", "getopt", "glob", "heapq", "hmac", "netrc", "pprint",
    "reprlib", "sched", "shlex",
)  # fmt: skip
#: Modules whose source is the Parquet corpus.
CODE_MODULES = (
    "bisect", "colorsys", "fnmatch", "genericpath", "getopt", "glob", "keyword", "netrc", "reprlib",
    "sched", "shlex", "stat",
)  # fmt: skip


def write_demo_corpora(out: str | Path) -> tuple[Path, Path]:
    """Write ``docs.jsonl`` and ``code.parquet`` into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    docs = out / "docs.jsonl"
    with docs.open("w", encoding="utf-8") as f:
        for name in DOC_MODULES:
            text = MEMORY_ADDRESS.sub(
                r"\g<1>0x0", pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
            )
            url = f"https://docs.python.org/3/library/{name}.html"
            f.write(json.dumps({"id": f"pydoc-{name}", "url": url, "text": text}) + "\n")
    rows = []
    for name in CODE_MODULES:
        module = importlib.import_module(name)
        rows.append({"id": f"src-{name}", "path": f"Lib/{name}.py", "content": inspect.getsource(module)})
    code = out / "code.parquet"
    pq.write_table(pa.Table.from_pylist(rows), code, compression="zstd")
    return docs, code


if __name__ == "__main__":
    for path in write_demo_corpora(sys.argv[1] if len(sys.argv) > 1 else "configs/data"):
        print(path, path.stat().st_size, "bytes")
