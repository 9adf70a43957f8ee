"""The GPU fast paths, checked on the CPU: each switch keeps a debug model's loss curve within a tolerance of
the plain path (eager attention, no compile, torch's foreach AdamW, fp32), which test_engine checks against a
plain PyTorch loop; document masking gives each packed document the logits it has alone."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from tests.training.plain_loop import BATCH, LR, SEQ, STEPS, VOCAB, batches, plain_pytorch_losses
from training.config import TrainConfig
from training.model import ModelConfig, build_model
from training.objectives import ObjectiveBatches, SpecialIds, document_positions

EOS = VOCAB - 1
PLAIN = {"attn_implementation": "eager"}


def engine_losses(cfg: TrainConfig) -> list[float]:
    """The same steps through lmforge's engine and its pretraining loss (objective_loss)."""
    from training.engine import initialize
    from training.trainer import objective_loss

    engine = initialize(build_model(cfg.model, VOCAB, SEQ, seed=cfg.seed), cfg)
    # Each switch took effect: the kernel, the compiled module, the training dtype.
    assert engine.module.config._attn_implementation == cfg.model.attn_implementation
    assert engine.is_compiled == cfg.compiles
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
    assert next(engine.module.parameters()).dtype == dtype
    adamw = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO and bf16 wrap torch's AdamW
    assert isinstance(adamw, torch.optim.AdamW) and bool(adamw.defaults["fused"]) == cfg.fuses_optimizer
    engine.train()
    losses = []
    for seqs in batches():
        loss = objective_loss(engine, {"input_ids": seqs[:, :-1], "labels": seqs[:, 1:]})
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def config(model: dict | None = None, **fields) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(preset="debug", **(model or PLAIN)),
        seq_len=SEQ,
        micro_batch_size=BATCH,
        steps=STEPS,
        warmup_steps=2,
        lr=LR,
        grad_clip=1.0,
        min_lr_ratio=0.1,
        zero_stage=fields.pop("zero_stage", 0),
        **fields,
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    ("switches", "rel"),
    [
        ({"model": {"attn_implementation": "sdpa"}}, 1e-5),
        ({"fused_optimizer": True}, 1e-5),
        ({"overlap_comm": True, "zero_stage": 2}, 1e-5),
        ({"precision": "bf16"}, 2e-2),  # bf16 weights and activations, fp32 master weights
        # Inductor fuses and reorders the arithmetic; one compile covers the three switches together.
        ({"compile": True, "fused_optimizer": True, "model": {"attn_implementation": "sdpa"}}, 1e-4),
    ],
    ids=["sdpa", "fused-adamw", "overlap-comm", "bf16", "compile+sdpa+fused"],
)
def test_each_fast_path_keeps_the_plain_loss_curve(single_process_dist, switches, rel):
    plain = config()
    expected = plain_pytorch_losses(plain)
    assert engine_losses(plain) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    fast = config(**switches)
    losses = engine_losses(fast)
    assert losses[-1] < losses[0] - 0.3
    assert losses == pytest.approx(expected, rel=rel)
    if fast.dtype == "bf16":  # the tolerance is bf16's, not a looser check of a path that matches
        assert max(abs(a - b) for a, b in zip(losses, expected, strict=True)) > 1e-6


@pytest.mark.unit
def test_gpu_defaults_are_the_fast_paths_and_cpu_keeps_the_plain_ones():
    from training.engine import build_ds_config

    gpu, cpu = TrainConfig(use_gpu=True, zero_stage=2), TrainConfig(zero_stage=2)
    ds = build_ds_config(gpu)
    assert (gpu.dtype, gpu.compiles, gpu.fuses_optimizer) == ("bf16", True, True)
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["overlap_comm"] is True
    assert ds["optimizer"]["params"]["fused"] is True and ds["optimizer"]["params"]["torch_adam"] is True
    ds = build_ds_config(cpu)
    assert (cpu.dtype, cpu.compiles, cpu.fuses_optimizer) == ("fp32", False, False)
    assert ds["bf16"] == {"enabled": False} and ds["zero_optimization"]["overlap_comm"] is False
    assert TrainConfig(use_gpu=True, precision="fp32", compile=False).compiles is False
    assert TrainConfig(use_gpu=True, zero_stage=3).compiles is False  # opt-in at ZeRO-3
    assert TrainConfig(use_gpu=True, zero_stage=3, compile=True).compiles is True
    # Optimizer state offloaded from a GPU keeps DeepSpeed's CPU Adam (no fused flag for it).
    offload = build_ds_config(TrainConfig(use_gpu=True, zero_stage=2, offload_optimizer=True))
    assert offload["optimizer"]["params"] == {**offload["optimizer"]["params"], "torch_adam": False}
    assert "fused" not in offload["optimizer"]["params"]
    assert TrainConfig().model.attn_implementation == "sdpa"


