"""Shared helpers of the benchmark scripts: timing, the result line, a real offline text corpus."""

from __future__ import annotations

import json
import os
import pkgutil
import pydoc
import statistics
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_times(fns: list[Callable[[], object]], repeats: int = 3, warmup: int = 1) -> list[float]:
    """Median wall seconds of each function, run in turn within every repetition, so a slow spell of a
    shared machine falls on all of them instead of on whichever ran then."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, own in zip(fns, times):
            start = time.perf_counter()
            fn()
            own.append(time.perf_counter() - start)
    return [statistics.median(own) for own in times]


def result(
    bench: str,
    unit: str,
    ours: float,
    peer: str,
    peer_value: float | None,
    goal: float,
    other_goals_met: bool = True,
    **extra,
) -> dict:
    """One benchmark result: the ratio and ``ok`` are computed from the measured values; ``ok`` also needs
    ``other_goals_met`` (a result's goals beside the ratio: parity, agreement). Without a peer value (a
    peer that is not installed, in a smoke run) both are null: nothing was compared."""
    ratio = None if peer_value is None else ours / peer_value
    line = {
        "bench": bench,
        "unit": unit,
        "ours": round(ours, 3),
        "peer": peer,
        "peer_value": None if peer_value is None else round(peer_value, 3),
        "ratio": None if ratio is None else round(ratio, 3),
        "goal": goal,
        "ok": None if ratio is None else ratio >= goal and other_goals_met,
        **extra,
    }
    print(json.dumps(line), flush=True)
    return line


def all_ok(oks: list[bool | None]) -> bool | None:
    """False if any is False, else null if any was not measured (null), else True."""
    if False in oks:
        return False
    return None if None in oks else True


def summary(bench: str, results: list[dict]) -> None:
    print(
        json.dumps({"bench": bench, "ok": all_ok([r["ok"] for r in results]), "results": results}), flush=True
    )


def installed(module: str) -> bool:
    """Whether a (peer's) module can be imported, without importing it."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def not_installed(peer: str) -> str:
    """The ``peer`` field of a result whose peer is not installed."""
    return f"{peer} (not installed: pip install -e '.[bench]')"


def skipped(bench: str, reason: str) -> None:
    """The last line of a script that cannot run here: why, and ``ok`` null (nothing was measured)."""
    print(json.dumps({"bench": bench, "skipped": reason, "ok": None}), flush=True)


def pydoc_texts(min_chars: int, doc_chars: int = 4000) -> list[str]:
    """Real English technical text: the plain-text pydoc of installed modules, cut into documents of about
    ``doc_chars`` at line boundaries, repeated (with a suffix) until ``min_chars`` is reached."""
    pages = []
    skip = ("test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip", "venv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for info in sorted(pkgutil.iter_modules(), key=lambda m: m.name):
            if info.name.startswith("_") or info.name.startswith(skip) or info.ispkg:
                continue
            try:
                module = __import__(info.name)
                pages.append(pydoc.render_doc(module, renderer=pydoc.plaintext))
            except Exception:  # modules that fail to import or render on this platform
                continue
            if sum(map(len, pages)) > min_chars:
                break
    docs, current = [], []
    for page in pages:
        size = 0
        for line in page.splitlines():
            current.append(line)
            size += len(line) + 1
            if size >= doc_chars:
                docs.append("\n".join(current))
                current, size = [], 0
        if current:
            docs.append("\n".join(current))
            current = []
    out, copy = list(docs), 1
    while sum(map(len, out)) < min_chars:
        out.extend(f"{d}\n(copy {copy})" for d in docs)
        copy += 1
    return out


def documents_table(texts: list[str], source: str = "pydoc", ids: list[str] | None = None):
    """Texts as a table in lmforge's document schema (ids ``doc-00000000``... unless given)."""
    from core.schema import document_table

    return document_table(
        texts, ids=ids or [f"doc-{i:08d}" for i in range(len(texts))], source=source, lang="en"
    )


DEBIAN_DOCS = {  # Debian documentation packages (ENVIRONMENT.md): real HTML written by people
    "python": "/usr/share/doc/python3.11/html",
    "handbook": "/usr/share/doc/debian-handbook/html",
    "rust": "/usr/share/doc/rust-doc/html",
}


def _extract_file(path: str) -> tuple[str, str]:
    import trafilatura

    html = Path(path).read_text(encoding="utf-8", errors="replace")
    return path, trafilatura.extract(html, include_tables=True, deduplicate=False) or ""


def debian_documents(n: int = 5000, cache: Path | None = None) -> list[tuple[str, str]]:
    """``n`` (path, text) pairs extracted with trafilatura from the Debian documentation packages: all
    Python 3.11 pages, the Debian Handbook in English and a sample of its 25 translations, and Rust
    std/core pages sampled evenly for the rest. Cached as Parquet (extraction takes minutes)."""
    import multiprocessing

    import pyarrow as pa
    import pyarrow.parquet as pq

    cache = cache or Path.home() / ".cache" / "lmforge-bench" / f"debian-docs-{n}.parquet"
    if cache.exists():
        table = pq.read_table(cache)
        return list(zip(table.column("path").to_pylist(), table.column("text").to_pylist()))
    missing = [d for d in DEBIAN_DOCS.values() if not Path(d).is_dir()]
    if missing:
        raise SystemExit(
            f"missing {missing}: apt-get install -y --no-install-recommends python3.11-doc debian-handbook rust-doc"
        )

    def pages(root: str, pattern: str = "*.html") -> list[str]:
        return sorted(str(p) for p in Path(root).rglob(pattern))

    def sample(paths: list[str], k: int) -> list[str]:
        step = max(1, len(paths) // max(k, 1))
        return paths[::step][:k]

    handbook = pages(DEBIAN_DOCS["handbook"])
    english = [p for p in handbook if "/en-US/" in p]
    chosen = pages(DEBIAN_DOCS["python"]) + english
    chosen += sample([p for p in handbook if "/en-US/" not in p], min(500, n // 10))
    chosen += sample(pages(DEBIAN_DOCS["rust"]), n - len(chosen) + 200)  # spare for empty extractions
    with multiprocessing.Pool(os.cpu_count()) as pool:
        docs = [(p, t) for p, t in pool.imap(_extract_file, chosen, chunksize=16) if len(t) >= 20][:n]
    cache.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"path": [d[0] for d in docs], "text": [d[1] for d in docs]})
    pq.write_table(table, cache)
    return docs


class PeakRss:
    """Samples the RSS of this process and of every Ray worker process (by name) until stopped."""

    def __init__(self):
        self.driver = 0
        self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            self.driver = max(self.driver, me.memory_info().rss)
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                cmd = proc.info["cmdline"] or []
                if cmd and cmd[0].startswith("ray::") and proc.info["memory_info"]:
                    self.worker = max(self.worker, proc.info["memory_info"].rss)
            time.sleep(0.2)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def encoder_classifier(
    root: Path, texts: list[str], layers: int = 2, hidden: int = 64, positions: int = 512
) -> Path:
    """A Hugging Face sequence-classifier directory made offline: a BERT (``layers`` x ``hidden``, random
    weights, seed 0) with labels negative/positive, and a BPE tokenizer fitted on ``texts`` whose
    post-processor adds [CLS] and [SEP] as BERT's does, so that the plain transformers route (tokenizer,
    model) and lmforge's encoding give the same ids."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=positions, unk_token="[UNK]", pad_token="[PAD]",
        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )  # fmt: skip
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=4 * hidden, max_position_embeddings=positions, pad_token_id=0, num_labels=2,
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
    )  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    BertForSequenceClassification(config).eval().save_pretrained(root)
    fast.save_pretrained(root)
    return root
