"""Fine-tuning on labeled data: sequence classification (single- and multi-label) and sequence-to-sequence,
on the same DeepSpeed engine, step loop, checkpoints and exact resume as pretraining (training/trainer.py).

Strategies, each a config switch: full fine-tuning; frozen embeddings and/or first K blocks; a frozen encoder
or decoder of an encoder-decoder; layer-wise learning-rate decay (ULMFiT's discriminative fine-tuning, in
the form ELECTRA/BEiT use: the head gets ``lr``, block ``i`` of ``L`` gets ``lr * decay**(L + 1 - i)``,
embeddings ``lr * decay**(L + 1)``); LoRA adapters with peft (its defaults and per-architecture target
modules), merged into the exported weights; class weights for imbalanced labels.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
import transformers

from core.files import atomic_write_bytes
from training import engine as ds_engine
from training.config import FinetuneConfig
from training.data.shards import DistributedBatchSampler
from training.flops import flops_per_token
from training.labeled import Task, label_ids, label_names, load_labeled
from training.model import count_parameters
from training.objectives import IGNORE
from training.trainer import run_steps, setup, token_loss

# -- model and strategies -------------------------------------------------------------------------------


def build_task_model(cfg: FinetuneConfig, names: list[str]) -> transformers.PreTrainedModel:
    """The base model with the task's head (a new, seeded head for classification)."""
    if not cfg.init_from:
        raise ValueError(
            "finetune.init_from: no base model (a Hugging Face directory, or a pipeline train stage)"
        )
    base = Path(cfg.init_from)
    if not (base / "config.json").exists():
        raise FileNotFoundError(
            f"finetune.init_from: {base} is not a Hugging Face model directory (no config.json)"
        )
    transformers.logging.set_verbosity_error()  # "newly initialized head" is the point of fine-tuning
    torch.manual_seed(cfg.seed)
    hf_config = transformers.AutoConfig.from_pretrained(base)
    if cfg.task == "seq2seq":
        if not hf_config.is_encoder_decoder:
            raise ValueError(
                f"finetune.task=seq2seq needs an encoder-decoder base; {base} is {hf_config.model_type}"
            )
        return transformers.AutoModelForSeq2SeqLM.from_pretrained(base, dtype=torch.float32)
    problem = "multi_label_classification" if cfg.task == "multi_label" else "single_label_classification"
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        base,
        dtype=torch.float32,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        problem_type=problem,
        output_loading_info=True,
    )
    # Modules the base lacks (the head; BERT's pooler after masked-LM pretraining) start from this seed.
    model.lmforge_new_modules = sorted({k.rsplit(".", 1)[0] for k in info["missing_keys"]})
    if model.config.pad_token_id is None:  # decoders pool the last non-pad token
        model.config.pad_token_id = model.config.eos_token_id
    return model


_BLOCK_LISTS = re.compile(r"(^|\.)(layer|layers|h|block)$")
_EMBEDDING = re.compile(r"(embed|wte|wpe|shared)")


def block_prefixes(model: torch.nn.Module) -> list[str]:
    """Names of the transformer block lists in forward order (encoder before decoder); lists inside a block
    (T5's per-block sub-layers) are part of that block."""
    found: list[str] = []
    for name, module in model.named_modules():
        inner = any(name.startswith(f"{outer}.") for outer in found)
        if isinstance(module, torch.nn.ModuleList) and _BLOCK_LISTS.search(name) and not inner:
            found.append(name)
    return found


def layer_ids(model: torch.nn.Module) -> tuple[dict[str, int], int]:
    """Depth of each parameter: 0 embeddings, 1..L the blocks in order, L+1 the rest (head, final norms)."""
    blocks: list[str] = []
    for prefix in block_prefixes(model):
        blocks += [f"{prefix}.{i}." for i in range(len(model.get_submodule(prefix)))]
    depth = len(blocks)
    ids = {}
    for name, _ in model.named_parameters():
        found = next((i + 1 for i, b in enumerate(blocks) if name.startswith(b) or f".{b}" in name), None)
        ids[name] = found if found is not None else (0 if _EMBEDDING.search(name) else depth + 1)
    return ids, depth


def apply_freezing(model: torch.nn.Module, cfg: FinetuneConfig) -> int:
    """Freeze what the strategy says; returns the number of parameters frozen."""
    ids, depth = layer_ids(model)
    if cfg.freeze_layers > depth:
        raise ValueError(f"finetune.freeze_layers={cfg.freeze_layers} but the model has {depth} blocks")
    if cfg.freeze != "none" and not getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(
            f"finetune.freeze={cfg.freeze} needs an encoder-decoder; this is {model.config.model_type}"
        )
    frozen = 0
    for name, p in model.named_parameters():
        layer = ids[name]
        if (
            (cfg.freeze_embeddings and layer == 0)
            or 1 <= layer <= cfg.freeze_layers
            or (cfg.freeze != "none" and re.search(rf"(^|\.){cfg.freeze}\.", name))
        ):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


