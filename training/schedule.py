"""Learning-rate schedule: linear warmup then cosine decay to ``lr * min_lr_ratio`` (as in nanoGPT)."""

from __future__ import annotations

import math

import torch

from training.config import EngineConfig


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, cfg: EngineConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over ``lr_multiplier``; its state_dict travels in DeepSpeed checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    )
