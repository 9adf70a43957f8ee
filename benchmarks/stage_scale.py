"""The clean and tokenize stages at scale: wall time, time per document and peak memory per process.

Synthetic English documents (about 60 words: five sentences drawn from the pydoc of the standard
library, so they pass the default filters as real prose does) are written to Parquet files of 250k
documents, then cleaned by the default clean chain (extraction, normalization, language ID, Gopher
repetition and quality, PII) and tokenized (a BPE tokenizer trained on a deterministic sample of
``--sample-mb``, then one task per partition) on a local Ray with 2 CPUs. Peak RSS is sampled every 0.2 s
for the driver and every Ray worker, and each task reports its own (VmHWM) in its completion marker.
Issue 19: time per document linear (growth <= 1.2) from the smallest to the largest size, memory flat.
Each stage's result at each size compares its time per document (``ours``) with the same stage's at the
smallest size (``peer``): ``ratio`` is the growth, lower is better.

    .venv/bin/python benchmarks/stage_scale.py [--quick | --smoke] [--sizes 1000000 10000000]
"""

from __future__ import annotations

import sys
from pathlib import Path

# The repository root replaces benchmarks/ on the path: benchmarks/tokenize.py would shadow the stdlib.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="20k and 100k documents")
parser.add_argument(
    "--smoke", action="store_true", help="seconds: 300 and 600 documents, a small sentence pool"
)
parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
parser.add_argument("--sentences", type=int, default=5, help="sentences per document")
parser.add_argument("--sample-mb", type=float, default=256, help="tokenizer.train_sample_mb")
args = parser.parse_args()
if args.quick:
    args.sizes = [20_000, 100_000]
if args.smoke:
    args.sizes = [300, 600]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

FILE_DOCS = 250_000
CHUNK = 25_000


def sentence_pool() -> list[str]:
    """Sentences of the standard library's pydoc made only of words (5 to 25 of them, ending in '.')."""
    from benchmarks.common import pydoc_texts

    text = " ".join(pydoc_texts(300_000 if args.smoke else 6_000_000))
    pool = []
    for sentence in re.split(r"(?<=\.)\s+", re.sub(r"\s+", " ", text)):
        words = sentence.split()
        if (
            5 <= len(words) <= 25
            and sentence[0].isupper()
            and all(re.fullmatch(r"[A-Za-z,;']+\.?", w) for w in words)
        ):
            pool.append(sentence)
    return sorted(set(pool))


def _write_file(job: tuple[Path, int, int, list[str]]) -> dict:
    from core.files import file_entry
    from core.schema import DOCUMENT_SCHEMA

    file, start, n, pool = job
    with pq.ParquetWriter(file, DOCUMENT_SCHEMA, compression="zstd") as writer:
        for offset in range(0, n, CHUNK):
            m = min(CHUNK, n - offset)
            first = start + offset
            picks = np.random.default_rng([7, first]).integers(0, len(pool), (m, args.sentences)).tolist()
            texts = [
                " ".join(pool[i] for i in row[:2]) + "\n" + " ".join(pool[i] for i in row[2:])
                for row in picks
            ]
            writer.write_table(
                pa.table(
                    {
                        "id": [f"doc{first + i:09d}" for i in range(m)],
                        "url": [
                            f"https://site{(first + i) % 997}.example/page/{first + i}" for i in range(m)
                        ],
                        "text": texts,
                        "source": ["synthetic"] * m,
                        "lang": [None] * m,
                        "fetched_at": [None] * m,
                        "meta": [[] for _ in range(m)],
                    },
                    schema=DOCUMENT_SCHEMA,
                )
            )
    return file_entry(file, n)


def write_corpus(path: Path, n: int, pool: list[str]) -> None:
    from multiprocessing import get_context

    path.mkdir(parents=True)
    jobs = [
        (path / f"part-{k:05d}.parquet", start, min(FILE_DOCS, n - start), pool)
        for k, start in enumerate(range(0, n, FILE_DOCS))
    ]
    if len(jobs) == 1:
        _write_file(jobs[0])
        return
    with get_context("spawn").Pool(2) as pool_:
        pool_.map(_write_file, jobs)


def phase_peaks(done: Path) -> dict[str, float]:
    """The largest peak RSS (MiB) any task of each kind reported in its completion marker."""
    peaks: dict[str, float] = {}
    for marker in done.glob("*.json"):
        kind = "tokenizer" if marker.stem == "tokenizer" else "partition"
        peaks[kind] = max(peaks.get(kind, 0), json.loads(marker.read_text()).get("peak_rss_mb", 0))
    return dict(sorted(peaks.items()))


