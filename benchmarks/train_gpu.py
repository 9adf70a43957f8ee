"""GPU training throughput and MFU: lmforge's trainer against a plain PyTorch + torch.compile loop, same run.

Ours: ``training.trainer.train`` with the GPU defaults (bf16 weights and activations with fp32 master weights,
SDPA attention, torch.compile through DeepSpeed's engine.compile, torch's fused AdamW, ZeRO's communication
overlapped with backward) at ZeRO 1, 2 and 3, reading the same token shards it trains from in a pipeline. One
GPU, one process: the per-worker step loop that Ray Train runs on each worker, without Ray around it, so the
script needs torch, transformers and DeepSpeed only (benchmarks/gpu_check.sh brings those to a CUDA machine).

Peer: the same transformers model (same preset, seed, sequence length and micro-batch) in the loop the best open
trainers start from (nanoGPT): fp32 weights under bf16 autocast, SDPA, torch.compile, fused AdamW, gradient
clipping, one optimizer step per micro-batch.

tokens/s is the mean over the steps after --warmup (compilation falls in the warmup); MFU = (6N + 12*L*d*T) *
tokens/s / peak, N the parameters in matmuls (nanoGPT's count, training/flops.py), peak the device's dense bf16
rate from its name (training/flops.py) unless --peak-tflops is given. Goals (issue 20, one H200): MFU >= 45%
(124M) and >= 50% (350M), and >= 0.95x the peer's tokens/s.

Plans, run in this order until --budget-s would be exceeded (the rest are printed as skipped):
  check: 124M and 350M at seq 1024 (peer, ZeRO-1), then ZeRO-2 and ZeRO-3, then seq 2048 (gpu_check.sh).
  full:  124M and 350M x seq 1024 and 2048 x ZeRO 1, 2, 3, each with its peer.
  quick: 124M at seq 1024, peer and ZeRO-1.
Without CUDA it prints one line with "skipped" and exits 0; --smoke runs the quick plan on the CPU with a
debug-size model, no compile (fp32) and, unless given, 4 steps of 1,024 tokens (GPT-2's vocabulary makes the
default batch's logits gigabytes) to test the script itself.

    python benchmarks/train_gpu.py [--plan check|full|quick] [--budget-s 360] [--out results.jsonl] [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--plan", choices=("check", "full", "quick"), default="check")
parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop before a run would pass this")
parser.add_argument("--peak-tflops", type=float, default=None, help="default: the device's, from its name")
parser.add_argument("--tokens-per-batch", type=int, default=32_768, help="micro-batch size x seq_len")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--warmup", type=int, default=10, help="steps left out of the mean (compilation)")
parser.add_argument("--out", type=Path, default=None, help="also append each JSON line to this file")
parser.add_argument(
    "--smoke", action="store_true", help="CPU, debug model, fp32, no compile, 4 small steps: test the script"
)
args = parser.parse_args()
if args.smoke:  # smoke sizes where not given
    for name, value in (("steps", 4), ("warmup", 2), ("tokens_per_batch", 1024)):
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
START = time.monotonic()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

VOCAB = 50_257
PLANS = {
    "quick": [("124m", 1024, 1)],
    "check": [("124m", 1024, 1), ("350m", 1024, 1), ("124m", 1024, 2), ("124m", 1024, 3), ("350m", 1024, 2),
              ("350m", 1024, 3), ("124m", 2048, 1), ("350m", 2048, 1)],
    "full": [(p, s, z) for p in ("124m", "350m") for s in (1024, 2048) for z in (1, 2, 3)],
}  # fmt: skip
GOAL_MFU = {"124m": 45.0, "350m": 50.0}
GOAL_RATIO = 0.95


def emit(line: dict) -> None:
    print(json.dumps(line), flush=True)
    if args.out is not None:
        with args.out.open("a") as f:
            f.write(json.dumps(line) + "\n")


def random_tokens(work: Path, tokens: int) -> Path:
    """Token shards of random GPT-2 ids, with the index and tokenizer the trainer reads."""
    import numpy as np

    from training.data.shards import TokenShardWriter
    from training.data.tokenize import Prepared, TokenizeConfig, write_token_index
    from training.data.tokenizer import TokenizerConfig, train_bpe

    out = work / "tokens"
    rng = np.random.default_rng(0)
    writer = TokenShardWriter(out, "train", VOCAB)
    n_docs = tokens // 4096
    ids = rng.integers(0, VOCAB - 1, size=n_docs * 4096, dtype=np.uint16)
    ids[4095::4096] = VOCAB - 1  # each document ends with the end-of-document id
    writer.add_many([f"d{i}" for i in range(n_docs)], ids, np.full(n_docs, 4096))
    shards = writer.close()
    # The export at the end of a run copies a tokenizer; the model's vocabulary comes from the index.
    train_bpe(["lmforge benchmark text"] * 10, TokenizerConfig(vocab_size=300)).save(
        str(out / "tokenizer.json")
    )
    prepared = Prepared("tokenizer.json", "random", VOCAB, VOCAB - 1, "<|endoftext|>")
    write_token_index(out, prepared, TokenizeConfig(), [{"shards": {"train": shards, "val": shards[:1]}}])
    return out


def model_config(preset: str) -> dict:
    return {"preset": "debug", "n_layer": 2, "n_embd": 128, "n_head": 4} if args.smoke else {"preset": preset}


def train_config(preset: str, seq: int, stage: int):
    from training.config import TrainConfig

    return TrainConfig.model_validate(
        {
            "model": model_config(preset),
            "seq_len": seq,
            "micro_batch_size": max(1, args.tokens_per_batch // seq),
            "steps": args.steps,
            "warmup_steps": min(5, args.steps - 1),
            "zero_stage": stage,
            "use_gpu": not args.smoke,
            "lr": 6e-4,
            "verify_shards": "never",
            "peak_tflops": args.peak_tflops,
        }
    )


def ours(preset: str, seq: int, stage: int, data: Path, work: Path) -> dict:
    from training.trainer import train

    cfg = train_config(preset, seq, stage)
    out = work / f"{preset}-{seq}-zero{stage}"
    try:
        s = train(cfg, data, out, print_progress=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # checkpoint and export: GBs each
    measured = s["step_seconds"][args.warmup :]
    return {
        "tokens_per_s": cfg.tokens_per_step * len(measured) / sum(measured),
        "flops_per_token": s["flops_per_token"],
    }


def peer(preset: str, seq: int) -> dict:
    """nanoGPT's loop on the same transformers model: fp32 weights, bf16 autocast, compile, fused AdamW."""
    from training.flops import flops_per_token
    from training.model import ModelConfig, build_model, count_parameters

    cfg = train_config(preset, seq, 1)
    device = torch.device("cpu" if args.smoke else "cuda")
    model = build_model(
        ModelConfig(**model_config(preset)), VOCAB, seq, seed=cfg.seed, eos_token_id=VOCAB - 1
    )
    fpt = flops_per_token(
        count_parameters(model), model.config.num_hidden_layers, model.config.hidden_size, seq
    )
    model.to(device).train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=not args.smoke
    )
    step_model = model if args.smoke else torch.compile(model)
    g = torch.Generator(device).manual_seed(0)
    batch = cfg.micro_batch_size

    def step() -> None:
        tokens = torch.randint(0, VOCAB, (batch, seq + 1), device=device, generator=g)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.smoke):
            logits = step_model(input_ids=tokens[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps - args.warmup):
        step()
    sync()
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": batch * seq * (args.steps - args.warmup) / seconds, "flops_per_token": fpt}


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def init_single_process() -> None:
    """World size 1 for DeepSpeed (nccl on a GPU), as a torchrun'd worker would have it."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    torch.distributed.init_process_group("gloo" if args.smoke else "nccl")


def main() -> None:
    if not args.smoke and not torch.cuda.is_available():
        emit({"bench": "train_gpu", "skipped": "no CUDA device on this machine", "ok": False})
        return
    from training.flops import device_peak_tflops

    device_name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    peak = args.peak_tflops or (1.0 if args.smoke else device_peak_tflops(device_name))
    if peak is None:
        raise SystemExit(f"no dense bf16 peak known for {device_name!r}: pass --peak-tflops")
    work = Path(tempfile.mkdtemp(prefix="lmf-bench-gpu-"))
    init_single_process()
    results, durations = [], {}
    try:
        data = random_tokens(work, 8 * 2**20 if not args.smoke else 2**20)
        peers: dict[tuple[str, int], dict] = {}
        for preset, seq, stage in PLANS["quick" if args.smoke else args.plan]:
            seq = 128 if args.smoke else seq
            key = (preset, seq)
            # The first run of a model compiles from cold; later ones reuse inductor's caches.
            expected = durations.get(key, 0.0) * (1 if key in peers else 2)
            if time.monotonic() - START + expected > args.budget_s:
                emit(
                    {
                        "bench": f"train_gpu.{preset}.seq{seq}.zero{stage}",
                        "skipped": "time budget",
                        "ok": False,
                    }
                )
                continue
            t0 = time.monotonic()
            if key not in peers:
                peers[key] = peer(preset, seq)
                release()
            mine = ours(preset, seq, stage, data, work)
            release()
            durations[key] = time.monotonic() - t0
            other = peers[key]
            mfu = 100 * mine["flops_per_token"] * mine["tokens_per_s"] / (peak * 1e12)
            peer_mfu = 100 * other["flops_per_token"] * other["tokens_per_s"] / (peak * 1e12)
            ratio = mine["tokens_per_s"] / other["tokens_per_s"]
            line = {
                "bench": f"train_gpu.{preset}.seq{seq}.zero{stage}",
                "unit": "tokens/s",
                "ours": round(mine["tokens_per_s"], 1),
                "peer": "plain PyTorch + torch.compile loop (bf16 autocast, fused AdamW), same model and batch",
                "peer_value": round(other["tokens_per_s"], 1),
                "ratio": round(ratio, 3),
                "goal": GOAL_RATIO,
                "mfu_pct": round(mfu, 2),
                "peer_mfu_pct": round(peer_mfu, 2),
                "mfu_goal_pct": GOAL_MFU[preset],
                "ok": ratio >= GOAL_RATIO and mfu >= GOAL_MFU[preset],
                "device": device_name,
                "peak_tflops": peak,
                "micro_batch": max(1, args.tokens_per_batch // seq),
                "seconds": round(durations[key], 1),
                **({"smoke": True} if args.smoke else {}),
            }
            emit(line)
            results.append(line)
        emit(
            {"bench": "train_gpu", "ok": bool(results) and all(r["ok"] for r in results), "results": results}
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
