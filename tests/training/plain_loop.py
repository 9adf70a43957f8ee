"""The plain PyTorch reference loop the DeepSpeed engine tests compare against: counting sequences, AdamW,
warmup-cosine schedule, gradient clipping, no DeepSpeed."""

import torch
import torch.nn.functional as F

from training.config import TrainConfig
from training.model import build_model
from training.schedule import lr_multiplier

VOCAB, SEQ, BATCH, STEPS, LR = 96, 16, 4, 6, 3e-3


def batches():
    """Counting sequences (next token = token + 1): learnable within a few steps."""
    g = torch.Generator().manual_seed(11)
    return [
        (torch.randint(0, VOCAB, (BATCH, 1), generator=g) + torch.arange(SEQ + 1)) % VOCAB
        for _ in range(STEPS)
    ]


def step_loss(model, seqs):
    logits = model(input_ids=seqs[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, VOCAB), seqs[:, 1:].reshape(-1))


def plain_pytorch_losses(cfg: TrainConfig) -> list[float]:
    model = build_model(cfg.model, VOCAB, SEQ, seed=cfg.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=cfg.betas, eps=1e-8, weight_decay=cfg.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, cfg.warmup_steps, cfg.steps, 0.1)
    )
    losses = []
    for seqs in batches():
        loss = step_loss(model, seqs)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses
