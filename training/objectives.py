"""Pretraining objectives over the same token shards: causal LM, masked LM (BERT/RoBERTa), span corruption (T5).

A batch is drawn from the packed token stream (or from windows inside one document, for next-sentence
prediction) and turned into model inputs and labels here. The random choices (which tokens are masked,
where the spans are) come from a generator seeded by (seed, step, rank, micro-batch), so a resumed run draws
exactly the masks the uninterrupted run drew.

Defaults are the published ones: Hugging Face ``DataCollatorForLanguageModeling`` (15% of tokens selected;
of those 80% replaced by the mask token, 10% by a random token, 10% kept) and T5's span corruption as
``run_t5_mlm_flax.py`` computes it (noise density 0.15, mean span length 3, one sentinel per span in the
inputs and in the targets, lengths chosen so that inputs are exactly ``seq_len`` tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field
from tokenizers import Tokenizer

from core.stage import StageConfig

Objective = Literal["causal_lm", "masked_lm", "span_corruption"]
IGNORE = -100  # label of positions without a loss (torch's cross_entropy ignore_index)

PAD_TOKEN, MASK_TOKEN, CLS_TOKEN, SEP_TOKEN = "<pad>", "<mask>", "<cls>", "<sep>"
#: T5 reserves 100 sentinels (<extra_id_0> ... <extra_id_99>); a sequence needs one per noise span.
SENTINELS = 100


def sentinel_token(k: int) -> str:
    return f"<extra_id_{k}>"


def special_tokens_for(objective: Objective) -> list[str]:
    """The special tokens an objective needs besides EOS, in the order a trained tokenizer adds them."""
    if objective == "masked_lm":
        return [PAD_TOKEN, MASK_TOKEN, CLS_TOKEN, SEP_TOKEN]
    if objective == "span_corruption":
        return [PAD_TOKEN, *(sentinel_token(k) for k in range(SENTINELS))]
    return []


class MaskingConfig(StageConfig):
    """Masked-LM corruption (defaults: Hugging Face DataCollatorForLanguageModeling, BERT's recipe)."""

    probability: float = Field(0.15, gt=0, lt=1, description="Share of tokens selected for prediction.")
    mask_replace: float = Field(0.8, ge=0, le=1, description="Of the selected, share replaced by <mask>.")
    random_replace: float = Field(
        0.1, ge=0, le=1, description="Of the selected, share replaced by a random token (the rest are kept)."
    )
    whole_word: bool = Field(
        False, description="Select whole words (all their sub-tokens) instead of tokens."
    )
    next_sentence_prediction: bool = Field(
        False,
        description="BERT's NSP: [CLS] A [SEP] B [SEP] where B follows A in its document or, half the time, "
        "comes from another document.",
    )


class SpanCorruptionConfig(StageConfig):
    """T5 span corruption (defaults: Raffel et al. 2020, as run_t5_mlm_flax.py implements it)."""

    noise_density: float = Field(0.15, gt=0, lt=1, description="Share of tokens inside noise spans.")
    mean_span_length: float = Field(3.0, ge=1, description="Mean length of a noise span.")


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens an objective uses, read from the shards' tokenizer."""

    vocab_size: int
    eos: int
    pad: int | None = None
    mask: int | None = None
    cls: int | None = None
    sep: int | None = None
    sentinels: tuple[int, ...] = ()

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Tokenizer, objective: Objective, eos_token: str, where: str = "the tokenizer"
    ) -> SpecialIds:
        """The ids, or a ValueError naming every token ``where`` lacks for ``objective``."""
        needed = [eos_token, *special_tokens_for(objective)]
        ids = {t: tokenizer.token_to_id(t) for t in needed}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise ValueError(
                f"{where} lacks the special tokens train.objective={objective} needs: {shown}; let lmforge "
                "train the tokenizer (it adds them), or use a tokenizer that has them"
            )
        return cls(
            vocab_size=tokenizer.get_vocab_size(),
            eos=ids[eos_token],
            pad=ids.get(PAD_TOKEN),
            mask=ids.get(MASK_TOKEN),
            cls=ids.get(CLS_TOKEN),
            sep=ids.get(SEP_TOKEN),
            sentinels=tuple(ids[sentinel_token(k)] for k in range(SENTINELS))
            if objective == "span_corruption"
            else (),
        )

    def special_array(self) -> np.ndarray:
        found = [self.eos, self.pad, self.mask, self.cls, self.sep, *self.sentinels]
        return np.array([i for i in found if i is not None], dtype=np.int64)


