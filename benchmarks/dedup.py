"""MinHash signatures: docs/s on one core vs datasketch 2.0 MinHash.bulk, same num_perm and seed.

Both start from the documents' text: the peer gets each document's distinct 5-word shingles (lmforge's
``shingles``, the normal form datasketch users would build) and computes ``MinHash.bulk`` with its default
hash (sha1_hash32, affine32 scheme); ours is ``MinHasher.signatures`` over the whole batch ("words"
shingle hash). Signatures are checked equal to datasketch's on a sample first (datasketch given lmforge's
``ShingleHash``). Documents: real pydoc text cut into ~300-word documents.
Goal (issue 6): >= 20x.

    .venv/bin/python benchmarks/dedup.py [--quick | --smoke] [--docs 2000] [--num-perm 128]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402

import numpy as np  # noqa: E402
from datasketch import MinHash  # noqa: E402

from benchmarks.common import median_time, pydoc_texts, result, summary  # noqa: E402
from cleaning.minhash import MinHasher, datasketch_signature, shingles  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="500 documents")
parser.add_argument("--smoke", action="store_true", help="seconds: 50 documents")
parser.add_argument("--docs", type=int, default=2000)
parser.add_argument("--num-perm", type=int, default=128)
args = parser.parse_args()
if args.quick:
    args.docs = 500
if args.smoke:
    args.docs = 50


def main() -> None:
    texts = pydoc_texts(args.docs * 2400, doc_chars=2000)[: args.docs]
    words = np.mean([len(t.split()) for t in texts])
    print(f"{len(texts)} documents, {words:.0f} words on average, num_perm={args.num_perm}", flush=True)
    sample = texts[:100]
    ours_sample = MinHasher(args.num_perm, seed=1).signatures(sample)
    reference = np.array([datasketch_signature(t, args.num_perm, 1, 5) for t in sample])
    assert (ours_sample == reference).all(), "signatures differ from datasketch's"

    def ours() -> None:
        MinHasher(args.num_perm, seed=1).signatures(texts)  # a fresh hasher: nothing cached between runs

    def peer() -> None:
        MinHash.bulk([shingles(t, 5) for t in texts], num_perm=args.num_perm, seed=1)

    t_ours = median_time(ours)
    t_peer = median_time(peer, repeats=3)
    t_sha1 = median_time(lambda: MinHasher(args.num_perm, seed=1, shingle_hash="sha1").signatures(texts))
    line = result(
        "dedup.signatures",
        "docs/s",
        len(texts) / t_ours,
        f"datasketch 2.0 MinHash.bulk, num_perm={args.num_perm}",
        len(texts) / t_peer,
        20.0,
        size=len(texts),
        words_per_doc=round(float(words)),
        ours_sha1_docs_per_s=round(len(texts) / t_sha1, 1),
        identical_to_datasketch=True,
    )
    summary("dedup", [line])


if __name__ == "__main__":
    main()
