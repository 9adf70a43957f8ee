"""Fine-tuning on the real DeepSpeed engine (one gloo rank): classifiers beat the majority baseline, frozen
weights stay bit-identical, LoRA trains only adapters and merges exactly, layer-wise decay reaches the
optimizer, seq2seq exports a model that generates, labeled data reads from every format."""

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from sklearn.utils.class_weight import compute_class_weight

from training.data.tokenizer import EOS_TOKEN, TokenizerConfig, save_tokenizer, train_bpe
from training.finetune import (
    FinetuneConfig,
    apply_freezing,
    build_task_model,
    class_weights,
    finetune,
    layer_ids,
    param_groups,
)
from training.labeled import LabeledDataConfig, label_names, load_labeled, row_split
from training.model import ModelConfig, build_model
from training.objectives import SENTINELS, SpecialIds, special_tokens_for
from training.schedule import lr_multiplier
from training.trainer import export_tokenizer

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "valley",
    "mill",
    "water",
    "light",
    "shadow",
    "bridge",
    "market",
]


def _rows(n: int, seed: int = 0) -> list[dict]:
    """Separable: the label is which of two marker words the text contains."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(8)]
        marker = "river" if i % 2 else "stone"
        words.insert(rng.randint(0, 8), marker)
        rows.append(
            {"text": " ".join(words), "label": ["neg", "pos"][i % 2], "target": f"{marker} {words[0]}"}
        )
    return rows


@pytest.fixture(scope="module")
def labeled(tmp_path_factory):
    path = tmp_path_factory.mktemp("labeled") / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows(480)) + "\n")
    return path


def _base(root, arch: str, objective: str):
    """A random-init base model with an lmforge tokenizer, exported as a Hugging Face directory."""
    texts = [r["text"] for r in _rows(200, seed=1)]
    specials = [EOS_TOKEN, *special_tokens_for(objective)]
    tok_path, tok_id = save_tokenizer(
        train_bpe(texts, TokenizerConfig(vocab_size=400, min_frequency=1, special_tokens=specials)),
        root / "tok",
    )
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    ids = SpecialIds.from_tokenizer(tok, objective, EOS_TOKEN)
    model = build_model(
        ModelConfig(arch=arch, n_embd=32, n_head=2),
        tok.get_vocab_size(),
        32,
        seed=3,
        special=ids,
        eos_token_id=ids.eos,
    )
    out = root / arch
    model.save_pretrained(out)
    export_tokenizer(tok_path, {"id": tok_id}, out, objective)
    return out


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory):
    return _base(tmp_path_factory.mktemp("bert"), "bert", "masked_lm")


@pytest.fixture(scope="module")
def t5_base(tmp_path_factory):
    return _base(tmp_path_factory.mktemp("t5"), "t5", "span_corruption")


def _cfg(base, labeled, **fields) -> FinetuneConfig:
    return FinetuneConfig.model_validate(
        {
            "init_from": str(base),
            "data": {"path": str(labeled), "test_fraction": 0.2, **fields.pop("data", {})},
            "seq_len": 24,
            "steps": 60,
            "warmup_steps": 5,
            "lr": 5e-3,
            "micro_batch_size": 16,
            "zero_stage": 2,
            **fields,
        }
    )


def _accuracy(model_dir, cfg) -> tuple[float, float]:
    """Test accuracy of the exported model (loaded by transformers) and the majority baseline."""
    from transformers import AutoModelForSequenceClassification

    from training.finetune import encode_split, load_tokenizer_of

    tables, features, _ = load_labeled(cfg.data, cfg.task)
    names = label_names(cfg.data, tables["train"], features, cfg.task)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    test = encode_split(tables["test"], cfg, load_tokenizer_of(model_dir), model.config, names, "test")
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v) for k, v in test.items() if k != "labels"}).logits
    labels = test["labels"]
    majority = np.bincount(labels).max() / labels.size
    return float((logits.argmax(-1).numpy() == labels).mean()), float(majority)


@pytest.mark.integration
def test_classifier_beats_the_majority_baseline(single_process_dist, bert_base, labeled, tmp_path):
    cfg = _cfg(bert_base, labeled)
    summary = finetune(cfg, tmp_path / "ft", print_progress=False)
    assert summary["label_names"] == ["neg", "pos"] and summary["examples"]["test"] > 60
    accuracy, majority = _accuracy(summary["model_dir"], cfg)
    assert accuracy >= majority + 0.3, (accuracy, majority)
    assert json.loads((tmp_path / "ft" / "model" / "config.json").read_text())["id2label"] == {
        "0": "neg",
        "1": "pos",
    }


@pytest.mark.integration
def test_frozen_weights_stay_bit_identical(single_process_dist, bert_base, labeled, tmp_path):
    cfg = _cfg(bert_base, labeled, steps=8, freeze_embeddings=True, freeze_layers=1)
    summary = finetune(cfg, tmp_path / "ft", print_progress=False)
    before = load_file(bert_base / "model.safetensors")
    after = load_file(tmp_path / "ft" / "model" / "model.safetensors")
    frozen = [k for k in before if k.startswith(("bert.embeddings.", "bert.encoder.layer.0."))]
    trained = [k for k in before if k.startswith("bert.encoder.layer.1.") and k.endswith("weight")]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained)
    assert summary["frozen_parameters"] == sum(before[k].numel() for k in frozen)


@pytest.mark.integration
def test_lora_trains_only_adapters_and_the_merged_export_is_base_plus_adapter(
    single_process_dist,
    bert_base,
    labeled,
    tmp_path,
):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg = _cfg(bert_base, labeled, steps=10, lora={"r": 4, "alpha": 8})
    summary = finetune(cfg, tmp_path / "ft", print_progress=False)
    adapter = load_file(tmp_path / "ft" / "adapter" / "adapter_model.safetensors")
    lora_numel = sum(v.numel() for k, v in adapter.items() if "lora_" in k)
    # The head and the pooler (new: the masked-LM base has none) are trained and saved in full.
    new_numel = sum(v.numel() for k, v in adapter.items() if "classifier" in k or "pooler" in k)
    assert lora_numel and new_numel and summary["trainable_parameters"] == lora_numel + new_numel
    assert {k.split(".lora_")[0].rsplit(".", 1)[1] for k in adapter if "lora_" in k} == {"query", "value"}

    # By hand: W' = W + (alpha / r) * B @ A for each adapted layer, the base weight unchanged elsewhere.
    base = load_file(bert_base / "model.safetensors")
    merged = load_file(tmp_path / "ft" / "model" / "model.safetensors")
    name = "bert.encoder.layer.1.attention.self.query.weight"
    a = next(v for k, v in adapter.items() if "layer.1.attention.self.query.lora_A" in k)
    b = next(v for k, v in adapter.items() if "layer.1.attention.self.query.lora_B" in k)
    assert torch.allclose(merged[name], base[name] + (8 / 4) * b @ a, atol=1e-6)
    key = "bert.encoder.layer.1.attention.self.key.weight"
    assert torch.equal(merged[key], base[key])

    # peft's own composition of base + adapter gives the merged model's logits on a probe input.
    probe = torch.tensor([[3, 40, 50, 60, 4]])
    base_model = AutoModelForSequenceClassification.from_pretrained(bert_base, num_labels=2)
    composed = PeftModel.from_pretrained(base_model, tmp_path / "ft" / "adapter").eval()
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ft" / "model").eval()
    with torch.no_grad():
        assert torch.allclose(composed(input_ids=probe).logits, exported(input_ids=probe).logits, atol=1e-5)


@pytest.mark.integration
def test_layer_wise_decay_gives_each_layer_its_learning_rate(single_process_dist, bert_base, labeled):
    from training import engine as ds_engine

    cfg = _cfg(bert_base, labeled, steps=10, warmup_steps=0, layer_decay=0.5, lr=1e-3)
    model = build_task_model(cfg, ["neg", "pos"])
    ids, depth = layer_ids(model)
    assert depth == 2
    # By hand (2 blocks): head 1e-3, block 2 5e-4, block 1 2.5e-4, embeddings 1.25e-4.
    assert ids["bert.embeddings.word_embeddings.weight"] == 0
    assert ids["bert.encoder.layer.0.attention.self.query.weight"] == 1
    assert ids["bert.encoder.layer.1.output.dense.bias"] == 2
    assert ids["classifier.weight"] == 3
    groups = param_groups(model, cfg)
    group_of = {id(p): g["name"] for g in groups for p in g["params"]}
    assert group_of[id(model.bert.encoder.layer[0].intermediate.dense.weight)] == "layer1"
    assert group_of[id(model.classifier.bias)] == "layer3"
    engine = ds_engine.initialize(model, cfg, groups)
    batch = {"input_ids": torch.randint(5, 300, (4, 12)), "labels": torch.tensor([0, 1, 0, 1])}
    loss = torch.nn.functional.cross_entropy(engine(input_ids=batch["input_ids"]).logits, batch["labels"])
    engine.backward(loss)
    engine.step()
    multiplier = lr_multiplier(1, 0, 10, 0.0)  # the schedule after one step
    lrs = {g["name"]: g["lr"] for g in engine.optimizer.param_groups}
    expected = {"layer3": 1e-3, "layer2": 5e-4, "layer1": 2.5e-4, "layer0": 1.25e-4}
    assert lrs == pytest.approx({k: v * multiplier for k, v in expected.items()})


@pytest.mark.integration
def test_seq2seq_fine_tuning_exports_a_model_that_generates(single_process_dist, t5_base, labeled, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    cfg = _cfg(t5_base, labeled, task="seq2seq", steps=40, data={"target_column": "target"}, target_len=8)
    summary = finetune(cfg, tmp_path / "ft", print_progress=False)
    assert summary["losses"][-1] < summary["losses"][0] - 1.0
    model = AutoModelForSeq2SeqLM.from_pretrained(summary["model_dir"]).eval()
    tok = AutoTokenizer.from_pretrained(summary["model_dir"])
    sentinels = (
        getattr(tok, "extra_special_tokens", None) or tok.additional_special_tokens
    )  # transformers 5 / 4
    assert len(sentinels) == SENTINELS
    inputs = tok(["alpha river beta gamma"], return_tensors="pt", add_special_tokens=False)
    ids = torch.cat([inputs["input_ids"], torch.tensor([[tok.eos_token_id]])], dim=1)
    out = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    assert tok.decode(out[0], skip_special_tokens=True).strip().startswith("river")


@pytest.mark.unit
def test_freezing_the_encoder_of_an_encoder_decoder(t5_base, labeled):
    cfg = _cfg(t5_base, labeled, task="seq2seq", freeze="encoder", data={"target_column": "target"})
    model = build_task_model(cfg, [])
    apply_freezing(model, cfg)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("encoder."))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("decoder."))
    # T5ForSequenceClassification keeps its stacks under "transformer.": the same rule applies.
    cls_cfg = _cfg(t5_base, labeled, freeze="decoder")
    classifier = build_task_model(cls_cfg, ["neg", "pos"])
    frozen = apply_freezing(classifier, cls_cfg)
    decoder = {n: p for n, p in classifier.named_parameters() if n.startswith("transformer.decoder.")}
    assert decoder and all(not p.requires_grad for p in decoder.values())
    assert frozen == sum(p.numel() for p in decoder.values())


@pytest.mark.unit
def test_class_weights_are_scikit_learns_balanced():
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    cfg = FinetuneConfig(init_from="x", data={"path": "x.jsonl"}, class_weights="balanced")
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    assert class_weights(cfg, labels, 3).numpy() == pytest.approx(expected)


@pytest.mark.unit
def test_labeled_data_reads_every_format_with_the_same_split(tmp_path, labeled):
    rows = _rows(200)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "rows.parquet")
    (tmp_path / "rows.csv").write_text(
        "text,label,target\n" + "\n".join(f"{r['text']},{r['label']},{r['target']}" for r in rows)
    )
    # An HF save_to_disk directory: Arrow stream file, state.json, dataset_info.json with ClassLabel names.
    hf = tmp_path / "hf"
    hf.mkdir()
    ints = pa.table(
        {"sentence": [r["text"] for r in rows], "label": [int(r["label"] == "pos") for r in rows]}
    )
    with pa.ipc.new_stream(hf / "data-00000-of-00001.arrow", ints.schema) as w:
        w.write_table(ints)
    (hf / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (hf / "dataset_info.json").write_text(
        json.dumps({"features": {"label": {"names": ["negative", "positive"]}}})
    )

    splits = {}
    for source in ["rows.parquet", "rows.csv"]:
        cfg = LabeledDataConfig(path=str(tmp_path / source))
        tables, _, _ = load_labeled(cfg, "classification")
        splits[source] = tables["test"].column("text").to_pylist()
        assert sum(t.num_rows for t in tables.values()) == 200
    assert splits["rows.parquet"] == splits["rows.csv"] and splits["rows.csv"]
    cfg = LabeledDataConfig(path=str(hf), text_column="sentence")
    tables, features, _ = load_labeled(cfg, "classification")
    assert label_names(cfg, tables["train"], features, "classification") == ["negative", "positive"]
    # The split of a row is a function of its content and the seed only.
    assert (
        list(row_split(["a", "b", "c"], 0, 0.3, 0.3)) == list(row_split(["c", "b", "a"], 0, 0.3, 0.3))[::-1]
    )


@pytest.mark.unit
def test_labeled_data_errors_name_the_file_and_column(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 0}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        load_labeled(LabeledDataConfig(path=str(bad)), "classification")
    bad.write_text('{"sentence": "a", "label": 0}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: no column text; its columns are sentence, label"):
        load_labeled(LabeledDataConfig(path=str(bad)), "classification")
    with pytest.raises(ValueError, match="finetune.lora with zero_stage 3"):
        FinetuneConfig(init_from="x", data={"path": "x.jsonl"}, lora={}, zero_stage=3)


@pytest.mark.unit
def test_rows_without_text_or_label_are_rejected_with_the_reason_and_unknown_labels_named(tmp_path):
    """Empty, whitespace-only, null or missing text and a null label leave the row out (in = kept +
    rejected; no class named 'None'); a validation/test label the train split lacks is an error naming the
    file, the row and the label before anything trains."""
    good = [{"text": f"sentence number {i}", "label": ["neg", "pos"][i % 2]} for i in range(40)]
    bad = [{"text": "", "label": "pos"}, {"text": "   \n", "label": "neg"}, {"text": None, "label": "pos"},
           {"label": "neg"}, {"text": "a label is missing", "label": None}]  # fmt: skip
    data = tmp_path / "rows.jsonl"
    rows = good[:10] + bad + good[10:]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = LabeledDataConfig(path=str(data))
    tables, features, rejected = load_labeled(cfg, "classification")
    assert sum(t.num_rows for t in tables.values()) + rejected.num_rows == len(rows)
    assert sorted(zip(rejected.column("row").to_pylist(), rejected.column("reason").to_pylist())) == [
        (11, "text is empty"), (12, "text is only whitespace"), (13, "text is null"), (14, "text is null"),
        (15, "label is null"),
    ]  # fmt: skip
    assert set(rejected.column("source").to_pylist()) == {str(data)}
    assert label_names(cfg, tables["train"], features, "classification") == ["neg", "pos"]

    splits = {s: tmp_path / f"{s}.jsonl" for s in ("train", "validation", "test")}
    splits["train"].write_text("".join(json.dumps(r) + "\n" for r in good[:30]))
    splits["validation"].write_text("".join(json.dumps(r) + "\n" for r in good[30:35]))
    unseen = good[35:] + [{"text": "a class nobody trained", "label": "neutral"}]
    splits["test"].write_text("".join(json.dumps(r) + "\n" for r in unseen))
    split_cfg = LabeledDataConfig(splits={s: str(p) for s, p in splits.items()})
    with pytest.raises(ValueError, match=r"test.jsonl: row 6 \(test split\): label 'neutral' is not one of"):
        load_labeled(split_cfg, "classification")


@pytest.mark.integration
def test_multi_label_fine_tuning_learns_each_label(single_process_dist, bert_base, tmp_path):
    from evaluation.finetuned import evaluate_finetuned

    rng = random.Random(4)
    rows = []
    for _ in range(400):
        words = [rng.choice(WORDS) for _ in range(8)]
        labels = [m for m in ("river", "stone") if rng.random() < 0.5]
        for m in labels:
            words.insert(rng.randint(0, len(words)), m)
        rows.append({"text": " ".join(words), "tags": labels})
    path = tmp_path / "tags.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = _cfg(
        bert_base,
        path,
        task="multi_label",
        steps=120,
        data={"label_column": "tags"},
        class_weights="balanced",
    )
    summary = finetune(cfg, tmp_path / "ft", print_progress=False)
    assert summary["label_names"] == ["river", "stone"]
    test = evaluate_finetuned(summary["model_dir"], cfg)["test"]
    # Both labels independent and balanced: always predicting the most common label set gets ~25%.
    assert test["subset_accuracy"] > 0.55 and test["f1_macro"] > 0.75, test


@pytest.mark.unit
def test_pairs_are_encoded_as_bert_does_them(bert_base):
    """[CLS] a [SEP] b [SEP], token types 0 then 1, the longer side truncated first (transformers'
    longest_first), padding after, with the mask marking real tokens."""
    from transformers import AutoConfig

    from training.finetune import encode_inputs, load_tokenizer_of

    tok = load_tokenizer_of(bert_base)
    config = AutoConfig.from_pretrained(bert_base)
    a, b = "river stone mill", "alpha beta gamma delta epsilon valley"
    ids_a, ids_b = (tok(t, add_special_tokens=False)["input_ids"] for t in (a, b))
    out = encode_inputs(tok, [a], [b], 12, config)
    keep_b = 12 - 3 - len(ids_a)  # b is longer: it loses tokens until the pair fits
    expected = [tok.cls_token_id, *ids_a, tok.sep_token_id, *ids_b[:keep_b], tok.sep_token_id]
    assert out["input_ids"][0].tolist() == expected
    assert out["token_type_ids"][0].tolist() == [0] * (len(ids_a) + 2) + [1] * (keep_b + 1)
    short = encode_inputs(tok, ["river"], None, 12, config)
    n = len(tok("river", add_special_tokens=False)["input_ids"]) + 2
    assert short["attention_mask"][0].tolist() == [1] * n + [0] * (12 - n)
    assert (short["input_ids"][0, n:] == tok.pad_token_id).all() and "token_type_ids" not in short
