"""The DeepSpeed boundary: the only module in lmforge that imports DeepSpeed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

from core.files import atomic_path, atomic_write_bytes, file_sha256
from core.mappings import deep_merge
from training.config import EngineConfig
from training.ranks import all_ranks
from training.schedule import warmup_cosine_scheduler

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _import_deepspeed():
    """DeepSpeed, imported without MLflow: its autotuner (never used here) imports MLflow when it is installed,
    a second of CPU in every training worker. MLflow imports normally afterwards."""
    blocked = "mlflow" not in sys.modules
    if blocked:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError meanwhile
    try:
        import deepspeed
    finally:
        if blocked and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed


deepspeed = _import_deepspeed()  # DS_ACCELERATOR must be set first
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

_ds_torch_backend = sys.modules.get("deepspeed.comm.torch")
if not torch.cuda.is_available() and hasattr(_ds_torch_backend, "build_shm_op"):
    # On CPU, DeepSpeed's torch backend JIT-compiles a shared-memory all-reduce (deepspeed_shm_comm) when it
    # starts: 40-80 s of C++ on a fresh machine (and again whenever the environment's path changes), then a
    # "built successfully" line per worker. Only inference_all_reduce (tensor-parallel inference) uses it;
    # training's collectives go through torch.distributed (gloo) and are unchanged without it.
    _ds_torch_backend.build_shm_op = lambda: None


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
#: Where a checkpoint that failed its manifest goes (not ``step*``: pruning and loading never see it).
SET_ASIDE_PREFIX = "corrupt-"


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, client_state: dict[str, Any], keep: int) -> Path:
    """DeepSpeed checkpoint tagged ``step{N}`` plus client state; older ones beyond ``keep`` are removed.

    Each rank hashes the files it wrote; rank 0 writes them all (name, bytes, sha256) with the world size
    and ZeRO stage into ``lmforge.json``, last: a checkpoint without it was never finished, one whose
    files differ from it is not loaded (:func:`load_latest_checkpoint`). Returns the checkpoint's
    directory (once every rank has written its part).
    """
    ckpt_dir = Path(ckpt_dir)
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    mine = {
        f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
        for f in rank_files(ckpt_dir / tag, engine.global_rank)
        if f.name != _META
    }
    files = {name: entry for part in all_ranks(mine) for name, entry in part.items()}
    if engine.global_rank == 0:
        meta = {
            "world_size": engine.world_size,
            "zero_stage": engine.zero_optimization_stage(),
            "step": step,
            "files": dict(sorted(files.items())),
        }
        atomic_write_bytes(ckpt_dir / tag / _META, json.dumps(meta, indent=1).encode())
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


def verify_checkpoint(tag_dir: Path) -> str | None:
    """What is wrong with a checkpoint against its manifest (the first file missing, of another size or
    another sha256), or None. A checkpoint written before manifests listed files cannot be checked: None."""
    meta_path = tag_dir / _META
    if not meta_path.is_file():
        return f"{tag_dir} has no {_META}: it was never finished"
    try:
        files = json.loads(meta_path.read_text()).get("files")
    except (OSError, ValueError) as e:
        return f"{meta_path} cannot be read: {e}"
    for name, entry in (files or {}).items():
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if (size := path.stat().st_size) != entry["bytes"]:
            return f"{path} has {size} bytes, {entry['bytes']} when it was written"
        if file_sha256(path) != entry["sha256"]:
            return f"{path} changed after it was written (sha256 {entry['sha256'][:12]}... expected)"
    return None


def _checkpoint_to_load(ckpt_dir: Path) -> str | None:
    """The tag to resume from: ``latest`` if it matches its manifest on every rank, else the newest earlier
    one that does. Each that does not is set aside (renamed ``corrupt-<tag>``) with a warning naming the
    file; with none left, ``latest`` is removed and None returned (the run starts over)."""
    tag = (ckpt_dir / "latest").read_text().strip()
    while True:
        problems = [p for p in all_ranks(verify_checkpoint(ckpt_dir / tag)) if p is not None]
        if not problems:
            return tag
        aside = ckpt_dir / f"{SET_ASIDE_PREFIX}{tag}"
        if (ckpt_dir / tag).exists():  # every rank tries: node-local disks each hold a copy
            with contextlib.suppress(OSError):
                os.replace(ckpt_dir / tag, aside)
        earlier = sorted(
            (p.name for p in ckpt_dir.glob("step*") if p.is_dir() and p.name < tag), reverse=True
        )
        # Agree on the next candidate: every rank sees the same names on a shared disk, the fewest decide.
        candidates = min(all_ranks(earlier), key=len)
        then = f"resuming from {candidates[0]}" if candidates else "starting over from step 0"
        print(f"checkpoint {tag} set aside as {aside}: {problems[0]}; {then}", flush=True)
        if not candidates:
            with contextlib.suppress(FileNotFoundError):
                (ckpt_dir / "latest").unlink()
            return None
        tag = candidates[0]
        atomic_write_bytes(ckpt_dir / "latest", tag.encode())


def load_latest_checkpoint(engine, ckpt_dir: str | Path, cfg: EngineConfig) -> dict[str, Any] | None:
    """Load the newest checkpoint that matches its manifest and return its client state, or None.

    A checkpoint whose files changed after they were written is set aside and the one before it is used
    (:func:`_checkpoint_to_load`). One written with another world size or ZeRO stage fails here with what
    differs, before DeepSpeed tries to read partitions that do not exist.
    """
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "latest").exists():
        return None
    tag = _checkpoint_to_load(ckpt_dir)
    if tag is None:
        return None
    meta_path = ckpt_dir / tag / _META
    meta = json.loads(meta_path.read_text())
    if (meta["world_size"], meta["zero_stage"]) != (engine.world_size, cfg.zero_stage):
        raise RuntimeError(
            f"{ckpt_dir}/{tag} was written by {meta['world_size']} workers with ZeRO-{meta['zero_stage']}; "
            f"this run has {engine.world_size} workers with ZeRO-{cfg.zero_stage}. Resume with the same "
            "num_workers and zero_stage, or start a fresh run (a new workdir, or delete the checkpoints)"
        )
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"{ckpt_dir}/{tag}: DeepSpeed could not load this checkpoint")
    return {**client_state, "checkpoint": {"tag": tag, "verified": "files" in meta}}


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
