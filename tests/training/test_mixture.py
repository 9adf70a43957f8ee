"""Weighted mixtures (training/data/mixture.py): the realised shares against hand-computed targets, the
schedule's switch, the same global samples at any worker layout and after a resume, and the repetition
cap refused with its figures."""

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from core.schema import DEDUP_COPIES, QUALITY_TIER, document_table
from tests.fixtures import corpus
from training.data.mixture import (
    MixtureConfig,
    MixturePlan,
    MixtureSampler,
    repetition,
    repetition_problems,
)
from training.data.shards import MixedSequences, TokenSequences
from training.data.tokenize import TokenizeConfig, prepare_tokenizer, tokenize_partition, write_token_index
from training.data.tokenizer import TokenizerConfig

pytestmark = pytest.mark.unit

SHARES = {"web": 0.6, "docs": 0.3, "code": 0.1}


def _sources(plan: MixturePlan, samples: int) -> np.ndarray:
    return plan.assign(0, samples, np.zeros(len(plan.sources), dtype=np.int64))


def test_every_source_stays_within_one_sequence_of_its_share_over_10k_samples():
    plan = MixturePlan(MixtureConfig(weights=SHARES), steps=1250, global_batch=8)
    sources = _sources(plan, 10_000)
    share = np.array([SHARES[s] for s in plan.sources])
    counts = np.cumsum(np.eye(3, dtype=np.int64)[sources], axis=0)  # counts after 1, 2, ... samples
    expected = np.arange(1, 10_001)[:, None] * share  # the hand computation: share x samples
    assert np.abs(counts - expected).max() < 1
    # Per 1,000 sequences: 600, 300 and 100 of them, within one.
    for block in np.split(sources, 10):
        assert np.abs(np.bincount(block, minlength=3) - 1000 * share).max() <= 1
    # The order a config lists the sources in changes nothing (a YAML round trip sorts them).
    reordered = MixturePlan(MixtureConfig(weights=dict(reversed(SHARES.items()))), steps=1250, global_batch=8)
    assert (_sources(reordered, 10_000) == sources).all()


def test_the_schedule_switches_at_its_step_and_uneven_weights_are_normalised_with_a_note():
    # 90/10 web/docs for 80 of 100 steps, then an anneal: 50% docs, 50% code (a source new in the phase).
    cfg = MixtureConfig(
        weights={"web": 9, "docs": 1},
        schedule=[{"at_fraction": 0.8, "weights": {"docs": 0.5, "code": 0.5}}],
    )
    assert cfg.notes() == ["train.mixture.weights sum to 10; normalised to web 0.9, docs 0.1"]
    plan = MixturePlan(cfg, steps=100, global_batch=10)
    assert plan.sources == ["code", "docs", "web"]  # by name, whatever order the config lists them in
    steps = _sources(plan, 1000).reshape(100, 10)  # one row per optimizer step
    code, docs, web = (np.flatnonzero((steps == s).any(axis=1)) for s in range(3))
    assert web.max() == 79 and code.min() == 80  # the switch, at step 80 exactly
    assert (np.bincount(steps[:80].ravel(), minlength=3) == [0, 80, 720]).all()
    assert (np.bincount(steps[80:].ravel(), minlength=3) == [100, 100, 0]).all()
    assert len(docs) == 100
    with pytest.raises(ValidationError, match="at_step or at_fraction"):
        MixtureConfig(weights=SHARES, schedule=[{"weights": SHARES}])
    with pytest.raises(ValueError, match="must increase"):
        MixtureConfig(weights=SHARES, schedule=[{"at_step": 5, "weights": SHARES}] * 2).phases(10)
    with pytest.raises(ValueError, match=r"inside the run's steps 1..9 \(train.steps=10\)"):
        MixtureConfig(weights=SHARES, schedule=[{"at_step": 10, "weights": SHARES}]).phases(10)


def _global_samples(
    data: MixedSequences, plan: MixturePlan, micro: int, world: int, steps: int
) -> np.ndarray:
    """The token ids of each global sample, in global order, as ``world`` ranks of ``micro`` draw them."""
    samplers = [MixtureSampler(plan, data.sizes, micro, rank, world, seed=3) for rank in range(world)]
    rows = [data.batch(s.next_indices()) for _ in range(steps) for s in samplers]
    return np.concatenate(rows)