def batch_rng(seed: int, step: int, rank: int, micro: int) -> np.random.Generator:
    """The generator of one micro-batch's corruption: a function of where it is in training, nothing else."""
    return np.random.default_rng([seed, step, rank, micro])


def word_starts(tokenizer: Tokenizer) -> np.ndarray:
    """Per token id: does it begin a word? (byte-level BPE marks a leading space as 'Ġ'; specials start one.)"""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    starts = np.zeros(tokenizer.get_vocab_size(), dtype=bool)
    for token, i in vocab.items():
        starts[i] = token.startswith(("Ġ", "Ċ", "ĉ")) or not token[:1].isalnum()
    for added in tokenizer.get_added_tokens_decoder().values():
        starts[tokenizer.token_to_id(added.content)] = True
    return starts


def mask_tokens(
    tokens: np.ndarray,
    rng: np.random.Generator,
    ids: SpecialIds,
    config: MaskingConfig,
    starts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT corruption of a ``(batch, length)`` token array: ``(inputs, labels)``.

    Special tokens are never selected. With ``starts`` (:func:`word_starts`, for whole-word masking) a
    word is selected as a unit: every sub-token of a selected word is predicted. Labels are the original
    token at selected positions and ``IGNORE`` elsewhere.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    special = np.isin(tokens, ids.special_array())
    draw = rng.random(tokens.shape)
    if starts is not None:
        begins = starts[tokens]
        begins[:, 0] = True
        position = np.where(begins, np.arange(tokens.shape[1]), 0)
        first = np.maximum.accumulate(position, axis=1)  # each token's word start
        draw = np.take_along_axis(draw, first, axis=1)
    selected = (draw < config.probability) & ~special
    labels = np.where(selected, tokens, IGNORE)
    replace = selected & (rng.random(tokens.shape) < config.mask_replace)
    keep_share = 1.0 - config.mask_replace
    randomize_p = config.random_replace / keep_share if keep_share > 0 else 0.0
    randomize = selected & ~replace & (rng.random(tokens.shape) < randomize_p)
    inputs = tokens.copy()
    inputs[replace] = ids.mask
    inputs[randomize] = rng.integers(0, ids.vocab_size, size=int(randomize.sum()))
    return inputs, labels


def bert_sequences(body: np.ndarray, ids: SpecialIds) -> np.ndarray:
    """``[CLS] body [SEP]`` per row (RoBERTa's full-sentence packing: documents split by EOS inside)."""
    rows = body.shape[0]
    return np.concatenate(
        [np.full((rows, 1), ids.cls), np.asarray(body, dtype=np.int64), np.full((rows, 1), ids.sep)], axis=1
    )


def sentence_pairs(
    windows: np.ndarray,
    others: np.ndarray,
    rng: np.random.Generator,
    ids: SpecialIds,
    seq_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Next-sentence-prediction pairs: ``(input_ids, token_type_ids, next_sentence_label)``.

    Row ``i`` is ``[CLS] A [SEP] B [SEP]`` with ``seq_len`` tokens: A is the start of ``windows[i]`` (a window
    inside one document) cut at a random point, B the rest of it (label 0, "is next") or, half the time, the
    start of ``others[i]``, a window of another document (label 1, as BertForPreTraining counts it).
    """
    body = seq_len - 3
    rows = windows.shape[0]
    cut = rng.integers(1, body, size=rows)  # A keeps 1 .. body-1 tokens
    random_next = rng.random(rows) < 0.5
    out = np.empty((rows, seq_len), dtype=np.int64)
    types = np.zeros((rows, seq_len), dtype=np.int64)
    for r in range(rows):
        a = windows[r, : cut[r]]
        b = (others[r] if random_next[r] else windows[r, cut[r] :])[: body - cut[r]]
        out[r] = np.concatenate([[ids.cls], a, [ids.sep], b, [ids.sep]])
        types[r, cut[r] + 2 :] = 1
    return out, types, random_next.astype(np.int64)


def span_lengths(inputs_length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """Raw tokens per sample and target length, so that corrupted inputs are ``inputs_length`` tokens.

    The search of run_t5_mlm_flax.py's ``compute_input_and_target_lengths``: the longest raw length whose
    inputs (non-noise tokens, one sentinel per span, EOS) still fit.
    """

    def lengths(tokens: int) -> tuple[int, int]:
        noise = round(tokens * noise_density)
        spans = round(noise / mean_span_length)
        return tokens - noise + spans + 1, noise + spans + 1

    tokens = inputs_length
    while lengths(tokens + 1)[0] <= inputs_length:
        tokens += 1
    inputs, targets = lengths(tokens)
    if noise_density == 0.5 and targets > inputs:  # as the reference does, for equal lengths at density 0.5
        tokens -= 1
        targets -= 1
    return tokens, targets


def noise_mask(
    length: int, rng: np.random.Generator, noise_density: float, mean_span_length: float
) -> np.ndarray:
    """Which of ``length`` tokens are noise: alternating non-noise / noise spans, non-noise first.

    Span counts and their random segmentation follow run_t5_mlm_flax.py's ``random_spans_noise_mask``.
    """
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = max(round(min(noise, length - noise) / mean_span_length), 1)

    def segment(items: int) -> np.ndarray:
        firsts = np.arange(items - 1) < spans - 1
        rng.shuffle(firsts)
        return np.bincount(np.cumsum(np.concatenate([[0], firsts])), minlength=spans)

    noise_spans, kept_spans = segment(noise), segment(length - noise)
    interleaved = np.stack([kept_spans, noise_spans], axis=1).reshape(-1)
    indicator = np.zeros(length, dtype=np.int64)
    indicator[np.cumsum(interleaved)[:-1]] = 1
    return np.cumsum(indicator) % 2 == 1


def _replace_spans(tokens: np.ndarray, dropped: np.ndarray, sentinels: np.ndarray, eos: int) -> np.ndarray:
    """Each run of ``dropped`` positions becomes its span's sentinel; EOS appended."""
    starts = dropped & ~np.concatenate([[False], dropped[:-1]])
    out = tokens.copy()
    out[starts] = sentinels[np.cumsum(starts)[starts] - 1]
    keep = ~dropped | starts
    return np.concatenate([out[keep], [eos]])


def corrupt_spans(
    tokens: np.ndarray, rng: np.random.Generator, ids: SpecialIds, config: SpanCorruptionConfig
) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption of ``(batch, raw_length)`` tokens: ``(inputs, targets)``.

    Inputs keep the non-noise tokens with ``<extra_id_k>`` in place of the k-th noise span; targets are each
    sentinel followed by the span it replaced; both end with EOS.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    sentinels = np.asarray(ids.sentinels, dtype=np.int64)
    inputs, targets = [], []
    for row in tokens:
        noise = noise_mask(row.size, rng, config.noise_density, config.mean_span_length)
        spans = int((noise & ~np.concatenate([[False], noise[:-1]])).sum())
        if spans > sentinels.size:
            raise ValueError(
                f"span corruption of {row.size} tokens makes {spans} spans, but the tokenizer has "
                f"{sentinels.size} sentinels; lower train.seq_len"
            )
        inputs.append(_replace_spans(row, noise, sentinels, ids.eos))
        targets.append(_replace_spans(row, ~noise, sentinels, ids.eos))
    return np.stack(inputs), np.stack(targets)


def shift_right(targets: np.ndarray, start: int) -> np.ndarray:
    """Decoder inputs: the targets shifted one to the right behind the decoder start token (T5: pad)."""
    return np.concatenate([np.full((targets.shape[0], 1), start, dtype=np.int64), targets[:, :-1]], axis=1)


def other_documents(
    rng: np.random.Generator, indices: np.ndarray, sample_documents: np.ndarray
) -> np.ndarray:
    """For each sample, a random sample of another document (10 draws, as BERT's pretraining data tries)."""
    candidates = rng.integers(0, sample_documents.size, size=(indices.size, 10))
    differs = sample_documents[candidates] != sample_documents[indices][:, None]
    first = np.where(differs.any(axis=1), differs.argmax(axis=1), 0)
    return candidates[np.arange(indices.size), first]


def document_positions(inputs: np.ndarray, eos: int) -> np.ndarray:
    """Position ids that restart at 0 after each end-of-document token (one row per packed sequence).

    transformers reads a restart as a new sequence and masks attention across it (its packed-sequence
    format, as flash-attention's varlen kernels take it).
    """
    t = inputs.shape[1]
    index = np.broadcast_to(np.arange(t), inputs.shape)
    starts = np.zeros(inputs.shape, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = inputs[:, :-1] == eos
    return index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)


class ObjectiveBatches:
    """Model inputs of one objective from the token dataset's samples (numpy arrays by argument name)."""

    def __init__(
        self,
        objective: Objective,
        seq_len: int,
        ids: SpecialIds,
        masking: MaskingConfig | None = None,
        span: SpanCorruptionConfig | None = None,
        starts: np.ndarray | None = None,
        document_masking: bool = False,
    ):
        self.objective, self.seq_len, self.ids = objective, seq_len, ids
        self.document_masking = document_masking
        self.masking, self.span = masking or MaskingConfig(), span or SpanCorruptionConfig()
        self.starts = starts if self.masking.whole_word else None
        self.nsp = objective == "masked_lm" and self.masking.next_sentence_prediction

    @property
    def sample_length(self) -> int:
        """Stream tokens per sample (TokenSequences' ``seq_len``: each sample has one more, the causal shift)."""
        if self.objective == "masked_lm":
            return self.seq_len - (3 if self.nsp else 2)  # [CLS] A [SEP] B [SEP] / [CLS] body [SEP]
        if self.objective == "span_corruption":
            return span_lengths(self.seq_len, self.span.noise_density, self.span.mean_span_length)[0]
        return self.seq_len

    @property
    def span_documents(self) -> bool | None:
        """NSP needs windows inside one document (None: the user's train.span_documents applies)."""
        return False if self.nsp else None

    def make(
        self, samples: np.ndarray, rng: np.random.Generator, others: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """``samples``: ``(batch, sample_length + 1)`` stream windows; ``others``: NSP's random-next windows."""
        samples = np.asarray(samples, dtype=np.int64)
        if self.objective == "causal_lm":
            inputs = {"input_ids": samples[:, :-1], "labels": samples[:, 1:]}
            if self.document_masking:
                inputs["position_ids"] = document_positions(inputs["input_ids"], self.ids.eos)
            return inputs
        body = samples[:, : self.sample_length]
        if self.objective == "span_corruption":
            inputs, targets = corrupt_spans(body, rng, self.ids, self.span)
            return {
                "input_ids": inputs,
                "decoder_input_ids": shift_right(targets, self.ids.pad),
                "labels": targets,
            }
        if not self.nsp:
            inputs, labels = mask_tokens(
                bert_sequences(body, self.ids), rng, self.ids, self.masking, self.starts
            )
            return {"input_ids": inputs, "labels": labels}
        assert others is not None, "next-sentence prediction draws B from other documents"
        pairs, types, is_random = sentence_pairs(
            body, others[:, : self.sample_length], rng, self.ids, self.seq_len
        )
        inputs, labels = mask_tokens(pairs, rng, self.ids, self.masking, self.starts)
        return {
            "input_ids": inputs,
            "token_type_ids": types,
            "labels": labels,
            "next_sentence_label": is_random,
        }
