"""finetune: fine-tune a base model (the train stage's, or ``finetune.init_from``) on the labeled splits
for classification or seq2seq, score it on each split, and log it as a LoggedModel whose lineage names its
base and its labeled data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.manifest import index_digest, write_index
from core.redact import redact
from core.storage import Store, local_copy, local_file, uri_scheme
from orchestration.component import RunContext, StageComponent, StageInstance, StageOutcome, last
from orchestration.stage_files import (
    MODEL_RECORD,
    init_from_problems,
    model_files,
    numbers,
    tree_digest,
    write_file,
)

if TYPE_CHECKING:
    from orchestration.config import PipelineConfig


class Finetune(StageComponent):
    name = "finetune"
    produces = "finetuned"

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.finetune is not None

    def reads(self, cfg: PipelineConfig, before: list[StageInstance]) -> tuple[str, ...]:
        """The labeled splits, and the trained model unless ``init_from`` names the base."""
        return last(before, "labeled") + (() if cfg.finetune.init_from else last(before, "model"))

    def key_config(self, cfg: PipelineConfig) -> Any:
        return {"finetune": cfg.finetune}

    def key_files(self, cfg: PipelineConfig) -> dict[str, list[str]]:
        """Its base model's content, when ``init_from`` names it (the train stage's is an input)."""
        return {"finetune.init_from": [cfg.finetune.init_from]} if cfg.finetune.init_from else {}

    def preflight(self, cfg: PipelineConfig) -> list[str]:
        """The base model: ``init_from``'s directory, or the train stage's model, made with train.seq_len
        positions (T5's are relative), long enough for finetune.seq_len."""
        ft, train = cfg.finetune, cfg.train
        if ft.init_from is not None:
            return init_from_problems(Path(ft.init_from), ft.seq_len, "finetune")
        if train.init_from is None and train.model.arch != "t5" and ft.seq_len > train.seq_len:
            return [
                f"finetune.seq_len: {ft.seq_len} is longer than the {train.seq_len} positions of the model "
                f"the train stage makes (train.seq_len); set finetune.seq_len <= {train.seq_len} "
                "or train with a longer train.seq_len"
            ]
        return []

    def summary(self, index: dict[str, Any]) -> str:
        c = index.get("counters", {})
        scores = [
            f"test {k} {c[f'test_{k}']:.3f}"
            for k in ("accuracy", "f1_macro", "exact_match")
            if f"test_{k}" in c
        ]
        return ", ".join([f"loss {c['first_loss']:.3f} -> {c['final_loss']:.3f}", *scores[:2]])

    def build(self, ctx: RunContext, out: Store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
        import ray

        from orchestration.run_metrics import RunMetricsLogger
        from orchestration.training_launch import launch_finetuning

        labeled, *model = inputs
        base = ctx.cfg.finetune.init_from or ctx.outcome(model[0]).store.uri_of("model")
        ft = _finetune_config(ctx, ctx.outcome(labeled), base)
        ctx.console.print(
            f"  {ft.task} from {base}, {ft.num_workers} worker(s), ZeRO-{ft.zero_stage}, {ft.steps} steps",
            highlight=False,
        )
        logger = RunMetricsLogger(ctx.tracker.tracking_uri, ctx.tracker.active_run_id())
        summary = launch_finetuning(
            ft, out, run_name=f"{ctx.cfg.name}-finetune-{key}", metrics_logger=logger, console=ctx.console
        )
        evaluate = ray.remote(_evaluate_finetuned_on_node)
        metrics = ray.get(evaluate.options(**ctx.cfg.ray.tasks("finetune").ray_options()).remote(out, ft))
        files = model_files(out)
        files.append(write_file(out, "metrics.json", json.dumps(metrics, indent=2).encode()))
        counters = {
            "steps": summary["steps"],
            "first_loss": summary["losses"][0],
            "final_loss": summary["losses"][-1],
        }
        counters |= {f"{split}_{k}": v for split, m in metrics.items() for k, v in numbers(m).items()}
        return write_index(
            out, stage="finetune", kind="model", cache_key=key, files=files, inputs=inputs, counters=counters,
            extra={"summary": summary, "base_model": base},
        )  # fmt: skip

    def track(self, ctx: RunContext, index: dict[str, Any], selected: bool) -> None:
        """The fine-tuned model as a LoggedModel whose lineage names its base and the labeled data's digest;
        its metrics per split against that dataset, the confusion matrices as tables and figures."""
        out, ft, tracker, result = index["out_dir"], ctx.cfg.finetune, ctx.tracker, ctx.result
        record = out.read_json(MODEL_RECORD)
        if record.get("model_id") and tracker.find_model(record["model_id"]):
            result.finetuned_model_id, result.finetuned_model_version = (
                record["model_id"],
                record.get("version"),
            )
            return
        labeled = ctx.outcome(next(iter(index["inputs"])))
        labeled_digest = index_digest(labeled.index)
        tags = {
            **ctx.code,
            "lmforge.labeled_digest": labeled_digest,
            "lmforge.finetune_cache_key": index["cache_key"],
        }
        if ft.init_from:
            tags["lmforge.base_model_path"] = str(Path(ft.init_from).resolve())
            tags["lmforge.base_model_digest"] = tree_digest([ft.init_from])
        else:
            tags["lmforge.base_model_id"] = result.model_id or ""
            if result.model_version:
                tags["lmforge.base_model_version"] = (
                    f"{ctx.cfg.tracking.registered_model}/{result.model_version}"
                )
        model_type = "seq2seq-lm" if ft.task == "seq2seq" else "sequence-classification"
        name = ctx.cfg.tracking.finetuned_name()
        model_id, version = tracker.log_model(
            local_copy(out, "model"), f"{ctx.cfg.name}-finetuned", {"finetune": ft.model_dump(mode="json")},
            tags, step=ft.steps, register_as=name, model_type=model_type,
        )  # fmt: skip
        if name and version and ctx.cfg.tracking.alias:
            tracker.set_alias(name, ctx.cfg.tracking.alias, version)
        result.finetuned_model_id, result.finetuned_model_version = model_id, version
        dataset = tracker.dataset("labeled", labeled.out_dir, labeled_digest, labeled.index)
        metrics = out.read_json("metrics.json")
        for split, m in metrics.items():
            tracker.log_model_metrics({f"{split}_{k}": v for k, v in numbers(m).items()}, model_id, dataset)
            if "confusion_matrix" in m:
                tracker.log_confusion_matrix(
                    m["confusion_matrix"], m.get("label_names", []), f"finetune/{split}_confusion"
                )
        record = {"tracking_uri": redact(tracker.tracking_uri), "model_id": model_id, "version": version}
        out.write_bytes(MODEL_RECORD, json.dumps(record).encode())


def _finetune_config(ctx: RunContext, labeled: StageOutcome, base: str):
    """The run's fine-tuning config reading the labeled stage's splits from the base model ``base``."""
    ft = ctx.cfg.finetune
    splits = {
        f["path"].removesuffix(".parquet"): labeled.store.uri_of(f["path"]) for f in labeled.index["files"]
    }
    data = ft.data.model_copy(
        update={"path": None, "splits": splits, "label_names": labeled.index["label_names"] or None}
    )
    base = base if uri_scheme(base) else str(Path(base).resolve())
    return ft.model_copy(update={"init_from": base, "data": data})


def _evaluate_finetuned_on_node(out: Store, ft: Any) -> dict[str, Any]:
    """evaluate_finetuned on local copies of the fine-tuned model and of the labeled splits."""
    from evaluation.finetuned import evaluate_finetuned

    data = ft.data.model_copy(update={"splits": {k: str(local_file(v)) for k, v in ft.data.splits.items()}})
    return evaluate_finetuned(str(local_copy(out, "model")), ft.model_copy(update={"data": data}))
