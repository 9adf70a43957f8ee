"""A real DeepSpeed engine in this process (gloo, world size 1) against a plain PyTorch loop."""

import os
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from tests.training.plain_loop import BATCH, LR, SEQ, STEPS, VOCAB, batches, plain_pytorch_losses, step_loss
from training.config import TrainConfig
from training.model import ModelConfig, build_model
from training.schedule import lr_multiplier


@pytest.mark.integration
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_deepspeed_matches_plain_pytorch_loop(single_process_dist, zero_stage):
    from training.engine import initialize

    cfg = TrainConfig(
        model=ModelConfig(preset="debug"),
        seq_len=SEQ,
        micro_batch_size=BATCH,
        steps=STEPS,
        warmup_steps=2,
        zero_stage=zero_stage,
        lr=LR,
        grad_clip=1.0,
        min_lr_ratio=0.1,
    )
    expected = plain_pytorch_losses(cfg)
    engine = initialize(build_model(cfg.model, VOCAB, SEQ, seed=cfg.seed), cfg)
    # One rank at ZeRO-0 skips the all-reduce over itself; ZeRO-2 reduces through its optimizer.
    assert engine.enable_backward_allreduce == (zero_stage != 0)
    losses, lrs = [], []
    for seqs in batches():
        loss = step_loss(engine, seqs)
        engine.backward(loss)
        lrs.append(engine.get_lr()[0])
        engine.step()
        losses.append(loss.item())
    assert lrs == pytest.approx([LR * lr_multiplier(s, 2, STEPS, 0.1) for s in range(STEPS)])
    assert losses[-1] < losses[0]
    assert losses == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.unit
def test_ds_config_is_generated_and_merged():
    from training.engine import build_ds_config

    cfg = TrainConfig(
        micro_batch_size=4,
        grad_accum_steps=2,
        num_workers=2,
        zero_stage=3,
        offload_params=True,
        ds_config={"zero_optimization": {"overlap_comm": True}},
    )
    ds = build_ds_config(cfg)
    assert ds["train_batch_size"] == 16
    assert ds["zero_optimization"] == {
        "stage": 3,
        "offload_param": {"device": "cpu", "pin_memory": False},
        "overlap_comm": True,
    }
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert "scheduler" not in ds  # lmforge's own warmup + cosine unless a raw ds_config names one
    sgd = {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    assert build_ds_config(TrainConfig(ds_config=sgd))["optimizer"] == sgd["optimizer"]


@pytest.mark.unit
def test_warmup_cosine_schedule_hand_computed():
    # warmup 2 of 6 steps, floor 0.1: (1/2, 2/2), then 0.1 + 0.9 * (1 + cos(pi * k/4)) / 2 for k = 0..3
    expected = [0.5, 1.0, 1.0, 0.1 + 0.9 * (1 + 2**-0.5) / 2, 0.55, 0.1 + 0.9 * (1 - 2**-0.5) / 2, 0.1]
    assert [lr_multiplier(s, 2, 6, 0.1) for s in range(7)] == pytest.approx(expected)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"offload_params": True, "zero_stage": 2}, "offload_params needs zero_stage 3"),
        ({"offload_optimizer": True, "zero_stage": 0}, "offload_optimizer needs zero_stage >= 1"),
        ({"global_batch_size": 30, "micro_batch_size": 8, "num_workers": 2}, "global_batch_size=30"),
        ({"warmup_steps": 10, "steps": 10}, "warmup_steps=10"),
        ({"precision": "fp8"}, "precision"),
        ({"model": {"n_embd": 100, "n_head": 3}}, "not divisible"),
        ({"precision": "bf16", "ds_config": {"fp16": {"enabled": True}}}, "both fp16 and bf16"),
        ({"offload_device": "nvme", "offload_optimizer": True}, "needs nvme_path"),
        ({"offload_device": "nvme", "nvme_path": "/nvme"}, "nothing to offload"),
        ({"freeze_layers": 2}, "set init_from"),
    ],
)
def test_invalid_training_configs_fail_before_launch(fields, message):
    with pytest.raises(ValidationError, match=message):
        TrainConfig(**fields)


