"""Checkpoints are verified before a run resumes from them: each is written with a manifest of its files
(bytes, sha256) and loaded only if every file still matches; one that does not (64 KiB overwritten, a
run killed before the manifest was written) is set aside, named in a warning, and the one before it is
used; with none left the run starts over. A real DeepSpeed engine (ZeRO-2, one rank) writes and reads
them."""

import json

import pytest
import torch

from tests.training.plain_loop import BATCH, LR, SEQ, VOCAB, batches, step_loss
from training.config import TrainConfig
from training.model import ModelConfig, build_model


def _engine():
    from training.engine import initialize

    cfg = TrainConfig(
        model=ModelConfig(preset="debug"), seq_len=SEQ, micro_batch_size=BATCH, steps=6, warmup_steps=1, lr=LR,
        zero_stage=2,
    )  # fmt: skip
    return initialize(build_model(cfg.model, VOCAB, SEQ, seed=cfg.seed), cfg), cfg


def _weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _overwrite_64k(path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 3)
        f.write(b"\xa5" * 65536)


@pytest.mark.integration
def test_a_changed_checkpoint_is_set_aside_and_the_one_before_it_is_resumed(
    single_process_dist, tmp_path, capsys
):
    from training.engine import SET_ASIDE_PREFIX, load_latest_checkpoint, save_checkpoint

    ckpt = tmp_path / "checkpoints"
    engine, cfg = _engine()
    saved = {}
    for step, seqs in enumerate(batches()[:6], start=1):
        engine.backward(step_loss(engine, seqs))
        engine.step()
        if step % 2 == 0:
            save_checkpoint(engine, ckpt, step, {"step": step}, keep=3)
            saved[step] = _weights(engine)
    meta = json.loads((ckpt / "step00000006" / "lmforge.json").read_text())
    files = meta["files"]
    assert files and all(len(e["sha256"]) == 64 for e in files.values())
    assert set(files) == {p.name for p in (ckpt / "step00000006").iterdir()} - {"lmforge.json"}

    # Step 6: 64 KiB of its largest file overwritten. Step 4: killed before its manifest was written.
    largest = max((ckpt / "step00000006").iterdir(), key=lambda p: p.stat().st_size)
    _overwrite_64k(largest)
    (ckpt / "step00000004" / "lmforge.json").unlink()

    resumed, _ = _engine()
    state = load_latest_checkpoint(resumed, ckpt, cfg)
    assert state["step"] == 2 and state["checkpoint"] == {"tag": "step00000002", "verified": True}
    weights = _weights(resumed)
    assert all(torch.equal(weights[k], saved[2][k]) for k in saved[2])
    said = capsys.readouterr().out
    assert f"{largest} changed after it was written" in said and "resuming from step00000004" in said
    assert "step00000004 has no lmforge.json: it was never finished" in said
    assert (ckpt / "latest").read_text() == "step00000002"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [
        f"{SET_ASIDE_PREFIX}step00000004", f"{SET_ASIDE_PREFIX}step00000006", "step00000002",
    ]  # fmt: skip

    # With no sound checkpoint left the run starts over, and says so.
    _overwrite_64k(max((ckpt / "step00000002").iterdir(), key=lambda p: p.stat().st_size))
    again, _ = _engine()
    assert load_latest_checkpoint(again, ckpt, cfg) is None
    assert "starting over from step 0" in capsys.readouterr().out and not (ckpt / "latest").exists()


@pytest.mark.unit
def test_nan_advice_names_an_unverified_checkpoint_rather_than_the_learning_rate():
    from training.trainer import _nan_advice

    assert _nan_advice(float("nan"), 4, None) == "loss became nan at step 4; lower lr"
    verified = _nan_advice(float("nan"), 4, {"tag": "step00000002", "verified": True})
    assert "step00000002 (its files match their manifest); lower lr" in verified
    legacy = _nan_advice(float("inf"), 4, {"tag": "step00000002", "verified": False})
    assert "could not be verified" in legacy and "delete it" in legacy
