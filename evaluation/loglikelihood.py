"""Log-likelihood of continuations under a causal LM, computed as lm-evaluation-harness defines it.

Requests are ``(context, continuation)`` strings. Tokenization follows lm-eval's ``HFLM``: trailing
whitespace of the context moves to the continuation, the pair is encoded whole and the continuation is
what follows the context's own encoding; an empty context is the prefix token (BOS, else EOS); a window
longer than the model is cut from the left. The score is the summed log-probability of the continuation
tokens and whether greedy decoding would have produced them.

Speed comes from sharing: the continuations of one context (the choices of a multiple-choice question)
are packed into one row after a single copy of the context, each attending to the context and to itself
only (a block mask, with position ids restarting after the context), so a 4-choice question costs one
context plus four short continuations instead of four full sequences. Rows are batched by length under a
token budget and only the continuation positions are projected through log-softmax.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from training.ranks import rank_world

Progress = Callable[[int, int], None]


@dataclass
class _Row:
    """One packed forward row: a context and the continuations that share it."""

    context: list[int]
    continuations: list[list[int]] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # request index of each continuation

    def length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for c in self.continuations)


def default_batch_tokens(device: torch.device) -> int:
    """Tokens per forward pass: small on CPU, where activations that stay in cache beat bigger matrix
    products (HellaSwag on a 6-layer GPT-2, 2 threads: 36 examples/s at 1,024 tokens, 29 at 8,192;
    ARC-Easy 75 vs 47), larger on accelerators."""
    return 1024 if device.type == "cpu" else 8192


def model_max_length(model: torch.nn.Module, tokenizer: Any, default: int = 2048) -> int:
    """The longest window the model takes, looked up as lm-eval does (config first, then tokenizer)."""
    config = model.config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 1e9 else default


class CausalScorer:
    """Scores continuations with a Hugging Face causal LM and its tokenizer.

    With ``across_ranks`` (inside an initialized ``torch.distributed`` group, every rank calling with the
    same requests) the batches are dealt out round-robin, each rank forwards its share, and every rank
    gets all results. Ranks run the same number of forwards (the last one may be a one-token filler),
    so a ZeRO-3 model, whose forward gathers its sharded parameters collectively, can score too.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        max_length: int | None = None,
        batch_tokens: int | None = None,
        across_ranks: bool = False,
    ):
        self.model = model.eval()
        self.across_ranks = across_ranks
        self.tokenizer = tokenizer
        self.max_length = max_length or model_max_length(model, tokenizer)
        self.device = next(model.parameters()).device
        self.batch_tokens = batch_tokens or default_batch_tokens(self.device)
        # GPT-2 and Llama heads are a plain projection of the base model's final (normed) hidden states;
        # other architectures (logit soft-capping, scaling) go through the full forward.
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        plain = getattr(model.config, "model_type", None) in ("gpt2", "llama")
        self._head = head if plain and isinstance(head, torch.nn.Linear) else None
        #: Vocabulary entries projected at a time by the head (None: all at once).
        self.vocab_slice: int | None = 2048 if self.device.type == "cpu" else None
        bos = tokenizer.bos_token_id
        self.prefix_token_id = int(bos if bos is not None else tokenizer.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            cont = self.encode(continuation)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        context_enc = self.encode(context)
        return context_enc, whole[len(context_enc) :]

    def loglikelihood(
        self, requests: Sequence[tuple[str, str]], progress: Progress | None = None
    ) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, greedy match) per request, in order."""
        encoded = [self.encode_pair(c, x) for c, x in requests]
        return self.loglikelihood_tokens(encoded, progress)

    def loglikelihood_tokens(
        self, encoded: Sequence[tuple[list[int], list[int]]], progress: Progress | None = None
    ) -> list[tuple[float, bool]]:
        rows: dict[tuple[int, ...], _Row] = {}  # the open row of each context
        full: list[_Row] = []
        for slot, (context, cont) in enumerate(encoded):
            if not cont:
                raise ValueError(f"request {slot}: the continuation encodes to no tokens")
            if len(cont) > self.max_length:
                raise ValueError(
                    f"request {slot}: continuation of {len(cont)} tokens exceeds the model's "
                    f"{self.max_length}-token window"
                )
            window = (context + cont)[-(self.max_length + 1) :]
            key = tuple(window[: len(window) - len(cont)])
            row = rows.get(key)
            if row is not None and row.length() + len(cont) - 1 > self.max_length:
                full.append(row)  # a row stays within one model window: attention cost grows as its square
                row = None
            if row is None:
                row = rows[key] = _Row(list(key))
            row.continuations.append(cont)
            row.slots.append(slot)
        batches = self._batches(sorted([*full, *rows.values()], key=lambda r: -r.length()))
        rank, world = rank_world() if self.across_ranks else (0, 1)
        mine = batches[rank::world]
        results: dict[int, tuple[float, bool]] = {}
        done = 0
        for batch in mine:
            results.update(self._forward(batch))
            done += sum(len(r.slots) for r in batch)
            if progress:
                progress(done, len(encoded))
        if world > 1:
            for _ in range(len(mine), -(-len(batches) // world)):  # as many forwards as the busiest rank
                self._forward([_Row([self.prefix_token_id], [[self.prefix_token_id]], [-1])])
            shares: list[dict[int, tuple[float, bool]] | None] = [None] * world
            torch.distributed.all_gather_object(shares, results)
            results = {slot: r for share in shares for slot, r in (share or {}).items() if slot >= 0}
        return [results[slot] for slot in range(len(encoded))]

    def _batches(self, rows: list[_Row]) -> list[list[_Row]]:
        batches: list[list[_Row]] = []
        for row in rows:  # longest first: each batch's first row sets its padded length
            if batches and (len(batches[-1]) + 1) * batches[-1][0].length() <= self.batch_tokens:
                batches[-1].append(row)
            else:
                batches.append([row])
        return batches

    @torch.no_grad()  # not inference_mode: under ZeRO-3 the gathered parameters are training's own
    def _forward(self, batch: list[_Row]) -> list[tuple[int, tuple[float, bool]]]:
        width = batch[0].length()
        n = len(batch)
        tokens = torch.zeros(n, width, dtype=torch.long)
        positions = torch.zeros(n, width, dtype=torch.long)
        segment = torch.full((n, width), -1, dtype=torch.long)  # -1: padding, 0: context, i: choice i
        targets: list[tuple[int, int, list[int], list[int]]] = []  # (row, slot, logit positions, tokens)
        for b, row in enumerate(batch):
            c = len(row.context)
            tokens[b, :c] = torch.tensor(row.context)
            positions[b, :c] = torch.arange(c)
            segment[b, :c] = 0
            at = c
            for i, (cont, slot) in enumerate(zip(row.continuations, row.slots), start=1):
                body = cont[:-1]  # the last continuation token is predicted, never fed
                k = len(body)
                tokens[b, at : at + k] = torch.tensor(body, dtype=torch.long)
                positions[b, at : at + k] = torch.arange(c, c + k)
                segment[b, at : at + k] = i
                targets.append((b, slot, [c - 1, *range(at, at + k)], cont))
                at += k
        mask = torch.ones_like(tokens).to(self.device)  # one continuation per row: plain causal attention
        if any(len(row.continuations) > 1 for row in batch):
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            seg_q, seg_k = segment[:, :, None], segment[:, None, :]
            allowed = causal & ((seg_k == 0) & (seg_q >= 0) | (seg_k == seg_q) & (seg_q > 0))
            allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax row
            mask = allowed[:, None].to(self.device)
        inputs = {
            "input_ids": tokens.to(self.device),
            "attention_mask": mask,
            "position_ids": positions.to(self.device),
        }
        rows_idx = torch.tensor([b for b, _, pos, _ in targets for _ in pos], device=self.device)
        pos_idx = torch.tensor([p for _, _, pos, _ in targets for p in pos], device=self.device)
        wanted = torch.tensor([t for *_, cont in targets for t in cont], device=self.device)
        if self._head is None:
            logits = self.model(**inputs).logits[rows_idx, pos_idx]
        else:  # project only the positions that predict a continuation token
            hidden = self.model.base_model(**inputs).last_hidden_state[rows_idx, pos_idx]
            # ZeRO-3 keeps the head's weight partitioned outside its module's own forward
            sliced = self.vocab_slice is not None and not hasattr(self._head.weight, "ds_id")
            logits = None if sliced else self._head(hidden)
        if logits is None:
            token_lp, greedy = self._head_scores(hidden, wanted)
        else:  # log p(token) = logit - logsumexp(logits): no log-softmax written out
            logits = logits.float()
            token_lp = logits.gather(1, wanted[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
            greedy = logits.argmax(-1) == wanted
        token_lp, greedy = token_lp.cpu(), greedy.cpu()
        out, at = [], 0
        for _, slot, pos, _ in targets:
            k = len(pos)
            out.append((slot, (float(token_lp[at : at + k].sum()), bool(greedy[at : at + k].all()))))
            at += k
        return out

    def _head_scores(self, hidden: torch.Tensor, wanted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p of each wanted token, whether it is the argmax) from the final hidden states, projecting
        a slice of the vocabulary at a time: each slice's logits are reduced (running max and argmax, a
        streaming log-sum-exp, the wanted logits picked) while they are still in cache, instead of writing
        the whole (positions x vocabulary) matrix out and reading it back three times."""
        weight, bias = self._head.weight, self._head.bias
        n, vocab = hidden.shape[0], weight.shape[0]
        step = self.vocab_slice or vocab
        best = torch.full((n,), -math.inf, device=hidden.device)
        best_at = torch.zeros(n, dtype=torch.long, device=hidden.device)
        total = torch.zeros(n, device=hidden.device)
        picked = torch.empty(n, device=hidden.device)
        for start in range(0, vocab, step):
            stop = min(start + step, vocab)
            z = F.linear(hidden, weight[start:stop], None if bias is None else bias[start:stop]).float()
            top, at = z.max(-1)  # the first maximal index, as argmax over the whole row gives
            better = top > best  # strictly: an equal later maximum keeps the earlier index
            best_at = torch.where(better, at + start, best_at)
            shift = torch.maximum(best, top)
            total = total * torch.exp(best - shift) + torch.exp(z - shift[:, None]).sum(-1)
            best = shift
            inside = (wanted >= start) & (wanted < stop)
            if inside.any():
                rows = inside.nonzero().squeeze(1)
                picked[rows] = z[rows, wanted[rows] - start]
        return picked - (best + torch.log(total)), best_at == wanted

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """Disjoint windows covering every token of ``text`` (lm-eval's loglikelihood_rolling): the first
        predicts from the prefix token, each later one with up to a full window of preceding tokens."""
        tokens = self.encode(text)
        if not tokens:
            return []
        size = self.max_length
        first = min(size, len(tokens))
        windows = [([self.prefix_token_id], tokens[:first])]
        predicted = first
        while predicted < len(tokens):
            step = min(len(tokens) - predicted, size)
            end = predicted + step
            windows.append((tokens[max(0, end - size - 1) : predicted], tokens[predicted:end]))
            predicted = end
        return windows

    def loglikelihood_rolling(
        self, texts: Sequence[str], progress: Progress | None = None
    ) -> list[tuple[float, int]]:
        """(total log-likelihood, tokens) of each whole text."""
        owner: list[int] = []
        windows: list[tuple[list[int], list[int]]] = []
        for i, text in enumerate(texts):
            for window in self.rolling_windows(text):
                owner.append(i)
                windows.append(window)
        scores = self.loglikelihood_tokens(windows, progress)
        totals = [[0.0, 0] for _ in texts]
        for i, (ll, _), (_, cont) in zip(owner, scores, windows):
            totals[i][0] += ll
            totals[i][1] += len(cont)
        return [(ll, int(n)) for ll, n in totals]
