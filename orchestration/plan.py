"""Which stages a run executes, which it serves from the cache, and why.

A stage's cache key hashes its *parts*: the config it depends on, the content digests of the files that
config names (seeds file, block list, tokenizer, ``init_from`` model, labeled data), the digests of its
inputs' manifests, and the code that computes it, the source of every lmforge module its entry modules
import, directly or not. The parts are kept beside the output (``.cache_parts.json``). A rerun compares
them with the new ones and says what changed: a config field, a named file, an input, or a module.
``lmforge run --dry-run`` prints that plan before anything runs.

A :class:`Selection` (``--only``, ``--from``, ``--until``, ``--force``) picks the stages to run. The
unselected stages that a selected one reads are used as they are on disk, even if their key is stale.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from core.files import file_sha256
from core.manifest import read_index
from core.storage import Store
from orchestration.instances import split_instance
from orchestration.stage_files import key_of_output

#: The lmforge packages whose source is part of a stage's code version.
PACKAGES = ("core", "ingestion", "cleaning", "training", "evaluation", "orchestration")
#: Where a stage's parts are kept, beside its ``.cache_key``.
PARTS_FILE = ".cache_parts.json"


class SelectionError(ValueError):
    """A ``--only/--from/--until/--force`` that names no stage of this config."""


@dataclass(frozen=True)
class Selection:
    """The stages a run should execute: ``only`` (a subset), the range ``start``..``until`` (inclusive),
    and those to rerun even when cached (``force``). Empty means the whole pipeline."""

    only: tuple[str, ...] = ()
    start: str | None = None
    until: str | None = None
    force: tuple[str, ...] = ()

    def resolve(self, order: list[str], deps: dict[str, tuple[str, ...]], all_stages: Iterable[str]):
        """(selected, needed) stage instances of a config whose instances are ``order`` (run order) with
        upstream ``deps``: ``needed`` adds the unselected ones a selected one reads (used as they are).

        A name is an instance (``clean[web]``) or a whole stage (``clean``: all its instances). ``--from X``
        selects X and what follows it in its source's chain and after (not the other sources' chains),
        ``--until X`` X and what comes before it in its chain and before; both, what the two share."""
        known = list(all_stages)
        sources = {n: split_instance(n)[1] for n in order}

        def expand(flag: str, name: str) -> list[str]:
            found = [n for n in order if n == name or split_instance(n)[0] == name]
            if not found:
                if split_instance(name)[0] not in known:
                    raise SelectionError(f"{flag} {name}: no such stage; stages are {', '.join(known)}")
                raise SelectionError(
                    f"{flag} {name}: this config has no {name} stage (its stages: {', '.join(order)})"
                )
            return found

        def reach(flag: str, name: str | None, forward: bool) -> set[str]:
            if name is None:
                return set(order)
            out: set[str] = set()
            for instance in expand(flag, name):
                i, source = order.index(instance), sources[instance]
                span = order[i:] if forward else order[: i + 1]
                out |= {n for n in span if source is None or sources[n] in (None, source)}
            return out

        only = {n for name in self.only for n in expand("--only", name)} or set(order)
        window = reach("--from", self.start, True) & reach("--until", self.until, False)
        if not window:
            raise SelectionError(f"--from {self.start} comes after --until {self.until}")
        selected = [n for n in order if n in window and n in only]
        if not selected:
            raise SelectionError(f"--only {','.join(self.only)} names no stage between --from and --until")
        for name in self.force:  # a whole stage forces those of its instances the selection runs
            instances = expand("--force", name)
            if not set(instances) & set(selected):
                raise SelectionError(f"--force {name}: the selection does not run {name}")
        needed = set(selected)
        for name in reversed(order):
            if name in needed:
                needed.update(deps[name])
        return selected, [n for n in order if n in needed]

    def forces(self, instance: str) -> bool:
        """Whether ``--force`` names this instance or its whole stage."""
        return instance in self.force or split_instance(instance)[0] in self.force


@dataclass
class PlanEntry:
    """What a run does with one stage: ``run``, ``cached`` or ``use`` (not selected: the output on disk
    is read as it is), ``missing`` (not selected and never run) or ``blocked`` (an input is missing),
    with the reason."""

    stage: str
    action: str
    reason: str
    key: str | None = None
    changes: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"{self.stage:<9} {self.action:<7} {self.reason}"


# -- code versions ----------------------------------------------------------------------------------
def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


@cache
def _imports(name: str) -> tuple[str, ...]:
    """The lmforge modules that module ``name`` imports anywhere in its source (function-level too; not
    those imported for type annotations only)."""
    path = _module_file(name)
    if path is None:
        return ()
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names]  # ``from pkg import module``
    return tuple(
        n for n in dict.fromkeys(found) if n.split(".")[0] in PACKAGES and _module_file(n) is not None
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (imports for annotations only: they
    never run, so they are not the module's code)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo += node.orelse
        else:
            todo += ast.iter_child_nodes(node)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_closure(entries: Iterable[str]) -> list[str]:
    """``entries`` and every lmforge module they import, transitively, sorted."""
    seen: set[str] = set()
    todo = list(entries)
    while todo:
        name = todo.pop()
        if name in seen or _module_file(name) is None:
            continue
        seen.add(name)
        todo += _imports(name)
    return sorted(seen)


def code_digests(entries: Iterable[str]) -> dict[str, str]:
    """The content digest of each module in the import closure of ``entries`` (by repository path)."""
    out = {}
    for name in module_closure(entries):
        path = _module_file(name)
        rel = "/".join(name.split(".")) + ("/__init__.py" if path.name == "__init__.py" else ".py")
        out[rel] = file_sha256(path)[:16]
    return out


# -- keys and reasons -------------------------------------------------------------------------------
def key_of(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_parts(out: str | Path | Store) -> dict[str, Any] | None:
    try:
        return Store(out).read_object(PARTS_FILE)
    except ValueError:  # damaged: the plan says the key changed, without saying how
        return None


def _changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _changed_fields(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [prefix or "(config)"]


def changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
    """What differs between a stage's stored parts and the new ones, for people: ``config train.lr``,
    ``file crawl.seeds_file``, ``input clean``, ``code cleaning/filters.py``."""
    if old is None:
        return ["cache key (made before lmforge kept its parts)"]
    new = json.loads(json.dumps(new, sort_keys=True, default=str))  # as stored: tuples become lists
    found = [f"config {f}" for f in _changed_fields(old.get("config"), new["config"])]
    for kind, label in (("files", "file"), ("inputs", "input"), ("code", "code")):
        before, after = old.get(kind, {}), new[kind]
        found += [f"{label} {k}" for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    return found


def summarize(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def format_plan(entries: list[PlanEntry]) -> str:
    return "\n".join(e.line() for e in entries)


# -- decisions --------------------------------------------------------------------------------------
def decide(
    out: Store, parts: dict[str, Any], inputs: dict[str, Any], selected: bool, force: bool
) -> PlanEntry:
    """What a run does with the stage whose output is ``out`` and whose new key parts are ``parts``, and why.
    ``inputs``: the outcomes of the stages it reads (``index`` None: rebuilt first; ``missing``: absent)."""
    name = parts["stage"]
    pending = [k for k, v in inputs.items() if v.index is None]
    absent = [k for k, v in inputs.items() if v.missing]
    key = key_of(parts)
    index = read_index(out)
    found = changes(read_parts(out), parts) if index is not None and index.get("cache_key") != key else []
    if not selected:
        if index is None:
            reason = f"not selected and {out} holds no finished output; run it first (widen --only/--from)"
            return PlanEntry(name, "missing", reason)
        if pending:
            reason = f"not selected: used as it is, though {_inputs(pending)} rebuilt"
        elif found:
            reason = f"not selected: used as it is, stale ({summarize(found)} changed since it ran)"
        else:
            reason = "not selected: used as it is (up to date)"
        return PlanEntry(name, "use", reason, key, found)
    if absent:
        return PlanEntry(name, "blocked", f"{_inputs(absent)} missing", key)
    if force:
        return PlanEntry(name, "run", "forced (--force)", key)
    if pending:
        return PlanEntry(name, "run", f"{_inputs(pending)} rebuilt first", key)
    if index is not None and index.get("cache_key") == key:
        return PlanEntry(name, "cached", "unchanged", key)
    if index is None:
        resumes = key_of_output(out) == key
        reason = (
            "resumes an interrupted run (its finished tasks are kept)"
            if resumes
            else "no finished output yet"
        )
        return PlanEntry(name, "run", reason, key)
    return PlanEntry(name, "run", f"changed: {summarize(found)}", key, found)


def _inputs(names: list[str]) -> str:
    return f"its input {names[0]} is" if len(names) == 1 else f"its inputs {' and '.join(names)} are"
