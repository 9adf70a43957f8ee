"""Tokenization into Arrow token shards vs raw `tokenizers` encode_batch over the same texts, same threads.

Peer: ``Tokenizer.encode_batch`` over the in-memory texts in batches of 1024 (``add_special_tokens=False``),
nothing else: no reading, no EOS, no numpy, no writing.
Ours, 1 thread: ``tokenize_partition`` in this process (encode, EOS, split, pack, write shards, sha256).
Ours, 2 workers: the tokenize stage on a local Ray with 2 CPUs, reading the documents' Parquet dataset
(partitions as Ray tasks, each single-threaded) vs encode_batch on a 2-thread rayon pool.
Goal (issue 7): >= 0.9x of the peer at the same number of threads.

    .venv/bin/python benchmarks/tokenize.py [--quick | --smoke] [--mb 64] [--workers 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

# The repository root replaces benchmarks/ on the path: this file's name would shadow the stdlib tokenize.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="8 MB of text instead of 64")
parser.add_argument("--smoke", action="store_true", help="seconds: 0.3 MB, a 1k vocabulary, one repetition")
parser.add_argument("--mb", type=float, default=64, help="MB of text to tokenize")
parser.add_argument("--workers", type=int, default=2, help="threads / Ray workers of the parallel comparison")
parser.add_argument("--vocab", type=int, default=32768)
args = parser.parse_args()
if args.quick:
    args.mb = 8
if args.smoke:
    args.mb, args.vocab = 0.3, 1024
REPEATS = 1 if args.smoke else 3
# The rayon pool of this process (the peer's) gets exactly --workers threads; set before tokenizers loads.
os.environ["RAYON_NUM_THREADS"] = str(args.workers)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from tokenizers import Tokenizer  # noqa: E402

from benchmarks.common import documents_table, median_time, pydoc_texts, result, summary  # noqa: E402
from core.files import file_entry, write_parquet  # noqa: E402
from core.manifest import write_index  # noqa: E402
from core.schema import DOCUMENT_SCHEMA  # noqa: E402
from training.data.tokenize import (  # noqa: E402
    TokenizeConfig,
    prepare_tokenizer,
    tokenize_partition,
)
from training.data.tokenizer import TokenizerConfig, train_bpe  # noqa: E402

BATCH = 1024


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="lmf-bench-tok-"))
    try:
        texts = pydoc_texts(int(args.mb * 1e6))
        mb = sum(map(len, texts)) / 1e6
        table = documents_table(texts)
        print(f"{len(texts)} documents, {mb:.1f} MB of pydoc text", flush=True)

        tok_cfg = TokenizerConfig(vocab_size=args.vocab)
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        tokenizer = train_bpe(texts[: max(1, len(texts) // 4)], tok_cfg)
        tok_path = work / "trained.json"
        tokenizer.save(str(tok_path))
        tokenizer = Tokenizer.from_file(str(tok_path))
        cfg = TokenizeConfig(
            tokenizer=TokenizerConfig(vocab_size=args.vocab, path=str(tok_path)),
            batch_size=BATCH,
            # The default partition size (16 MiB); --quick and --smoke cut their text into 2 partitions per worker.
            partition_mb=args.mb / (2 * args.workers)
            if args.quick or args.smoke
            else TokenizeConfig().partition_mb,
        )

        def peer() -> None:
            for start in range(0, len(texts), BATCH):
                tokenizer.encode_batch(texts[start : start + BATCH], add_special_tokens=False)

        out = work / "one"
        prepared = prepare_tokenizer(lambda: texts, lambda: table.column("id").to_pylist(), out, cfg)

        def ours_one() -> None:
            tokenize_partition(table.to_batches(max_chunksize=BATCH), out, prepared, cfg, tokenizer=tokenizer)

        results = []
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read per call: encode_batch runs on this thread
        t_peer = median_time(peer, REPEATS)
        t_ours = median_time(ours_one, REPEATS)
        results.append(
            result(
                "tokenize.1thread", "MB/s", mb / t_ours, "tokenizers encode_batch, 1 thread", mb / t_peer, 0.9
            )
        )

        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        t_peer = median_time(peer, REPEATS)
        import ray

        from orchestration.stages.tokenize import run_tokenize_stage

        docs = work / "docs"
        write_parquet(docs / "part-00000.parquet", table.to_batches(max_chunksize=BATCH), DOCUMENT_SCHEMA)
        entry = file_entry(docs / "part-00000.parquet", table.num_rows)
        write_index(docs, stage="dedup", cache_key="bench", files=[entry], schema=DOCUMENT_SCHEMA)
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        try:

            def ours_ray() -> None:
                shutil.rmtree(work / "ray", ignore_errors=True)
                run_tokenize_stage(docs, work / "ray", cfg)

            t_ours = median_time(ours_ray, REPEATS)
        finally:
            ray.shutdown()
        results.append(
            result(
                f"tokenize.{args.workers}workers",
                "MB/s",
                mb / t_ours,
                f"tokenizers encode_batch, {args.workers} rayon threads",
                mb / t_peer,
                0.9,
                size_mb=round(mb, 1),
            )
        )
        summary("tokenize", results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
