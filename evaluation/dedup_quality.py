"""How well near-duplicate removal works: a corpus with planted near-duplicates of known similarity and
hard negatives, and pair-level precision / recall against exact Jaccard similarity.

The corpus (:func:`planted_corpus`) has
- families: a base document and variants made by word substitutions, insertions, deletions and
  boilerplate wrappers (a header and footer around the same text), at edit rates spread so that exact
  similarities fall on both sides of the threshold;
- hard negatives: documents built on one shared template (the same long header, footer and field labels)
  with different content, which share many shingles without being duplicates;
- singletons of unrelated text.

Ground truth is the exact Jaccard similarity of the documents' shingle sets (the same shingles the
deduplicator hashes). A pair is a true duplicate when its exact Jaccard reaches the threshold. Only pairs
that can be similar are compared (within a family or a template group, plus every predicted pair); pairs
of unrelated random text are far below any threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from cleaning.minhash import shingles


@dataclass
class PlantedCorpus:
    ids: list[str]
    texts: list[str]
    groups: list[list[int]] = field(default_factory=list)  # index groups that may hold similar pairs


def planted_corpus(
    families: int = 200,
    variants: int = 4,
    template_groups: int = 40,
    template_size: int = 5,
    singletons: int = 400,
    words: int = 300,
    seed: int = 0,
) -> PlantedCorpus:
    rng = np.random.default_rng(seed)
    vocab = np.array([f"v{i}" for i in range(20_000)])
    zipf = 1.0 / np.arange(1, vocab.size + 1)
    zipf /= zipf.sum()

    def text(n: int) -> list[str]:
        return list(rng.choice(vocab, size=n, p=zipf))

    def variant(base: list[str]) -> list[str]:
        rate = float(rng.choice([0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.15]))
        out = []
        for w in base:
            r = rng.random()
            if r < rate / 3:
                continue  # deletion
            out.append(str(rng.choice(vocab)) if r < 2 * rate / 3 else w)  # substitution
            if rng.random() < rate / 3:
                out.append(str(rng.choice(vocab)))  # insertion
        if rng.random() < 0.3:  # boilerplate wrapper
            out = ["breaking", "news", "from", "the", "wire"] + out + ["read", "more", "stories", "below"]
        return out

    texts: list[str] = []
    groups: list[list[int]] = []
    for _ in range(families):
        base = text(words)
        members = [len(texts)]
        texts.append(" ".join(base))
        for _ in range(variants):
            members.append(len(texts))
            texts.append(" ".join(variant(base)))
        groups.append(members)
    for _ in range(template_groups):
        header = text(60)
        footer = text(60)
        members = []
        for _ in range(template_size):
            members.append(len(texts))
            body = [f"{label}: {' '.join(text(25))}" for label in ("title", "author", "summary", "details")]
            texts.append(" ".join(header) + "\n" + "\n".join(body) + "\n" + " ".join(footer))
        groups.append(members)
    for _ in range(singletons):
        texts.append(" ".join(text(words)))
    order = rng.permutation(len(texts))  # ids in random order: the kept copy is not always the base
    ids = [f"doc{int(order[i]):06d}" for i in range(len(texts))]
    return PlantedCorpus(ids, texts, groups)


def exact_jaccard(a: set[bytes], b: set[bytes]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass
class PairMetrics:
    precision: float  # removals really similar (exact Jaccard >= threshold) to a member of their cluster
    recall: float  # truly similar pairs that ended in one cluster
    removals: int
    correct_removals: int
    true_pairs: int
    recovered_pairs: int


def pair_metrics(
    corpus: PlantedCorpus, duplicate_of: dict[int, int], threshold: float, ngram: int = 5
) -> PairMetrics:
    """Score removals ``{removed index: index of the kept document it duplicates}``.

    Clusters are a kept document and the documents removed as its duplicates. Precision: a removal is
    right when the removed document's exact Jaccard with some other member of its cluster reaches the
    threshold. Recall: every pair whose exact Jaccard reaches the threshold must end in one cluster.
    """
    sets = [set(shingles(t, ngram)) for t in corpus.texts]
    cluster = {i: duplicate_of.get(i, i) for i in range(len(corpus.texts))}
    members: dict[int, list[int]] = {}
    for i, c in cluster.items():
        members.setdefault(c, []).append(i)
    correct = sum(
        any(exact_jaccard(sets[r], sets[m]) >= threshold for m in members[cluster[r]] if m != r)
        for r in duplicate_of
    )
    truth = [
        (i, j)
        for group in corpus.groups
        for i, j in combinations(sorted(group), 2)
        if exact_jaccard(sets[i], sets[j]) >= threshold
    ]
    recovered = sum(cluster[i] == cluster[j] for i, j in truth)
    return PairMetrics(
        precision=correct / len(duplicate_of) if duplicate_of else 1.0,
        recall=recovered / len(truth) if truth else 1.0,
        removals=len(duplicate_of),
        correct_removals=int(correct),
        true_pairs=len(truth),
        recovered_pairs=int(recovered),
    )
