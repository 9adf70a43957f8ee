"""The DeepSpeed boundary: the only module in lmforge that imports DeepSpeed."""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import torch

from core.files import atomic_path, atomic_write_bytes
from core.mappings import deep_merge
from training.config import EngineConfig
from training.schedule import warmup_cosine_scheduler

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402  (DS_ACCELERATOR must be set first)
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402


def build_ds_config(cfg: EngineConfig) -> dict[str, Any]:
    """DeepSpeed config generated from lmforge's validated config, with ``cfg.ds_config`` merged on top."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero["overlap_comm"] = cfg.overlaps_comm
    offload: dict[str, Any] = {"device": cfg.offload_device, "pin_memory": cfg.use_gpu}
    if cfg.offload_device == "nvme":
        offload["nvme_path"] = cfg.nvme_path
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = dict(offload)
    if cfg.offload_params:
        zero["offload_param"] = dict(offload)
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum_steps * cfg.num_workers,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": list(cfg.betas),
                "eps": 1e-8,
                "weight_decay": cfg.weight_decay,
                **_adam_implementation(cfg),
            },
        },
        "bf16": {"enabled": cfg.dtype == "bf16"},
        "fp16": {"enabled": cfg.dtype == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    override = dict(cfg.ds_config)
    # A different optimizer type brings its own params: replace ours instead of merging into them.
    if "optimizer" in override and override["optimizer"].get("type", "AdamW") != "AdamW":
        ds["optimizer"] = override.pop("optimizer")
    return deep_merge(ds, override)


def _adam_implementation(cfg: EngineConfig) -> dict[str, Any]:
    """torch's AdamW (its fused kernel on request, on CPU and CUDA: nothing for DeepSpeed to JIT-build),
    except for optimizer state offloaded from a GPU, where DeepSpeed's vectorized CPU Adam is the fast one."""
    if cfg.use_gpu and cfg.offload_optimizer:
        return {"torch_adam": False}
    return {"torch_adam": True, "fused": cfg.fuses_optimizer}


def initialize(model: torch.nn.Module, cfg: EngineConfig, param_groups: list[dict[str, Any]] | None = None):
    """Build the DeepSpeed engine (torch.distributed must already be initialized, or single-process env set).

    ``param_groups`` (torch optimizer groups, each may set its own ``lr``) default to one group of every
    trainable parameter. The learning-rate schedule is lmforge's warmup + cosine (training/schedule.py),
    which scales each group's own peak lr, unless the raw ds_config names a DeepSpeed scheduler.
    """
    ds = build_ds_config(cfg)
    schedule = None if "scheduler" in ds else partial(warmup_cosine_scheduler, cfg=cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups or [p for p in model.parameters() if p.requires_grad],
        config=ds,
        lr_scheduler=schedule,
    )
    if engine.zero_optimization_stage() == 0 and engine.dp_world_size == 1:
        # One data-parallel rank at ZeRO-0: the backward all-reduce would flatten, "reduce" over one
        # rank and copy back every gradient (about 3% of a small model's CPU step) for nothing.
        engine.enable_backward_allreduce = False
    if cfg.compiles:
        # In place (nn.Module.compile): parameter names, checkpoints and save_pretrained are unchanged.
        engine.compile()
    return engine


_META = "lmforge.json"


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, client_state: dict[str, Any], keep: int) -> Path:
    """DeepSpeed checkpoint tagged ``step{N}`` plus client state; older ones beyond ``keep`` are removed.

    Returns the checkpoint's directory (once every rank has written its part).
    """
    ckpt_dir = Path(ckpt_dir)
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    if engine.global_rank == 0:
        meta = {"world_size": engine.world_size, "zero_stage": engine.zero_optimization_stage(), "step": step}
        atomic_write_bytes(ckpt_dir / tag / _META, json.dumps(meta).encode())
        tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return ckpt_dir / tag


def rank_files(tag_dir: Path, rank: int) -> list[Path]:
    """The files of a checkpoint that ``rank`` wrote: its ZeRO partitions; rank 0 also the rest."""
    mine = f"zero_pp_rank_{rank}_"
    return sorted(
        f
        for f in tag_dir.iterdir()
        if f.is_file() and (mine in f.name or (rank == 0 and "zero_pp_rank_" not in f.name))
    )


def install_checkpoint(source: Path, ckpt_dir: Path, tag: str) -> None:
    """Copy a complete checkpoint (every rank's files) into ``ckpt_dir/tag`` and make it the latest."""
    with atomic_path(ckpt_dir / tag) as tmp:
        shutil.copytree(source, tmp)
    atomic_write_bytes(ckpt_dir / "latest", tag.encode())


def load_latest_checkpoint(engine, ckpt_dir: str | Path, cfg: EngineConfig) -> dict[str, Any] | None:
    """Load the newest checkpoint (DeepSpeed's ``latest`` file) and return its client state, or None.

    A checkpoint written with another world size or ZeRO stage fails here with what differs, before
    DeepSpeed tries to read partitions that do not exist.
    """
    latest = Path(ckpt_dir) / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    meta_path = Path(ckpt_dir) / tag / _META
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if (meta["world_size"], meta["zero_stage"]) != (engine.world_size, cfg.zero_stage):
            raise RuntimeError(
                f"{ckpt_dir}/{tag} was written by {meta['world_size']} workers with ZeRO-{meta['zero_stage']}; "
                f"this run has {engine.world_size} workers with ZeRO-{cfg.zero_stage}. Resume with the same "
                "num_workers and zero_stage, or start a fresh run (a new workdir, or delete the checkpoints)"
            )
    path, client_state = engine.load_checkpoint(str(ckpt_dir))
    if path is None:
        raise RuntimeError(f"{ckpt_dir}: 'latest' names a checkpoint DeepSpeed could not load")
    return client_state


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The full model weights in fp32 on rank 0, whatever the training precision; None on other ranks.

    Trained parameters come from the optimizer's fp32 master copy where it keeps one (ZeRO 1-3, bf16 and
    fp16 training: ``deepspeed.utils.safe_get_full_fp32_param``), else from the module itself; frozen ones
    from the module, gathered from their ZeRO-3 partitions. Collective: every rank must call it.
    """
    persistent = set(engine.module.state_dict())
    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                full = param.detach().clone()
        state[name] = full.detach().float().cpu()
    for name, buffer in engine.module.named_buffers():
        if name in persistent:
            state[name] = buffer.detach().clone().cpu()
    return state if engine.global_rank == 0 else None
