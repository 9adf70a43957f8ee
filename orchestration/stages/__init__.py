"""The pipeline's stages, one component per module (docs/ARCHITECTURE.md, "Stages"), in DAG order.

Adding a stage is one module here holding a StageComponent, its config field on PipelineConfig, and its
place in ``STAGES``; :func:`register` adds one at run time (a plugin, a test) after a named stage.
"""

from __future__ import annotations

from orchestration.component import StageComponent
from orchestration.stages.clean import Clean
from orchestration.stages.crawl import Crawl
from orchestration.stages.dedup import Dedup
from orchestration.stages.evaluate import Evaluate
from orchestration.stages.finetune import Finetune
from orchestration.stages.labeled import Labeled
from orchestration.stages.tokenize import Tokenize
from orchestration.stages.train import Train

STAGES: list[StageComponent] = [
    Crawl(),
    Clean(),
    Dedup(),
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


def stage_names() -> tuple[str, ...]:
    return tuple(c.name for c in STAGES)
