"""The per-worker training loop: data-parallel rank's loader, DeepSpeed engine, checkpoints, export.

It runs inside a Ray Train worker (orchestration/training_launch.py) or any process where
torch.distributed is set up; it takes rank and world size from torch.distributed and reports metrics
through a callback, so it imports neither Ray nor MLflow.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import resource
import time
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer

from core.files import atomic_write_bytes
from training import engine as ds_engine
from training.config import PROGRESS_FILE, EngineConfig, TrainConfig
from training.data.mixture import MixturePlan, MixtureSampler, entry_of
from training.data.shards import (
    BatchSampler,
    DistributedBatchSampler,
    MixedSequences,
    ShardError,
    TokenSequences,
    read_token_index,
)
from training.data.tokenizer import EOS_TOKEN, load_tokenizer, tokenizer_id
from training.flops import device_peak_tflops, flops_per_token
from training.model import (
    apply_model_switches,
    build_model,
    count_parameters,
    freeze_first_layers,
    load_pretrained,
)
from training.objectives import (
    IGNORE,
    MASK_TOKEN,
    PAD_TOKEN,
    SENTINELS,
    ObjectiveBatches,
    SpecialIds,
    batch_rng,
    other_documents,
    sentinel_token,
    word_starts,
)
from training.ranks import mean_across_ranks, rank_world

MetricsCallback = Callable[[dict[str, float], int], None]
#: Called on every rank after each checkpoint with its directory, the step and the last step's metrics.
CheckpointCallback = Callable[[Path, int, dict[str, float]], None]
#: Called on every rank every ``eval_every`` steps with the (possibly ZeRO-3 sharded) module in eval mode
#: and the step, all ranks together; rank 0's returned metrics are reported with that step's.
EvalCallback = Callable[[torch.nn.Module, int], dict[str, float]]


def _write_progress(out_dir: Path, step: int, steps: int, metrics: dict[str, float]) -> None:
    """Rank 0's latest step for a driver-side progress bar (written atomically, read by polling)."""
    atomic_write_bytes(
        out_dir / PROGRESS_FILE, json.dumps({"step": step, "steps": steps, **metrics}).encode()
    )


def hf_tokenizer(
    tokenizer_json: Path,
    info: dict[str, Any],
    objective: str = "causal_lm",
    max_length: int | None = None,
    token_types: bool = False,
) -> transformers.PreTrainedTokenizerFast:
    """The shards' tokenizer as the exported model will have it.

    Decoders: EOS is also BOS and padding. Masked LMs: <cls>/<sep>/<mask>/<pad> as BERT names them;
    T5: <pad> and the <extra_id_k> sentinels, EOS ends inputs and targets. ``max_length``: the model's
    positions (``model_max_length``); padding on the right, as lmforge's own batches pad. ``token_types``:
    the model takes token type ids (BERT); others are given none (GPT-2, Llama, RoBERTa, T5).
    """
    eos = info.get("eos_token", EOS_TOKEN)
    inputs = (
        ["input_ids", "token_type_ids", "attention_mask"] if token_types else ["input_ids", "attention_mask"]
    )
    common: dict[str, Any] = {
        "tokenizer_file": str(tokenizer_json),
        "padding_side": "right",
        "model_input_names": inputs,
    }
    if max_length is not None:
        common["model_max_length"] = max_length
    if objective == "masked_lm":
        return transformers.PreTrainedTokenizerFast(
            **common, cls_token="<cls>", sep_token="<sep>", mask_token=MASK_TOKEN, pad_token=PAD_TOKEN,
            eos_token=eos, bos_token="<cls>",
        )  # fmt: skip
    if objective == "span_corruption":
        return transformers.PreTrainedTokenizerFast(
            **common, eos_token=eos, pad_token=PAD_TOKEN,
            additional_special_tokens=[sentinel_token(k) for k in range(SENTINELS)],
        )  # fmt: skip
    return transformers.PreTrainedTokenizerFast(**common, bos_token=eos, eos_token=eos, pad_token=eos)


