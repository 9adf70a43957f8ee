"""Validated training configuration; DeepSpeed's config is generated from it (training/engine.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from core.stage import StageConfig
from training.data.mixture import MixtureConfig
from training.labeled import LabeledDataConfig, Task
from training.model import OBJECTIVE_OF, ModelConfig
from training.objectives import MaskingConfig, Objective, SpanCorruptionConfig

#: Rank 0's latest step, in the training output dir, for the driver's progress bar.
PROGRESS_FILE = "progress.json"


class EngineConfig(StageConfig):
    """Optimization, parallelism and checkpointing of one run on the DeepSpeed engine: what pretraining
    (TrainConfig) and fine-tuning (training/finetune.py) share."""

    seq_len: int = Field(256, ge=8, description="Tokens per training sequence.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per worker per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    global_batch_size: int | None = Field(
        None, description="If set, must equal micro_batch_size * grad_accum_steps * num_workers."
    )
    steps: int = Field(100, ge=1, description="Optimizer steps.")
    lr: float = Field(6e-4, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio.")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0, description="Global gradient-norm clip (0 = off).")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 on GPU (weights and activations in bf16, fp32 master weights and optimizer "
        "state), fp32 on CPU.",
    )
    compile: bool | None = Field(
        None,
        description="torch.compile the model through DeepSpeed's engine.compile (null: on GPU at ZeRO <= 2).",
    )
    fused_optimizer: bool | None = Field(
        None, description="torch's fused AdamW kernel (one kernel for every parameter; null: on GPU)."
    )
    overlap_comm: bool | None = Field(
        None,
        description="Overlap ZeRO's gradient reduction (and ZeRO-3's parameter gathers) with the backward "
        "pass, micro-batch by micro-batch under gradient accumulation (null: on GPU at ZeRO >= 1).",
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO >= 1).")
    offload_params: bool = Field(False, description="Keep parameters in CPU memory (ZeRO 3 only).")
    num_workers: int = Field(1, ge=1, description="Data-parallel workers (one per GPU, or CPU processes).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: int = Field(
        1,
        ge=1,
        description="CPUs reserved per worker (torch's intra-op threads follow, via OMP_NUM_THREADS).",
    )
    seed: int = Field(0, description="Seed of init and data order.")
    checkpoint_every: int = Field(
        0, ge=0, description="Save a checkpoint every N steps (0: only at the end)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (and in storage_path).")
    storage_path: str | None = Field(
        None,
        description="Where Ray Train persists reported checkpoints: a local path or a pyarrow filesystem URI "
        "(s3://, gs://, hdfs://...); default <workdir>/train/ray_train.",
    )
    max_failures: int = Field(
        0, ge=0, description="Restart the workers from the last checkpoint this many times after a failure."
    )
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="Per-worker peak TFLOP/s for MFU (null: the device's dense bf16 peak where its name is "
        "known, training/flops.py).",
    )
    offload_device: Literal["cpu", "nvme"] = Field(
        "cpu", description="Where offload_optimizer / offload_params put their tensors."
    )
    nvme_path: str | None = Field(None, description="Local NVMe directory for offload_device='nvme'.")
    ds_config: dict[str, Any] = Field(default_factory=dict, description="Raw DeepSpeed config merged on top.")

    @model_validator(mode="after")
    def _consistent(self) -> EngineConfig:
        per_step = self.micro_batch_size * self.grad_accum_steps * self.num_workers
        if self.global_batch_size is not None and self.global_batch_size != per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} but micro_batch_size({self.micro_batch_size}) x "
                f"grad_accum_steps({self.grad_accum_steps}) x num_workers({self.num_workers}) = {per_step}"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3, got zero_stage={self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1, got zero_stage=0")
        if self.offload_device == "nvme" and not self.nvme_path:
            raise ValueError("offload_device='nvme' needs nvme_path (a directory on a local NVMe drive)")
        if self.offload_device == "nvme" and not (self.offload_optimizer or self.offload_params):
            raise ValueError(
                "offload_device='nvme' has nothing to offload: set offload_optimizer or offload_params"
            )
        if self.fp16_and_bf16:
            raise ValueError(
                "precision is one of fp32, bf16, fp16; a raw ds_config must not enable both fp16 and bf16"
            )
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be smaller than steps={self.steps}")
        return self

    @property
    def fp16_and_bf16(self) -> bool:
        raw = self.ds_config
        enabled = {k for k in ("fp16", "bf16") if isinstance(raw.get(k), dict) and raw[k].get("enabled")}
        if self.dtype != "fp32":
            enabled.add(self.dtype)
        return len(enabled) > 1

    @property
    def dtype(self) -> Literal["fp32", "bf16", "fp16"]:
        """The training precision, ``auto`` resolved: bf16 on GPU, fp32 on CPU."""
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision

    @property
    def compiles(self) -> bool:
        # ZeRO-3 swaps parameters for gathered ones around every module: dynamo's guards fail on each, it
        # recompiles past its limit (8) and runs those frames eagerly, so compile stays opt-in there.
        if self.compile is None:
            return self.use_gpu and self.zero_stage < 3
        return self.compile

    @property
    def fuses_optimizer(self) -> bool:
        return self.use_gpu if self.fused_optimizer is None else self.fused_optimizer

    @property
    def overlaps_comm(self) -> bool:
        if self.overlap_comm is None:
            return self.use_gpu and self.zero_stage >= 1
        return self.overlap_comm

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.num_workers * self.seq_len


class TrainConfig(EngineConfig):
    """Pretraining: the objective, the model and its data, on the engine's optimization and parallelism."""

    objective: Objective = Field(
        "causal_lm",
        description="causal_lm (next token, decoders), masked_lm (BERT/RoBERTa encoders) or span_corruption "
        "(T5 encoder-decoders).",
    )
    masking: MaskingConfig = Field(default_factory=MaskingConfig, description="masked_lm corruption.")
    span_corruption: SpanCorruptionConfig = Field(
        default_factory=SpanCorruptionConfig, description="span_corruption noise."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    init_from: str | None = Field(
        None, description="Fine-tune: a Hugging Face model directory to start from instead of random init."
    )
    freeze_layers: int = Field(
        0, ge=0, description="Fine-tune: freeze the embeddings and the first K transformer blocks."
    )
    span_documents: bool = Field(
        True, description="Pack documents across sequence boundaries (else windows inside one document)."
    )
    document_masking: bool = Field(
        False,
        description="causal_lm with span_documents: position ids restart after each end-of-document token "
        "and attention stays inside each document (transformers' packed-sequence masks; sdpa, eager, flash).",
    )
    verify_shards: Literal["never", "first_open", "always"] = Field(
        "first_open",
        description="Hash token shards against index.json: never, once per change, or every open.",
    )
    eval_every: int = Field(
        0,
        ge=0,
        description="Score eval_tasks (first eval_limit examples each) and the held-out split on the "
        "training workers every N steps, logged at the step as eval/<task>/<metric> (0: off).",
    )
    eval_tasks: list[str] = Field(
        default_factory=list,
        description="Tasks for eval_every: built-in names or task files (default: evaluate.tasks).",
    )
    eval_limit: int = Field(
        100, ge=1, description="Examples per task, and held-out sequences, of each periodic evaluation."
    )
    mixture: MixtureConfig | None = Field(
        None,
        description="Train on the sources by token share, on a schedule (training/data/mixture.py); null: "
        "every shard of the tokens stage in one shuffled pool.",
    )

    @model_validator(mode="after")
    def _objective_fits(self) -> TrainConfig:
        if self.freeze_layers and not self.init_from:
            raise ValueError(
                f"freeze_layers={self.freeze_layers} only applies when fine-tuning (set init_from)"
            )
        if not self.init_from and OBJECTIVE_OF[self.model.arch] != self.objective:
            fits = ", ".join(a for a, o in OBJECTIVE_OF.items() if o == self.objective)
            raise ValueError(
                f"train.objective={self.objective} trains {fits} models, but train.model.arch={self.model.arch}"
            )
        if self.document_masking and (self.objective != "causal_lm" or not self.span_documents):
            raise ValueError(
                "train.document_masking separates the documents packed into one causal_lm sequence: it needs "
                f"objective=causal_lm and span_documents=true (got objective={self.objective}, "
                f"span_documents={str(self.span_documents).lower()})"
            )
        if self.mixture is not None:
            self.mixture.phases(self.steps)  # phase starts inside the run, in order
        if self.objective != "causal_lm" and self.eval_every:
            raise ValueError(
                f"train.eval_every scores causal-LM tasks; train.objective={self.objective} has none (set it to 0)"
            )
        if self.objective == "masked_lm" and self.masking.next_sentence_prediction:
            if self.model.arch != "bert" and not self.init_from:
                raise ValueError(
                    "train.masking.next_sentence_prediction needs train.model.arch=bert (RoBERTa has no NSP head)"
                )
            if self.seq_len < 8:
                raise ValueError("next-sentence prediction needs seq_len >= 8")
        return self


class LoraConfig(StageConfig):
    """LoRA adapters (defaults: peft's LoraConfig; target modules: peft's per-architecture mapping)."""

    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: int = Field(8, ge=1, description="Scaling numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None,
        description="Module names to adapt (default: peft's choice for the architecture, e.g. query/value).",
    )


class FinetuneConfig(EngineConfig):
    """A fine-tuning run: task, base model, labeled data, strategy; optimization as in pretraining.

    Defaults for the optimizer follow Hugging Face Trainer / BERT fine-tuning (lr 5e-5, AdamW betas 0.9/0.999,
    weight decay 0.01, no warmup) with lmforge's cosine decay.
    """

    task: Task = Field("classification", description="classification, multi_label or seq2seq.")
    init_from: str | None = Field(
        None,
        description="Base model: a Hugging Face model directory (default in a pipeline: the model its train "
        "stage exported).",
    )
    data: LabeledDataConfig = Field(description="The labeled examples: source, columns, split.")
    seq_len: int = Field(128, ge=8, description="Input tokens per example (truncated, padded).")
    target_len: int = Field(64, ge=2, description="seq2seq: target tokens per example (truncated).")
    micro_batch_size: int = Field(16, ge=1, description="Examples per worker per forward pass.")
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (of the head, with layer_decay).")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    freeze_embeddings: bool = Field(False, description="Keep the token (and position) embeddings fixed.")
    freeze_layers: int = Field(0, ge=0, description="Keep the first K transformer blocks fixed.")
    freeze: Literal["none", "encoder", "decoder"] = Field(
        "none", description="Encoder-decoders: keep the whole encoder or decoder fixed."
    )
    layer_decay: float = Field(
        1.0, gt=0, le=1, description="Layer-wise lr decay per block from the top (1: off)."
    )
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters instead of the weights.")
    class_weights: Literal["none", "balanced"] | list[float] = Field(
        "none",
        description="Loss weights per class: balanced (n / (classes * count), scikit-learn's rule; multi_label: "
        "positive weight negatives / positives per label) or one weight per class.",
    )
    threshold: float = Field(
        0.5, gt=0, lt=1, description="multi_label: a label is predicted above this probability."
    )
    max_new_tokens: int = Field(64, ge=1, description="seq2seq evaluation: greedy decoding length.")

    @model_validator(mode="after")
    def _strategy_fits(self) -> FinetuneConfig:
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError(
                "finetune.lora with zero_stage 3 is not supported: use zero_stage 0-2 (adapters are small)"
            )
        if self.lora is not None and (self.freeze_layers or self.freeze_embeddings or self.freeze != "none"):
            raise ValueError("finetune.lora already freezes every base weight: drop freeze_* / freeze")
        if self.task == "seq2seq" and self.class_weights != "none":
            raise ValueError("finetune.class_weights applies to classification tasks, not seq2seq")
        return self
