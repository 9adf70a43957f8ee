"""Names of stage instances: a stage of the one corpus, or of one source (docs/ARCHITECTURE.md, "Sources"):
``clean`` or ``clean[web]``, and where each writes in the work dir."""

from __future__ import annotations


def instance_name(stage: str, source: str | None) -> str:
    return stage if source is None else f"{stage}[{source}]"


def output_path(name: str) -> str:
    """Where a stage instance writes in the work dir: ``clean`` for the one corpus's, ``sources/web/clean``
    for ``clean[web]`` (a source's chain in a directory of its own)."""
    stage, source = split_instance(name)
    return stage if source is None else f"sources/{source}/{stage}"


def split_instance(name: str) -> tuple[str, str | None]:
    """``clean[web]`` -> (``clean``, ``web``); ``tokenize`` -> (``tokenize``, None)."""
    stage, _, rest = name.partition("[")
    return (stage, rest[:-1]) if rest.endswith("]") else (name, None)
