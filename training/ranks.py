"""This process's place among the ranks of torch.distributed, and the collectives lmforge's loops use
(each works outside torch.distributed too, as the one rank of one)."""

from __future__ import annotations

from typing import Any

import torch


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def mean_across_ranks(value: float) -> float:
    """The mean of ``value`` over every rank (in float64)."""
    if not torch.distributed.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t.item()) / torch.distributed.get_world_size()


def all_ranks(value: Any) -> list[Any]:
    """``value`` from every rank, in rank order (this rank's alone outside torch.distributed)."""
    if not torch.distributed.is_initialized():
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
