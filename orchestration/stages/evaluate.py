"""evaluate: held-out loss, perplexity and bits per byte of the trained model on the validation shards, and
the benchmark tasks (lm-eval's scoring) on a Ray task; then its metrics against the logged model in MLflow
and the registered version's promotion aliases."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from core.manifest import index_digest, write_index
from core.storage import Store, local_copy
from orchestration.component import RunContext, StageComponent, StageInstance, last
from orchestration.stage_files import write_file

if TYPE_CHECKING:
    from orchestration.config import PipelineConfig


class Evaluate(StageComponent):
    name = "evaluate"
    produces = "metrics"

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.has_corpus

    def reads(self, cfg: PipelineConfig, before: list[StageInstance]) -> tuple[str, ...]:
        return last(before, "model") + last(before, "tokens")

    def key_config(self, cfg: PipelineConfig) -> Any:
        """The evaluation config and what of training it depends on: the sequence length, and the objective
        of masked and span-corruption models (none for causal LMs, whose cached evaluations stay valid)."""
        train, objective = cfg.train, {}
        if train.objective != "causal_lm":
            objective = {
                "objective": train.objective,
                "masking": train.masking,
                "span_corruption": train.span_corruption,
            }
        return {"evaluate": cfg.evaluate, "seq_len": train.seq_len, **objective}

    def summary(self, index: dict[str, Any]) -> str:
        c = index.get("counters", {})
        if "perplexity" in c:
            return f"val loss {c['loss']:.3f}, perplexity {c['perplexity']:.1f}"
        return (
            f"val loss {c['loss']:.3f}, pseudo-perplexity {c['pseudo_perplexity']:.1f}"
            if "pseudo_perplexity" in c
            else ""
        )

    def build(self, ctx: RunContext, out: Store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
        import ray

        from evaluation.tasks import task_metric_names

        model, tokens = inputs
        cfg = ctx.cfg
        task = ray.remote(_evaluate_on_node).options(**cfg.ray.tasks("evaluate").ray_options())
        metrics = ray.get(
            task.remote(
                ctx.outcome(model).store / "model",
                ctx.outcome(tokens).store,
                cfg.evaluate,
                cfg.train.seq_len,
                cfg.train.objective,
                cfg.train.masking,
                cfg.train.span_corruption,
            )
        )
        files = [write_file(out, "metrics.json", json.dumps(metrics, indent=2).encode())]
        counters = {k: v for k, v in metrics.items() if k not in ("tasks", "sources")}
        for source, scores in metrics.get("sources", {}).items():
            counters |= {f"{k}.{source}": v for k, v in scores.items()}
        for name, scores in metrics.get("tasks", {}).items():
            counters |= task_metric_names(name, scores["metrics"])
        return write_index(
            out,
            stage="evaluate",
            kind="metrics",
            cache_key=key,
            files=files,
            inputs=inputs,
            counters=counters,
        )

    def track(self, ctx: RunContext, index: dict[str, Any], selected: bool) -> None:
        """The evaluation's metrics against the logged model: the held-out ones with the token shards as
        their dataset, each task's with the task's data (by its digest); then, for a selected evaluation,
        the registered version's aliases."""
        from evaluation.tasks import task_metric_names

        tracker, result = ctx.tracker, ctx.result
        _, tokens_name = index["inputs"]
        tokens = ctx.outcome(tokens_name)
        tokens_dataset = tracker.dataset("tokens", tokens.out_dir, index_digest(tokens.index), tokens.index)
        metrics = index["out_dir"].read_json("metrics.json")
        tasks = metrics.pop("tasks", {})
        for source, scores in metrics.pop("sources", {}).items():  # val_bits_per_byte.web, ...
            metrics |= {f"{k}.{source}": v for k, v in scores.items() if k not in ("tokens", "bytes")}
        # A rerun served from the cache has logged these against this model already: log only what
        # the model lacks (all of it after a fresh evaluation, the rest after an interrupted one).
        logged = tracker.model_metric_keys(result.model_id)
        result.metrics = {f"val_{k}": v for k, v in metrics.items() if k not in ("tokens", "bytes")}
        fresh = {k: v for k, v in result.metrics.items() if k not in logged}
        tracker.log_model_metrics(fresh, result.model_id, tokens_dataset)
        for name, task in tasks.items():
            dataset = tracker.dataset(name, task["source"], task["digest"][:16])
            tracker.log_datasets([dataset], [])
            scores = task_metric_names(name, task["metrics"])
            tracker.log_model_metrics(
                {k: v for k, v in scores.items() if k not in logged}, result.model_id, dataset
            )
            result.metrics |= scores
        if selected:
            _aliases(ctx)


def _aliases(ctx: RunContext) -> None:
    """The new registered version gets the default alias, and each promotion alias whose rule passes."""
    cfg, result, tracker = ctx.cfg.tracking, ctx.result, ctx.tracker
    if not (cfg.registered_model and result.model_version):
        return
    if cfg.alias:
        tracker.set_alias(cfg.registered_model, cfg.alias, result.model_version)
    for rule in cfg.promote:
        value = result.metrics.get(rule.metric)
        bound = f"> {rule.above}" if rule.above is not None else f"< {rule.below}"
        if value is None:
            verdict = f"not promoted to @{rule.alias}: {rule.metric} was not computed"
        elif rule.passes(value):
            tracker.set_alias(cfg.registered_model, rule.alias, result.model_version)
            verdict = f"promoted to @{rule.alias}: {rule.metric} = {value:.4g} {bound}"
        else:
            verdict = f"not promoted to @{rule.alias}: {rule.metric} = {value:.4g}, needs {bound}"
        tracker.tag_version(
            cfg.registered_model, result.model_version, f"lmforge.promotion.{rule.alias}", verdict
        )
        ctx.console.print(f"[bold]model[/bold] {cfg.registered_model}/{result.model_version} {verdict}")


def _evaluate_on_node(model: Store, tokens: Store, *args: Any) -> dict[str, Any]:
    """evaluate_model_dir on local copies of the model and the token shards (themselves when local)."""
    from evaluation.perplexity import evaluate_model_dir

    return evaluate_model_dir(str(local_copy(model)), str(local_copy(tokens)), *args)
