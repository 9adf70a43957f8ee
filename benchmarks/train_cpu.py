"""Training step throughput on CPU: DeepSpeed (ZeRO-2) via Ray Train vs a plain PyTorch loop.

Same model (GPT-2 architecture, random init, same seed), same micro-batch of sequences from the same token
shards, same optimizer (AdamW, fp32), same gradient clipping, same threads per worker. The peer runs in
this process with ``torch.set_num_threads(threads)``; ours is ``lmforge``'s trainer on Ray Train workers
that reserve ``threads`` CPUs each. Both report the median step time after warmup steps.

Results: 1 worker ours vs plain (goal >= 0.9x, issue 8), and 2-worker scaling (tokens/s of 2 workers over
1 worker, each with ``threads`` threads; ideal 2.0 on a machine with 2 free cores per worker pair).

    .venv/bin/python benchmarks/train_cpu.py [--quick | --smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="a smaller model and fewer steps")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
parser.add_argument("--threads", type=int, default=1, help="torch threads (and Ray CPUs) per worker")
parser.add_argument("--zero-stage", type=int, default=2)
parser.add_argument(
    "--smoke", action="store_true", help="seconds: a one-layer model, 4 steps, a 512 vocabulary"
)
args = parser.parse_args()
if args.smoke:
    args.warmup = 1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import documents_table, pydoc_texts, result, summary  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data.shards import DistributedBatchSampler, TokenSequences  # noqa: E402
from training.data.tokenize import TokenizeConfig, tokenize_documents  # noqa: E402
from training.data.tokenizer import TokenizerConfig  # noqa: E402
from training.model import build_model  # noqa: E402
from training.schedule import lr_multiplier  # noqa: E402

if args.smoke:
    MODEL = {"preset": "debug", "n_layer": 1, "n_embd": 32, "n_head": 2}
    SEQ, BATCH, STEPS = 32, 2, 4
elif args.quick:
    MODEL = {"preset": "debug", "n_layer": 2, "n_embd": 128, "n_head": 4}
    SEQ, BATCH, STEPS = 128, 8, 15
else:
    MODEL = {"preset": "debug", "n_layer": 4, "n_embd": 256, "n_head": 4}
    SEQ, BATCH, STEPS = 256, 8, args.steps


def token_data(work: Path) -> Path:
    texts = pydoc_texts(100_000 if args.smoke else 3_000_000)
    table = documents_table(texts)
    out = work / "tokens"
    vocab = 512 if args.smoke else 8192
    cfg = TokenizeConfig(tokenizer=TokenizerConfig(vocab_size=vocab), val_fraction=0.01)
    tokenize_documents(lambda: table.to_batches(max_chunksize=1024), out, cfg)
    return out


def config(workers: int) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "model": MODEL,
            "seq_len": SEQ,
            "micro_batch_size": BATCH,
            "num_workers": workers,
            "cpus_per_worker": args.threads,
            "steps": STEPS,
            "warmup_steps": 2,
            "zero_stage": args.zero_stage,
            "lr": 1e-3,
            "checkpoint_every": 0,
            "keep_checkpoints": 1,
        }
    )


def plain_pytorch(cfg: TrainConfig, data_dir: Path) -> tuple[float, list[float]]:
    """Median step seconds and losses of the reference loop (nanoGPT-style)."""
    torch.set_num_threads(args.threads)
    data = TokenSequences(data_dir, "train", cfg.seq_len)
    sampler = DistributedBatchSampler(len(data), cfg.micro_batch_size, 0, 1, seed=cfg.seed)
    model = build_model(cfg.model, data.index["tokenizer"]["vocab_size"], cfg.seq_len, seed=cfg.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=1e-8, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    )
    times, losses = [], []
    model.train()
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        seqs = torch.from_numpy(data.batch(sampler.next_indices()).astype(np.int64))
        logits = model(input_ids=seqs[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), seqs[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    return statistics.median(times[args.warmup :]), losses


def lmforge(cfg: TrainConfig, data_dir: Path, out: Path) -> tuple[float, list[float]]:
    from orchestration.training_launch import launch_training

    s = launch_training(cfg, data_dir, out, run_name=out.name)
    return statistics.median(s["step_seconds"][args.warmup :]), s["losses"]


def main() -> None:
    import ray

    work = Path(tempfile.mkdtemp(prefix="lmf-bench-train-"))
    try:
        data_dir = token_data(work)
        one = config(1)
        print(
            f"model {MODEL}, seq {SEQ}, micro-batch {BATCH}, {STEPS} steps, {args.threads} thread(s)/worker"
        )
        ray.init(num_cpus=max(2, 2 * args.threads), include_dashboard=True, log_to_driver=False)
        try:
            ours_1, losses_1 = lmforge(one, data_dir, work / "one")
            ours_2, _ = lmforge(config(2), data_dir, work / "two")
        finally:
            ray.shutdown()
        peer_1, peer_losses = plain_pytorch(one, data_dir)
        tokens_1 = one.tokens_per_step
        results = [
            result(
                "train_cpu.1worker",
                "tokens/s",
                tokens_1 / ours_1,
                f"plain PyTorch loop, {args.threads} thread(s)",
                tokens_1 / peer_1,
                0.9,
                zero_stage=args.zero_stage,
                loss_first_last_ours=[round(losses_1[0], 4), round(losses_1[-1], 4)],
                loss_first_last_peer=[round(peer_losses[0], 4), round(peer_losses[-1], 4)],
            ),
            result(
                "train_cpu.2worker_scaling",
                "tokens/s",
                2 * tokens_1 / ours_2,
                "lmforge, 1 worker",
                tokens_1 / ours_1,
                1.6,
                zero_stage=args.zero_stage,
            ),
        ]
        summary("train_cpu", results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
