"""Whole training runs: ZeRO 0/2/3 on 2 Ray Train workers, export round-trip, fine-tuning, masked-LM and
span-corruption pretraining, and resume after a real kill (torchrun, 2 ranks, SIGKILL) reproducing the
uninterrupted loss curve exactly for each objective."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import free_port
from tests.training.test_shards import batches, corpus
from training.config import TrainConfig
from training.data.tokenize import TokenizeConfig, tokenize_documents
from training.data.tokenizer import EOS_TOKEN, TokenizerConfig
from training.objectives import special_tokens_for

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens")
    texts = corpus(300, seed=2)
    cfg = TokenizeConfig(tokenizer=TokenizerConfig(vocab_size=320, min_frequency=1), val_fraction=0.1)
    tokenize_documents(lambda: batches(texts), out, cfg)
    return out


@pytest.fixture(scope="module")
def special_tokens(tmp_path_factory):
    """The same corpus with a tokenizer that has the masked-LM and span-corruption special tokens."""
    out = tmp_path_factory.mktemp("special_tokens")
    sentinels = [t for t in special_tokens_for("span_corruption") if t not in special_tokens_for("masked_lm")]
    specials = [EOS_TOKEN, *special_tokens_for("masked_lm"), *sentinels]
    tok = TokenizerConfig(vocab_size=512, min_frequency=1, special_tokens=specials)
    tokenize_documents(
        lambda: batches(corpus(300, seed=2)), out, TokenizeConfig(tokenizer=tok, val_fraction=0.1)
    )
    return out


OBJECTIVES = {
    "causal_lm": {},
    "masked_lm": {
        "objective": "masked_lm",
        "masking": {"next_sentence_prediction": True, "whole_word": True},
    },
    "span_corruption": {"objective": "span_corruption"},
}
ARCH = {"causal_lm": "gpt2", "masked_lm": "bert", "span_corruption": "t5"}


def small(**fields) -> TrainConfig:
    base = {
        "model": {"preset": "debug", "n_embd": 32, "n_head": 2},
        "seq_len": 32,
        "micro_batch_size": 4,
        "num_workers": 2,
        "steps": 12,
        "warmup_steps": 2,
        "lr": 1e-2,
    }
    return TrainConfig.model_validate({**base, **fields})


def launch(cfg, tokens, out):
    from orchestration.training_launch import launch_training

    return launch_training(cfg, tokens, out, run_name=out.name)


@pytest.fixture(scope="module")
def zero3_run(ray_session, tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    return launch(small(zero_stage=3), tokens, out), out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_zero_stage_trains_on_two_workers(ray_session, tokens, tmp_path, stage):
    summary = launch(small(zero_stage=stage), tokens, tmp_path / f"zero{stage}")
    losses = summary["losses"]
    assert summary["world_size"] == 2 and len(losses) == 12
    assert np.mean(losses[-3:]) < losses[0] - 0.5


@pytest.mark.slow
def test_zero3_trains_and_the_same_seed_gives_the_same_losses(zero3_run, tokens, tmp_path):
    summary, _ = zero3_run
    assert summary["world_size"] == 2
    assert np.mean(summary["losses"][-3:]) < summary["losses"][0] - 0.5
    again = launch(small(zero_stage=3), tokens, tmp_path / "again")
    assert again["losses"] == summary["losses"]


@pytest.mark.slow
def test_exported_model_loads_and_generates_with_transformers(zero3_run, tokens):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary, out = zero3_run
    model_dir = Path(summary["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == model.config.eos_token_id
    # The exported weights are the ZeRO-3 partitions gathered, in fp32.
    weights = load_file(model_dir / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in weights.values())
    # Its loss on training text matches what training reached, not a random init's ln(vocab).
    from training.data.shards import TokenSequences

    seqs = torch.from_numpy(TokenSequences(tokens, "train", 32).batch(np.arange(16)).astype(np.int64))
    with torch.no_grad():
        loss = model(input_ids=seqs[:, :-1], labels=seqs[:, :-1]).loss.item()
    assert loss < np.log(320) - 1.0
    prompt = tok("river stone", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    # Greedy decoding by hand (argmax of the next-token logits, no cache) gives the same tokens.
    ids = prompt["input_ids"]
    with torch.no_grad():
        while ids.shape[1] < generated.shape[1]:
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert torch.equal(generated, ids)
    assert tok.decode(generated[0]).startswith("river stone")  # byte-level BPE round-trips the prompt


@pytest.mark.slow
def test_fine_tuning_freezes_the_first_layers(zero3_run, tokens, tmp_path):
    summary, _ = zero3_run
    base_dir = Path(summary["model_dir"])
    cfg = small(
        zero_stage=2, num_workers=1, steps=4, warmup_steps=1, init_from=str(base_dir), freeze_layers=1
    )
    tuned = launch(cfg, tokens, tmp_path / "tuned")
    before = load_file(base_dir / "model.safetensors")
    after = load_file(Path(tuned["model_dir"]) / "model.safetensors")
    frozen = [k for k in before if k.startswith("transformer.h.0.") or k == "transformer.wpe.weight"]
    trained = [k for k in before if k.startswith("transformer.h.1.")]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained if k.endswith("weight"))
    assert tuned["trainable_parameters"] < sum(t.numel() for t in before.values())


def _torchrun(config: Path, tokens: Path, out: Path, nproc: int = 2) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
         f"--master-port={free_port()}", "-m", "training.trainer", config, tokens, out],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_resume_after_a_kill_reproduces_the_uninterrupted_losses(objective, request, tmp_path):
    """Masks, spans and NSP partners are drawn from (seed, step, rank, micro-batch): resume stays exact."""
    tokens = request.getfixturevalue("tokens" if objective == "causal_lm" else "special_tokens")
    config = tmp_path / "train.yaml"
    # Wide enough that 30 steps after the step-10 checkpoint outlast the 10 ms poll below.
    model = {"arch": ARCH[objective], "preset": "debug", "n_embd": 128, "n_head": 4}
    cfg = small(
        model=model, seq_len=64, steps=40, zero_stage=2, checkpoint_every=5, keep_checkpoints=2,
        **OBJECTIVES[objective],
    )  # fmt: skip
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    straight = _torchrun(config, tokens, tmp_path / "straight")
    log = straight.communicate(timeout=600)[0]
    assert straight.returncode == 0, log[-3000:]
    expected = json.loads((tmp_path / "straight" / "summary.json").read_text())["losses"]

    out = tmp_path / "killed"
    run = _torchrun(config, tokens, out)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "step00000010" / "lmforge.json").exists():
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[0][-3000:]
        time.sleep(0.01)
    # Every rank and the launcher, mid-run (torchrun starts each rank in a session of its own).
    launcher = psutil.Process(run.pid)
    procs = [*launcher.children(recursive=True), launcher]
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    run.wait()
    assert not (out / "summary.json").exists(), "the run finished before it was killed"

    resumed = _torchrun(config, tokens, out)
    log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert 10 <= summary["resumed_from"] < 40
    assert summary["losses"] == expected  # bit-identical on CPU
    if objective != "causal_lm":
        return

    # Another world size cannot load these ZeRO partitions: a clear error, before DeepSpeed tries.
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(cfg.model_copy(update={"num_workers": 1}).model_dump(mode="json")))
    (out / "summary.json").unlink()
    mismatch = _torchrun(one, tokens, out, nproc=1)
    log = mismatch.communicate(timeout=600)[0]
    assert mismatch.returncode != 0
    assert "written by 2 workers with ZeRO-2; this run has 1 workers" in log


def _ray_train_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, IndexError, TypeError):
            if "RayTrainWorker" in proc.info["cmdline"][0]:
                found.append(proc)
    return found


@pytest.mark.slow
def test_ray_train_restarts_a_killed_worker_and_resumes_from_storage(ray_session, tokens, tmp_path):
    model = {"preset": "debug", "n_embd": 128, "n_head": 4}
    cfg = small(model=model, seq_len=64, steps=40, zero_stage=2, checkpoint_every=5, max_failures=1)
    expected = launch(cfg, tokens, tmp_path / "straight")["losses"]

    out = tmp_path / "killed"
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=launch(cfg, tokens, out)))
    thread.start()
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "step00000010" / "lmforge.json").exists():
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    victim = _ray_train_workers()[-1]
    victim.send_signal(signal.SIGKILL)
    thread.join(timeout=600)
    summary = outcome["summary"]
    assert 10 <= summary["resumed_from"] < 40
    assert summary["losses"] == expected

    # Every rank's partition reached Ray Train's storage, merged into one checkpoint per step.
    (run_dir,) = (out / "ray_train").iterdir()
    final = run_dir / "step00000040"
    names = {f.name for f in final.iterdir()}
    assert {n for n in names if "zero_pp_rank_0_" in n} and {n for n in names if "zero_pp_rank_1_" in n}
    assert "lmforge.json" in names

    # A node that lost its local disk resumes from storage: the run is found complete at step 40.
    shutil.rmtree(out / "checkpoints")
    (out / "summary.json").unlink()
    again = launch(cfg, tokens, out)
    assert again["resumed_from"] == 40 and again["losses"] == expected


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["masked_lm", "span_corruption"])
def test_masked_and_span_corruption_pretraining_learn_and_export(
    ray_session, special_tokens, tmp_path, objective
):
    from transformers import (
        AutoModelForMaskedLM,
        AutoModelForPreTraining,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    from training.data.shards import TokenSequences

    model = {"arch": ARCH[objective], "preset": "debug", "n_embd": 64, "n_head": 2}
    summary = launch(
        small(model=model, steps=20, **OBJECTIVES[objective]), special_tokens, tmp_path / objective
    )
    losses = summary["losses"]
    assert summary["world_size"] == 2 and summary["objective"] == objective
    assert np.mean(losses[-3:]) < losses[0] - 1.0

    model_dir = Path(summary["model_dir"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = len(tok)
    stream = TokenSequences(special_tokens, "val", 40).batch(np.arange(8)).astype(np.int64)
    if objective == "masked_lm":
        assert tok.mask_token == "<mask>" and tok.cls_token == "<cls>"
        assert type(AutoModelForPreTraining.from_pretrained(model_dir)).__name__ == "BertForPreTraining"
        mlm = AutoModelForMaskedLM.from_pretrained(model_dir)
        # Held-out text, every 7th ordinary token masked by hand: the trained encoder predicts them.
        ids = torch.from_numpy(stream[:, :30])
        positions = torch.zeros_like(ids, dtype=torch.bool)
        positions[:, 3::7] = True
        positions &= ids != tok.eos_token_id
        inputs = ids.masked_fill(positions, tok.mask_token_id)
        with torch.no_grad():
            logits = mlm(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits[positions], ids[positions]).item()
        assert loss < np.log(vocab) - 1.0
    else:
        t5 = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
        assert t5.config.decoder_start_token_id == tok.pad_token_id
        sentinel = tok.convert_tokens_to_ids("<extra_id_0>")
        # Held-out text with a span replaced by <extra_id_0>: the target starts with that sentinel.
        inputs = torch.tensor([[*stream[0, :10], sentinel, *stream[0, 13:30], tok.eos_token_id]])
        target = torch.tensor([[sentinel, *stream[0, 10:13], tok.convert_tokens_to_ids("<extra_id_1>")]])
        with torch.no_grad():
            loss = t5(input_ids=inputs, labels=target).loss.item()
            generated = t5.generate(input_ids=inputs, max_new_tokens=5, do_sample=False)
        assert loss < np.log(vocab) - 1.0
        assert generated[0, 0] == tok.pad_token_id and generated[0, 1] == sentinel

    # Continued pretraining from the exported directory (its Auto class per objective) starts where the
    # first run ended, not from a random init's loss.
    resumed = launch(
        small(
            model=model,
            steps=4,
            warmup_steps=1,
            num_workers=1,
            init_from=str(model_dir),
            **OBJECTIVES[objective],
        ),
        special_tokens,
        tmp_path / f"{objective}-continued",
    )
    assert resumed["losses"][0] < losses[0] - 1.0
