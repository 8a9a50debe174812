"""Per-example losses of a model — as it is, or under many adapters — in packed passes
(docs/design.md, 'Reasoning perplexity'): what scoring ranks adapters by and evaluation reports.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
import torch
from tqdm.auto import tqdm
from rocket.adapters.bank import LoraBank
from rocket.data.examples import where
from rocket.data.tokenize import IGNORE_INDEX, Tokenized, tokenize_example
from rocket.errors import BankError, DataError, RocketError
from rocket.kernels.linear_ce import linear_cross_entropy_per_example
from rocket.runtime.adapters import AdapterRows, MergedAdapters
from rocket.runtime.fastpath import fast_forward, supports_fast_path
from rocket.runtime.packing import PackedBatch, pack_rows, packed_attention, supports_packing


@dataclass
class ScoringExample:
    """One tokenized example ready to pack: its ids and the positions whose next token is a label."""
    ids: torch.Tensor        # [L] int64
    label_pos: torch.Tensor  # [n] int64: position p predicts targets[i] = token p+1
    targets: torch.Tensor    # [n] int64


def context_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def tokenize_for_scoring(examples, tokenizer, template, max_length) -> list[Tokenized]:
    """Examples (dicts, or already tokenized) → Tokenized, checking the context and the labels;
    errors name the example's file and line (examples from rocket.data.load_examples) or index."""
    if not examples:
        raise DataError("no examples to score (the data is empty)")
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, Tokenized):
            if tokenizer is None:
                raise RocketError("a tokenizer is needed for untokenized examples")
            ex = tokenize_example(ex, tokenizer, template, max_length, overflow="error", where=where(examples, i))
        elif max_length is not None and len(ex.input_ids) > max_length:
            raise DataError(f"{where(examples, i)}: {len(ex.input_ids)} tokens exceed the context of {max_length}")
        if not any(l != IGNORE_INDEX for l in ex.labels[1:]):
            raise DataError(f"{where(examples, i)}: no output tokens to score")
        out.append(ex)
    return out


def prepare_examples(tokenized: list[Tokenized], vocab_size: int) -> list[ScoringExample]:
    out = []
    for i, t in enumerate(tokenized):
        labels = torch.tensor(t.labels[1:], dtype=torch.long)
        pos = torch.nonzero(labels != IGNORE_INDEX, as_tuple=True)[0]
        targets = labels[pos]
        if int(targets.min()) < 0 or int(targets.max()) >= vocab_size:
            raise DataError(f"example {i}: a label token id is outside the model's vocabulary of {vocab_size}")
        out.append(ScoringExample(torch.tensor(t.input_ids, dtype=torch.long), pos, targets))
    return out


def _default_max_tokens(device: torch.device) -> int:
    return 32768 if device.type == "cuda" else 4096


def _batch_losses(model, batch: PackedBatch, path: str, prune: bool, fused=None) -> torch.Tensor:
    """Mean label loss [rows] of one packed batch: a base-model pass, logits only at label positions.
    path: 'fast' (rocket.fastpath; `prune`: the last layer's MLP on label rows only), 'packed'
    (transformers' forward, varlen attention) or 'single' (one row, transformers' own attention);
    fused: the FusedProjections of merged adapters (fast path)."""
    if path == "fast":
        hidden = fast_forward(model, batch, keep=batch.label_pos if prune else None, fused=fused)
        if not prune:
            hidden = hidden[batch.label_pos]
    else:
        kwargs = batch.forward_kwargs() if path == "packed" else dict(
            input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
        hidden = model.get_decoder()(**kwargs).last_hidden_state[0][batch.label_pos]
    return linear_cross_entropy_per_example(hidden, model.get_output_embeddings().weight, batch.targets,
                                            batch.label_row, len(batch.rows), validate=False)


@torch.no_grad()
def adapter_losses(model, adapters: "AdapterRows | MergedAdapters | None", examples: list[ScoringExample],
                   n_adapters: int, max_tokens: int | None = None, progress: bool = True,
                   fast: bool | None = None) -> torch.Tensor:
    """loss [n_adapters, K] (float32, on the model's device) of every (adapter, example) pair.

    adapters: the AdapterRows of a model wrapped by multi_lora_model (rows of many adapters share a
    pass, SGMV), or a MergedAdapters (one adapter merged at a time; the packed batches, built once,
    are reused for every adapter), or None: the model as it is (n_adapters = 1; a base model, or one
    carrying a LoRA-MoE). Rows are packed without padding into passes of ≤ max_tokens tokens
    when the model's attention allows it (else one row per pass). fast: use rocket.fastpath for
    Llama-family models (default: whenever it supports the model)."""
    device = model.get_output_embeddings().weight.device
    max_tokens = max_tokens or _default_max_tokens(device)
    lengths = [len(ex.ids) for ex in examples]
    packed = supports_packing(model)
    if fast is None or fast:
        fast = supports_fast_path(model, max(lengths))
    path = "fast" if fast else "packed" if packed else "single"
    budget = max_tokens if path != "single" else 0
    merged = isinstance(adapters, MergedAdapters)
    K = len(examples)
    loss = torch.full((n_adapters, K), float("nan"), dtype=torch.float32, device=device)
    bar = tqdm(total=n_adapters * K, desc="scoring", unit="pair", disable=not progress)
    with packed_attention(model) if path == "packed" else nullcontext():
        if merged or adapters is None:
            batches = [PackedBatch(b, examples, device) for b in pack_rows([(0, e) for e in range(K)], lengths, budget)]
            for a in range(n_adapters):
                if merged:
                    adapters.merge(a)
                for batch in batches:
                    loss[a, batch.example_ids] = _batch_losses(model, batch, path, prune=True,
                                                               fused=adapters.fused if merged else None)
                bar.update(K)
            if merged:
                adapters.restore()
        else:
            rows = [(a, e) for a in range(n_adapters) for e in range(K)]  # adapter-major: long segments
            for rows_b in pack_rows(rows, lengths, budget):
                batch = PackedBatch(rows_b, examples, device)
                adapters.set([a for a, _ in rows_b], batch.lengths)
                loss[batch.adapters, batch.example_ids] = _batch_losses(model, batch, path, prune=False)
                bar.update(len(rows_b))
    bar.close()
    return loss


def validate_bank(model, bank: LoraBank) -> None:
    """The bank against the model (LoraBank.validate), and no adapter on the output layer: the losses
    read its weight directly."""
    bank.validate(model)
    head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    if head is not None and head in bank.modules:
        raise BankError(f"adapters on the output layer '{head}' are not supported")
