"""Language models built from a transformers config with random init: decoders (GPT-2, Llama), encoders
(BERT, RoBERTa) and encoder-decoders (T5).

The model is a plain Hugging Face ``PreTrainedModel`` so that export is ``save_pretrained`` and the matching
``AutoModelFor...`` class loads it. It knows nothing about how it is parallelized.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from core.stage import StageConfig
from training.objectives import Objective, SpecialIds

if TYPE_CHECKING:  # torch and transformers load where a model is built, not with the config
    import torch
    from transformers import PreTrainedModel

Arch = Literal["gpt2", "llama", "bert", "roberta", "t5"]
#: The objective each architecture family pretrains with.
OBJECTIVE_OF: dict[str, Objective] = {
    "gpt2": "causal_lm",
    "llama": "causal_lm",
    "bert": "masked_lm",
    "roberta": "masked_lm",
    "t5": "span_corruption",
}

#: (layers, heads, width) per preset; GPT-2 sizes from Radford et al. 2019, 1.3B/7B from GPT-3/Llama.
PRESETS: dict[str, tuple[int, int, int]] = {
    "debug": (2, 2, 64),
    "124m": (12, 12, 768),
    "350m": (24, 16, 1024),
    "1.3b": (24, 32, 2048),
    "7b": (32, 32, 4096),
}


class ModelConfig(StageConfig):
    """Architecture and size of the model."""

    arch: Arch = Field(
        "gpt2",
        description="gpt2 (learned positions) or llama (RoPE, SwiGLU) decoders for causal_lm; bert or roberta "
        "encoders for masked_lm; t5 (relative positions, as many decoder as encoder layers) for span_corruption.",
    )
    preset: Literal["debug", "124m", "350m", "1.3b", "7b"] = Field("debug", description="Size preset.")
    n_layer: int | None = Field(None, ge=1, description="Override the preset's layer count.")
    n_head: int | None = Field(None, ge=1, description="Override the preset's attention heads.")
    n_embd: int | None = Field(None, ge=8, description="Override the preset's hidden width.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout (0 for pretraining, as in nanoGPT).")
    activation_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = Field(
        "sdpa",
        description="Attention kernel: sdpa (torch's scaled_dot_product_attention, flash / memory-efficient "
        "kernels on GPU), eager (the reference matmuls), flash_attention_2 (needs the flash-attn package) or "
        "flex_attention.",
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        n_layer, n_head, n_embd = self.dims()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not divisible by n_head={n_head}")
        return self

    def dims(self) -> tuple[int, int, int]:
        layers, heads, width = PRESETS[self.preset]
        return self.n_layer or layers, self.n_head or heads, self.n_embd or width


def build_model(
    config: ModelConfig,
    vocab_size: int,
    seq_len: int,
    seed: int = 0,
    eos_token_id: int | None = None,
    special: SpecialIds | None = None,
    next_sentence_prediction: bool = False,
) -> PreTrainedModel:
    """A randomly initialized model of ``config.arch``; the same seed gives the same weights.

    Decoders: ``eos_token_id`` (the tokenizer's end-of-document id) becomes the model's bos/eos/pad id so that
    generation from the exported model stops where training documents ended. Encoders and encoder-decoders
    take their pad/cls/sep ids from ``special``; T5's decoder starts from pad, as in the reference.
    """
    import torch
    import transformers

    n_layer, n_head, n_embd = config.dims()
    torch.manual_seed(seed)
    if config.arch in ("bert", "roberta", "t5") and special is None:
        raise ValueError(f"model.arch={config.arch} needs the tokenizer's special token ids")
    if config.arch == "gpt2":
        special_ids = {
            "bos_token_id": eos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": eos_token_id,
        }
        hf_config = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_positions=seq_len,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            **special_ids,
        )
        model = transformers.GPT2LMHeadModel(hf_config)
    elif config.arch == "llama":
        special_ids = {
            "bos_token_id": eos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": eos_token_id,
        }
        hidden = 256 * ((8 * n_embd // 3 + 255) // 256)  # SwiGLU width, rounded as in Llama
        hf_config = transformers.LlamaConfig(
            vocab_size=vocab_size,
            max_position_embeddings=seq_len,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            hidden_size=n_embd,
            intermediate_size=hidden,
            attention_dropout=config.dropout,
            **special_ids,
        )
        model = transformers.LlamaForCausalLM(hf_config)
    elif config.arch in ("bert", "roberta"):
        roberta = config.arch == "roberta"
        common = dict(
            vocab_size=vocab_size,
            hidden_size=n_embd,
            num_hidden_layers=n_layer,
            num_attention_heads=n_head,
            intermediate_size=4 * n_embd,
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout,
            pad_token_id=special.pad,
            bos_token_id=special.cls,
            eos_token_id=special.sep,
        )
        if roberta:  # positions start after padding_idx, as in fairseq's RoBERTa
            model = transformers.RobertaForMaskedLM(
                transformers.RobertaConfig(max_position_embeddings=seq_len + 2, type_vocab_size=1, **common)
            )
        else:
            hf_config = transformers.BertConfig(max_position_embeddings=seq_len, type_vocab_size=2, **common)
            model = (
                transformers.BertForPreTraining(hf_config)
                if next_sentence_prediction
                else transformers.BertForMaskedLM(hf_config)
            )
    else:
        hf_config = transformers.T5Config(
            vocab_size=vocab_size,
            d_model=n_embd,
            d_kv=n_embd // n_head,
            d_ff=4 * n_embd,
            num_layers=n_layer,
            num_decoder_layers=n_layer,
            num_heads=n_head,
            dropout_rate=config.dropout,
            pad_token_id=special.pad,
            eos_token_id=special.eos,
            decoder_start_token_id=special.pad,
        )
        model = transformers.T5ForConditionalGeneration(hf_config)
    return apply_model_switches(model, config)


def apply_model_switches(model: PreTrainedModel, config: ModelConfig) -> PreTrainedModel:
    """The attention kernel and activation checkpointing of ``config`` on a built or loaded model."""
    try:
        model.set_attn_implementation(config.attn_implementation)
    except (ImportError, ValueError) as e:
        raise ValueError(
            f"model.attn_implementation={config.attn_implementation} is not available for "
            f"{type(model).__name__} here: {e}"
        ) from e
    if config.activation_checkpointing:
        # transformers >= 5 renamed gradient_checkpointing_enable (kept as a deprecated alias).
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    return model


def count_parameters(model: torch.nn.Module, exclude_embeddings: bool = True) -> int:
    """Parameters for the 6N FLOPs rule: those in the model's matmuls.

    Embeddings are lookups and are left out, except an input embedding tied to the output head, whose
    matmul it is (nanoGPT's and llm-foundry's count: GPT-2 124M has 123.65M). Shared tensors count once.
    """
    import torch

    total = sum(p.numel() for p in model.parameters())
    if not exclude_embeddings:
        return total
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    lookups = {
        id(m.weight): m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding) and m.weight is not head_weight
    }
    return total - sum(lookups.values())


def load_pretrained(
    path: str, vocab_size: int, objective: Objective = "causal_lm", next_sentence_prediction: bool = False
) -> PreTrainedModel:
    """A Hugging Face model directory to continue training (fp32 weights; the shards' vocab must fit)."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForPreTraining,
        AutoModelForSeq2SeqLM,
    )

    auto = {
        "causal_lm": AutoModelForCausalLM,
        "masked_lm": AutoModelForPreTraining if next_sentence_prediction else AutoModelForMaskedLM,
        "span_corruption": AutoModelForSeq2SeqLM,
    }[objective]
    model = auto.from_pretrained(path, dtype=torch.float32)
    if model.config.vocab_size < vocab_size:
        raise ValueError(
            f"{path}: the model's vocabulary has {model.config.vocab_size} ids, the token shards use "
            f"{vocab_size}; tokenize with the model's tokenizer (tokenize.tokenizer.path={path})"
        )
    return model


def freeze_first_layers(model: PreTrainedModel, k: int) -> int:
    """Freeze the input embeddings and the first ``k`` transformer blocks; returns parameters frozen."""
    if k == 0:
        return 0
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    if k > len(blocks):
        raise ValueError(f"freeze_layers={k} but the model has {len(blocks)} layers")
    frozen = [*model.get_input_embeddings().parameters(), *(p for b in blocks[:k] for p in b.parameters())]
    if hasattr(model, "transformer"):
        frozen.extend(model.transformer.wpe.parameters())
    tied = {id(p) for p in model.get_output_embeddings().parameters()}
    count = 0
    for p in frozen:
        if id(p) not in tied:  # a tied LM head keeps training the shared matrix
            p.requires_grad_(False)
            count += p.numel()
    return count
