"""MinHash signatures computed over whole batches of documents, bit-identical to datasketch.

The scheme is datasketch >= 2.0's default ``affine32``: a 32-bit hash ``h`` of each distinct shingle,
pre-mixed with the MurmurHash3 finalizer, then permutation ``k`` maps it to ``a_k * h + b_k mod 2**32``
(``a_k`` odd); the signature is the minimum per permutation. ``a`` and ``b`` are drawn exactly as
datasketch draws them from ``np.random.RandomState(seed)``, so for the same seed, number of permutations
and shingle hash, ``MinHasher(...).signatures(texts)[i]`` equals a ``datasketch.MinHash(num_perm, seed,
hashfunc=...)`` updated with document i's shingles (:func:`datasketch_signature` does exactly that).

Shingles are word n-grams of the dedup normal form (:func:`dedup_normal_form`: lower case, every run of
non-word characters one space); a document with fewer than n words is one shingle of all its words.
Two shingle hashes are offered:

- ``"words"`` (default): each word's UTF-8 bytes get a 64-bit FNV-1a hash finished with MurmurHash3's
  64-bit finalizer; a shingle's hash folds its words' hashes (``h = h * M + w mod 2**64``) and keeps the
  high 32 bits. One compiled pass (numba) splits, hashes and folds a whole batch, and a second takes the
  per-permutation minima. :class:`ShingleHash` is the same function of a shingle's bytes, in Python, to
  give datasketch as ``hashfunc``.
- ``"sha1"``: datasketch's default ``sha1_hash32`` of the shingle bytes, one Python call per shingle:
  identical to a default ``datasketch.MinHash``, and much slower.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Literal

import numba
import numpy as np

ShingleHashName = Literal["words", "sha1"]
_NON_WORD = re.compile(r"[^\w]+")
_WORD = re.compile(r"\w+")
# ASCII text: upper -> lower, every ASCII non-word character -> space (what \w means on ASCII).
_ASCII = bytes(
    (c + 32 if 65 <= c <= 90 else c if (48 <= c <= 57 or 97 <= c <= 122 or c == 95 or c >= 128) else 32)
    for c in range(256)
)
_M64 = 0xFFFFFFFFFFFFFFFF
_FNV_OFFSET, _FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3
_FOLD = 0x9E3779B97F4A7C15  # odd: the golden-ratio multiplier of Fibonacci hashing


def dedup_normal_form(text: str) -> str:
    """Lower-case, punctuation-free, single-spaced text: what 'the same text' means for dedup."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def normal_words(text: str) -> list[bytes]:
    """The words of :func:`dedup_normal_form` as UTF-8 bytes."""
    return _normal_bytes(text).split()


def _normal_bytes(text: str) -> bytes:
    """The normal form's words as UTF-8, separated by runs of spaces (a byte table for ASCII text)."""
    if text.isascii():
        return text.encode().translate(_ASCII)
    return " ".join(_WORD.findall(text.lower())).encode()


def shingles(text: str, ngram: int) -> list[bytes]:
    """The distinct word n-gram shingles of a document, as datasketch would be given them."""
    words = normal_words(text)
    if len(words) < ngram:
        return [b" ".join(words)]
    return sorted({b" ".join(words[i : i + ngram]) for i in range(len(words) - ngram + 1)})


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``affine32`` permutation parameters (a, b) datasketch draws for ``seed``."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


# -- the "words" shingle hash in plain Python (the reference) ---------------------------------------


def _fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _M64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _M64
    return h ^ (h >> 33)


def _word_hash(word: bytes) -> int:
    h = _FNV_OFFSET
    for byte in word:
        h = ((h ^ byte) * _FNV_PRIME) & _M64
    return _fmix64(h)


class ShingleHash:
    """The ``"words"`` hash of one shingle's bytes (words joined by single spaces), for datasketch."""

    def __call__(self, shingle: bytes) -> int:
        h = 0
        for word in shingle.split(b" "):
            h = (h * _FOLD + _word_hash(word)) & _M64
        return h >> 32


# -- the compiled batch kernels ----------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _fmix64_nb(h):
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


@numba.njit(cache=True, nogil=True)
def _fmix32_nb(h):
    h ^= h >> np.uint32(16)
    h = np.uint32(h * np.uint32(0x85EBCA6B))
    h ^= h >> np.uint32(13)
    h = np.uint32(h * np.uint32(0xC2B2AE35))
    return h ^ (h >> np.uint32(16))


@numba.njit(cache=True, nogil=True)
def _shingle_kernel(buf, doc_ends, ngram, out, counts):  # pragma: no cover - compiled
    """Split each document's bytes at spaces, hash words, fold n-grams; write fmix32(shingle hash)."""
    ring = np.zeros(ngram, dtype=np.uint64)
    n_out = 0
    start = 0
    for d in range(doc_ends.size):
        end = doc_ends[d]
        words = 0
        first = n_out
        i = start
        while i < end:
            while i < end and buf[i] == 32:
                i += 1
            if i >= end:
                break
            h = np.uint64(0xCBF29CE484222325)
            while i < end and buf[i] != 32:
                h = (h ^ np.uint64(buf[i])) * np.uint64(0x100000001B3)
                i += 1
            ring[words % ngram] = _fmix64_nb(h)
            words += 1
            if words >= ngram:
                s = np.uint64(0)
                for j in range(words - ngram, words):
                    s = s * np.uint64(0x9E3779B97F4A7C15) + ring[j % ngram]
                out[n_out] = _fmix32_nb(np.uint32(s >> np.uint64(32)))
                n_out += 1
        if words < ngram:  # the whole short (or empty: the word b"") document is one shingle
            s = np.uint64(0)
            if words == 0:
                s = _fmix64_nb(np.uint64(0xCBF29CE484222325))
            for j in range(words):
                s = s * np.uint64(0x9E3779B97F4A7C15) + ring[j]
            out[n_out] = _fmix32_nb(np.uint32(s >> np.uint64(32)))
            n_out += 1
        counts[d] = n_out - first
        start = end
    return n_out


@numba.njit(cache=True, nogil=True)
def _min_permuted(flat, counts, a, b, out):  # pragma: no cover - compiled
    """out[d, k] = min over document d's (pre-mixed) shingle hashes h of a[k] * h + b[k] mod 2**32."""
    pos = 0
    for d in range(counts.size):
        row = out[d]
        row[:] = np.uint32(0xFFFFFFFF)
        for i in range(pos, pos + counts[d]):
            h = flat[i]
            for k in range(a.size):
                v = np.uint32(a[k] * h + b[k])  # the product is 64-bit; uint32 keeps it mod 2**32
                row[k] = min(row[k], v)
        pos += counts[d]


def _fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """Signatures of many documents at once: ``signatures(texts)`` -> ``(len(texts), num_perm)`` uint32."""

    def __init__(
        self, num_perm: int = 128, seed: int = 1, ngram: int = 5, shingle_hash: ShingleHashName = "words"
    ):
        self.num_perm, self.seed, self.ngram, self.shingle_hash = num_perm, seed, ngram, shingle_hash
        self.a, self.b = permutations(num_perm, seed)

    def shingle_hashes(self, texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """Pre-mixed 32-bit hashes of every document's shingles, concatenated, and the count per document.

        A document's shingles may repeat; a repeat does not change a minimum.
        """
        if self.shingle_hash == "sha1":
            per_doc = [
                np.fromiter(
                    (int.from_bytes(hashlib.sha1(s).digest()[:4], "little") for s in shingles(t, self.ngram)),
                    dtype=np.uint32,
                )
                for t in texts
            ]
            counts = np.array([h.size for h in per_doc], dtype=np.int64)
            flat = np.concatenate(per_doc) if per_doc else np.empty(0, np.uint32)
            return _fmix32(flat), counts
        parts = [_normal_bytes(t) for t in texts]
        buf = np.frombuffer(b"".join(parts), dtype=np.uint8)
        doc_ends = np.cumsum(np.fromiter(map(len, parts), dtype=np.int64, count=len(parts)))
        out = np.empty(buf.size // 2 + len(parts) + 1, dtype=np.uint32)  # >= words + one per document
        counts = np.empty(len(parts), dtype=np.int64)
        n = _shingle_kernel(buf, doc_ends, self.ngram, out, counts)
        return out[:n], counts

    def signatures(self, texts: Sequence[str] | Iterable[str]) -> np.ndarray:
        return self.minimums(*self.shingle_hashes(texts))

    def minimums(self, flat: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Signatures from :meth:`shingle_hashes`' output: ``(len(counts), num_perm)`` uint32."""
        out = np.empty((counts.size, self.num_perm), dtype=np.uint32)
        if counts.size:
            _min_permuted(flat, counts, self.a, self.b, out)
        return out


def datasketch_signature(
    text: str, num_perm: int, seed: int, ngram: int, shingle_hash: ShingleHashName = "words"
) -> np.ndarray:
    """The same signature through datasketch itself (the reference the tests compare against)."""
    from datasketch import MinHash

    hashfunc = ShingleHash() if shingle_hash == "words" else None
    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=hashfunc, scheme="affine32")
    m.update_batch(shingles(text, ngram))
    return m.hashvalues
