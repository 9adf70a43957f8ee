"""Weighted mixtures of token sources: which source each global sample comes from, and which of its
sequences, as a pure function of the run's seed, schedule and global sample index.

A run's global samples are numbered ``g = step * G + j`` (``G`` sequences per optimizer step: micro
batch x gradient accumulation x workers), whatever the workers' layout. Sample ``g`` goes to the source
furthest behind its target: the target of source ``s`` after ``n`` samples is ``D_s(n)``, the sum of its
weight over those samples (the weight of the schedule phase of each sample's step), and sample ``n``
goes to the ``s`` maximizing ``D_s(n + 1) - C_s(n)`` (``C_s(n)``: samples already given to ``s``; ties
to the first source listed). Every source's count stays within one sequence of its target at every
sample, in every phase, and the assignment depends on nothing but ``g`` and the schedule (the counts are
the sampler's resumable state). The ``k``-th sample of a source is its ``perm[k % n]`` sequence, ``perm``
a permutation seeded by (seed, source, ``k // n``): a source smaller than its share repeats, each pass in
a new order.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from core.stage import StageConfig


class MixturePhase(StageConfig):
    """The weights from one step of the run on (until the next phase)."""

    at_step: int | None = Field(
        None, ge=1, description="The first step of the phase (0-based optimizer step)."
    )
    at_fraction: float | None = Field(
        None, gt=0, lt=1, description="Or: the first step as a fraction of train.steps (0.8: the last 20%)."
    )
    weights: dict[str, float] = Field(description="Token share of each source in the phase (others: 0).")

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

    weights: dict[str, float] = Field(
        description="Token share of each source from the first step (normalised when they do not sum to 1)."
    )
    schedule: list[MixturePhase] = Field(
        default_factory=list, description="Later phases, each with its start and its weights, in order."
    )
    max_repetition: float | dict[str, float] = Field(
        1.0,
        description="How often a source's training tokens may be seen (1: once, OLMo's default); per source "
        "as {name: factor}, the others 1. A mixture needing more is refused before training.",
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
        if isinstance(self.max_repetition, dict) and (extra := set(self.max_repetition) - set(self.sources)):
            raise ValueError(
                f"train.mixture.max_repetition: {', '.join(sorted(extra))} has no weight in the mixture"
            )
        return self

    def _phase_weights(self) -> list[tuple[str, dict[str, float]]]:
        return [("train.mixture.weights", self.weights)] + [
            (f"train.mixture.schedule[{i}].weights", p.weights) for i, p in enumerate(self.schedule)
        ]

    @property
    def sources(self) -> list[str]:
        """Every source any phase weighs, in the order first named."""
        return list(dict.fromkeys(s for _, weights in self._phase_weights() for s in weights))

    def repetition_limit(self, source: str) -> float:
        if isinstance(self.max_repetition, dict):
            return self.max_repetition.get(source, 1.0)
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
        """(first step, normalised weights over :attr:`sources`) of each phase that has steps, in order."""
        names = self.sources
        starts = [0] + [p.start(steps) for p in self.schedule]
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError(
                f"train.mixture.schedule: phase starts {starts[1:]} must increase (steps={steps})"
            )
        out = []
        for start, (_, weights) in zip(starts, self._phase_weights()):
            if start < steps:
                w = np.array([weights.get(s, 0.0) for s in names], dtype=np.float64)
                out.append((start, w / w.sum()))
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
        targets = self.targets(np.arange(start + 1, start + count + 1)).tolist()
        c = counts.tolist()
        out = np.empty(count, dtype=np.int64)
        for i, d in enumerate(targets):
            s = max(range(len(c)), key=lambda k: d[k] - c[k])
            out[i] = s
            c[s] += 1
        counts[:] = c
        return out

    def samples_needed(self) -> np.ndarray:
        """Each source's samples over the whole run (its target at the end, rounded up)."""
        return np.ceil(self.targets(self.steps * self.global_batch) - 1e-9).astype(np.int64)


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
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        #: Source index of each of this rank's last micro-batch's samples (for accounting).
        self.last_sources = np.empty(0, dtype=np.int64)

    def _order(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._orders:
            if len(self._orders) > 2 * len(self.sizes):
                self._orders.clear()
            name = zlib.crc32(self.plan.sources[source].encode())
            self._orders[key] = np.random.default_rng([self.seed, name, epoch]).permutation(
                self.sizes[source]
            )
        return self._orders[key]

    def next_indices(self) -> np.ndarray:
        """Indices of this rank's next micro-batch; advances the state."""
        per_step = self.batch_size * self.world_size
        start = self.step * per_step
        before = self.counts.copy()
        sources = self.plan.assign(start, per_step, self.counts)
        # k: how many samples of the same source came before each one.
        k = np.empty(per_step, dtype=np.int64)
        for s in np.unique(sources):
            where = np.flatnonzero(sources == s)
            k[where] = before[s] + np.arange(where.size)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        out = np.array(
            [
                self.offsets[s] + self._order(s, kk // self.sizes[s])[kk % self.sizes[s]]
                for s, kk in zip(sources[mine].tolist(), k[mine].tolist())
            ],
            dtype=np.int64,
        )
        self.last_sources = sources[mine]
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


def repetition_problems(cfg: MixtureConfig, figures: dict[str, dict[str, float]]) -> list[str]:
    """A sentence for each source the run would repeat more than its ``max_repetition``."""
    problems = []
    for source, f in figures.items():
        limit = cfg.repetition_limit(source)
        if f["repetition"] > limit:
            problems.append(
                f"train.mixture: source {source} holds {f['tokens']:,} training tokens; its share "
                f"{f['share']:.1%} of the run is {f['tokens_needed']:,} tokens, a repetition of "
                f"{f['repetition']:.2f}x past its max_repetition {limit:g} (raise "
                f"train.mixture.max_repetition.{source}, lower its weight or train.steps, or add data)"
            )
    return problems
