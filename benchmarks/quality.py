"""Quality scoring speed (issue 37): documents per second through lmforge's quality stage against the
classifier package's own ``predict`` in a loop (fastText) or a plain transformers loop (an encoder), on the
same model and texts, one core; and that both give the same labels and probabilities (scores).

Data that ships on every Debian machine: the plain-text pydoc of the installed Python modules (technical
prose: the positive class) against the packages' copyright files under /usr/share/doc (licence boilerplate:
the negative class). A fastText classifier (DCLM's settings: word bigrams; 200,000 buckets) is trained on
a sample of each; the corpus scored is both, mixed, cut into documents of ~2,000 characters.

``ours``: lmforge's QualityScorer stage (cleaning/quality.py, the code each Ray task of the quality stage
runs) over Arrow batches of 1,024 documents: the one-line form of each text, fastText's batch predict, the
scores into ``meta``, the threshold applied. ``peer``: fastText's ``model.predict(line, k=2)`` per document,
on lines prepared beforehand (not timed). Goal: ratio >= 0.9, identical labels and probabilities.
Encoder: see ``encoder_scoring``; goal >= 1.5x from length bucketing, scores equal to 1e-5.

    .venv/bin/python benchmarks/quality.py [--quick | --smoke] [--documents 200000]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from benchmarks.common import documents_table, median_times, pydoc_texts, result, summary  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--documents", type=int, default=200_000, help="documents scored")
parser.add_argument("--quick", action="store_true", help="20,000 documents")
parser.add_argument("--smoke", action="store_true", help="seconds: 1,000 documents, a small model")
parser.add_argument(
    "--scale",
    type=int,
    metavar="N",
    help="instead: the quality stage's tasks on Ray over N synthetic documents (4 Parquet partitions) with "
    "fastText's default 2,000,000-bucket model, the exact top 10%% cut found over all of them; wall time and "
    "peak RSS of the driver, of any Ray worker and of each task (goal: every process under 2 GB)",
)
args = parser.parse_args()
if args.quick:
    args.documents = 20_000
if args.smoke:
    args.documents = 1_000


def copyright_texts(min_chars: int, doc_chars: int = 2000) -> list[str]:
    """The copyright files of the installed packages, cut into documents of about ``doc_chars``."""
    docs = []
    for path in sorted(Path("/usr/share/doc").glob("*/copyright")):
        text = path.read_text(encoding="utf-8", errors="replace")
        docs += [
            text[i : i + doc_chars] for i in range(0, len(text), doc_chars) if text[i : i + doc_chars].strip()
        ]
        if sum(map(len, docs)) >= min_chars:
            break
    return docs


def main() -> None:
    import fasttext

    from cleaning.quality import (
        NEGATIVE,
        POSITIVE,
        FastTextConfig,
        QualityScoreConfig,
        QualityScorer,
        fasttext_line,
        train_fasttext,
        write_training_file,
    )
    from core.stage import StageContext, run_chain

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    half = args.documents // 2
    good = pydoc_texts(min_chars=min(half, 20_000) * 2000, doc_chars=2000)
    bad = copyright_texts(min_chars=min(half, 20_000) * 2000)
    rng = random.Random(0)
    train = [(t, True) for t in rng.sample(good, min(len(good), 2000))]
    train += [(t, False) for t in rng.sample(bad, min(len(bad), 2000))]
    corpus = [good[i % len(good)] for i in range(half)] + [
        bad[i % len(bad)] for i in range(args.documents - half)
    ]
    rng.shuffle(corpus)
    with tempfile.TemporaryDirectory(prefix="lmf-bench-quality-") as tmp:
        root = Path(tmp)
        write_training_file(root / "train.txt", train, seed=0)
        buckets = 20_000 if args.smoke else 200_000
        train_fasttext(root / "train.txt", root / "model.bin", FastTextConfig(bucket=buckets))
        batches = documents_table(corpus).to_batches(max_chunksize=1024)
        cfg = QualityScoreConfig(digest="0" * 16, model_dir=str(root), threshold=0.5)
        scorer = QualityScorer(cfg)
        model = fasttext.load_model(str(root / "model.bin"))
        lines = [fasttext_line(t) for t in corpus]
        kept: list[pa.RecordBatch] = []

        def ours() -> None:
            kept[:] = list(run_chain([scorer], batches, StageContext("quality")))

        peer_out: list[tuple[tuple[str, ...], np.ndarray]] = []

        def peer() -> None:
            peer_out[:] = [model.predict(line, k=2) for line in lines]

        t_ours, t_peer = median_times([ours, peer], repeats=1 if args.smoke else 3 if args.quick else 5)
        scores = np.concatenate(
            [np.array([dict(m)["quality.score"] for m in b.column("meta").to_pylist()]) for b in kept]
        )
        expected = np.array(
            [float(np.float32(p[list(ls).index(POSITIVE)])) for ls, p in peer_out], np.float64
        )
        kept_ids = {i for b in kept for i in b.column("id").to_pylist()}
        peer_kept = {f"doc-{i:08d}" for i, (ls, _) in enumerate(peer_out) if ls[0] == POSITIVE}
        # the stage's scores are those of the kept documents; the rejected ones are compared through the set
        same_labels = kept_ids == peer_kept
        same_scores = bool(
            np.array_equal(scores, expected[[int(i[4:]) for b in kept for i in b.column("id").to_pylist()]])
        )
        assert {ls[0] for ls, _ in peer_out} <= {POSITIVE, NEGATIVE}
    n = args.documents
    fasttext_line_ = result(
        "quality.fasttext_scoring",
        "docs/s",
        n / t_ours,
        f"fasttext-community {fasttext_version()} model.predict per document",
        n / t_peer,
        0.9,
        other_goals_met=same_labels and same_scores,
        size=n,
        identical_labels=same_labels,
        identical_probabilities=same_scores,
        kept=len(kept_ids),
    )
    summary("quality", [fasttext_line_, encoder_scoring(good, bad)])


def encoder_scoring(good: list[str], bad: list[str]) -> dict:
    """An encoder classifier (BERT 4 x 256, 512 positions) scoring documents of web-like lengths
    (log-uniform 100 to 8,000 characters) through the quality stage's scorer (batches of 1,024 documents,
    each sorted by length into forward passes of 64) against the plain transformers loop: the documents in
    corpus order, 64 at a time, tokenizer(padding=True, truncation=True), forward, softmax. One thread
    each."""
    import functools

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from benchmarks.common import encoder_classifier
    from cleaning.quality import QualityScoreConfig, QualityScorer
    from core.stage import StageContext, run_chain
    from evaluation.quality_encoder import encoder_scorer

    torch.set_num_threads(1)
    # one thread forwards BERT 4 x 256 at ~60 documents/s: the default is 1,000 documents (minutes)
    n, (layers, hidden, positions, batch) = (1000, (4, 256, 512, 64))
    if args.quick:
        n, (layers, hidden, positions, batch) = (300, (2, 128, 256, 32))
    if args.smoke:
        n, (layers, hidden, positions, batch) = (64, (1, 32, 128, 16))
    rng = random.Random(1)
    pool = good + bad
    texts = []
    for i in range(n):
        text = pool[i % len(pool)] * 4
        texts.append(text[: int(np.exp(rng.uniform(np.log(100), np.log(8000))))])
    with tempfile.TemporaryDirectory(prefix="lmf-bench-encoder-") as tmp:
        model_dir = encoder_classifier(Path(tmp) / "clf", pool[:500], layers, hidden, positions)
        load = functools.partial(encoder_scorer, seq_len=positions, batch_size=batch)
        cfg = QualityScoreConfig(digest="0" * 16, model_dir=str(model_dir), threshold=0.5)
        scorer = QualityScorer(cfg, load)
        batches = documents_table(texts).to_batches(max_chunksize=1024)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        ours_scores: list[float] = []
        peer_scores: list[float] = []

        def ours() -> None:
            ctx = StageContext("quality")
            kept = list(run_chain([scorer], batches, ctx))
            scored = {
                i: dict(m)["quality.score"]
                for b in kept
                for i, m in zip(b.column("id").to_pylist(), b.column("meta").to_pylist())
            }
            scored |= {
                i: v
                for b in ctx.rejected
                for i, v in zip(b.column("id").to_pylist(), b.column("value").to_pylist())
            }
            ours_scores[:] = [scored[f"doc-{i:08d}"] for i in range(n)]

        def peer() -> None:
            out = []
            with torch.inference_mode():
                for start in range(0, n, batch):
                    enc = tokenizer(texts[start : start + batch], padding=True, truncation=True,
                                    max_length=positions, return_tensors="pt")  # fmt: skip
                    out += model(**enc).logits.softmax(-1)[:, 1].tolist()
            peer_scores[:] = out

        t_ours, t_peer = median_times([ours, peer], repeats=1 if args.smoke else 3 if args.quick else 5)
    difference = float(np.max(np.abs(np.array(ours_scores) - np.array(peer_scores))))
    return result(
        "quality.encoder_scoring",
        "docs/s",
        n / t_ours,
        f"transformers {transformers_version()} loop: tokenizer(padding=True), forward, softmax; batch {batch}",
        n / t_peer,
        1.5,
        other_goals_met=difference <= 1e-5,
        size=n,
        model=f"BERT {layers} x {hidden}, {positions} positions",
        max_score_difference=difference,
    )


def transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def fasttext_version() -> str:
    from importlib.metadata import version

    return version("fasttext-community")


def scale(n: int) -> None:
    """The memory of scoring ``n`` documents: the stage's tasks hold a batch and the classifier, the cut
    one partition's scores and two histograms."""
    import json
    import time

    import pyarrow.parquet as pq
    import ray

    from benchmarks.common import PeakRss
    from cleaning.quality import (
        FastTextConfig,
        QualityScoreConfig,
        QualityScorer,
        scores_of,
        top_cut,
        train_fasttext,
        write_training_file,
    )
    from core.schema import DOCUMENT_SCHEMA
    from orchestration.executors import dataset_source, run_document_stage

    good = pydoc_texts(min_chars=4_000_000, doc_chars=400)
    bad = copyright_texts(min_chars=4_000_000, doc_chars=400)
    work = Path(tempfile.mkdtemp(prefix="lmf-bench-quality-scale-"))
    rng = random.Random(0)
    write_training_file(
        work / "train.txt", [(t, True) for t in good[:3000]] + [(t, False) for t in bad[:3000]], 0
    )
    (work / "model").mkdir()
    train_fasttext(work / "train.txt", work / "model" / "model.bin", FastTextConfig())  # fastText's defaults
    pool = good + bad
    per_file = -(-n // 4)
    parts = []
    for k in range(4):
        path = work / "docs" / f"part-{k:05d}.parquet"
        path.parent.mkdir(exist_ok=True)
        with pq.ParquetWriter(path, DOCUMENT_SCHEMA) as writer:
            for start in range(k * per_file, min(n, (k + 1) * per_file), 50_000):
                m = min(50_000, min(n, (k + 1) * per_file) - start)
                texts = [pool[rng.randrange(len(pool))] for _ in range(m)]
                writer.write_table(
                    documents_table(texts, ids=[f"doc{start + i:09d}" for i in range(m)]).cast(
                        DOCUMENT_SCHEMA
                    )
                )
        parts.append((f"part-{k:05d}", dataset_source(str(path))))
    ray.init(num_cpus=2, object_store_memory=512 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        cfg = QualityScoreConfig(digest="0" * 16, model_dir=str(work / "model"), threshold=0.0)
        with PeakRss() as rss:
            start = time.perf_counter()
            run_document_stage(
                "quality", [QualityScorer(cfg)], parts, work / "scored", cache_key="b", inputs={}
            )
            scoring = time.perf_counter() - start
            start = time.perf_counter()
            files = sorted((work / "scored").glob("part-*.parquet"))

            def partitions(with_ids: bool):
                for f in files:
                    table = pq.read_table(f, columns=["id", "meta"] if with_ids else ["meta"])
                    yield scores_of(table), table.column("id").to_pylist() if with_ids else None

            cut = top_cut(partitions, n // 10)
            cutting = time.perf_counter() - start
        tasks = [
            json.loads(m.read_text()).get("peak_rss_mb", 0)
            for m in (work / "scored" / "_done").glob("*.json")
        ]
    finally:
        ray.shutdown()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    peak = max(rss.driver, rss.worker) / 2**20
    line = {
        "bench": "quality.scale",
        "documents": n,
        "scoring_seconds": round(scoring, 1),
        "docs_per_s": round(n / scoring),
        "cut_seconds": round(cutting, 1),
        "cut_score": cut.score,
        "peak_rss_mb_driver": round(rss.driver / 2**20),
        "peak_rss_mb_worker": round(rss.worker / 2**20),
        "peak_rss_mb_task": round(max(tasks)),
        "goal": "every process under 2 GB",
        "ok": peak < 2048,
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    if args.scale:
        scale(args.scale)
    else:
        main()
