"""labeled: the fine-tuning examples, read, labeled and split, as one Parquet file per split (their own
manifest and MLflow dataset), the rows left out kept with the reason."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from core.manifest import write_index
from core.storage import Store
from orchestration.component import RunContext, StageComponent
from orchestration.stage_files import REJECTED_DIR, write_file

if TYPE_CHECKING:
    from orchestration.config import PipelineConfig


class Labeled(StageComponent):
    name = "labeled"
    produces = "labeled"

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.finetune is not None

    def key_config(self, cfg: PipelineConfig) -> Any:
        return {"data": cfg.finetune.data, "task": cfg.finetune.task}

    def key_files(self, cfg: PipelineConfig) -> dict[str, list[str]]:
        data = cfg.finetune.data
        return {"finetune.data": [data.path] if data.path else list(data.splits.values())}

    def preflight(self, cfg: PipelineConfig) -> list[str]:
        """The labeled files exist, hold the columns, and every split's labels are among the classes."""
        from core.files import resolve_path
        from training.labeled import load_labeled

        data = cfg.finetune.data
        missing = [
            f"finetune.data.{name}: {source} does not exist"
            for name, source in [("path", data.path), *((f"splits.{k}", v) for k, v in data.splits.items())]
            if source is not None and not resolve_path(source).exists()
        ]
        if missing:
            return missing
        try:
            load_labeled(data, cfg.finetune.task)
        except ValueError as e:
            return [f"finetune.data: {e}"]
        return []

    def build(self, ctx: RunContext, out: Store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from training.labeled import label_names, load_labeled

        ft = ctx.cfg.finetune
        tables, features, rejected = load_labeled(ft.data, ft.task)
        names = label_names(ft.data, tables["train"], features, ft.task)
        files, counters = [], {}
        for split, table in tables.items():
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            files.append(write_file(out, f"{split}.parquet", sink.getvalue().to_pybytes(), table.num_rows))
            counters[f"examples.{split}"] = table.num_rows
        # The rows left out, with the reason: in = kept + rejected, as for documents.
        sink = pa.BufferOutputStream()
        pq.write_table(rejected, sink)
        reject_file = write_file(
            out / REJECTED_DIR, "rows.parquet", sink.getvalue().to_pybytes(), rejected.num_rows
        )
        write_index(out / REJECTED_DIR, stage="labeled", kind="rejected", cache_key=key, files=[reject_file],
                    schema=rejected.schema)  # fmt: skip
        kept = sum(t.num_rows for t in tables.values())
        counters |= {"examples_in": kept + rejected.num_rows, "kept": kept, "rejected": rejected.num_rows}
        for reason in rejected.column("reason").to_pylist():
            counters[f"rejected.{reason}"] = counters.get(f"rejected.{reason}", 0) + 1
        left_out = f" ({rejected.num_rows} rows left out: no text or no label)" if rejected.num_rows else ""
        ctx.console.print(
            f"  {', '.join(f'{t.num_rows} {s}' for s, t in tables.items())} examples{left_out}",
            highlight=False,
        )
        return write_index(
            out,
            stage="labeled",
            kind="labeled",
            cache_key=key,
            files=files,
            schema=tables["train"].schema,
            inputs=inputs,
            counters=counters,
            extra={"label_names": names, "task": ft.task},
        )