def test_the_same_tokens_for_each_global_sample_at_one_and_two_workers_and_after_a_resume(mixture_shards):
    plan = MixturePlan(MixtureConfig(weights=SHARES), steps=40, global_batch=24)
    parts = [TokenSequences(mixture_shards, "train", 32, source=s) for s in plan.sources]
    data = MixedSequences(parts)
    assert data.sizes == [len(p) for p in parts] and data.sizes[2] > 3 * data.sizes[0]  # web, code
    # 24 sequences per optimizer step, 40 steps: the small sources repeat.
    one = _global_samples(data, plan, micro=24, world=1, steps=40)
    two = _global_samples(data, plan, micro=12, world=2, steps=40)
    accumulated = _global_samples(data, plan, micro=6, world=2, steps=80)  # two micro-batches per step
    assert one.shape == (960, 33) and (one == two).all() and (one == accumulated).all()

    # Each sample is the source's own sequence: a row of the source's TokenSequences.
    sampler = MixtureSampler(plan, data.sizes, 24, seed=3)
    indices = np.concatenate([sampler.next_indices() for _ in range(40)])
    for s, part in enumerate(parts):
        mine = indices[(indices >= data.offsets[s]) & (indices < data.offsets[s + 1])] - data.offsets[s]
        assert (data.batch(mine + data.offsets[s]) == part.batch(mine)).all()
        # A source seen k times over holds each of its sequences once in each pass.
        passes = len(mine) // len(part)
        assert passes >= (2 if plan.sources[s] == "code" else 0)  # code: 96 samples of its 35 sequences
        for p in range(passes):
            assert sorted(mine[p * len(part) : (p + 1) * len(part)]) == list(range(len(part)))

    # A resume from the state at step 17 continues with the same samples.
    first = MixtureSampler(plan, data.sizes, 12, 1, 2, seed=3)
    for _ in range(17):
        first.next_indices()
    resumed = MixtureSampler(plan, data.sizes, 12, 1, 2, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert all((first.next_indices() == resumed.next_indices()).all() for _ in range(23))
    with pytest.raises(ValueError, match="world_size=2, this run has 1"):
        MixtureSampler(plan, data.sizes, 24, seed=3).load_state_dict(first.state_dict())


def test_a_source_past_its_repetition_cap_is_refused_with_its_tokens_share_and_repetition():
    cfg = MixtureConfig(weights={"web": 0.75, "docs": 0.25}, max_repetition={"docs": 2})
    # 100 steps of 8 sequences of 32 tokens: docs' share is 200 sequences, 6,400 tokens.
    figures = repetition(cfg, 100, 8, 32, {"web": 100_000, "docs": 2_000})
    assert figures["docs"] == {"tokens": 2000, "share": 0.25, "tokens_needed": 6400, "repetition": 3.2}
    assert figures["web"]["repetition"] == 600 * 32 / 100_000
    (problem,) = repetition_problems(cfg, figures)
    assert problem.startswith(
        "train.mixture: source docs holds 2,000 training tokens; its share 25.0% of the run is 6,400 tokens, "
        "a repetition of 3.20x past its max_repetition 2"
    )
    assert repetition_problems(cfg, repetition(cfg, 100, 8, 32, {"web": 100_000, "docs": 3_200})) == []
    (short,) = repetition_problems(cfg, repetition(cfg, 100, 8, 32, {"web": 100_000, "docs": 20}), 32)
    assert short.startswith("train.mixture: source docs holds 20 training tokens, fewer than one sequence")
    with pytest.raises(ValidationError, match="max_repetition: cod has no weight in the mixture"):
        MixtureConfig(weights=SHARES, max_repetition={"cod": 2, "code": 1})


def _web_shards(out, texts: dict[str, str], meta: list) -> tuple[dict, dict]:
    """``texts`` (with their ``meta``) tokenized as the tokenize stage does one source's partition, in
    batches of 16: the partition's result and the token index."""
    config = TokenizeConfig(tokenizer=TokenizerConfig(vocab_size=300, min_frequency=1), val_fraction=0.1)
    prepared = prepare_tokenizer(lambda: texts.values(), lambda: texts.keys(), out, config)
    table = document_table(list(texts.values()), ids=list(texts), meta=meta)
    part = tokenize_partition(table.to_batches(max_chunksize=16), out, prepared, config, part="web-p00000")
    for split in part["shards"].values():
        for shard in split:
            shard["source"] = "web"
    return part, write_token_index(out, prepared, config, [part])


def test_a_source_is_drawn_by_quality_tier_from_the_shards_tokenize_writes_per_tier(tmp_path):
    texts = corpus(90, seed=4)
    tier = {doc_id: i % 3 for i, doc_id in enumerate(texts)}  # as quality scoring's tiers [a, b] write them
    _, index = _web_shards(tmp_path, texts, [[(QUALITY_TIER, float(t))] for t in tier.values()])
    # One set of shards per split and tier, each holding exactly that tier's documents.
    for t in range(3):
        (shard,) = [s for s in index["splits"]["train"]["shards"] if s["tier"] == t]
        assert shard["path"] == f"train-web-p00000-tier{t}-0000.arrow"
        ids = pa.ipc.open_file(tmp_path / shard["docs_path"]).read_all().column("doc_id").to_pylist()
        assert ids and all(tier[d] == t for d in ids)
        assert index["sources"]["web"]["tiers"][str(t)]["train_documents"] == len(ids)
        assert len(TokenSequences(tmp_path, "train", 16, source="web", tier=t)) > 0
    assert sum(index["sources"]["web"]["tiers"][str(t)]["documents"] for t in range(3)) == 90

    # The mixture weighs the top two tiers 2:1 (the lowest left out, as Nemotron-CC's buckets allow).
    cfg = MixtureConfig(weights={"web": {2: 0.5, 1: 0.25}, "docs": 0.25}, max_repetition={"web": 3})
    assert cfg.sources == ["docs", "web.tier1", "web.tier2"] and cfg.tiers_of() == {"web": [1, 2]}
    assert cfg.repetition_limit("web.tier2") == 3 and cfg.repetition_limit("docs") == 1
    parts = [TokenSequences(tmp_path, "train", 16, source="web", tier=t) for t in (1, 2)]
    plan = MixturePlan(cfg.model_copy(update={"weights": {"web": {2: 2, 1: 1}}}), steps=10, global_batch=12)
    sampler = MixtureSampler(plan, [len(p) for p in parts], 12, seed=0)
    drawn = np.concatenate([sampler.next_indices() for _ in range(10)])
    assert (drawn < len(parts[0])).sum() == 40 and (drawn >= len(parts[0])).sum() == 80


def test_rehydration_draws_each_dedup_survivor_as_often_as_its_copies_up_to_the_cap(tmp_path):
    texts = corpus(40, seed=6)
    copies = {
        doc_id: 1 + i % 5 for i, doc_id in enumerate(texts)
    }  # cluster sizes 1 to 5, as dedup writes them
    meta = [[(DEDUP_COPIES, float(n))] if n > 1 else [] for n in copies.values()]
    part, _ = _web_shards(tmp_path, texts, meta)
    (shard,) = part["shards"]["train"]
    docs = pa.ipc.open_file(tmp_path / shard["docs_path"]).read_all()
    assert docs.column("copies").to_pylist() == [copies[d] for d in docs.column("doc_id").to_pylist()]

    # Windows inside documents: each window counts its document's copies, capped at 3.
    windows = TokenSequences(tmp_path, "train", 8, span_documents=False, source="web")
    by_doc = np.minimum([copies[d] for d in docs.column("doc_id").to_pylist()], 3)
    assert (windows.multiplicity(3) == by_doc[windows.sample_documents]).all()
    # Packed sequences: the document under each one's middle token.
    packed = TokenSequences(tmp_path, "train", 16, source="web")
    ends = np.cumsum(docs.column("length").to_numpy())
    middle = np.arange(len(packed)) * 16 + 8
    assert (packed.multiplicity(3) == by_doc[np.searchsorted(ends, middle, side="right")]).all()

    # One pass of the rehydrated source holds each sequence as often as its multiplicity.
    repeats = packed.multiplicity(3)
    mixed = MixedSequences([packed], [repeats])
    assert mixed.sizes == [int(repeats.sum())]
    plan = MixturePlan(
        MixtureConfig(weights={"web": 1}, rehydrate={"web": 3}), steps=1, global_batch=mixed.sizes[0]
    )
    rows = mixed.batch(MixtureSampler(plan, mixed.sizes, mixed.sizes[0]).next_indices())
    seen = {tuple(r): 0 for r in packed.batch(np.arange(len(packed)))}
    for r in rows:
        seen[tuple(r)] += 1
    assert list(seen.values()) == repeats.tolist()
    with pytest.raises(ValidationError, match="rehydrate: code has no weight"):
        MixtureConfig(weights={"web": 1}, rehydrate={"code": 2})
