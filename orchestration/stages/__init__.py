"""The pipeline's stages, one component per module (docs/ARCHITECTURE.md, "Stages"), in DAG order.

Adding a stage is one module here holding a StageComponent, its config field on PipelineConfig, and its
place in ``STAGES``; :func:`register` adds one at run time (a plugin, a test) after a named stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestration.component import StageComponent, StageInstance
from orchestration.instances import split_instance
from orchestration.stages.clean import Clean
from orchestration.stages.crawl import Crawl
from orchestration.stages.dedup import Dedup
from orchestration.stages.dedup_across import DedupAcross
from orchestration.stages.evaluate import Evaluate
from orchestration.stages.finetune import Finetune
from orchestration.stages.labeled import Labeled
from orchestration.stages.quality import Quality
from orchestration.stages.quality_classifier import QualityClassifier
from orchestration.stages.tokenize import Tokenize
from orchestration.stages.train import Train

if TYPE_CHECKING:
    from orchestration.config import PipelineConfig

STAGES: list[StageComponent] = [
    Crawl(),
    Clean(),
    Dedup(),
    DedupAcross(),
    QualityClassifier(),
    Quality(),
    Tokenize(),
    Train(),
    Evaluate(),
    Labeled(),
    Finetune(),
]


def register(component: StageComponent, after: str) -> None:
    """Add ``component`` to the pipeline right after the stage named ``after`` (a name is registered once)."""
    names = [c.name for c in STAGES]
    if component.name in names:
        raise ValueError(f"a stage named {component.name!r} is registered already")
    if after not in names:
        raise ValueError(f"no stage named {after!r} to register {component.name!r} after (known: {names})")
    STAGES.insert(names.index(after) + 1, component)


def unregister(name: str) -> None:
    """Remove the stage named ``name`` (one added by :func:`register`)."""
    STAGES[:] = [c for c in STAGES if c.name != name]


def component_of(name: str) -> StageComponent | None:
    """The registered component of a stage instance (``clean[web]``: clean's), None for an unknown one."""
    stage = split_instance(name)[0]
    return next((c for c in STAGES if c.name == stage), None)


def stage_names() -> tuple[str, ...]:
    return tuple(c.name for c in STAGES)


def dag(cfg: PipelineConfig) -> list[StageInstance]:
    """The config's stage instances in run order, each with what it reads: consecutive per-source
    components of ``STAGES`` become one chain per source (in the config's order, each seeing its source's
    view of the config and its own chain), a pooled component one instance reading every source's."""
    views = cfg.source_views()
    out: list[StageInstance] = []
    chain: list[StageComponent] = []

    def add(component: StageComponent, source: str | None, view: PipelineConfig) -> None:
        if component.enabled(view):
            before = [i for i in out if source is None or i.source in (None, source)]
            out.append(StageInstance(component, source, component.reads(view, before)))

    for component in [*STAGES, None]:
        if component is not None and component.per_source:
            chain.append(component)
            continue
        for source, view in views.items():
            for member in chain:
                add(member, source, view)
        chain = []
        if component is not None:
            add(component, None, cfg)
    return out
