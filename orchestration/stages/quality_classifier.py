"""quality_classifier: train the quality classifier the quality stage scores with (cleaning/quality.py), from
positive and negative documents (sources of the run, or files) or an annotated file; measure it on a held-out
split by id hash within each class; log it to MLflow as a LoggedModel whose tags name its training data."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.manifest import index_digest, source_files, write_index
from core.storage import Store, local_copy, open_input_file, uri_scheme
from orchestration.component import RunContext, StageComponent, StageInstance, last
from orchestration.instances import split_instance
from orchestration.stage_files import MODEL_RECORD, init_from_problems

if TYPE_CHECKING:
    from cleaning.quality import ClassifierConfig, FileSide, LabeledFile, Side
    from orchestration.config import PipelineConfig

#: The classifier's directory in the stage output (what the quality stage loads).
CLASSIFIER_DIR = "classifier"


class QualityClassifier(StageComponent):
    name = "quality_classifier"
    produces = "classifier"

    def enabled(self, cfg: PipelineConfig) -> bool:
        return cfg.quality is not None

    def reads(self, cfg: PipelineConfig, before: list[StageInstance]) -> tuple[str, ...]:
        assert cfg.quality is not None
        return last(before, "documents") if cfg.quality.classifier.sources() else ()

    def key_config(self, cfg: PipelineConfig) -> Any:
        assert cfg.quality is not None
        c = cfg.quality.classifier
        # file sides are extracted and normalized as the clean stage does, and decontaminated with it
        text = {"extract": cfg.clean.extract, "normalize": cfg.clean.normalize}
        return {"classifier": c, "text": text, "decontaminate": cfg.clean.decontaminate}

    def key_files(self, cfg: PipelineConfig) -> dict[str, list[str]]:
        from ingestion.readers import ReadConfig

        assert cfg.quality is not None
        return {
            f: ReadConfig(paths=paths).inputs() for f, paths in _file_fields(cfg.quality.classifier).items()
        }

    def preflight(self, cfg: PipelineConfig) -> list[str]:
        from ingestion.readers import ReadConfig

        assert cfg.quality is not None
        problems = []
        for field, paths in _file_fields(cfg.quality.classifier).items():
            try:
                ReadConfig(paths=paths).inputs()
            except (FileNotFoundError, ValueError) as e:
                problems.append(f"{field}: {e}")
        if cfg.quality.classifier.kind == "encoder":
            from orchestration.config import quality_finetune_config

            ft = quality_finetune_config(cfg.quality, {"train": "train.parquet"})
            assert ft.init_from is not None
            problems += init_from_problems(Path(ft.init_from), ft.seq_len, "quality.classifier.encoder")
        return problems

    def summary(self, index: dict[str, Any]) -> str:
        c = index.get("counters", {})
        return (
            f"{c['train_documents']} documents ({c['positives']} positive), held-out F1 {c['f1']:.3f} "
            f"(precision {c['precision']:.3f}, recall {c['recall']:.3f})"
        )

    def build(self, ctx: RunContext, out: Store, key: str, inputs: dict[str, str]) -> dict[str, Any]:
        from cleaning.quality import binary_metrics, held_out

        assert ctx.cfg.quality is not None
        c = ctx.cfg.quality.classifier
        examples = _examples(ctx, c, inputs)
        for name, label in (("positive", True), ("negative", False)):
            if (n := sum(y == label for *_, y in examples)) < 2:
                raise ValueError(
                    f"quality.classifier: the {name} class holds {n} document(s); it needs at least 2, one "
                    "to train on and one held out (add documents to its side)"
                )
        held = held_out([(doc_id, y) for doc_id, _, y in examples], c.test_fraction)
        train = [(t, y) for (_, t, y), h in zip(examples, held) if not h]
        test = [(t, y) for (_, t, y), h in zip(examples, held) if h]
        ctx.console.print(f"  training a {c.kind} classifier on {len(train):,} documents")
        with tempfile.TemporaryDirectory(prefix="lmf-quality-") as tmp:
            work = Path(tmp)
            if c.kind == "fasttext":
                where, scorer = _fasttext(c, train, work, out)
            else:
                where, scorer = _encoder(ctx, train, test, out, key)
            scores = scorer([t for t, _ in test])
            metrics = binary_metrics([y for _, y in test], [bool(s > 0.5) for s in scores])
            data = {
                "positives": sum(y for *_, y in examples),
                "negatives": sum(not y for *_, y in examples),
                "inputs": inputs,
                "files": _file_fields(c),
                "held_out": {
                    "method": "per class, the round(test_fraction * n) of lowest sha256(id)[:8] (1 to n-1)",
                    "documents": len(test),
                },
            }
            report = work / "report"
            report.mkdir()
            (report / "metrics.json").write_text(json.dumps(metrics, indent=2))
            (report / "training_data.json").write_text(json.dumps(data, indent=2))
            out.upload(report, where)
        counters = {
            "train_documents": len(train),
            "test_documents": len(test),
            "positives": data["positives"],
            "negatives": data["negatives"],
            **metrics,
        }
        return write_index(
            out,
            stage=self.name,
            kind="classifier",
            cache_key=key,
            files=_files(out, where),
            inputs=inputs,
            counters=counters,
            extra={"classifier": {"kind": c.kind, "dir": where, "seq_len": _seq_len(ctx)}},
        )

    def track(self, ctx: RunContext, index: dict[str, Any], selected: bool) -> None:
        """The classifier as a LoggedModel of its stage run, with its held-out metrics, the digest of the
        datasets it learned from and the files it read (once: a cached output's model is found again)."""
        import mlflow

        out, tracker = index["out_dir"], ctx.tracker
        assert tracker is not None and ctx.cfg.quality is not None
        record = out.read_object(MODEL_RECORD) or {}
        if record.get("model_id") and tracker.find_model(record["model_id"]):
            return
        c = ctx.cfg.quality.classifier
        tags = {
            "lmforge.classifier_digest": index_digest(index),
            **{f"lmforge.trained_on.{name}": digest for name, digest in index["inputs"].items()},
            **{
                f"lmforge.trained_on_files.{field}": ", ".join(paths)
                for field, paths in _file_fields(c).items()
            },
            "lmforge.config_hash": ctx.config_hash,
            **ctx.code,
        }
        model_id, _ = tracker.log_model(
            local_copy(out, index["classifier"]["dir"]),
            f"{ctx.cfg.name}-quality-classifier",
            {"quality.classifier": c.model_dump(mode="json")},
            tags,
            step=0,
            register_as=None,
            model_type="quality-classifier",
        )
        metrics = {k: index["counters"][k] for k in ("precision", "recall", "f1", "accuracy")}
        for name, value in metrics.items():
            mlflow.log_metric(f"heldout_{name}", float(value), model_id=model_id)
        out.write_bytes(MODEL_RECORD, json.dumps({"model_id": model_id}).encode())


def _fasttext(c: ClassifierConfig, train: list[tuple[str, bool]], work: Path, out: Store) -> tuple[str, Any]:
    """Train fastText on ``train``; the classifier's directory in ``out`` and its scoring function."""
    from cleaning.quality import MODEL_FILE, FastTextScorer, train_fasttext, write_training_file

    write_training_file(work / "train.txt", train, c.fasttext.seed)
    model_dir = work / CLASSIFIER_DIR
    model_dir.mkdir()
    train_fasttext(work / "train.txt", model_dir / MODEL_FILE, c.fasttext)
    out.upload(model_dir, CLASSIFIER_DIR)
    return CLASSIFIER_DIR, FastTextScorer(model_dir / MODEL_FILE).scores


def _encoder(
    ctx: RunContext, train: list[tuple[str, bool]], test: list[tuple[str, bool]], out: Store, key: str
) -> tuple[str, Any]:
    """Fine-tune ``quality.classifier.encoder.init_from`` as a sequence classifier (lmforge's fine-tuning,
    on Ray Train) on the training examples; its directory in ``out`` and its scoring function."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from evaluation.quality_encoder import encoder_scorer
    from orchestration.config import quality_finetune_config
    from orchestration.training_launch import launch_finetuning

    assert ctx.cfg.quality is not None
    splits = {}
    for split, rows in (("train", train), ("test", test)):
        table = pa.table(
            {"text": [t for t, _ in rows], "label": ["positive" if y else "negative" for _, y in rows]}
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        out.write_bytes(f"data/{split}.parquet", sink.getvalue().to_pybytes())
        splits[split] = out.uri_of(f"data/{split}.parquet")
    ft = quality_finetune_config(ctx.cfg.quality, splits)
    assert ft.init_from is not None  # the config requires it for kind encoder
    init_from = ft.init_from if uri_scheme(ft.init_from) else str(Path(ft.init_from).resolve())
    ft = ft.model_copy(update={"init_from": init_from})
    launch_finetuning(ft, out / "finetune", run_name=f"{ctx.cfg.name}-quality-{key}", console=ctx.console)
    where = "finetune/model"
    return where, encoder_scorer(out.uri_of(where), ft.seq_len, ctx.cfg.quality.classifier.scoring_batch_size)


def _seq_len(ctx: RunContext) -> int | None:
    from orchestration.config import quality_finetune_config

    assert ctx.cfg.quality is not None
    if ctx.cfg.quality.classifier.kind != "encoder":
        return None
    return quality_finetune_config(ctx.cfg.quality, {"train": "train.parquet"}).seq_len


def _files(out: Store, where: str) -> list[dict[str, Any]]:
    """The manifest entries of the classifier's directory."""
    from core.files import file_entry

    local = local_copy(out, where)
    return [{**file_entry(p, 0), "path": f"{where}/{p.name}"} for p in sorted(local.iterdir()) if p.is_file()]


def _file_fields(c: ClassifierConfig) -> dict[str, list[str]]:
    """Config field -> the files it names (the classifier's key covers their content)."""
    from cleaning.quality import FileSide

    fields = {}
    for side in ("positive", "negative"):
        for i, entry in enumerate(getattr(c, side)):
            if isinstance(entry, FileSide):
                fields[f"quality.classifier.{side}[{i}].paths"] = list(entry.paths)
    if c.labeled is not None:
        fields["quality.classifier.labeled.paths"] = list(c.labeled.paths)
    return fields


def _examples(ctx: RunContext, c: ClassifierConfig, inputs: dict[str, str]) -> list[tuple[str, str, bool]]:
    """(id, text, positive) of each training document: each side's ``max_documents`` of lowest id hash."""
    from cleaning.quality import sample

    if c.labeled is not None:
        return _labeled(ctx, c.labeled, c.max_documents)
    out = []
    for label, sides in ((True, c.positive), (False, c.negative)):
        docs = (doc for side in sides for doc in _side_documents(ctx, side, inputs))
        out += [(doc_id, text, label) for doc_id, text in sample(docs, c.max_documents)]
        name = "positive" if label else "negative"
        ctx.console.print(f"  {sum(1 for *_, y in out if y == label):,} {name} documents")
    return out


def _side_documents(ctx: RunContext, side: Side, inputs: dict[str, str]) -> Iterator[tuple[str, str]]:
    from cleaning.quality import SourceSide

    if isinstance(side, SourceSide):
        yield from _source_documents(ctx, side.source, inputs)
    else:
        yield from _file_documents(ctx, side)


def _source_documents(ctx: RunContext, source: str, inputs: dict[str, str]) -> Iterator[tuple[str, str]]:
    """The documents of ``source`` among the stage outputs read (its own chain's, or its files in a
    dataset that holds several sources')."""
    import pyarrow.parquet as pq

    from cleaning.quality import ONE_CORPUS

    for name in inputs:
        of = split_instance(name)[1]
        _, by_source = source_files(ctx.outcome(name).store)
        if not ctx.cfg.sources and source == ONE_CORPUS:  # the one corpus: everything read
            paths = [p for files in by_source.values() for p in files]
        elif of is None:  # a dataset of several sources' (dedup across sources)
            paths = by_source.get(source, [])
        else:
            paths = by_source.get(None, []) if of == source else []
        for path in paths:
            with open_input_file(path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=1024, columns=["id", "text"]):
                    yield from zip(batch.column("id").to_pylist(), batch.column("text").to_pylist())


def _file_documents(ctx: RunContext, side: FileSide) -> Iterator[tuple[str, str]]:
    """The documents of files, extracted and normalized as the clean stage does (and decontaminated when
    the clean stage is)."""
    from cleaning.decontaminate import Decontaminator
    from cleaning.extract import HtmlExtractor
    from cleaning.normalize import TextNormalizer
    from core.stage import StageContext, run_chain
    from ingestion.readers import ReadConfig, ReadReport, read_corpus

    clean = ctx.cfg.clean
    stages = [HtmlExtractor(clean.extract), TextNormalizer(clean.normalize)]
    if clean.decontaminate is not None:
        from orchestration.task_ngrams import task_ngrams

        stages.append(Decontaminator(clean.decontaminate, task_ngrams(ctx.console, clean.decontaminate)))
    read = ReadConfig(
        paths=side.paths, text_field=side.text_field, id_field=side.id_field, url_field=side.url_field
    )
    fields = {"text_field": side.text_field, "id_field": side.id_field, "url_field": side.url_field}
    for uri in read.inputs():
        sctx = StageContext("quality_classifier")
        for batch in run_chain(stages, read_corpus(uri, read.batch_size, ReadReport(), **fields), sctx):
            yield from zip(batch.column("id").to_pylist(), batch.column("text").to_pylist())


def _labeled(ctx: RunContext, labeled: LabeledFile, n: int) -> list[tuple[str, str, bool]]:
    """An annotated file's documents (id: the file and row), decontaminated as the clean stage is, ``n`` of
    lowest id hash per class."""
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    from cleaning.quality import sample
    from ingestion.readers import ReadConfig

    clean = _decontaminated(ctx)

    positive: list[tuple[str, str]] = []
    negative: list[tuple[str, str]] = []
    for uri in ReadConfig(paths=labeled.paths).inputs():
        with open_input_file(uri) as f:
            table = pq.read_table(f) if uri.endswith(".parquet") else pj.read_json(f)
        for field in (labeled.text_field, labeled.label_field):
            if field not in table.column_names:
                raise ValueError(
                    f"quality.classifier.labeled: {uri} has no column {field!r} (its columns: "
                    f"{', '.join(table.column_names)})"
                )
        texts = [t or "" for t in table.column(labeled.text_field).to_pylist()]
        labels = table.column(labeled.label_field).to_pylist()
        ids = [f"{Path(uri).name}#{row}" for row in range(len(texts))]
        kept = clean(ids, texts)
        for doc_id, text, label in zip(ids, texts, labels):
            if doc_id in kept:
                (positive if labeled.is_positive(label) else negative).append((doc_id, text))
    return [(i, t, True) for i, t in sample(positive, n)] + [(i, t, False) for i, t in sample(negative, n)]


def _decontaminated(ctx: RunContext):
    """ids, texts -> the ids of those the clean stage's decontamination keeps (all, without it)."""
    decontaminate = ctx.cfg.clean.decontaminate
    if decontaminate is None:
        return lambda ids, texts: set(ids)
    from cleaning.decontaminate import Decontaminator
    from core.schema import document_table
    from core.stage import StageContext, run_chain
    from orchestration.task_ngrams import task_ngrams

    stage = Decontaminator(decontaminate, task_ngrams(ctx.console, decontaminate))

    def kept(ids: list[str], texts: list[str]) -> set[str]:
        batches = document_table(texts, ids=ids).to_batches()
        out = run_chain([stage], batches, StageContext("quality_classifier"))
        return {i for batch in out for i in batch.column("id").to_pylist()}

    return kept