def measured(n: int, run, *args, **kwargs) -> tuple[dict, dict]:
    """``run(*args, **kwargs)``'s wall time, time per document and the peak RSS of the driver and any Ray worker; and
    what it returned."""
    from benchmarks.common import PeakRss

    with PeakRss() as rss:
        start = time.perf_counter()
        index = run(*args, **kwargs)
        seconds = time.perf_counter() - start
    figures = {
        "seconds": round(seconds, 1),
        "us_per_doc": round(1e6 * seconds / n, 1),
        "peak_rss_mb_driver": round(rss.driver / 2**20),
        "peak_rss_mb_worker": round(rss.worker / 2**20),
    }
    return figures, index


def main() -> None:
    import ray

    from ingestion.readers import ReadConfig
    from orchestration.config import CleanConfig
    from orchestration.executors import corpus_source, run_document_stage
    from orchestration.stages.clean import clean_stages
    from orchestration.stages.tokenize import run_tokenize_stage
    from training.data.tokenize import TokenizeConfig
    from training.data.tokenizer import TokenizerConfig

    work = Path(tempfile.mkdtemp(prefix="lmf-bench-stage-scale-"))
    pool = sentence_pool()
    print(f"{len(pool)} sentences in the pool", flush=True)
    ray.init(num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False, log_to_driver=False)
    stages = clean_stages(CleanConfig())
    tokenize = TokenizeConfig(tokenizer=TokenizerConfig(train_sample_mb=args.sample_mb))
    results: list[dict] = []
    smallest: dict[str, float] = {}  # each stage's time per document at the smallest size
    try:
        for n in args.sizes:
            docs = work / f"docs-{n}"
            t0 = time.perf_counter()
            write_corpus(docs, n, pool)
            gen_seconds = time.perf_counter() - t0
            read = ReadConfig(paths=[str(docs)])
            parts = [(f"read-{i:05d}", corpus_source(uri, read)) for i, uri in enumerate(read.inputs())]
            clean_out, tok_out = work / f"clean-{n}", work / f"tok-{n}"
            clean, index = measured(
                n, run_document_stage, "clean", stages, parts, clean_out, cache_key="b", inputs={}
            )
            clean["kept"] = index["counters"]["kept"]
            clean["peak_rss_mb_task"] = max(phase_peaks(clean_out / "_done").values())
            shutil.rmtree(docs)
            tok, index = measured(n, run_tokenize_stage, clean_out, tok_out, tokenize)
            tok["tokens"] = index["counters"]["tokens"]
            tok["peak_rss_mb_by_task"] = phase_peaks(tok_out / "_done")
            for stage, figures in (("clean", clean), ("tokenize", tok)):
                first = smallest.setdefault(stage, figures["us_per_doc"])
                peak = max(figures["peak_rss_mb_driver"], figures["peak_rss_mb_worker"])
                line = {
                    "bench": f"stage_scale.{stage}.{n}",
                    "unit": "us/doc",
                    "ours": figures["us_per_doc"],
                    "peer": f"the same stage at {args.sizes[0]:,} documents",
                    "peer_value": first,
                    "ratio": round(figures["us_per_doc"] / first, 3),
                    "goal": 1.2,
                    "ok": figures["us_per_doc"] / first <= 1.2 and peak <= 3072,
                    "documents": n,
                    "corpus_write_seconds": round(gen_seconds, 1),
                    **figures,
                }
                print(json.dumps(line), flush=True)
                results.append(line)
            shutil.rmtree(clean_out)
            shutil.rmtree(tok_out)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    growth = {r["bench"].split(".")[1]: r["ratio"] for r in results[-2:]}  # the largest size's
    peak = max(max(r["peak_rss_mb_driver"], r["peak_rss_mb_worker"]) for r in results)
    print(
        json.dumps(
            {
                "bench": "stage_scale",
                "per_doc_time_growth": {s: round(g, 2) for s, g in growth.items()},
                "peak_rss_mb_any_process": peak,
                "goal": "per-document time growth <= 1.2 from the smallest to the largest size, every process's "
                "peak RSS <= 3 GB",
                "ok": max(growth.values()) <= 1.2 and peak <= 3072,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
