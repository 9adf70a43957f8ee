"""The dedup stage (exact + MinHash-LSH on Ray) at scale: wall time, time per document, peak memory.

Synthetic documents of ~300 words from a Zipf vocabulary, 5% of them near-duplicate variants of another
document, are written to Parquet in chunks (bounded memory), then deduplicated by
``orchestration.dedup.run_dedup_stage`` on a local Ray with 2 CPUs. Peak RSS is sampled every 0.2 s
for the driver and for every Ray worker process. Sizes run from small to large so the growth of time per
document shows whether the stage scales linearly (issue 6: 1,000,000 documents without running out of
memory; time linear from 100k to 1M).

    .venv/bin/python benchmarks/dedup_scale.py [--quick] [--sizes 100000 1000000]
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
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from core.files import file_entry  # noqa: E402
from core.manifest import write_index  # noqa: E402
from core.schema import DOCUMENT_SCHEMA  # noqa: E402
from orchestration.config import DedupConfig  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="20k and 60k documents")
parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
parser.add_argument("--words", type=int, default=300)
args = parser.parse_args()
if args.quick:
    args.sizes = [20_000, 60_000]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

CHUNK = 20_000


def write_corpus(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(50_000)])
    p = 1.0 / np.arange(1, vocab.size + 1)
    p /= p.sum()
    path.mkdir(parents=True)
    file = path / "part-00000.parquet"
    with pq.ParquetWriter(file, DOCUMENT_SCHEMA, compression="zstd") as writer:
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            words = vocab[rng.choice(vocab.size, size=(m, args.words), p=p)]
            # 5% are variants of the previous document: 1% of their words replaced (Jaccard ~0.9).
            variant = rng.random(m) < 0.05
            variant[0] = False
            for i in np.flatnonzero(variant):
                words[i] = words[i - 1]
                edits = rng.random(args.words) < 0.01
                words[i, edits] = vocab[rng.integers(0, vocab.size, edits.sum())]
            texts = [" ".join(row) for row in words]
            writer.write_table(
                pa.table(
                    {
                        "id": [f"doc{start + i:09d}" for i in range(m)],
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
    write_index(path, stage="clean", cache_key="bench", files=[file_entry(file, n)], schema=DOCUMENT_SCHEMA)


class PeakRss:
    """Samples the RSS of this process and of every Ray worker process (by name) until stopped."""

    def __init__(self):
        self.driver = 0
        self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
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

    from orchestration.dedup import run_dedup_stage

    work = Path(tempfile.mkdtemp(prefix="lmf-bench-dedup-scale-"))
    ray.init(num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        warm = work / "warm"  # start the workers and load the compiled kernels before timing
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
            line = {
                "bench": f"dedup_scale.{n}",
                "documents": n,
                "seconds": round(seconds, 1),
                "us_per_doc": round(1e6 * seconds / n, 1),
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
    print(
        json.dumps(
            {
                "bench": "dedup_scale",
                "per_doc_time_growth": round(growth, 2),
                "goal": "linear: per-document time growth <= 1.3 from the smallest to the largest size",
                "ok": growth <= 1.3,
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