@pytest.mark.unit
def test_document_positions_restart_after_each_end_of_document():
    rows = np.array([[5, 6, EOS, 7, 8, 9, EOS, 4], [EOS, 1, 2, 3, 4, 5, 6, 7]])
    assert document_positions(rows, EOS).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 4, 5, 6]]


@pytest.mark.integration
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_document_masking_gives_each_document_its_logits_alone(single_process_dist, arch, attn):
    """A packed row [a EOS b EOS c] scores each document as if it were alone; without masking, b sees a."""
    from training.engine import initialize
    from training.trainer import objective_loss

    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, EOS, (n,), generator=g) for n in (5, 7, 3)]
    docs = [torch.cat([d, torch.tensor([EOS])]) for d in docs]  # shards end each document with EOS
    stream = torch.cat(docs)  # 6 + 8 + 4 = 18 tokens: 17 inputs, 17 targets
    model = build_model(
        ModelConfig(arch=arch, preset="debug", attn_implementation=attn), VOCAB, 32, eos_token_id=EOS
    )
    model.eval()
    ids = SpecialIds(vocab_size=VOCAB, eos=EOS)
    masked = ObjectiveBatches("causal_lm", 17, ids, document_masking=True).make(stream[None].numpy(), None)
    plain = ObjectiveBatches("causal_lm", 17, ids).make(stream[None].numpy(), None)
    assert "position_ids" not in plain
    tensors = {k: torch.from_numpy(v) for k, v in masked.items()}
    with torch.no_grad():
        packed = model(
            input_ids=tensors["input_ids"], position_ids=tensors["position_ids"], use_cache=False
        ).logits
        unmasked = model(input_ids=tensors["input_ids"], use_cache=False).logits
        alone = [model(input_ids=d[None], use_cache=False).logits for d in docs]
    expected = torch.cat(alone, dim=1)[:, :17]
    torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)
    assert (unmasked[:, 6:] - expected[:, 6:]).abs().max() > 1e-2
    # The training loss sees the same thing: objective_loss through the engine equals the per-document scores.
    engine = initialize(model, config(model={"arch": arch, "attn_implementation": attn}))
    engine.eval()
    with torch.no_grad():
        loss = objective_loss(engine, tensors)
    reference = F.cross_entropy(expected.reshape(-1, VOCAB), tensors["labels"].reshape(-1))
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_document_masking_needs_packed_causal_sequences():
    assert TrainConfig(document_masking=True).document_masking
    with pytest.raises(ValidationError, match="span_documents=false"):
        TrainConfig(document_masking=True, span_documents=False)
    with pytest.raises(ValidationError, match="objective=masked_lm"):
        TrainConfig(document_masking=True, objective="masked_lm", model=ModelConfig(arch="bert"))
    with pytest.raises(ValueError, match="flash_attention_2 is not available"):
        build_model(ModelConfig(attn_implementation="flash_attention_2"), VOCAB, SEQ, eos_token_id=EOS)


@pytest.mark.unit
def test_mfu_counts_the_flops_nanogpt_counts():
    """GPT-2 124M: 124,439,808 parameters less the 1024 x 768 position table (the token table is the
    head's matmul) = 123.65M; FLOPs per token 6N + 12*L*d*T, nanoGPT's estimate_mfu by hand."""
    from training.flops import device_peak_tflops, flops_per_token
    from training.model import count_parameters

    model = build_model(ModelConfig(preset="124m"), 50_257, 1024, eos_token_id=50_256)
    n = count_parameters(model)
    assert n == 124_439_808 - 1024 * 768
    assert flops_per_token(n, 12, 768, 1024) == 6 * n + 12 * 12 * 768 * 1024
    llama = build_model(ModelConfig(arch="llama", preset="debug"), VOCAB, SEQ, eos_token_id=EOS)
    untied = sum(p.numel() for p in llama.parameters()) - VOCAB * 64  # its lookup table is not its head
    assert count_parameters(llama) == untied
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == device_peak_tflops("NVIDIA H200") == 989.4
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert device_peak_tflops("Some Future Accelerator") is None