@pytest.mark.unit
def test_same_seed_same_init():
    a = build_model(ModelConfig(preset="debug"), VOCAB, SEQ, seed=5)
    b = build_model(ModelConfig(preset="debug"), VOCAB, SEQ, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.unit
def test_engine_selects_the_cpu_accelerator_without_cuda():
    """Imported with no DS_ACCELERATOR set, the engine module picks DeepSpeed's CPU accelerator when no GPU
    answers (and leaves the choice to DeepSpeed when one does)."""
    code = (
        "import os, torch\n"
        "os.environ.pop('DS_ACCELERATOR', None)\n"
        "import training.engine\n"
        "from deepspeed.accelerator import get_accelerator\n"
        "print(torch.cuda.is_available(), os.environ.get('DS_ACCELERATOR'), get_accelerator().device_name())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    cuda, chosen, device = out.stdout.split()[-3:]
    if cuda == "False":
        assert (chosen, device) == ("cpu", "cpu")
    else:
        assert chosen == "None" and device == "cuda"


@pytest.mark.integration
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_training_exports_the_fp32_master_weights(single_process_dist, zero_stage):
    from training.engine import consolidated_state_dict, initialize

    cfg = TrainConfig(
        model=ModelConfig(preset="debug"),
        seq_len=SEQ,
        micro_batch_size=BATCH,
        steps=2,
        warmup_steps=1,
        zero_stage=zero_stage,
        precision="bf16",
        lr=LR,
    )
    engine = initialize(build_model(cfg.model, VOCAB, SEQ, seed=cfg.seed), cfg)
    for seqs in batches()[:2]:
        engine.backward(step_loss(engine, seqs))
        engine.step()
    state = consolidated_state_dict(engine)
    module = {n: p for n, p in engine.module.named_parameters()}
    assert set(module) <= set(state)
    for name, param in module.items():
        weights = state[name]
        assert weights.dtype == torch.float32, name
        assert weights.numel() > 0, name
        if zero_stage < 3:  # the bf16 module weights are the master weights rounded
            assert torch.equal(weights.to(torch.bfloat16), param.detach().cpu()), name
    # fp32 masters, not bf16 weights cast up: after training, values lie between bf16's steps.
    trained = torch.cat([state[n].flatten() for n in module])
    assert (trained != trained.to(torch.bfloat16).float()).float().mean() > 0.5


@pytest.mark.unit
def test_nvme_offload_config():
    from training.engine import build_ds_config

    cfg = TrainConfig(
        zero_stage=3, offload_params=True, offload_optimizer=True, offload_device="nvme", nvme_path="/nvme"
    )
    zero = build_ds_config(cfg)["zero_optimization"]
    for key in ("offload_param", "offload_optimizer"):
        assert zero[key] == {"device": "nvme", "pin_memory": False, "nvme_path": "/nvme"}


@pytest.mark.integration
@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_grad_accumulation_matches_the_full_batch_plain_loop(single_process_dist, activation_checkpointing):
    """2 micro-batches of 2 accumulated == one batch of 4 (equal sizes: the mean of means is the mean)."""
    from training.engine import initialize

    model_cfg = ModelConfig(preset="debug", activation_checkpointing=activation_checkpointing)
    cfg = TrainConfig(
        model=model_cfg,
        seq_len=SEQ,
        micro_batch_size=BATCH // 2,
        grad_accum_steps=2,
        steps=STEPS,
        warmup_steps=2,
        zero_stage=0,
        lr=LR,
    )
    expected = plain_pytorch_losses(cfg)  # full batches of BATCH, one optimizer step each
    model = build_model(cfg.model, VOCAB, SEQ, seed=cfg.seed)
    enabled = getattr(model, "is_activation_checkpointing", None)
    if enabled is None:
        enabled = model.is_gradient_checkpointing
    assert enabled == activation_checkpointing
    engine = initialize(model, cfg)
    engine.train()
    losses = []
    for seqs in batches():
        step = 0.0
        for half in (seqs[: BATCH // 2], seqs[BATCH // 2 :]):
            loss = step_loss(engine, half)
            engine.backward(loss)
            engine.step()
            step += loss.item() / 2
        losses.append(step)
    assert losses == pytest.approx(expected, rel=1e-5, abs=1e-6)
