"""Weighted mixtures of token sources: which source each global sample comes from, and which of its
sequences, as a pure function of the run's seed, schedule and global sample index.

A run's global samples are numbered ``g = step * G + j`` (``G`` sequences per optimizer step: micro
batch x gradient accumulation x workers), whatever the workers' layout. Sample ``g`` goes to the source
furthest behind its target: the target of source ``s`` after ``n`` samples is ``D_s(n)``, the sum of its
weight over those samples (the weight of the schedule phase of each sample's step), and sample ``n``
goes to the ``s`` maximizing ``D_s(n + 1) - C_s(n)`` (``C_s(n)``: samples already given to ``s``; ties
to the first source by name). Every source's count stays within one sequence of its target at every
sample, in every phase, and the assignment depends on nothing but ``g`` and the schedule (the counts are
the sampler's resumable state). The ``k``-th sample of a source is its ``perm[k % n]`` sequence, ``perm``
a permutation seeded by (seed, source, ``k // n``): a source smaller than its share repeats, each pass in
a new order.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import numba
import numpy as np
from pydantic import Field, model_validator

from core.stage import StageConfig

#: A phase's weights: a share per source, or per quality tier of a source ({web: {2: 0.4, 1: 0.2}}).
Weights = dict[str, float | dict[int, float]]

_TIER = re.compile(r"(.+)\.tier(\d+)")


def _entries(weights: Weights) -> dict[str, float]:
    """Weights by entry: ``web`` for a source, ``web.tier2`` for a tier of one."""
    out: dict[str, float] = {}
    for source, w in weights.items():
        if isinstance(w, dict):
            out |= {f"{source}.tier{t}": v for t, v in w.items()}
        else:
            out[source] = w
    return out


def entry_of(name: str) -> tuple[str, int | None]:
    """(source, tier or None) of a mixture entry."""
    m = _TIER.fullmatch(name)
    return (m.group(1), int(m.group(2))) if m else (name, None)


class MixturePhase(StageConfig):
    """The weights from one step of the run on (until the next phase)."""

    at_step: int | None = Field(
        None, ge=1, description="The first step of the phase (0-based optimizer step)."
    )
    at_fraction: float | None = Field(
        None, gt=0, lt=1, description="Or: the first step as a fraction of train.steps (0.8: the last 20%)."
    )
    weights: Weights = Field(
        description="Token share of each source (or its tiers) in the phase (others: 0)."
    )

    @model_validator(mode="after")
    def _one_start(self) -> MixturePhase:
        if (self.at_step is None) == (self.at_fraction is None):
            raise ValueError(
                "a train.mixture.schedule phase names its start: at_step or at_fraction, one of them"
            )
        return self

    def start(self, steps: int) -> int:
        return self.at_step if self.at_step is not None else round(self.at_fraction * steps)  # type: ignore[operator]


class MixtureConfig(StageConfig):
    """Sources by token share of each global batch, changing on a schedule (OLMo's mid-training anneal)."""

    weights: Weights = Field(
        description="Token share of each source from the first step (normalised when they do not sum to 1); "
        "a source given as {tier: share} is drawn by the quality tiers of its documents (quality.select.tiers)."
    )
    schedule: list[MixturePhase] = Field(
        default_factory=list, description="Later phases, each with its start and its weights, in order."
    )
    max_repetition: float | dict[str, float] = Field(
        1.0,
        description="How often a source's training tokens may be seen (1: once, OLMo's default); per source "
        "(or tier, web.tier2) as {name: factor}, the others 1. A mixture needing more is refused before "
        "training.",
    )

    rehydrate: dict[str, int] = Field(
        default_factory=dict,
        description="FineWeb-2's rehydration, per source: {name: cap}: a dedup survivor whose cluster held n "
        "copies is drawn min(n, cap) times as often as a document that had none (dedup.copies in meta).",
    )

    @model_validator(mode="after")
    def _weights(self) -> MixtureConfig:
        for where, weights in self._phase_weights():
            bad = {k: v for k, v in weights.items() if not v >= 0}
            if bad or not sum(weights.values()) > 0:
                raise ValueError(f"{where}: weights must be >= 0 with a positive sum (got {weights})")
        limits = (
            self.max_repetition.values() if isinstance(self.max_repetition, dict) else [self.max_repetition]
        )
        if any(not v > 0 for v in limits):
            raise ValueError(f"train.mixture.max_repetition must be > 0 (got {self.max_repetition})")
        named = set(self.sources) | {entry_of(e)[0] for e in self.sources}
        if unknown := sorted(set(self.rehydrate) - named):
            raise ValueError(f"train.mixture.rehydrate: {', '.join(unknown)} has no weight in the mixture")
        if bad := {k: v for k, v in self.rehydrate.items() if v < 1}:
            raise ValueError(f"train.mixture.rehydrate caps must be >= 1 (got {bad})")
        if isinstance(self.max_repetition, dict) and (extra := set(self.max_repetition) - named):
            raise ValueError(
                f"train.mixture.max_repetition: {', '.join(sorted(extra))} has no weight in the mixture"
            )
        return self

    def _phase_weights(self) -> list[tuple[str, dict[str, float]]]:
        """Each phase's weights by entry: a source (``web``) or a tier of one (``web.tier2``)."""
        return [("train.mixture.weights", _entries(self.weights))] + [
            (f"train.mixture.schedule[{i}].weights", _entries(p.weights)) for i, p in enumerate(self.schedule)
        ]

    @property
    def sources(self) -> list[str]:
        """Every entry any phase weighs (a source, or a tier of one: ``web.tier2``), by name: the samples do
        not depend on the order a config file lists them in (YAML writers sort keys; the cache key too)."""
        return sorted({s for _, weights in self._phase_weights() for s in weights})

    def tiers_of(self) -> dict[str, list[int]]:
        """The sources drawn by quality tier, and the tiers weighed."""
        out: dict[str, list[int]] = {}
        for entry in self.sources:
            source, tier = entry_of(entry)
            if tier is not None:
                out.setdefault(source, []).append(tier)
        return out

    def repetition_limit(self, entry: str) -> float:
        if isinstance(self.max_repetition, dict):
            return self.max_repetition.get(entry, self.max_repetition.get(entry_of(entry)[0], 1.0))
        return self.max_repetition

    def notes(self) -> list[str]:
        """What the run should tell its user: weights normalised because they did not sum to 1."""
        return [
            f"{where} sum to {sum(w.values()):g}; normalised to "
            + ", ".join(f"{k} {v / sum(w.values()):.3g}" for k, v in w.items())
            for where, w in self._phase_weights()
            if abs(sum(w.values()) - 1) > 1e-9
        ]

    def phases(self, steps: int) -> list[tuple[int, np.ndarray]]:
        """(first step, normalised weights over :attr:`sources`) of each phase, in order; every phase
        starts after the one before and before the run ends (ValueError naming the starts)."""
        names = self.sources
        starts = [0] + [p.start(steps) for p in self.schedule]
        if any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= steps:
            raise ValueError(
                f"train.mixture.schedule: phase starts {starts[1:]} must increase and lie inside the run's "
                f"steps 1..{steps - 1} (train.steps={steps})"
            )
        out = []
        for start, (_, weights) in zip(starts, self._phase_weights()):
            w = np.array([weights.get(s, 0.0) for s in names], dtype=np.float64)
            out.append((start, w / w.sum()))  # summed in name order: the same floats however listed
        return out


class MixturePlan:
    """The source of every global sample of a run (see the module docstring)."""

    def __init__(self, cfg: MixtureConfig, steps: int, global_batch: int):
        self.sources = cfg.sources
        self.steps, self.global_batch = steps, global_batch
        phases = cfg.phases(steps)
        self._starts = np.array([start * global_batch for start, _ in phases], dtype=np.int64)
        self._weights = np.stack([w for _, w in phases])
        # The target of each source at each phase's first sample.
        spans = np.diff(np.append(self._starts, steps * global_batch))
        self._base = np.vstack(
            [np.zeros(len(self.sources)), np.cumsum(spans[:-1, None] * self._weights[:-1], 0)]
        )

    def targets(self, n: int | np.ndarray) -> np.ndarray:
        """``D(n)``: each source's target after ``n`` samples, shape ``(..., sources)``."""
        n = np.asarray(n, dtype=np.int64)
        phase = np.searchsorted(self._starts, n, side="right") - 1
        phase = np.maximum(phase, 0)
        return self._base[phase] + (n - self._starts[phase])[..., None] * self._weights[phase]

    def assign(self, start: int, count: int, counts: np.ndarray) -> np.ndarray:
        """The source index of samples ``[start, start + count)``, given ``counts`` (``C(start)``), which
        it advances in place."""
        return self.assign_counted(start, count, counts)[0]

    def assign_counted(self, start: int, count: int, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`assign`, and for each sample how many of its source came before it in the run."""
        sources, before, none = (
            np.empty(count, dtype=np.int64),
            np.empty(count, dtype=np.int64),
            np.empty(0, dtype=np.int64),
        )
        _largest_deficit(
            start, 0, *self.phase_arrays, counts, sources, before, 0, 0, none, none, none, none, none
        )
        return sources, before

    @property
    def phase_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each phase's first sample, the targets there and the weights (the kernel's view of the plan)."""
        return self._starts, self._base, self._weights

    def samples_needed(self) -> np.ndarray:
        """Each source's samples over the whole run (its target at the end, rounded up)."""
        return np.ceil(self.targets(self.steps * self.global_batch) - 1e-9).astype(np.int64)


@numba.njit(cache=True, nogil=True)
def _largest_deficit(
    start,
    first,
    phase_starts,
    base,
    weights,
    counts,
    sources,
    before,
    lo,
    hi,
    sizes,
    offsets,
    epochs,
    perms,
    out,
):  # pragma: no cover
    """Give samples ``start + first, start + first + 1, ...`` (to ``start + len(sources)``) each to the
    source furthest behind its target ``D(n + 1)`` (ties to the lowest index), advancing ``counts``;
    ``sources`` and ``before`` (the source's count before it) are written for each. The samples
    ``lo <= i < hi`` are also placed: ``out[i - lo]`` is the sample's sequence, from ``perms`` (each
    source's current pass, ``epochs``). Returns ``len(sources)``, or the ``i`` whose source needs another
    pass loaded first (``sources[i]`` names it; nothing of ``i`` is counted yet). Compiled: a global batch
    costs microseconds, not a Python loop per sample."""
    phase = 0
    for i in range(first, sources.size):
        n = start + i + 1
        while phase + 1 < phase_starts.size and phase_starts[phase + 1] <= n:
            phase += 1
        best, best_deficit = 0, -np.inf
        for s in range(counts.size):
            deficit = base[phase, s] + (n - phase_starts[phase]) * weights[phase, s] - counts[s]
            if deficit > best_deficit:
                best, best_deficit = s, deficit
        sources[i] = best
        before[i] = counts[best]
        if lo <= i < hi:
            size = sizes[best]
            if before[i] // size != epochs[best]:
                return i
            out[i - lo] = perms[offsets[best] + before[i] % size]
        counts[best] += 1
    return sources.size


class MixtureSampler:
    """A rank's micro-batches of a mixture: indices into the sources' sequences laid end to end (source
    ``s``'s ``i``-th sequence is ``offsets[s] + i``), the same global samples at any world size.

    The drop-in of :class:`training.data.shards.DistributedBatchSampler`: ``next_indices`` per micro-batch,
    ``state_dict`` / ``load_state_dict`` for checkpoints (the micro-step and each source's count)."""

    def __init__(
        self,
        plan: MixturePlan,
        sizes: list[int],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if len(sizes) != len(plan.sources) or min(sizes) < 1:
            raise ValueError(f"sources {plan.sources} hold {sizes} sequences; each needs one at least")
        self.plan, self.sizes = plan, list(sizes)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.step = 0  # micro-steps taken
        self.counts = np.zeros(len(sizes), dtype=np.int64)
        # Each source's current pass: its order at offsets[s]:offsets[s] + sizes[s], as global indices.
        self._sizes = np.array(sizes, dtype=np.int64)
        self._epochs = np.full(len(sizes), -1, dtype=np.int64)
        self._perms = np.empty(sum(sizes), dtype=np.int64)
        per_step = batch_size * world_size
        self._sources, self._before = np.empty(per_step, dtype=np.int64), np.empty(per_step, dtype=np.int64)

    def _load_pass(self, source: int, epoch: int) -> None:
        """Source ``source``'s order for its pass ``epoch``: a permutation seeded by (seed, name, epoch)."""
        name = zlib.crc32(self.plan.sources[source].encode())
        order = np.random.default_rng([self.seed, name, epoch]).permutation(self.sizes[source])
        lo = self.offsets[source]
        self._perms[lo : lo + self.sizes[source]] = lo + order
        self._epochs[source] = epoch

    def next_indices(self) -> np.ndarray:
        """Indices of this rank's next micro-batch; advances the state."""
        per_step = self.batch_size * self.world_size
        lo = self.rank * self.batch_size
        out = np.empty(self.batch_size, dtype=np.int64)
        i = 0
        while True:
            i = _largest_deficit(
                self.step * per_step, i, *self.plan.phase_arrays, self.counts, self._sources, self._before,
                lo, lo + self.batch_size, self._sizes, self.offsets, self._epochs, self._perms, out,
            )  # fmt: skip
            if i == per_step:
                break
            source = int(self._sources[i])  # its next sample starts a pass (once per pass)
            self._load_pass(source, int(self.counts[source]) // self.sizes[source])
        self.step += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "counts": self.counts.tolist(),
            "seed": self.seed,
            "world_size": self.world_size,
            "sizes": self.sizes,
            "sources": self.plan.sources,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for key in ("seed", "world_size", "sizes", "sources"):
            if state.get(key) != mine[key]:
                raise ValueError(f"sampler state has {key}={state.get(key)}, this run has {mine[key]}")
        self.step, self.counts = state["step"], np.array(state["counts"], dtype=np.int64)


def repetition(
    cfg: MixtureConfig, steps: int, global_batch: int, seq_len: int, train_tokens: dict[str, int]
) -> dict[str, dict[str, float]]:
    """Each source's training tokens, its share of the run's tokens, the tokens the run takes from it and
    so how often it repeats (``needed / tokens``), from the tokens stage's per-source counts."""
    plan = MixturePlan(cfg, steps, global_batch)
    total = steps * global_batch
    out = {}
    for source, samples in zip(plan.sources, plan.samples_needed().tolist()):
        have = train_tokens.get(source, 0)
        needed = samples * seq_len
        out[source] = {
            "tokens": have,
            "share": samples / total,
            "tokens_needed": needed,
            "repetition": needed / have if have else (float("inf") if needed else 0.0),
        }
    return out


def repetition_problems(
    cfg: MixtureConfig, figures: dict[str, dict[str, float]], seq_len: int = 0
) -> list[str]:
    """A sentence for each source the run would repeat more than its ``max_repetition``, or that cannot
    fill one training sequence (``seq_len`` + 1 tokens)."""
    problems = []
    for source, f in figures.items():
        limit = cfg.repetition_limit(source)
        if f["tokens"] < seq_len + 1:
            problems.append(
                f"train.mixture: source {source} holds {f['tokens']:,} training tokens, fewer than one "
                f"sequence (train.seq_len+1={seq_len + 1}): add data or leave it out of the mixture"
            )
        elif f["repetition"] > limit:
            problems.append(
                f"train.mixture: source {source} holds {f['tokens']:,} training tokens; its share "
                f"{f['share']:.1%} of the run is {f['tokens_needed']:,} tokens, a repetition of "
                f"{f['repetition']:.2f}x past its max_repetition {limit:g} (raise "
                f"train.mixture.max_repetition.{source}, lower its weight or train.steps, or add data)"
            )
    return problems
