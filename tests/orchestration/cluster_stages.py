"""The data stages, clean -> dedup -> tokenize, run by a driver against a Ray cluster (``--address``) or an
embedded Ray, with every output below one store (a local path or an s3:// URI). Prints one JSON line: each
stage's index digest and the Ray nodes its tasks ran on (from their completion markers).

    python -m tests.orchestration.cluster_stages CORPUS_URI OUT_URI [--address HOST:PORT]
"""

from __future__ import annotations

import argparse
import json

from core.manifest import index_digest
from core.storage import Store
from ingestion.readers import ReadConfig
from orchestration.config import CleanConfig, DedupConfig
from orchestration.dedup import run_dedup_stage
from orchestration.executors import corpus_source, ensure_ray, run_document_stage, run_tokenize_stage
from orchestration.pipeline import clean_stages
from training.data.tokenize import TokenizeConfig
from training.data.tokenizer import TokenizerConfig


def run(corpus: str, out: Store) -> dict:
    read = ReadConfig(paths=[corpus], batch_size=16)
    parts = [(f"read-{i:05d}", corpus_source(uri, read)) for i, uri in enumerate(read.inputs())]
    clean = run_document_stage(
        "clean",
        clean_stages(CleanConfig(gopher_repetition=None)),
        parts,
        out / "clean",
        cache_key="k",
        inputs={},
    )
    dedup = run_dedup_stage(
        out / "clean", out / "dedup", DedupConfig(partition_mb=0.004, shards=2), cache_key="k", inputs={}
    )
    config = TokenizeConfig(
        tokenizer=TokenizerConfig(vocab_size=300, min_frequency=1), val_fraction=0.2, partition_mb=0.004
    )
    tokens = run_tokenize_stage(out / "dedup", out / "tokenize", config)
    markers = {"clean": ["_done"], "dedup": ["_work/_done"], "tokenize": ["_done"]}
    nodes = {
        stage: sorted(
            {
                json.loads((out / stage).read_bytes(f"{d}/{m}")).get("node", "")
                for d in dirs
                for m in (out / stage / d).files()
            }
        )
        for stage, dirs in markers.items()
    }
    return {
        "digests": {
            name: index_digest(index)
            for name, index in (("clean", clean), ("dedup", dedup), ("tokenize", tokens))
        },
        "counters": {"clean": clean["counters"], "dedup": dedup["counters"], "tokenize": tokens["counters"]},
        "nodes": nodes,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("corpus")
    parser.add_argument("out")
    parser.add_argument("--address")
    args = parser.parse_args()
    ensure_ray(args.address, 2, 300, dashboard=False)
    print(json.dumps(run(args.corpus, Store(args.out))))
