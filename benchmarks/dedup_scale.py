"""The dedup stage (exact + MinHash-LSH on Ray) at scale: wall time, time per document, peak memory.

Synthetic documents of ~300 words from a Zipf vocabulary, 5% of them near-duplicate variants of another
document, are written to Parquet (files of 500k documents, two processes), then deduplicated by
``orchestration.dedup.run_dedup_stage`` on a local Ray with 2 CPUs and the default config (the shard
count follows the corpus). Peak RSS is sampled every 0.2 s for the driver and for every Ray worker
process, and each task reports its own (VmHWM) in its completion marker: the largest per phase is
printed. Issue 19: per-document time growth <= 1.2 from 1M to 10M documents and every process's peak
<= 3 GB. Each size's result compares its time per document (``ours``) with the smallest size's (``peer``):
``ratio`` is the growth, lower is better.

    .venv/bin/python benchmarks/dedup_scale.py [--quick | --smoke] [--sizes 1000000 4000000 10000000]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from benchmarks.common import PeakRss  # noqa: E402
from core.files import file_entry  # noqa: E402
from core.manifest import write_index  # noqa: E402
from core.schema import DOCUMENT_SCHEMA  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="20k and 60k documents")
parser.add_argument("--smoke", action="store_true", help="seconds: 500 and 1,000 documents, no warm-up")
parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 4_000_000, 10_000_000])
parser.add_argument("--words", type=int, default=300)
args = parser.parse_args()
if args.quick:
    args.sizes = [20_000, 60_000]
if args.smoke:
    args.sizes = [500, 1000]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

CHUNK = 20_000
FILE_DOCS = 500_000  # documents per Parquet file of the corpus (written in parallel, one process each)


def _chunk_texts(rng: np.random.Generator, vocab: list[str], cdf: np.ndarray, m: int) -> list[str]:
    """``m`` documents of Zipf words; 5% are variants of the previous one, 1% of their words replaced
    (Jaccard ~0.9)."""
    words = np.searchsorted(cdf, rng.random((m, args.words)))
    variant = rng.random(m) < 0.05
    variant[0] = False
    for i in np.flatnonzero(variant):
        words[i] = words[i - 1]
        edits = rng.random(args.words) < 0.01
        words[i, edits] = rng.integers(0, len(vocab), edits.sum())
    return [" ".join([vocab[w] for w in row]) for row in words.tolist()]


def _write_file(job: tuple[Path, int, int, int]) -> dict:
    file, start, n, seed = job
    vocab = [f"w{i}" for i in range(50_000)]
    cdf = np.cumsum(1.0 / np.arange(1, len(vocab) + 1))
    cdf /= cdf[-1]
    with pq.ParquetWriter(file, DOCUMENT_SCHEMA, compression="zstd") as writer:
        for offset in range(0, n, CHUNK):
            m = min(CHUNK, n - offset)
            first = start + offset
            texts = _chunk_texts(np.random.default_rng([seed, first]), vocab, cdf, m)
            writer.write_table(
                pa.table(
                    {
                        "id": [f"doc{first + i:09d}" for i in range(m)],
                        "url": [None] * m,
                        "text": texts,
                        "source": ["synthetic"] * m,
                        "lang": ["en"] * m,
                        "fetched_at": [None] * m,
                        "meta": [[] for _ in range(m)],
                    },
                    schema=DOCUMENT_SCHEMA,
                )
            )
    return file_entry(file, n)


def write_corpus(path: Path, n: int, seed: int = 0) -> None:
    """``n`` synthetic documents in Parquet files of ``FILE_DOCS``, two written at a time (one file: in this
    process); every chunk's random stream is seeded by its first document, so a corpus is the same however
    it is split."""
    from multiprocessing import get_context

    path.mkdir(parents=True)
    jobs = [
        (path / f"part-{k:05d}.parquet", start, min(FILE_DOCS, n - start), seed)
        for k, start in enumerate(range(0, n, FILE_DOCS))
    ]
    if len(jobs) == 1:
        entries = [_write_file(jobs[0])]
    else:
        with get_context("spawn").Pool(2) as pool:
            entries = pool.map(_write_file, jobs)
    write_index(path, stage="clean", cache_key="bench", files=entries, schema=DOCUMENT_SCHEMA)


def phase_peaks(out: Path) -> dict[str, float]:
    """The largest peak RSS (MiB) of any task of each phase, from the tasks' completion markers."""
    peaks: dict[str, float] = {}
    for marker in (out / "_work" / "_done").glob("*.json"):
        phase = marker.stem.split("-")[0].rstrip("0123456789")
        peak = json.loads(marker.read_text()).get("peak_rss_mb", 0)
        peaks[phase] = max(peaks.get(phase, 0), peak)
    return dict(sorted(peaks.items()))


def main() -> None:
    import ray

    # Here, not at the top: the corpus writers (spawned) import this file, and need none of this.
    from orchestration.config import DedupConfig
    from orchestration.dedup import run_dedup_stage

    work = Path(tempfile.mkdtemp(prefix="lmf-bench-dedup-scale-"))
    ray.init(num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        if not args.smoke:  # start the workers and load the compiled kernels before timing
            warm = work / "warm"
            write_corpus(warm, 2_000)
            run_dedup_stage(warm, work / "warm-out", DedupConfig(), cache_key="warm", inputs={})
        for n in args.sizes:
            docs = work / f"docs-{n}"
            t0 = time.perf_counter()
            write_corpus(docs, n)
            gen_seconds = time.perf_counter() - t0
            with PeakRss() as rss:
                start = time.perf_counter()
                index = run_dedup_stage(docs, work / f"out-{n}", DedupConfig(), cache_key="bench", inputs={})
                seconds = time.perf_counter() - start
            c = index["counters"]
            us = round(1e6 * seconds / n, 1)
            smallest = results[0] if results else {"documents": n, "us_per_doc": us}
            peak = round(max(rss.driver, rss.worker) / 2**20)
            line = {
                "bench": f"dedup_scale.{n}",
                "unit": "us/doc",
                "ours": us,
                "peer": f"the same stage at {smallest['documents']:,} documents",
                "peer_value": smallest["us_per_doc"],
                "ratio": round(us / smallest["us_per_doc"], 3),
                "goal": 1.2,
                "ok": us / smallest["us_per_doc"] <= 1.2 and peak <= 3072,
                "documents": n,
                "seconds": round(seconds, 1),
                "us_per_doc": us,
                "kept": c["kept"],
                "removed": c["rejected"],
                "clusters": c.get("clusters"),
                "peak_rss_mb_driver": round(rss.driver / 2**20),
                "peak_rss_mb_worker": round(rss.worker / 2**20),
                "peak_rss_mb_by_phase": phase_peaks(work / f"out-{n}"),
                "shards": index["counters"].get("shards"),
                "corpus_write_seconds": round(gen_seconds, 1),
            }
            print(json.dumps(line), flush=True)
            results.append(line)
            shutil.rmtree(docs)
            shutil.rmtree(work / f"out-{n}")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    growth = results[-1]["us_per_doc"] / results[0]["us_per_doc"]
    peak = max(max(r["peak_rss_mb_driver"], r["peak_rss_mb_worker"]) for r in results)
    print(
        json.dumps(
            {
                "bench": "dedup_scale",
                "per_doc_time_growth": round(growth, 2),
                "peak_rss_mb_any_process": peak,
                "goal": "per-document time growth <= 1.2 from the smallest to the largest size (issue 19: "
                "1M to 10M) and every process's peak RSS <= 3 GB",
                "ok": growth <= 1.2 and peak <= 3072,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
