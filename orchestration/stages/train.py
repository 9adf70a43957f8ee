"""train: pretrain the model on the token shards (DeepSpeed ZeRO on a Ray Train worker group), then log it,
its checkpoints and its lineage to MLflow and register it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.manifest import index_digest, write_index
from core.redact import redact
from core.storage import Store, local_copy
from orchestration.component import RunContext, StageComponent, StageInstance, last
from orchestration.errors import ConfigError
from orchestration.stage_files import MODEL_RECORD, init_from_problems, model_files

if TYPE_CHECKING:
    from orchestration.config import PipelineConfig
    from training.config import TrainConfig

#: The MLflow LoggedModel type of each pretraining objective's model.
MODEL_TYPES = {"causal_lm": "causal-lm", "masked_lm": "masked-lm", "span_corruption": "seq2seq-lm"}


class Train(StageComponent):
    name = "train"
    produces = "model"

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.has_corpus

    def reads(self, cfg: PipelineConfig, before: list[StageInstance]) -> tuple[str, ...]:
        return last(before, "tokens")

    def key_config(self, cfg: PipelineConfig) -> Any:
        return cfg.train

    def key_files(self, cfg: PipelineConfig) -> dict[str, list[str]]:
        return {"train.init_from": [cfg.train.init_from]} if cfg.train.init_from else {}

    def preflight(self, cfg: PipelineConfig) -> list[str]:
        return init_from_problems(Path(cfg.train.init_from), cfg.train.seq_len) if cfg.train.init_from else []

    def summary(self, index: dict[str, Any]) -> str:
        c = index.get("counters", {})
        return f"loss {c['first_loss']:.3f} -> {c['final_loss']:.3f}"

    def build(self, ctx: RunContext, out: Store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
        from orchestration.run_metrics import RunMetricsLogger
        from orchestration.training_launch import launch_training

        cfg = ctx.cfg.train
        (tokens,) = inputs
        tokens_index = ctx.outcome(tokens).index or {}
        _check_validation_split(tokens_index, cfg.seq_len, ctx.cfg.tokenize.val_fraction)
        mixture = _check_mixture(ctx, tokens_index)
        logger = RunMetricsLogger(ctx.tracker.tracking_uri, ctx.tracker.active_run_id())
        ctx.console.print(
            f"  {cfg.num_workers} worker(s), ZeRO-{cfg.zero_stage}, {cfg.precision}, {cfg.steps} steps, "
            f"{cfg.tokens_per_step} tokens/step",
            highlight=False,
        )
        summary = launch_training(
            cfg,
            ctx.outcome(tokens).store,
            out,
            run_name=f"{ctx.cfg.name}-{key}",
            metrics_logger=logger,
            console=ctx.console,
        )
        losses = summary["losses"]
        counters = {
            "steps": summary["steps"],
            "tokens_seen": summary["tokens_seen"],
            "first_loss": losses[0],
            "final_loss": losses[-1],
        }
        for source, n in summary.get("mixture", {}).get("tokens", {}).items():
            counters[f"tokens_seen.{source}"] = n
            counters[f"repetition.{source}"] = n / max(mixture[source]["tokens"], 1)
        return write_index(
            out,
            stage="train",
            kind="model",
            cache_key=key,
            files=model_files(out),
            inputs=inputs,
            counters=counters,
            extra={"summary": summary} | _mixture_record(cfg, mixture),
        )

    def track(self, ctx: RunContext, index: dict[str, Any], selected: bool) -> None:
        """Log (and register) the trained model in MLflow once; a cached stage reuses the logged model
        wherever this store holds it (a work dir copied with its store, or reached by another URI, logs
        and registers nothing new: a stage that did not run adds no model version)."""
        cfg, out, tracker, result = ctx.cfg, index["out_dir"], ctx.tracker, ctx.result
        record = out.read_json(MODEL_RECORD)
        if record.get("model_id") and tracker.find_model(record["model_id"]):
            result.model_id, result.model_version = record["model_id"], record["version"]
            return
        (tokens,) = index["inputs"]
        tokens_index = ctx.outcome(tokens).index
        model_tags = {
            "lmforge.shards_digest": index_digest(tokens_index),
            "lmforge.tokenizer_id": tokens_index["tokenizer"]["id"],
            "lmforge.config_hash": ctx.config_hash,
            **ctx.code,
            "lmforge.train_cache_key": index["cache_key"],
            **_mixture_tags(index, tokens_index),
        }
        for step, where in _checkpoints(out):
            tracker.log_checkpoint(f"{cfg.name}-checkpoint", step, where, model_tags)
        result.model_id, result.model_version = tracker.log_model(
            local_copy(out, "model"),
            f"{cfg.name}-model",
            {"train": cfg.train.model_dump(mode="json")},
            model_tags,
            step=cfg.train.steps,
            register_as=cfg.tracking.registered_model,
            model_type=MODEL_TYPES[cfg.train.objective],
        )
        record = {
            "tracking_uri": redact(tracker.tracking_uri),
            "model_id": result.model_id,
            "version": result.model_version,
        }
        out.write_bytes(MODEL_RECORD, json.dumps(record).encode())


def _checkpoints(out: Store) -> list[tuple[int, Path | str]]:
    """(step, where) of each checkpoint of a training output: DeepSpeed's directories in a local work
    dir; in a remote one, those Ray Train uploaded (training/engine.py's ``step<N>`` names)."""
    if out.local is not None:
        found = [p for p in (out.local / "checkpoints").glob("step*") if p.is_dir()]
        return sorted((int(p.name[4:]), p) for p in found if p.name[4:].isdigit())
    dirs = {
        "/".join(parts[: i + 1])
        for parts in (name.split("/") for name in out.files("ray_train"))
        for i, part in enumerate(parts[:-1])
        if part.startswith("step") and part[4:].isdigit()
    }
    return sorted((int(d.rsplit("/", 1)[-1][4:]), out.uri_of(d)) for d in dirs)


def _check_validation_split(tokens_index: dict[str, Any], seq_len: int, val_fraction: float) -> None:
    """Refuse to train a model the evaluate stage after it cannot measure: its validation split must hold
    one sequence (seq_len+1 tokens). Said before training, not after it."""
    held_out = tokens_index.get("counters", {}).get("val_tokens")
    if held_out is not None and held_out < seq_len + 1:
        raise ConfigError(
            f"tokenize's validation split holds {held_out} tokens, fewer than train.seq_len+1={seq_len + 1} "
            f"that evaluate needs for one sequence: raise tokenize.val_fraction (now {val_fraction}), add "
            "documents, or lower train.seq_len"
        )


def _check_mixture(ctx: RunContext, tokens_index: dict[str, Any]) -> dict[str, dict[str, float]]:
    """The mixture's figures per source (tokens, share, tokens needed, repetition), its notes printed;
    refused before training where a source would repeat past its ``max_repetition``."""
    cfg = ctx.cfg.train
    if cfg.mixture is None:
        return {}
    from training.data.mixture import repetition, repetition_problems

    for note in cfg.mixture.notes():
        ctx.console.print(f"  note: {note}", highlight=False)
    train_tokens = {}
    for source, t in tokens_index.get("sources", {}).items():
        train_tokens[source] = t.get("train_tokens", 0)
        train_tokens |= {f"{source}.tier{k}": v.get("train_tokens", 0) for k, v in t.get("tiers", {}).items()}
    figures = repetition(
        cfg.mixture, cfg.steps, cfg.tokens_per_step // cfg.seq_len, cfg.seq_len, train_tokens
    )
    if problems := repetition_problems(cfg.mixture, figures, cfg.seq_len):
        raise ConfigError("; ".join(problems))
    return figures


def _mixture_record(cfg: TrainConfig, figures: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The index's record of a mixture: each source's figures and the phases (first step, weights)."""
    if cfg.mixture is None:
        return {}
    phases = [
        {"start_step": start, "weights": dict(zip(cfg.mixture.sources, weights.tolist()))}
        for start, weights in cfg.mixture.phases(cfg.steps)
    ]
    return {"mixture": {"sources": figures, "phases": phases}}


def _mixture_tags(index: dict[str, Any], tokens_index: dict[str, Any]) -> dict[str, str]:
    """Per source of a mixture: the digest of its training shards, the tokens the model saw from it and
    its repetition (the weights and schedule are the model's ``train`` params)."""
    from training.data.mixture import entry_of

    sources = index.get("mixture", {}).get("sources", {})
    shards = tokens_index["splits"]["train"]["shards"]
    tags = {}
    for source in sources:  # an entry: a source, or a tier of one (web.tier2)
        name, tier = entry_of(source)
        mine = sorted(
            s["sha256"] for s in shards if s.get("source") == name and (tier is None or s.get("tier") == tier)
        )
        tags |= {
            f"lmforge.mixture.{source}.shards_digest": hashlib.sha256("".join(mine).encode()).hexdigest()[
                :16
            ],
            f"lmforge.mixture.{source}.tokens_seen": str(index["counters"][f"tokens_seen.{source}"]),
            f"lmforge.mixture.{source}.repetition": f"{index['counters'][f'repetition.{source}']:.4f}",
        }
    return tags
