"""End-to-end near-duplicate removal: lmforge's dedup stage on Ray vs DataTrove 0.10.1's 4-stage MinHash
pipeline (signatures, buckets, cluster, filter), same documents, matching parameters, same cores.

Parameters as DataTrove's defaults: 5-word shingles, 14 bands x 8 rows (112 permutations), and no
verification (every bucket match is a duplicate, as DataTrove does): lmforge runs with
``verify='none'``, exact dedup off. Documents: synthetic ~300-word texts over an alphabetic Zipf
vocabulary (so DataTrove's spaCy word tokenizer and number normalization split them as lmforge does),
5% of them variants of another with 1% of words replaced. Both sides read the same documents (DataTrove
from JSONL, lmforge from Parquet, both written before timing) and run on ``--workers`` processes.
Reported: documents/s of each, the ratio, and how much the duplicate clusters differ: the share of
lmforge's clusters from which DataTrove did not remove exactly all members but one, plus documents
DataTrove removed outside them (the two keep different survivors: lmforge the smallest id, DataTrove
its union-find root). Goals (issue 6): >= 5x, clusters within 1%.

Needs DataTrove: ``.venv/bin/pip install -e '.[bench]'`` (``--smoke`` runs lmforge's side alone without it).

    .venv/bin/python benchmarks/dedup_datatrove.py [--quick | --smoke] [--docs 5000] [--workers 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.common import installed, not_installed, result, summary  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="1,000 documents")
parser.add_argument("--smoke", action="store_true", help="seconds: 200 documents")
parser.add_argument("--docs", type=int, default=5000)
parser.add_argument("--workers", type=int, default=2)
args = parser.parse_args()
if args.quick:
    args.docs = 1000
if args.smoke:
    args.docs = 200
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def corpus(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = np.array(
        sorted({"".join(rng.choice(letters, size=int(rng.integers(3, 10)))) for _ in range(60_000)})
    )
    p = 1.0 / np.arange(1, vocab.size + 1)
    p /= p.sum()
    words = vocab[rng.choice(vocab.size, size=(n, 300), p=p)]
    for i in np.flatnonzero(rng.random(n) < 0.05)[1:]:
        words[i] = words[i - 1]
        edits = rng.random(300) < 0.01
        words[i, edits] = vocab[rng.integers(0, vocab.size, edits.sum())]
    return [f"doc{i:08d}" for i in range(n)], [" ".join(row) for row in words]


def run_datatrove(work: Path, files: int) -> tuple[float, set[str]]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=1)
    jsonl, dt = str(work / "jsonl"), work / "datatrove"
    logs = str(dt / "logs")
    start = time.perf_counter()
    LocalPipelineExecutor(
        [JsonlReader(jsonl), MinhashDedupSignature(output_folder=str(dt / "sigs"), config=cfg)],
        tasks=files,
        workers=args.workers,
        logging_dir=f"{logs}/1",
    ).run()
    LocalPipelineExecutor(
        [MinhashDedupBuckets(input_folder=str(dt / "sigs"), output_folder=str(dt / "buckets"), config=cfg)],
        tasks=cfg.num_buckets,
        workers=args.workers,
        logging_dir=f"{logs}/2",
    ).run()
    LocalPipelineExecutor(
        [MinhashDedupCluster(input_folder=str(dt / "buckets"), output_folder=str(dt / "remove"), config=cfg)],
        tasks=1,
        logging_dir=f"{logs}/3",
    ).run()
    LocalPipelineExecutor(
        [
            JsonlReader(jsonl),
            MinhashDedupFilter(
                input_folder=str(dt / "remove"), exclusion_writer=JsonlWriter(str(dt / "removed"))
            ),
            JsonlWriter(str(dt / "kept")),
        ],
        tasks=files,
        workers=args.workers,
        logging_dir=f"{logs}/4",
    ).run()
    seconds = time.perf_counter() - start
    removed = set()
    for path in (dt / "removed").glob("*.jsonl*"):
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
            removed.update(json.loads(line)["id"] for line in f)
    return seconds, removed


def run_lmforge(work: Path) -> tuple[float, dict[str, str]]:
    import ray

    from cleaning.dedup import MinHashDedupConfig
    from core.manifest import read_table
    from orchestration.config import DedupConfig
    from orchestration.dedup import run_dedup_stage

    cfg = DedupConfig(
        exact=None,
        minhash=MinHashDedupConfig(num_perm=112, bands=14, rows=8, verify="none", ngram=5, seed=1),
        partition_mb=max(1.0, args.docs * 2200 / 2**20 / args.workers / 2),
        shards=args.workers,
    )
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    try:
        if not args.smoke:  # a smoke run times its start-up too
            warm = work / "warm"
            run_dedup_stage(work / "parquet", warm, cfg, cache_key="warm", inputs={})  # workers + kernels
            shutil.rmtree(warm)
        start = time.perf_counter()
        run_dedup_stage(work / "parquet", work / "lmforge", cfg, cache_key="bench", inputs={})
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    rejected = read_table(work / "lmforge" / "rejected")
    return seconds, dict(zip(rejected.column("id").to_pylist(), rejected.column("duplicate_of").to_pylist()))


def main() -> None:
    from benchmarks.common import documents_table
    from core.files import file_entry, write_parquet
    from core.manifest import write_index
    from core.schema import DOCUMENT_SCHEMA

    peer = f"DataTrove 0.10.1 MinHash (4 stages), {args.workers} workers"
    has_peer = installed("datatrove")
    if not has_peer and not args.smoke:
        raise SystemExit("needs DataTrove: .venv/bin/pip install -e '.[bench]'")
    work = Path(tempfile.mkdtemp(prefix="lmf-bench-dt-"))
    try:
        ids, texts = corpus(args.docs)
        files = args.workers
        (work / "jsonl").mkdir()
        # Contiguous id ranges per file: DataTrove keeps the smallest (file, position) of a cluster, which
        # is then the smallest id, as lmforge's default keep rule.
        bounds = [len(ids) * f // files for f in range(files + 1)]
        for f in range(files):
            with gzip.open(work / "jsonl" / f"part-{f:02d}.jsonl.gz", "wt") as out:
                for i in range(bounds[f], bounds[f + 1]):
                    out.write(json.dumps({"id": ids[i], "text": texts[i]}) + "\n")
        table = documents_table(texts, source="synthetic", ids=ids)
        (work / "parquet").mkdir()
        write_parquet(
            work / "parquet" / "part-00000.parquet", table.to_batches(max_chunksize=500), DOCUMENT_SCHEMA
        )
        entry = file_entry(work / "parquet" / "part-00000.parquet", len(ids))
        write_index(work / "parquet", stage="clean", cache_key="bench", files=[entry], schema=DOCUMENT_SCHEMA)

        t_ours, removed_ours = run_lmforge(work)
        # Clusters, whatever survivor each side picked: lmforge's clusters agree with DataTrove when
        # DataTrove removed all but one member of each, and nothing outside them.
        clusters: dict[str, set[str]] = {}
        for doc_id, survivor in removed_ours.items():
            clusters.setdefault(survivor, {survivor}).add(doc_id)
        if not has_peer:
            line = result(
                "dedup.end_to_end",
                "docs/s",
                len(ids) / t_ours,
                not_installed(peer),
                None,
                5.0,
                documents=len(ids),
                removed_ours=len(removed_ours),
                clusters=len(clusters),
            )
            summary("dedup_datatrove", [line])
            return
        t_peer, removed_peer = run_datatrove(work, files)
        members = set().union(*clusters.values()) if clusters else set()
        disagree = sum(len(removed_peer & c) != len(c) - 1 for c in clusters.values())
        outside = len(removed_peer - members)
        difference = (disagree + outside) / max(len(clusters), 1)
        line = result(
            "dedup.end_to_end",
            "docs/s",
            len(ids) / t_ours,
            peer,
            len(ids) / t_peer,
            5.0,
            documents=len(ids),
            removed_ours=len(removed_ours),
            removed_datatrove=len(removed_peer),
            clusters=len(clusters),
            cluster_difference=round(difference, 4),
            other_goals_met=difference <= 0.01,
            same_clusters_within_1pct=difference <= 0.01,
        )
        summary("dedup_datatrove", [line])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
