"""Scoring dealt out across torch.distributed ranks gives every rank the single-process results."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.conftest import free_port

pytestmark = pytest.mark.integration

# Seven batches of 64 tokens: rank 0 forwards four, rank 1 three and one filler.
REQUESTS = [(f"Question {i}: which is it?" * (1 + i % 3), f" answer {j}") for i in range(8) for j in range(3)]


def _rank(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    from evaluation.harness import load_model
    from evaluation.loglikelihood import CausalScorer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, tokenizer = load_model(model_dir, threads=1)
        scorer = CausalScorer(model, tokenizer, batch_tokens=64, across_ranks=True)
        Path(out, f"rank{rank}.json").write_text(json.dumps(scorer.loglikelihood(REQUESTS)))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo over loopback")
def test_every_rank_gets_all_results_equal_to_one_process(tiny_model, tmp_path):
    from evaluation.harness import load_model
    from evaluation.loglikelihood import CausalScorer

    mp.start_processes(
        _rank, args=(2, free_port(), str(tiny_model), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    model, tokenizer = load_model(tiny_model)
    scorer = CausalScorer(model, tokenizer, batch_tokens=64)
    alone = scorer.loglikelihood(REQUESTS)
    for rank in range(2):
        shared = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(shared) == len(alone)
        for (a, ga), (b, gb) in zip(shared, alone):
            assert a == pytest.approx(b, abs=1e-5) and ga == gb