def _post_processor(tokenizer: Tokenizer, objective: str, eos: str, pair_type: int) -> dict[str, Any] | None:
    """The family's special tokens around a text (and a pair), as lmforge's own fine-tuning and scoring
    build inputs (training/finetune.py ``input_rows``): BERT/RoBERTa ``<cls> A <sep> (B <sep>)``, the pair's
    second text of token type ``pair_type`` (1 for BERT); T5 ``A (B) </s>``; decoders nothing
    (lm-evaluation-harness scores raw text)."""
    from tokenizers import processors

    def special(*names: str) -> list[tuple[str, int]]:
        return [(n, tokenizer.token_to_id(n)) for n in names]

    if objective == "masked_lm":
        template = processors.TemplateProcessing(
            single="<cls> $A <sep>",
            pair=f"<cls> $A <sep> $B:{pair_type} <sep>:{pair_type}",
            special_tokens=special("<cls>", "<sep>"),
        )
    elif objective == "span_corruption":
        template = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A $B {eos}", special_tokens=special(eos)
        )
    else:
        return None
    tokenizer.post_processor = template
    return json.loads(tokenizer.to_str())["post_processor"]


def export_tokenizer(
    tokenizer_json: Path,
    info: dict[str, Any],
    model_dir: Path,
    objective: str = "causal_lm",
    max_length: int | None = None,
    token_types: bool = False,
) -> None:
    """Save the tokenizer as a complete Hugging Face tokenizer directory: ``AutoTokenizer`` and
    ``pipeline`` encode as lmforge does (the family's special tokens, ``model_max_length``, padding side).

    tokenizer.json is the shards' own with the family's post-processor set in it (nothing else changed), so
    its :func:`tokenizer_id` is the shards' tokenizer's.
    """
    hf_tokenizer(tokenizer_json, info, objective, max_length, token_types).save_pretrained(model_dir)
    raw = Path(tokenizer_json).read_text(encoding="utf-8")
    data = json.loads(raw)
    eos = info.get("eos_token", EOS_TOKEN)
    post = _post_processor(Tokenizer.from_str(raw), objective, eos, int(token_types))
    if post is not None:
        data["post_processor"] = post
    atomic_write_bytes(model_dir / "tokenizer.json", json.dumps(data, ensure_ascii=False, indent=2).encode())


def _model(
    cfg: TrainConfig, data: TokenSequences, data_dir: str | Path, rank: int, special: SpecialIds
) -> torch.nn.Module:
    """A fresh model from the preset, or the ``init_from`` model (same tokenizer required) to fine-tune."""
    tokenizer = data.index["tokenizer"]
    if not cfg.init_from:
        return build_model(
            cfg.model,
            tokenizer["vocab_size"],
            cfg.seq_len,
            seed=cfg.seed,
            eos_token_id=tokenizer["eos_id"],
            special=special,
            next_sentence_prediction=cfg.masking.next_sentence_prediction,
        )
    expected = tokenizer_id(Path(cfg.init_from) / "tokenizer.json")
    if expected != tokenizer["id"]:
        raise ShardError(
            f"{data_dir} was tokenized with tokenizer {tokenizer['id'][:12]}, but "
            f"{cfg.init_from} uses {expected[:12]}; set tokenize.tokenizer.path={cfg.init_from}"
        )
    torch.manual_seed(cfg.seed)
    nsp = cfg.objective == "masked_lm" and cfg.masking.next_sentence_prediction
    model = apply_model_switches(
        load_pretrained(cfg.init_from, tokenizer["vocab_size"], cfg.objective, nsp), cfg.model
    )
    frozen = freeze_first_layers(model, cfg.freeze_layers)
    if rank == 0 and frozen:
        print(f"fine-tuning {cfg.init_from}: {frozen:,} parameters frozen", flush=True)
    return model


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over the labelled positions (0 with no gradient signal if there are none)."""
    flat = labels.reshape(-1)
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), flat, ignore_index=IGNORE, reduction="sum"
    )
    return total / (flat != IGNORE).sum().clamp(min=1)


@cache
def _no_cache(model_class: type) -> dict[str, bool]:
    """``use_cache=False`` for models that take it: training builds no key/value cache, and
    transformers reads packed documents from the position ids only without one."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model_class.forward).parameters else {}


