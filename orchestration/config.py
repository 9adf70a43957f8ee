"""The one config file that drives a pipeline run, validated before any work starts."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cleaning.decontaminate import DecontaminateConfig
from cleaning.dedup_phases import DedupConfig
from cleaning.extract import HtmlExtractorConfig
from cleaning.filters import (
    C4QualityConfig,
    FineWebQualityConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    UrlBlocklistConfig,
)
from cleaning.langid import LanguageFilterConfig
from cleaning.normalize import TextNormalizerConfig
from cleaning.pii import PiiConfig
from cleaning.quality import ONE_CORPUS, QualityConfig
from core.manifest import Verify
from core.mappings import deep_merge
from core.stage import StageConfig
from core.storage import Store, is_remote, node_dir
from evaluation.config import EvalConfig
from ingestion.crawler import CrawlConfig
from ingestion.readers import ReadConfig
from orchestration.errors import ConfigError
from training.config import FinetuneConfig, TrainConfig
from training.data.mixture import MixtureConfig, entry_of
from training.data.tokenize import TokenizeConfig
from training.data.tokenizer import EOS_TOKEN
from training.objectives import special_tokens_for


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


#: The stages whose Ray tasks ``ray.resources`` can size (training sizes its workers in ``train``; crawl
#: actors hold no CPU, they wait on the network).
TASK_STAGES = ("clean", "dedup", "quality", "tokenize", "evaluate", "finetune")


class TaskResources(_Section):
    """What each Ray task of a stage asks for, and how many may be in flight at once."""

    cpus: float = Field(1.0, gt=0, description="CPUs per task.")
    gpus: float = Field(0.0, ge=0, description="GPUs per task (evaluate, finetune's evaluation).")
    memory_mb: int | None = Field(
        None, ge=1, description="Memory per task, reserved in Ray's scheduler (null: no reservation)."
    )
    max_in_flight: int | None = Field(
        None,
        ge=1,
        description="Tasks submitted at once (null: twice the cluster's CPUs): backpressure on the driver "
        "and the object store when a stage has many partitions.",
    )

    def ray_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.cpus, "num_gpus": self.gpus}
        if self.memory_mb is not None:
            options["memory"] = self.memory_mb * 2**20
        return options


class RayConfig(_Section):
    """Where stages run: an embedded local Ray (address null) or an existing cluster."""

    address: str | None = Field(
        None, description="Ray cluster address ('auto', 'ray://host:10001'); null: embedded."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded Ray (default: all).")
    object_store_memory_mb: int = Field(1024, ge=100, description="Object store cap of the embedded Ray.")
    dashboard: bool = Field(
        True,
        description="Start the embedded Ray's dashboard on 127.0.0.1 (Ray Train's state checks need it).",
    )
    resources: dict[str, TaskResources] = Field(
        default_factory=dict,
        description=f"Per-stage task resources, by stage ({', '.join(TASK_STAGES)}); e.g. "
        "{clean: {cpus: 1, memory_mb: 2048, max_in_flight: 8}, evaluate: {gpus: 1}}.",
    )

    @model_validator(mode="after")
    def _known_stages(self) -> RayConfig:
        unknown = sorted(set(self.resources) - set(TASK_STAGES))
        if unknown:
            raise ValueError(
                f"ray.resources: no stage {', '.join(unknown)}; stages with Ray tasks are {', '.join(TASK_STAGES)} "
                "(training's workers are sized by train.num_workers / cpus_per_worker / use_gpu)"
            )
        return self

    def tasks(self, stage: str) -> TaskResources:
        return self.resources.get(stage, TaskResources())


class PromoteRule(_Section):
    """Give the registered version ``alias`` when ``metric`` (as in the run's metrics: ``val_bits_per_byte``,
    ``arc_easy/acc``, ...) is above ``above`` or below ``below``."""

    alias: str = Field(..., min_length=1, description="Alias to set, e.g. production.")
    metric: str = Field(..., min_length=1, description="Evaluation metric the rule reads.")
    above: float | None = Field(None, description="Promote when the metric is greater than this.")
    below: float | None = Field(None, description="Promote when the metric is less than this.")

    @model_validator(mode="after")
    def _one_bound(self) -> PromoteRule:
        if (self.above is None) == (self.below is None):
            raise ValueError("set exactly one of 'above' or 'below'")
        return self

    def passes(self, value: float) -> bool:
        return value > self.above if self.above is not None else value < self.below  # type: ignore[operator]


class TrackingConfig(_Section):
    """MLflow tracking."""

    uri: str | None = Field(None, description="Any MLflow tracking URI; null: sqlite file in the work dir.")
    experiment: str = Field("lmforge", min_length=1, description="MLflow experiment name.")
    registered_model: str | None = Field(None, description="Register the trained model under this name.")
    finetuned_model: str | None = Field(
        None,
        description="Register the fine-tuned model under this name (default: registered_model + '-finetuned', "
        "when registered_model is set).",
    )
    alias: str | None = Field("candidate", description="Alias the new registered version gets (null: none).")
    promote: list[PromoteRule] = Field(
        default_factory=list,
        description="Rules that move an alias to the new version when an evaluation metric passes.",
    )

    def finetuned_name(self) -> str | None:
        """The registered model name of fine-tuned models, or None (not registered)."""
        if self.finetuned_model is not None:
            return self.finetuned_model
        return f"{self.registered_model}-finetuned" if self.registered_model else None


class DemoSiteConfig(_Section):
    """A local pydoc site served on 127.0.0.1 and crawled (the demo's data source)."""

    modules: int = Field(40, ge=2, le=46, description="Standard-library modules rendered as pages.")
    exact_duplicates: int = Field(3, ge=0, description="Pages copied verbatim under /mirror/.")
    near_duplicates: int = Field(3, ge=0, description="Pages copied with a few words edited under /v2/.")
    private_pages: int = Field(3, ge=0, description="Pages under /private/, disallowed by robots.txt.")
    port: int = Field(
        8765,
        ge=0,
        le=65535,
        description="Port on 127.0.0.1. Fixed, so page URLs (and so document ids) are the same on every run; "
        "0: any free port.",
    )


class CleanConfig(_Section):
    """Extraction, normalization, filtering and redaction, in this order; null switches a step off."""

    extract: HtmlExtractorConfig = Field(default_factory=HtmlExtractorConfig)
    normalize: TextNormalizerConfig = Field(default_factory=TextNormalizerConfig)
    url_blocklist: UrlBlocklistConfig | None = Field(None, description="Reject documents from listed sites.")
    language: LanguageFilterConfig | None = Field(default_factory=LanguageFilterConfig)
    gopher_repetition: GopherRepetitionConfig | None = Field(default_factory=GopherRepetitionConfig)
    gopher: GopherQualityConfig | None = Field(default_factory=GopherQualityConfig)
    c4: C4QualityConfig | None = Field(None, description="C4's line rules ({} to switch on).")
    fineweb: FineWebQualityConfig | None = Field(None, description="FineWeb's rules ({} to switch on).")
    pii: PiiConfig | None = Field(default_factory=PiiConfig)
    decontaminate: DecontaminateConfig | None = Field(
        None, description="Remove documents sharing a 13-gram with the evaluation tasks ({} to switch on)."
    )

    def thresholds(self) -> dict[str, list[float]]:
        """Every switched-on rule's cuts, by the ``meta`` key of the signal it reads."""
        cuts: dict[str, list[float]] = {}
        for name in type(self).model_fields:
            if isinstance(step := getattr(self, name), StageConfig):
                cuts |= step.thresholds()
        return cuts


#: The sections a source may set for itself; the top-level ones are their defaults (docs/ARCHITECTURE.md,
#: "Sources").
SOURCE_SECTIONS = ("demo_site", "crawl", "read", "clean", "dedup")
#: The fields that say where a corpus comes from: a source's own, never a default for the others.
CORPUS_FIELDS = ("demo_site", "crawl.seeds", "crawl.seeds_file", "read.paths")


class SourceConfig(_Section):
    """One corpus of a multi-source run: its crawl (or the demo site) or its files to read, and its own
    clean and dedup settings. Each section is the top-level one with the source's fields laid over it, so a
    source names only what differs (``clean: {c4: null}`` switches C4's rules off for it alone)."""

    demo_site: DemoSiteConfig | None = None
    crawl: CrawlConfig = Field(default_factory=CrawlConfig)
    read: ReadConfig = Field(default_factory=ReadConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)

    @property
    def has_corpus(self) -> bool:
        return _names_corpus(self.demo_site, self.crawl, self.read)


class DedupAcrossConfig(_Section):
    """Deduplication across sources, after each source's own (FineWeb dedups each snapshot alone; this is
    the global pass over all of them): the top-level ``dedup`` settings, over every source's documents."""

    order: list[str] = Field(
        default_factory=list,
        description="Sources by precedence: of copies in several sources, the first listed source's survives "
        "(sources not listed follow, in the order of `sources`).",
    )


class PipelineConfig(_Section):
    """A whole pipeline run: crawl -> clean -> dedup -> tokenize -> train -> evaluate, for one corpus or
    for each of ``sources``."""

    name: str = Field("lmforge", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$", description="Run name.")
    workdir: Path | str = Field(
        Path("work"),
        description="Where every stage writes its output: a local directory, or a pyarrow filesystem URI "
        "(s3://bucket/prefix, gs://, hdfs://; S3 options as a query, e.g. ?endpoint_override=host:port) that "
        "every node of a cluster reaches.",
    )
    seed: int = Field(0, description="Global seed.")
    verify: Verify = Field(
        "first_open",
        description="sha256 of a cached stage's files against its manifest before reuse: always, first_open "
        "(once, then files whose size, mtime or ctime changed) or never (presence, sizes, row counts only).",
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    demo_site: DemoSiteConfig | None = Field(None, description="Serve and crawl a generated local site.")
    crawl: CrawlConfig = Field(default_factory=CrawlConfig)
    read: ReadConfig = Field(default_factory=ReadConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    finetune: FinetuneConfig | None = Field(
        None,
        description="Fine-tune on labeled data after training (the trained model, or finetune.init_from alone "
        "with no data source), then score the validation and test splits.",
    )
    sources: dict[str, SourceConfig] = Field(
        default_factory=dict,
        description="Corpora processed each by its own crawl/read, clean and dedup (stages clean[NAME], ...), "
        "then tokenized with one tokenizer and trained on as one pool; each source's sections override the "
        "top-level ones, which are the defaults. Empty: one corpus, from the top-level sections.",
    )
    dedup_across: DedupAcrossConfig | None = Field(
        None,
        description="Deduplicate across sources after each source's own dedup ({} to switch on; stage "
        "dedup_across), the earlier source's copy surviving.",
    )

    quality: QualityConfig | None = Field(
        None,
        description="Score every document with a learned quality classifier (stages quality_classifier, "
        "quality) and keep by threshold, top fraction or tiers.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_to_evaluated_tasks(cls, data: Any) -> Any:
        """Decontamination and periodic evaluation without their own task list use evaluate.tasks,
        written into their sections so that the clean and train cache keys change with them."""
        if not isinstance(data, dict):
            return data
        evaluate = data.get("evaluate")
        tasks = evaluate.get("tasks") if isinstance(evaluate, dict) else None
        clean = data.get("clean")
        d = clean.get("decontaminate") if isinstance(clean, dict) else None
        if isinstance(d, dict) and d.get("tasks") is None:
            if not tasks:
                raise ValueError(
                    "clean.decontaminate names no tasks: set clean.decontaminate.tasks or evaluate.tasks"
                )
            data = {**data, "clean": {**clean, "decontaminate": {**d, "tasks": list(tasks)}}}
        train = data.get("train")
        if isinstance(train, dict) and train.get("eval_every") and not train.get("eval_tasks") and tasks:
            data = {**data, "train": {**train, "eval_tasks": list(tasks)}}
        return _with_objective_tokens(_sources_over_defaults(data))

    @model_validator(mode="after")
    def _has_a_source(self) -> PipelineConfig:
        if not self.has_corpus and not (self.finetune is not None and self.finetune.init_from):
            raise ValueError(
                "no data source: set crawl.seeds (or crawl.seeds_file) to the URLs to crawl, read.paths to corpora "
                "you have, demo_site: {} for the demo, sources: {NAME: {read: {paths: [...]}}, ...}, or "
                "finetune.init_from to fine-tune a model you have"
            )
        for name, source in self.source_views().items():
            prefix = f"sources.{name}." if name else ""
            if self.sources and not source.has_corpus:
                raise ValueError(
                    f"sources.{name} names no corpus: set its read.paths, crawl.seeds (or crawl.seeds_file) "
                    "or demo_site"
                )
            _check_crawl_scope(source.demo_site, source.crawl, prefix)
        if self.dedup_across is not None:
            if len(self.sources) < 2:
                raise ValueError(
                    "dedup_across needs two sources or more in sources (a single corpus: use dedup)"
                )
            unknown = [s for s in self.dedup_across.order if s not in self.sources]
            if unknown:
                raise ValueError(
                    f"dedup_across.order: no source {', '.join(unknown)} (sources: {', '.join(self.sources)})"
                )
        if self.train.mixture is not None:
            _check_mixture_sources(self.train.mixture, list(self.sources), self.quality)
        if self.quality is not None:
            _check_quality_sources(self.quality, list(self.sources))
            if self.quality.classifier.kind == "encoder":
                quality_finetune_config(self.quality, {"train": "train.parquet"})
        ports = [s.demo_site.port for s in self.sources.values() if s.demo_site and s.demo_site.port]
        if len(ports) != len(set(ports)):
            raise ValueError("sources: two demo sites on one demo_site.port; give each its own (or 0: any)")
        return self

    @model_validator(mode="after")
    def _objective_fits_tokenizer_and_tasks(self) -> PipelineConfig:
        objective = self.train.objective
        if objective == "causal_lm":
            return self
        if self.evaluate.tasks:
            raise ValueError(
                f"evaluate.tasks are scored as causal LMs are (lm-evaluation-harness); train.objective={objective} "
                "is evaluated on the held-out split (loss, pseudo-perplexity): remove evaluate.tasks"
            )
        path = self.tokenize.tokenizer.path
        if path and Path(path).exists():
            from training.data.tokenizer import load_tokenizer
            from training.objectives import SpecialIds

            eos = self.tokenize.tokenizer.special_tokens[0]
            SpecialIds.from_tokenizer(
                load_tokenizer(path), objective, eos, where=f"tokenize.tokenizer.path {path}"
            )
        return self

    @model_validator(mode="after")
    def _promotion_metrics_are_computed(self) -> PipelineConfig:
        """A promotion rule names a metric the evaluate stage reports: val_<metric> or <task>/<metric>."""
        files = [t for t in self.evaluate.tasks if Path(t).suffix]
        names = {t for t in self.evaluate.tasks if not Path(t).suffix} | {Path(t).stem for t in files}
        for i, rule in enumerate(self.tracking.promote):
            task, _, metric = rule.metric.rpartition("/")
            if not task and not metric.startswith("val_"):
                raise ValueError(
                    f"tracking.promote.{i}.metric: {rule.metric!r} is not an evaluation metric: use "
                    "val_<metric> (val_loss, val_bits_per_byte, ...) or <task>/<metric> (arc_easy/acc)"
                )
            if task and task not in names and not files:
                raise ValueError(
                    f"tracking.promote.{i}.metric: {rule.metric!r} reads task {task!r}, which evaluate.tasks "
                    f"({', '.join(self.evaluate.tasks) or 'none'}) does not score"
                )
        return self

    @property
    def has_corpus(self) -> bool:
        """Whether the config names text to crawl or read (else only fine-tuning runs)."""
        return bool(self.sources) or _names_corpus(self.demo_site, self.crawl, self.read)

    def source_views(self) -> dict[str | None, PipelineConfig]:
        """Each source's config as its per-source stages see it: this config with the source's sections in
        place of the top-level ones (a single-corpus config: itself, as the one source ``None``)."""
        if not self.sources:
            return {None: self}
        return {name: self.view(name) for name in self.sources}

    def source_order(self) -> list[str]:
        """The sources by precedence across them: dedup_across.order, then the others in config order."""
        first = list(self.dedup_across.order) if self.dedup_across is not None else []
        return first + [s for s in self.sources if s not in first]

    def view(self, source: str | None) -> PipelineConfig:
        """The config a stage instance of ``source`` sees (None: a pooled stage, or the one corpus)."""
        if source is None:
            return self
        own = self.sources[source]
        return self.model_copy(update={**{f: getattr(own, f) for f in SOURCE_SECTIONS}, "sources": {}})

    @field_validator("workdir", mode="before")
    @classmethod
    def _workdir(cls, value: Any) -> Any:
        """A local directory as a Path; a filesystem URI kept as the string (a Path would fold its //)."""
        if isinstance(value, str) and is_remote(value):
            return value
        if isinstance(value, str):
            if not value.strip():
                raise ValueError("workdir is empty: give a directory or a filesystem URI")
            return Path(value.removeprefix("file://"))
        return value

    @property
    def store(self) -> Store:
        """The work dir, local or remote."""
        return Store(self.workdir)

    @property
    def local_dir(self) -> Path:
        """This machine's directory for the run's own state (the sqlite MLflow store and its artifacts,
        Ray's session files, the crawl's frontier): the work dir itself, or for a remote work dir one of
        the node cache (core/storage.py) that stands for it."""
        return node_dir(self.workdir, "runs")

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{self.local_dir / 'mlflow.db'}"


def quality_finetune_config(quality: QualityConfig, splits: dict[str, str]) -> FinetuneConfig:
    """The fine-tuning of an encoder quality classifier: ``quality.classifier.encoder``'s settings on the
    classifier's training examples (``splits``: files with text and label columns, labels negative and
    positive)."""
    from training.labeled import LabeledDataConfig

    data = LabeledDataConfig(splits=splits, label_names=["negative", "positive"])
    fields = {"task": "classification", **(quality.classifier.encoder or {}), "data": data}
    try:
        return FinetuneConfig(**fields)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "quality.classifier.encoder")) from None


def _check_mixture_sources(mixture: MixtureConfig, sources: list[str], quality: QualityConfig | None) -> None:
    """A mixture weighs sources of the config (the tokens stage tags each one's shards), and tiers only
    of sources that quality scoring buckets into tiers."""
    if not sources:
        raise ValueError(
            "train.mixture weighs sources: name them in sources ({NAME: {read: {paths: [...]}}, ...}); "
            "a config without sources trains on its one corpus"
        )
    named = {entry_of(e)[0] for e in mixture.sources}
    unknown = [n for n in sorted(named) if n not in sources]
    if unknown:
        raise ValueError(f"train.mixture: no source {', '.join(unknown)} (sources: {', '.join(sources)})")
    for source, tiers in mixture.tiers_of().items():
        bounds = quality.select.tiers if quality is not None else None
        if bounds is None or (
            quality is not None and quality.sources is not None and source not in quality.sources
        ):
            raise ValueError(
                f"train.mixture weighs tiers of {source}: quality scoring must bucket it into tiers "
                "(quality.select.tiers, with the source among quality.sources)"
            )
        if max(tiers) > len(bounds):
            raise ValueError(
                f"train.mixture: {source} has tiers 0 to {len(bounds)} (quality.select.tiers {list(bounds)}), "
                f"not {max(tiers)}"
            )


def _check_quality_sources(quality: QualityConfig, sources: list[str]) -> None:
    """The sources the quality classifier learns from and scores are sources of the config."""
    named = {
        "quality.classifier (positive, negative)": quality.classifier.sources(),
        "quality.sources": quality.sources or [],
    }
    known = sources or [ONE_CORPUS]
    for field, names in named.items():
        unknown = [n for n in names if n not in known]
        if unknown:
            have = f"sources: {', '.join(sources)}" if sources else f"one corpus, named {ONE_CORPUS}"
            raise ValueError(f"{field}: no source {', '.join(unknown)} ({have})")


def _sources_over_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Each source's sections laid over the top-level ones (nested fields merge, others replace). Where a
    corpus comes from is a source's own: with sources, the top level may not name one."""
    sources = data.get("sources")
    if not sources or not isinstance(sources, dict):
        return data
    for field in CORPUS_FIELDS:
        section, _, key = field.partition(".")
        value = data.get(section)
        if key:
            value = _mapping(value).get(key) if isinstance(_mapping(value), dict) else None
        if value is not None and value != []:
            raise ValueError(
                f"{field} is set beside sources: a corpus belongs to a source; move it into one "
                f"(sources.NAME.{field})"
            )
    merged = {}
    for name, source in sources.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise ValueError(
                f"sources.{name}: a source name is letters, digits, _ and - (it names directories)"
            )
        if not isinstance(source, dict):
            merged[name] = source  # the model's validation names what is wrong with it
            continue
        merged[name] = {
            **source,
            **{
                section: deep_merge(_mapping(data.get(section)), _mapping(source.get(section)))
                for section in SOURCE_SECTIONS[1:]
                if isinstance(_mapping(source.get(section)), dict)
                and isinstance(_mapping(data.get(section)), dict)
            },
        }
        clean = merged[name].get("clean")
        d = clean.get("decontaminate") if isinstance(clean, dict) else None
        if isinstance(d, dict) and d.get("tasks") is None:  # evaluate.tasks, as for the top level's
            evaluate = data.get("evaluate")
            tasks = evaluate.get("tasks") if isinstance(evaluate, dict) else None
            if not tasks:
                raise ValueError(
                    f"sources.{name}.clean.decontaminate names no tasks: set its tasks or evaluate.tasks"
                )
            merged[name]["clean"] = {**clean, "decontaminate": {**d, "tasks": list(tasks)}}
    return {**data, "sources": merged}


def _mapping(value: Any) -> Any:
    """A section as a mapping: a model's fields, {} for none, anything else as it is (validation names it)."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    return {} if value is None else value


def _names_corpus(demo_site: DemoSiteConfig | None, crawl: CrawlConfig, read: ReadConfig) -> bool:
    return bool(demo_site is not None or crawl.seeds or crawl.seeds_file is not None or read.paths)


def _check_crawl_scope(demo_site: DemoSiteConfig | None, crawl: CrawlConfig, prefix: str) -> None:
    """The demo site and local seeds need ``crawl.allow_private_addresses`` (``prefix``: the source's)."""
    if demo_site is not None and not crawl.allow_private_addresses:
        raise ValueError(
            f"{prefix}demo_site is served on 127.0.0.1, which the crawler refuses by default: "
            f"set {prefix}crawl.allow_private_addresses: true"
        )
    if not crawl.allow_private_addresses:
        for seed in crawl.seeds:
            host = urlsplit(seed).hostname or ""
            if host == "localhost" or _is_private_ip(host):
                raise ValueError(
                    f"{prefix}crawl.seeds: {seed!r} is a local/private address, refused by default; "
                    f"set {prefix}crawl.allow_private_addresses: true to crawl it"
                )


def _with_objective_tokens(data: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer lmforge trains gets the special tokens of train.objective (after EOS, which stays first),
    written into the tokenize section so that its cache key changes with them."""
    train = data.get("train")
    objective = train.get("objective", "causal_lm") if isinstance(train, dict) else "causal_lm"
    needed = special_tokens_for(objective)
    tokenize = data.get("tokenize") or {}
    tokenizer = tokenize.get("tokenizer") or {} if isinstance(tokenize, dict) else {}
    if not needed or not isinstance(tokenizer, dict) or tokenizer.get("path"):
        return data
    have = list(tokenizer.get("special_tokens") or [EOS_TOKEN])
    tokens = have + [t for t in needed if t not in have]
    return {**data, "tokenize": {**tokenize, "tokenizer": {**tokenizer, "special_tokens": tokens}}}


def _is_private_ip(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid value(s):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        message = e["msg"].removeprefix("Value error, ")
        lines.append(
            f"  - {where}: {message} (got {shown})" if e["type"] != "missing" else f"  - {where}: {message}"
        )
    return "\n".join(lines)


def parse_config(
    data: dict[str, Any], source: str = "config", overrides: dict[str, Any] | None = None
) -> PipelineConfig:
    """Validate a config mapping; raises ConfigError naming each bad field, value and what is allowed."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    data = deep_merge(data, overrides or {})
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read and validate a YAML config file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_config(data, str(path), overrides)


def dotted_overrides(pairs: list[str]) -> dict[str, Any]:
    """``train.steps=10`` style overrides (values parsed as YAML) into a nested mapping."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not KEY=VALUE (e.g. train.steps=10)")
        key, value = pair.split("=", 1)
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out
