"""Compiled batch MinHash against datasketch itself: the same permutations, the same signatures."""

import numpy as np
import pytest
from datasketch import MinHash

from cleaning.minhash import (
    MinHasher,
    ShingleHash,
    datasketch_signature,
    dedup_normal_form,
    normal_words,
    permutations,
    shingles,
)

pytestmark = pytest.mark.unit


def corpus(n: int, seed: int = 0) -> list[str]:
    """Documents with shared phrases (so signatures collide in places), punctuation, case, Unicode."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(400)] + [
        "Über",
        "naïve",
        "café",
        "ÆON",
        "x_y",
        "42",
        "déjà-vu",
        "—",
        "’s",
    ]
    docs = []
    for i in range(n):
        words = rng.choice(vocab, size=int(rng.integers(0, 300)))
        seps = rng.choice([" ", "  ", ", ", ". ", "\n", "\u00a0", "!? "], size=len(words))
        text = "".join(w + s for w, s in zip(words, seps))
        docs.append(text.upper() if i % 7 == 0 else text)
    return docs + ["", "   ", "one", "two words", "Hello, World!", "a b c d", "a b c d e"]


@pytest.mark.parametrize("num_perm,seed", [(128, 1), (64, 42)])
def test_permutations_are_datasketchs(num_perm, seed):
    a, b = permutations(num_perm, seed)
    ds = MinHash(num_perm=num_perm, seed=seed)
    np.testing.assert_array_equal(a, ds.permutations[0])
    np.testing.assert_array_equal(b, ds.permutations[1])


def test_signatures_equal_datasketch_on_1000_documents():
    texts = corpus(1000)
    ours = MinHasher(num_perm=128, seed=1, ngram=5).signatures(texts)
    reference = np.array([datasketch_signature(t, 128, 1, 5, "words") for t in texts])
    np.testing.assert_array_equal(ours, reference)
    assert len({r.tobytes() for r in ours}) > 950  # signatures differ between documents


def test_sha1_mode_equals_a_default_datasketch_minhash():
    texts = corpus(150, seed=1)
    ours = MinHasher(num_perm=64, seed=7, ngram=3, shingle_hash="sha1").signatures(texts)
    for text, sig in zip(texts, ours):
        m = MinHash(num_perm=64, seed=7)  # datasketch's defaults: sha1_hash32, affine32
        m.update_batch(shingles(text, 3))
        np.testing.assert_array_equal(sig, m.hashvalues)


def test_word_splitting_is_the_normal_form():
    for text in corpus(300, seed=2):
        assert [w.decode() for w in normal_words(text)] == dedup_normal_form(text).split()


def test_shingle_hash_by_hand():
    # FNV-1a 64 of b"a" then fmix64; a shingle of one word folds to that hash (0 * M + w), top 32 bits.
    h = 0xCBF29CE484222325
    h = ((h ^ ord("a")) * 0x100000001B3) % 2**64
    for shift, mult in ((33, 0xFF51AFD7ED558CCD), (33, 0xC4CEB9FE1A85EC53)):
        h ^= h >> shift
        h = (h * mult) % 2**64
    h ^= h >> 33
    assert ShingleHash()(b"a") == h >> 32


def test_estimated_jaccard_tracks_the_exact_one():
    rng = np.random.default_rng(3)
    base = [f"t{i}" for i in rng.integers(0, 10_000, 400)]
    edited = list(base)
    for i in rng.choice(len(edited), 40, replace=False):
        edited[i] = f"edit{i}"
    a, b = (" ".join(x) for x in (base, edited))
    sa, sb = set(shingles(a, 5)), set(shingles(b, 5))
    exact = len(sa & sb) / len(sa | sb)
    sig = MinHasher(num_perm=256).signatures([a, b])
    assert abs(float(np.mean(sig[0] == sig[1])) - exact) < 0.08
