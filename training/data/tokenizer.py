"""Byte-level BPE tokenizers: train on a text stream, load, and identify by the sha256 of tokenizer.json."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from core.stage import StageConfig

EOS_TOKEN = "<|endoftext|>"


class TokenizerConfig(StageConfig):
    """Train a byte-level BPE (GPT-2 style) or load an existing tokenizer.json."""

    vocab_size: int = Field(8192, ge=300, description="Target vocabulary, 256 byte tokens included.")
    min_frequency: int = Field(2, ge=1, description="Pairs seen fewer times are not merged.")
    special_tokens: list[str] = Field(
        default_factory=lambda: [EOS_TOKEN], description="First is the EOS token."
    )
    path: str | None = Field(None, description="Existing tokenizer.json to use instead of training one.")
    train_sample_mb: float | None = Field(
        1024,
        gt=0,
        description="Train on a deterministic sample of about this much text: the documents whose "
        "sha256('tokenizer-sample:' + id) falls below sample / corpus size, so the same corpus gives the "
        "same sample and the trainer's memory stays bounded (null: every document).",
    )


def train_bpe(texts: Iterable[str], config: TokenizerConfig) -> Tokenizer:
    """Train a byte-level BPE by streaming ``texts`` (nothing is held beyond the trainer's counts)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=config.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path) -> tuple[Path, str]:
    """Write tokenizer.json; return its path and id (:func:`tokenizer_id`)."""
    path = Path(out_dir) / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path, tokenizer_id(path)


#: tokenizer.json fields that say how an encoding is finished (the special tokens a model family adds
#: around a text, padding, truncation), not how text becomes tokens.
FINISHING = ("post_processor", "padding", "truncation")


def tokenizer_id(path: str | Path) -> str:
    """The identity of a tokenizer: sha256 of its tokenizer.json without the :data:`FINISHING` fields,
    keys sorted. An exported model's tokenizer, which adds its family's post-processor, keeps the id of
    the shards' tokenizer it was trained on."""
    return canonical_id(Path(path).read_bytes())


def canonical_id(raw: bytes) -> str:
    """:func:`tokenizer_id` of a tokenizer.json's bytes."""
    data = json.loads(raw)
    for field in FINISHING:
        data.pop(field, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json file or a Hugging Face tokenizer directory containing one."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer file {path} does not exist; set tokenize.tokenizer.path to a tokenizer.json"
        )
    return Tokenizer.from_file(str(path))


def eos_id(tokenizer: Tokenizer, eos_token: str = EOS_TOKEN) -> int:
    """Id of the end-of-document token, with a clear error when the tokenizer lacks it."""
    token_id = tokenizer.token_to_id(eos_token)
    if token_id is None:
        raise ValueError(f"tokenizer has no {eos_token!r} token; add it to tokenize.tokenizer.special_tokens")
    return token_id