def objective_loss(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of a batch from :class:`ObjectiveBatches`: its labels say which positions count.

    Masked LM with next-sentence prediction adds the NSP cross entropy, as BertForPreTraining does.
    """
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "next_sentence_label")}
    out = engine(**inputs, **_no_cache(type(engine.module)))
    if "next_sentence_label" in batch:
        nsp = F.cross_entropy(out.seq_relationship_logits.float(), batch["next_sentence_label"])
        return token_loss(out.prediction_logits, batch["labels"]) + nsp
    return token_loss(out.logits, batch["labels"])


def _train_step(
    engine,
    cfg: EngineConfig,
    next_batch: Callable[[int], dict[str, torch.Tensor]],
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor],
) -> float:
    """One optimizer step over ``grad_accum_steps`` micro-batches; the loss averaged over micro-batches."""
    step_loss = 0.0
    for micro in range(cfg.grad_accum_steps):
        loss = loss_fn(engine, next_batch(micro))
        engine.backward(loss)
        engine.step()
        step_loss += loss.item() / cfg.grad_accum_steps
    return step_loss


def _peak_tflops(cfg: EngineConfig, device: torch.device) -> float | None:
    """``peak_tflops``, else the device's dense bf16 peak where its name is known (once per run)."""
    if cfg.peak_tflops or device.type != "cuda":
        return cfg.peak_tflops
    return device_peak_tflops(torch.cuda.get_device_name(device))


def _step_metrics(
    engine, cfg: EngineConfig, loss: float, seconds: float, fpt: float, world: int, device, peak: float | None
) -> dict[str, float]:
    tokens_per_s = cfg.tokens_per_step / seconds
    metrics = {
        "loss": loss,
        "lr": float(engine.get_lr()[0]),
        "grad_norm": float(engine.get_global_grad_norm() or 0.0),
        "step_seconds": seconds,
        "tokens_per_s": tokens_per_s,
    }
    if peak:
        metrics["mfu"] = fpt * tokens_per_s / (peak * 1e12 * world)
    if device.type == "cuda":
        metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    metrics["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return metrics


def _evaluate(engine, on_eval: EvalCallback, step: int) -> dict[str, float]:
    engine.eval()
    try:
        t0 = time.perf_counter()
        with torch.no_grad():
            scores = on_eval(engine.module, step)
        return scores | {"eval/seconds": time.perf_counter() - t0}
    finally:
        engine.train()


def _export(
    engine,
    data: TokenSequences | MixedSequences,
    data_dir: str | Path,
    out_dir: Path,
    objective: str,
    seq_len: int,
) -> Path | None:
    """The fp32 model and its tokenizer as a Hugging Face directory (rank 0; collective gather first); the
    tokenizer's ``model_max_length`` is the model's positions, or ``seq_len`` (T5's are relative)."""
    state_dict = ds_engine.consolidated_state_dict(engine)
    if state_dict is None:
        return None
    model_dir = out_dir / "model"
    transformers.logging.disable_progress_bar()
    engine.module.save_pretrained(model_dir, state_dict=state_dict, safe_serialization=True)
    export_tokenizer(
        Path(data_dir) / data.index["tokenizer"]["path"], data.index["tokenizer"], model_dir, objective,
        max_length=_positions(engine.module.config) or seq_len,
        token_types=getattr(engine.module.config, "type_vocab_size", 1) > 1,
    )  # fmt: skip
    return model_dir


def _positions(config: transformers.PretrainedConfig) -> int | None:
    """The longest input the model takes: its position table (GPT-2 ``n_positions``, BERT
    ``max_position_embeddings``); None for relative positions (T5)."""
    for name in ("n_positions", "max_position_embeddings"):
        if isinstance(getattr(config, name, None), int):
            # RoBERTa's table starts after the padding index (roberta-base: 514 positions, 512 tokens).
            return getattr(config, name) - (2 if config.model_type == "roberta" else 0)
    return None


def _objective_batches(cfg: TrainConfig, data_dir: str | Path) -> tuple[ObjectiveBatches, SpecialIds]:
    """The objective's batch maker, with the special ids read from the shards' own tokenizer."""
    info = read_token_index(data_dir)["tokenizer"]
    path = Path(data_dir) / info["path"]
    tokenizer = load_tokenizer(path)
    special = SpecialIds.from_tokenizer(
        tokenizer, cfg.objective, info.get("eos_token", EOS_TOKEN), where=f"tokenizer {path}"
    )
    starts = word_starts(tokenizer) if cfg.masking.whole_word else None
    return ObjectiveBatches(
        cfg.objective, cfg.seq_len, special, cfg.masking, cfg.span_corruption, starts, cfg.document_masking
    ), special


def _data(
    cfg: TrainConfig, data_dir: str | Path, length: int, span: bool, rank: int, world: int
) -> tuple[TokenSequences | MixedSequences, BatchSampler]:
    """The training sequences and this rank's sampler: one shuffled pool, or the mixture's sources."""
    if cfg.mixture is None:
        data = TokenSequences(data_dir, "train", length, span_documents=span, verify=cfg.verify_shards)
        return data, DistributedBatchSampler(len(data), cfg.micro_batch_size, rank, world, seed=cfg.seed)
    plan = MixturePlan(cfg.mixture, cfg.steps, cfg.tokens_per_step // cfg.seq_len)
    parts = [
        TokenSequences(
            data_dir, "train", length, span_documents=span, verify=cfg.verify_shards, source=s, tier=t
        )
        for s, t in map(entry_of, plan.sources)
    ]
    caps = cfg.mixture.rehydrate
    mixed = MixedSequences(
        parts, [p.multiplicity(caps[p.source]) if p.source in caps else None for p in parts]
    )
    return mixed, MixtureSampler(plan, mixed.sizes, cfg.micro_batch_size, rank, world, seed=cfg.seed)


def mixture_metrics(sampler: BatchSampler, seq_len: int) -> dict[str, float]:
    """Tokens seen so far from each source of a mixture, over all workers (``seq_len`` per sequence, as
    ``tokens_per_step`` counts them; none without a mixture)."""
    if not isinstance(sampler, MixtureSampler):
        return {}
    return {f"mixture/tokens.{s}": float(n * seq_len) for s, n in zip(sampler.plan.sources, sampler.counts)}


def _mixture_summary(sampler: BatchSampler, seq_len: int) -> dict[str, Any]:
    if not isinstance(sampler, MixtureSampler):
        return {}
    return {
        "mixture": {
            "sources": sampler.plan.sources,
            "sequences": dict(zip(sampler.plan.sources, sampler.counts.tolist())),
            "tokens": {s: n * seq_len for s, n in zip(sampler.plan.sources, sampler.counts.tolist())},
            "source_sequences": dict(zip(sampler.plan.sources, sampler.sizes)),
        }
    }


def setup(cfg: EngineConfig, out_dir: str | Path) -> tuple[int, int, torch.device, Path]:
    """This process's rank, the world size (checked against the config), its device and the output dir."""
    rank, world = rank_world()
    if world != cfg.num_workers:
        raise RuntimeError(f"num_workers={cfg.num_workers} but torch.distributed has {world} ranks")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
    return rank, world, device, out_dir


def run_steps(
    engine,
    cfg: EngineConfig,
    sampler: BatchSampler,
    next_batch: Callable[[int, int], dict[str, torch.Tensor]],
    out_dir: Path,
    fpt: float,
    *,
    loss_fn: Callable[[Any, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    on_metrics: MetricsCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    print_progress: bool = True,
    on_eval: EvalCallback | None = None,
) -> tuple[int, list[float], list[float]]:
    """The optimizer steps of a run, pretraining or fine-tuning, resuming from ``out_dir/checkpoints``.

    ``next_batch(step, micro)`` gives the micro-batch's tensors (its randomness a function of the two and
    the sampler's state, which checkpoints carry); ``loss_fn`` turns one into the loss (default: the
    pretraining objectives' :func:`objective_loss`). Returns (resumed-from step, losses, step seconds).
    """
    rank, world = rank_world()
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
    ckpt_dir = out_dir / "checkpoints"
    start_step, losses, step_times = 0, [], []
    client_state = ds_engine.load_latest_checkpoint(engine, ckpt_dir, cfg)
    resumed = None
    if client_state is not None:
        sampler.load_state_dict(client_state["sampler"])
        start_step, losses = client_state["step"], list(client_state["losses"])
        resumed = client_state["checkpoint"]

    log_every, peak = max(1, cfg.steps // 10), _peak_tflops(cfg, device)
    engine.train()
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        loss_value = mean_across_ranks(
            _train_step(engine, cfg, partial(next_batch, step), loss_fn or objective_loss)
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        losses.append(loss_value)
        step_times.append(seconds)
        if not math.isfinite(loss_value):
            raise FloatingPointError(_nan_advice(loss_value, step + 1, resumed))
        metrics = _step_metrics(engine, cfg, loss_value, seconds, fpt, world, device, peak)
        metrics |= mixture_metrics(sampler, cfg.seq_len)
        done = step + 1
        if on_eval is not None and getattr(cfg, "eval_every", 0) and done % cfg.eval_every == 0:
            metrics |= _evaluate(engine, on_eval, done)
        if rank == 0:
            _write_progress(out_dir, done, cfg.steps, metrics)
            if on_metrics is not None:
                on_metrics(metrics, done)
            if print_progress and (done % log_every == 0 or done == cfg.steps):
                print(
                    f"step {done}/{cfg.steps} loss {loss_value:.4f} lr {metrics['lr']:.2e} "
                    f"{metrics['tokens_per_s']:,.0f} tokens/s",
                    flush=True,
                )
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
            state = {"sampler": sampler.state_dict(), "step": done, "losses": losses}
            tag_dir = ds_engine.save_checkpoint(engine, ckpt_dir, done, state, cfg.keep_checkpoints)
            if on_checkpoint is not None:
                on_checkpoint(tag_dir, done, metrics)
    return start_step, losses, step_times


def train(
    cfg: TrainConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    on_metrics: MetricsCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    print_progress: bool = True,
    on_eval: EvalCallback | None = None,
) -> dict[str, Any]:
    """Train (resuming from ``out_dir/checkpoints`` if present) and export the model to ``out_dir/model``.

    Returns a summary on rank 0 (losses per step, tokens/s, paths); other ranks return {}.
    """
    rank, world, device, out_dir = setup(cfg, out_dir)
    batches, special = _objective_batches(cfg, data_dir)
    span = cfg.span_documents if batches.span_documents is None else batches.span_documents
    data, sampler = _data(cfg, data_dir, batches.sample_length, span, rank, world)
    model = _model(cfg, data, data_dir, rank, special)
    fpt = flops_per_token(
        count_parameters(model), model.config.num_hidden_layers, model.config.hidden_size, cfg.seq_len
    )
    engine = ds_engine.initialize(model, cfg)

    def next_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        indices = sampler.next_indices()
        rng = batch_rng(cfg.seed, step, rank, micro)
        others = None
        if batches.nsp:
            others = data.batch(other_documents(rng, indices, data.sample_documents))
        arrays = batches.make(data.batch(indices), rng, others)
        return {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}

    start_step, losses, step_times = run_steps(
        engine, cfg, sampler, next_batch, out_dir, fpt,
        on_metrics=on_metrics, on_checkpoint=on_checkpoint, print_progress=print_progress, on_eval=on_eval,
    )  # fmt: skip
    model_dir = _export(engine, data, data_dir, out_dir, cfg.objective, cfg.seq_len)
    if model_dir is None:
        return {}
    summary = {
        "losses": losses,
        "steps": cfg.steps,
        "resumed_from": start_step,
        "tokens_seen": cfg.steps * cfg.tokens_per_step,
        **_mixture_summary(sampler, cfg.seq_len),
        "flops_per_token": fpt,
        "model_dir": str(model_dir),
        "tokenizer_id": data.index["tokenizer"]["id"],
        "world_size": world,
        "objective": cfg.objective,
        "step_seconds": step_times,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def _nan_advice(loss: float, step: int, resumed: dict[str, Any] | None) -> str:
    """What a non-finite loss means: the learning rate, unless the run resumed from a checkpoint that could
    not be checked against its manifest (one written by an older lmforge)."""
    said = f"loss became {loss} at step {step}"
    if resumed is None:
        return f"{said}; lower lr"
    if not resumed["verified"]:
        return (
            f"{said}, resumed from checkpoint {resumed['tag']}, which lists no file digests (an older "
            "lmforge wrote it) and could not be verified: if it changed on disk, delete it to resume from an "
            "earlier one; otherwise lower lr"
        )
    return f"{said}, resumed from checkpoint {resumed['tag']} (its files match their manifest); lower lr"


def main(argv: list[str] | None = None) -> None:
    """Train without Ray: ``torchrun --nproc-per-node N -m training.trainer TRAIN.yaml DATA_DIR OUT_DIR``.

    TRAIN.yaml holds the ``train`` section of a pipeline config (num_workers must equal N).
    """
    import argparse

    import yaml

    parser = argparse.ArgumentParser(prog="python -m training.trainer", description=main.__doc__)
    parser.add_argument("config", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    cfg = TrainConfig.model_validate(yaml.safe_load(args.config.read_text()) or {})
    if "WORLD_SIZE" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cfg.use_gpu else "gloo")
    try:
        train(cfg, args.data_dir, args.out_dir)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
