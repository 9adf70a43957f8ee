"""Benchmark-task evaluation speed vs lm-evaluation-harness on the same model, task data and threads.

Model: a GPT-2-shaped decoder (6 layers, width 384, 1024-token window) with a 16k byte-level BPE trained
on pydoc text, exported as training exports it (random weights: speed does not depend on them).
Peer: ``lm_eval.simple_evaluate`` with ``HFLM`` (batch size 32) on lm-eval's own task YAML pointed at the
same local files (``evaluation.tasks.lm_eval_task``), in this process. Ours: ``score_task`` with a
``CausalScorer`` on the same loaded model, scoring the same examples. Both include reading the task data. The numbers must be identical (acc,
acc_norm to 1e-4), and the run reports them.
Goal (issue 15): >= 3x lm-eval's examples/s with identical numbers.

    .venv/bin/python benchmarks/eval.py [--quick | --smoke] [--tasks hellaswag,arc_easy] [--limit 500] [--threads 2]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--quick", action="store_true", help="100 examples per task, one repetition")
parser.add_argument("--tasks", default="hellaswag,arc_easy")
parser.add_argument("--limit", type=int, default=500, help="examples per task")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--peer-batch", type=int, default=32, help="lm-eval's batch size")
parser.add_argument("--smoke", action="store_true", help="seconds: 8 examples per task, a one-layer model")
args = parser.parse_args()
if args.quick:
    args.limit, args.repeats = 100, 1
if args.smoke:
    args.limit, args.repeats = 8, 1
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

import torch  # noqa: E402

from benchmarks.common import median_times, pydoc_texts, result, summary  # noqa: E402
from evaluation.harness import load_model  # noqa: E402
from evaluation.loglikelihood import CausalScorer  # noqa: E402
from evaluation.tasks import lm_eval_task, resolve_task, score_task  # noqa: E402
from training.data.tokenizer import TokenizerConfig, eos_id, save_tokenizer, train_bpe  # noqa: E402
from training.model import ModelConfig, build_model  # noqa: E402
from training.trainer import export_tokenizer  # noqa: E402


def export_model(out: Path) -> Path:
    if args.smoke:
        text, vocab, shape = 200_000, 1024, {"n_layer": 1, "n_head": 2, "n_embd": 64}
    else:
        text, vocab, shape = 4_000_000, 16384, {"n_layer": 6, "n_head": 6, "n_embd": 384}
    tokenizer = train_bpe(pydoc_texts(text), TokenizerConfig(vocab_size=vocab))
    tok_path, tok_id = save_tokenizer(tokenizer, out / "tok")
    cfg = ModelConfig(preset="debug", **shape)
    model = build_model(cfg, tokenizer.get_vocab_size(), 1024, eos_token_id=eos_id(tokenizer))
    model.save_pretrained(out / "model")
    export_tokenizer(tok_path, {"id": tok_id}, out / "model")
    return out / "model"


def main() -> None:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="lmf-bench-eval-"))
    try:
        model_dir = export_model(work)
        lm = HFLM(pretrained=str(model_dir), batch_size=args.peer_batch, device="cpu")
        scorer = CausalScorer(*load_model(model_dir))
        lm_tasks = Path(lm_eval.__file__).parent / "tasks"
        tasks = {task: lm_eval_task(task, lm_tasks, work) for task in args.tasks.split(",")}
        # Only the tasks written here (they include lm-eval's YAML by path): indexing all of lm-eval's
        # thousands of task files takes half a minute.
        manager = TaskManager(include_path=str(work), include_defaults=False)
        results = []
        for task, name in tasks.items():
            peer: dict = {}

            def run_peer(name=name, peer=peer) -> None:
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=[name], limit=args.limit, task_manager=manager, verbosity="ERROR"
                )
                peer.update(out["results"][name])

            ours: dict = {}

            def run_ours(task=task, ours=ours) -> None:
                ours.update(score_task(scorer, resolve_task(task), args.limit))

            warmup = 0 if args.quick or args.smoke else 1
            t_peer, t_ours = median_times([run_peer, run_ours], args.repeats, warmup=warmup)
            metrics = [m for m in ("acc", "acc_norm", "perplexity") if f"{m},none" in peer]
            diff = max(abs(ours[m] - peer[f"{m},none"]) for m in metrics)
            line = result(
                f"eval.{task}",
                "examples/s",
                args.limit / t_ours,
                f"lm-eval {lm_eval.__version__} HFLM batch {args.peer_batch}",
                args.limit / t_peer,
                3.0,
                size=args.limit,
                threads=args.threads,
                ours_metrics={m: round(ours[m], 6) for m in metrics},
                peer_metrics={m: round(peer[f"{m},none"], 6) for m in metrics},
                other_goals_met=diff <= 1e-4,
                max_abs_diff=diff,
            )
            results.append(line)
        summary("eval", results)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