def apply_lora(model: transformers.PreTrainedModel, cfg: FinetuneConfig) -> torch.nn.Module:
    """Wrap the model with peft LoRA adapters (the classification head stays trainable, as peft's SEQ_CLS does)."""
    import peft

    task_type = peft.TaskType.SEQ_2_SEQ_LM if cfg.task == "seq2seq" else peft.TaskType.SEQ_CLS
    # Newly initialized modules besides the head (a pooler) train and are saved with the adapter, so
    # base + adapter alone rebuild the model.
    head = {"classifier", "score"}
    extra = [m for m in getattr(model, "lmforge_new_modules", []) if m.split(".")[0] not in head]
    lora = peft.LoraConfig(
        task_type=task_type,
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        modules_to_save=extra or None,
    )
    return peft.get_peft_model(model, lora)


def param_groups(model: torch.nn.Module, cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """Trainable parameters in groups by depth with layer-decayed learning rates (top group first)."""
    ids, depth = layer_ids(model)
    groups: dict[int, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(ids[name], []).append(p)
    return [
        {
            "params": groups[layer],
            "lr": cfg.lr * cfg.layer_decay ** (depth + 1 - layer),
            "name": f"layer{layer}",
        }
        for layer in sorted(groups, reverse=True)
    ]


# -- data -----------------------------------------------------------------------------------------------


def _fit(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None]:
    """Truncate the longer of the two until both fit (transformers' longest_first)."""
    a = list(a)
    b = list(b) if b is not None else None
    while len(a) + (len(b) if b is not None else 0) > budget:
        if b is not None and len(b) > len(a):
            b.pop()
        else:
            a.pop()
    return a, b


def encode_inputs(
    tokenizer: transformers.PreTrainedTokenizerBase,
    texts: list[str],
    pairs: list[str] | None,
    seq_len: int,
    config: transformers.PretrainedConfig,
) -> dict[str, np.ndarray]:
    """Token ids, attention mask (and token types for BERT pairs) padded to ``seq_len``.

    Encoders: ``[CLS] a [SEP] (b [SEP])``; encoder-decoders: ``a b EOS`` (T5 classifies from the EOS);
    decoders: ``a (EOS b)``, pooled at the last real token.
    """
    ids_a = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids_b = (
        tokenizer(pairs, add_special_tokens=False)["input_ids"] if pairs is not None else [None] * len(texts)
    )
    rows, types = input_rows(tokenizer, ids_a, ids_b, seq_len, config)
    return pad_rows(rows, types, seq_len, tokenizer, config, pairs is not None)


def _is_encoder(
    tokenizer: transformers.PreTrainedTokenizerBase, config: transformers.PretrainedConfig
) -> bool:
    """An encoder's inputs: ``[CLS] a [SEP]`` (a tokenizer with both, a model without a decoder)."""
    return (
        tokenizer.cls_token_id is not None
        and tokenizer.sep_token_id is not None
        and not config.is_encoder_decoder
    )


def input_rows(
    tokenizer: transformers.PreTrainedTokenizerBase,
    ids_a: list[list[int]],
    ids_b: list[list[int] | None],
    seq_len: int,
    config: transformers.PretrainedConfig,
) -> tuple[list[list[int]], list[list[int]]]:
    """Each example's token ids with the model's special tokens, at most ``seq_len``, and token types."""
    encoder = _is_encoder(tokenizer, config)
    eos = tokenizer.eos_token_id
    rows, types = [], []
    for a, b in zip(ids_a, ids_b):
        if encoder:
            a, b = _fit(a, b, seq_len - (3 if b is not None else 2))
            row = [tokenizer.cls_token_id, *a, tokenizer.sep_token_id]
            type_row = [0] * len(row)
            if b is not None:
                row += [*b, tokenizer.sep_token_id]
                type_row += [1] * (len(b) + 1)
        elif config.is_encoder_decoder:
            a, b = _fit(a, b, seq_len - 1)
            row = [*a, *(b or []), eos]
            type_row = [0] * len(row)
        else:
            a, b = _fit(a, b, seq_len - (1 if b is not None else 0))
            row = [*a, *([eos, *b] if b is not None else [])]
            type_row = [0] * len(row)
        rows.append(row)
        types.append(type_row)
    return rows, types


def pad_rows(
    rows: list[list[int]],
    types: list[list[int]],
    seq_len: int,
    tokenizer: transformers.PreTrainedTokenizerBase,
    config: transformers.PretrainedConfig,
    pairs: bool = False,
) -> dict[str, np.ndarray]:
    """Rows padded to ``seq_len``: token ids, attention mask (and token types for BERT pairs)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
    encoder = _is_encoder(tokenizer, config)
    input_ids = np.full((len(rows), seq_len), pad, dtype=np.int64)
    mask = np.zeros((len(rows), seq_len), dtype=np.int64)
    token_types = np.zeros((len(rows), seq_len), dtype=np.int64)
    for i, (row, type_row) in enumerate(zip(rows, types)):
        input_ids[i, : len(row)], mask[i, : len(row)], token_types[i, : len(row)] = row, 1, type_row
    out = {"input_ids": input_ids, "attention_mask": mask}
    if encoder and pairs and getattr(config, "type_vocab_size", 1) > 1:
        out["token_type_ids"] = token_types
    return out


def encode_targets(
    tokenizer: transformers.PreTrainedTokenizerBase, targets: list[str], target_len: int, start: int
) -> dict[str, np.ndarray]:
    """seq2seq labels (target ids + EOS, IGNORE-padded) and the decoder inputs (shifted right behind ``start``)."""
    ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    labels = np.full((len(ids), target_len), IGNORE, dtype=np.int64)
    for i, row in enumerate(ids):
        row = [*row[: target_len - 1], tokenizer.eos_token_id]
        labels[i, : len(row)] = row
    decoder = np.concatenate([np.full((len(ids), 1), start), labels[:, :-1]], axis=1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return {"labels": labels, "decoder_input_ids": np.where(decoder == IGNORE, pad, decoder)}


def encode_split(
    table: pa.Table,
    cfg: FinetuneConfig,
    tokenizer: transformers.PreTrainedTokenizerBase,
    config: transformers.PretrainedConfig,
    names: list[str],
    where: str,
) -> dict[str, np.ndarray]:
    """A split's model inputs and labels (class ids, a 0/1 label matrix, or target token ids)."""
    d = cfg.data
    texts = [str(t) for t in table.column(d.text_column).to_pylist()]
    pairs = [str(t) for t in table.column(d.text_pair_column).to_pylist()] if d.text_pair_column else None
    out = encode_inputs(tokenizer, texts, pairs, cfg.seq_len, config)
    if cfg.task == "seq2seq":
        targets = [str(t) for t in table.column(d.target_column).to_pylist()]
        return out | encode_targets(tokenizer, targets, cfg.target_len, config.decoder_start_token_id)
    values = table.column(d.label_column).to_pylist()
    if cfg.task == "multi_label":
        matrix = np.zeros((len(values), len(names)), dtype=np.float32)
        for i, row in enumerate(values):
            matrix[i, label_ids(list(row or []), names, where)] = 1.0
        return out | {"labels": matrix}
    return out | {"labels": np.array(label_ids(values, names, where), dtype=np.int64)}


def class_weights(cfg: FinetuneConfig, labels: np.ndarray, num_classes: int) -> torch.Tensor | None:
    """Per-class loss weights (multi_label: positive weights per label)."""
    if cfg.class_weights == "none":
        return None
    if isinstance(cfg.class_weights, list):
        if len(cfg.class_weights) != num_classes:
            raise ValueError(
                f"finetune.class_weights has {len(cfg.class_weights)} weights for {num_classes} classes"
            )
        return torch.tensor(cfg.class_weights, dtype=torch.float32)
    if cfg.task == "multi_label":
        positives = labels.sum(axis=0)
        return torch.tensor((labels.shape[0] - positives) / np.maximum(positives, 1), dtype=torch.float32)
    counts = np.bincount(labels, minlength=num_classes)
    return torch.tensor(labels.size / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


def task_loss(task: Task, weights: torch.Tensor | None):
    """The loss of a fine-tuning batch: cross entropy, binary cross entropy per label, or seq2seq token loss."""

    def loss(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = engine(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        labels = batch["labels"]
        if task == "seq2seq":
            return token_loss(logits, labels)
        w = weights.to(logits.device) if weights is not None else None
        if task == "multi_label":
            return F.binary_cross_entropy_with_logits(logits, labels, pos_weight=w)
        return F.cross_entropy(logits, labels, weight=w)

    return loss


# -- the run --------------------------------------------------------------------------------------------


def load_tokenizer_of(base: str | Path) -> transformers.PreTrainedTokenizerBase:
    transformers.logging.disable_progress_bar()
    return transformers.AutoTokenizer.from_pretrained(base)


def _export(engine, cfg: FinetuneConfig, names: list[str], tokenizer, out_dir: Path) -> Path | None:
    """The fine-tuned model (LoRA merged into the weights) and the base tokenizer, rank 0."""
    state = ds_engine.consolidated_state_dict(engine)
    if state is None:
        return None
    model_dir = out_dir / "model"
    if cfg.lora is not None:
        fresh = apply_lora(build_task_model(cfg, names), cfg)
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        aliases = (
            set(fresh.state_dict()) - set(dict(fresh.named_parameters())) - set(dict(fresh.named_buffers()))
        )
        if unexpected or set(missing) - aliases:  # only tied aliases may be absent from the gathered weights
            raise RuntimeError(
                f"LoRA export: state mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})"
            )
        fresh.save_pretrained(out_dir / "adapter")  # the adapter alone, loadable with peft
        merged = fresh.merge_and_unload()
        merged.save_pretrained(model_dir, safe_serialization=True)
    else:
        engine.module.save_pretrained(model_dir, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    source = Path(cfg.init_from) / "tokenizer.json"
    if source.exists():  # the exact bytes: the tokenizer id (its sha256) is the base's
        shutil.copy(source, model_dir / "tokenizer.json")
    return model_dir


def finetune(
    cfg: FinetuneConfig,
    out_dir: str | Path,
    on_metrics=None,
    on_checkpoint=None,
    print_progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune (resuming from ``out_dir/checkpoints``) and export to ``out_dir/model``; rank 0's summary."""
    rank, world, device, out_dir = setup(cfg, out_dir)
    tables, features, rejected = load_labeled(cfg.data, cfg.task)
    names = label_names(cfg.data, tables["train"], features, cfg.task)
    if rejected.num_rows and rank == 0 and print_progress:
        print(f"{rejected.num_rows} labeled rows left out (no text or no label), e.g. "
              f"{rejected.column('source')[0]} row {rejected.column('row')[0]}: {rejected.column('reason')[0]}",
              flush=True)  # fmt: skip
    tokenizer = load_tokenizer_of(cfg.init_from)
    model = build_task_model(cfg, names)
    where = f"{cfg.data.path or cfg.data.splits['train']} (train)"
    train = encode_split(tables["train"], cfg, tokenizer, model.config, names, where)
    weights = class_weights(cfg, train["labels"], len(names)) if cfg.task != "seq2seq" else None
    frozen = apply_freezing(model, cfg)
    if cfg.lora is not None:
        model = apply_lora(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if rank == 0 and print_progress:
        total = sum(p.numel() for p in model.parameters())
        print(f"fine-tuning {cfg.init_from}: {trainable:,} of {total:,} parameters trained", flush=True)
    hf = model.config
    fpt = flops_per_token(count_parameters(model), hf.num_hidden_layers, hf.hidden_size, cfg.seq_len)
    groups = param_groups(model, cfg)
    peak_lrs = {g["name"]: g["lr"] for g in groups}  # the engine's scheduler rewrites the groups' lr
    engine = ds_engine.initialize(model, cfg, groups)
    sampler = DistributedBatchSampler(
        train["labels"].shape[0], cfg.micro_batch_size, rank, world, seed=cfg.seed
    )

    def next_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        rows = sampler.next_indices()
        return {k: torch.from_numpy(v[rows]).to(device) for k, v in train.items()}

    start_step, losses, step_times = run_steps(
        engine, cfg, sampler, next_batch, out_dir, fpt, loss_fn=task_loss(cfg.task, weights),
        on_metrics=on_metrics, on_checkpoint=on_checkpoint, print_progress=print_progress,
    )  # fmt: skip
    model_dir = _export(engine, cfg, names, tokenizer, out_dir)
    if model_dir is None:
        return {}
    summary = {
        "task": cfg.task,
        "losses": losses,
        "steps": cfg.steps,
        "resumed_from": start_step,
        "model_dir": str(model_dir),
        "base_model": str(cfg.init_from),
        "label_names": names,
        "examples": {s: t.num_rows for s, t in tables.items()},
        "world_size": world,
        "step_seconds": step_times,
        "trainable_parameters": trainable,
        "frozen_parameters": frozen,
        "lr_groups": peak_lrs,
    }
    atomic_write_bytes(out_dir / "summary.json", json.dumps(summary, indent=2).encode())
    return summary
