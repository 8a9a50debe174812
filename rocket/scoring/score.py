"""Stage 1: score every adapter of a bank on K-shot data (reasoning perplexity, exact-match accuracy)."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
import torch
from tqdm.auto import tqdm
from rocket.adapters.bank import LoraBank
from rocket.data.answers import DEFAULT_MAX_NEW_TOKENS
from rocket.data.tokenize import IGNORE_INDEX, Tokenized, tokenize_example
from rocket.data.examples import DataError, where
from rocket.errors import ScoringError
from rocket.kernels.linear_ce import linear_cross_entropy_per_example
from rocket.runtime.fastpath import fast_forward, supports_fast_path
from rocket.runtime.packing import PackedBatch, pack_rows, packed_attention, supports_packing
from rocket.data.scores import Scores, read_accuracy
from rocket.runtime.adapters import AdapterRows, MergedAdapters, compiled_layers, merged_adapters, multi_lora_model
from rocket.scoring.accuracy import generated_accuracy, plan_accuracy


# --------------------------------------------------------------------------- scoring
@dataclass
class ScoringExample:
    """One tokenized example ready to pack: its ids and the positions whose next token is a label."""
    ids: torch.Tensor        # [L] int64
    label_pos: torch.Tensor  # [n] int64: position p predicts targets[i] = token p+1
    targets: torch.Tensor    # [n] int64


def context_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def tokenize_for_scoring(examples, tokenizer, template, max_length) -> list[Tokenized]:
    """Examples (dicts, or already tokenized) → Tokenized, checking the context and the labels."""
    if not examples:
        raise ScoringError("scoring: no examples (the K-shot data is empty)")
    out = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, Tokenized):
            if tokenizer is None:
                raise ScoringError("scoring: a tokenizer is needed for untokenized examples")
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


def _shard(n: int, distributed: bool | None) -> tuple[list[int], bool]:
    import torch.distributed as dist
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not distributed:
        return list(range(n)), False
    return list(range(dist.get_rank(), n, dist.get_world_size())), True


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
def adapter_losses(model, adapters: "AdapterRows | MergedAdapters", examples: list[ScoringExample], n_adapters: int,
                   max_tokens: int | None = None, progress: bool = True, fast: bool | None = None) -> torch.Tensor:
    """loss [n_adapters, K] (float32, on the model's device) of every (adapter, example) pair.

    adapters: the AdapterRows of a model wrapped by multi_lora_model (rows of many adapters share a
    pass, SGMV), or a MergedAdapters (one adapter merged at a time; the packed batches, built once,
    are reused for every adapter). Rows are packed without padding into passes of ≤ max_tokens tokens
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
        if merged:
            batches = [PackedBatch(b, examples, device) for b in pack_rows([(0, e) for e in range(K)], lengths, budget)]
            for a in range(n_adapters):
                adapters.merge(a)
                for batch in batches:
                    loss[a, batch.example_ids] = _batch_losses(model, batch, path, prune=True, fused=adapters.fused)
                bar.update(K)
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


def choose_strategy(strategy: str, device: torch.device, tokens_per_adapter: int) -> str:
    """'auto': merge adapters one at a time on a GPU when each has ≥ 4096 tokens to score (one merge
    then costs a few % of its pass), else run many adapters per pass with the SGMV kernel."""
    if strategy not in ("auto", "merged", "sgmv"):
        raise ScoringError(f"scoring: unknown strategy {strategy!r}: use auto, merged or sgmv")
    if strategy != "auto":
        return strategy
    return "merged" if device.type == "cuda" and tokens_per_adapter >= 4096 else "sgmv"


def score_adapters(model, tokenizer, bank: LoraBank, examples, template="alpaca", *,
                   accuracy: str | None = "auto", accuracy_file: str | Path | None = None, perplexity_examples=None,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_tokens: int | None = None, progress: bool = True,
                   distributed: bool | None = None, strategy: str = "auto", compile: bool = False, log=print) -> Scores:
    """Stage 1: loss/ppl [N, K] of every adapter of `bank`, and its exact-match accuracy, in batched passes.

    examples: dicts in the reference implementation's schema (tokenized with `template`), the K-shot
    set whose golds accuracy compares; also the perplexity data unless perplexity_examples is given.
    perplexity_examples: the K-shot set with rationales in `output` (dicts or rocket.data.Tokenized)
    for reasoning perplexity; without it the losses are those of `examples` (vanilla perplexity).
    accuracy: 'auto' (default: the extractor follows the golds: option labels → 'choice', stated
    numbers → 'number', else 'exact'), an extractor ('choice', 'number', 'exact'), or None (off: the
    perplexity + diversity ablation); every gold is checked against it before any pass, and a run in
    which all adapters tie at 0 because it cannot read the answers is refused. Greedy generations of
    max_new_tokens each. accuracy_file: a JSON {adapter: accuracy} used instead of generating.
    max_tokens: tokens per forward pass (default 32768 on CUDA, 4096 on CPU); rows are packed unpadded.
    strategy: 'sgmv' (many adapters per pass, multi-adapter LoRA kernel), 'merged' (one adapter merged
    into the weights at a time) or 'auto' (see choose_strategy). Llama-family models (Llama, Mistral,
    Qwen2) run through rocket.fastpath; compile: instead torch.compile transformers' own decoder
    layers (merged strategy only; for other architectures, on banks large enough to repay ~10 s).
    distributed: shard adapters over torch.distributed ranks (default: when a group of >1 is up).
    log: where the lines saying which perplexity and which extractor ran go (rank 0 only).
    """
    import time

    key = plan_accuracy(examples, accuracy, accuracy_file)
    reasoning = perplexity_examples is not None
    tokenized = tokenize_for_scoring(perplexity_examples if reasoning else examples, tokenizer, template,
                                     context_length(model))
    bank.validate(model)
    head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    if head is not None and head in bank.modules:
        raise ScoringError(f"scoring: adapters on the output layer '{head}' are not supported")
    acc_file = read_accuracy(accuracy_file, bank.names) if accuracy_file is not None else None
    prompts = None
    if key is not None:
        asked = tokenize_for_scoring(examples, tokenizer, template, context_length(model)) if reasoning else tokenized
        prompts = [t.input_ids[:t.prompt_len] for t in asked]
    prepared = prepare_examples(tokenized, model.get_output_embeddings().weight.shape[0])
    mine, sharded = _shard(len(bank), distributed)
    if not sharded or torch.distributed.get_rank() == 0:
        log(f"perplexity: {'reasoning' if reasoning else 'vanilla'} on {len(tokenized)} examples"
            + ("" if reasoning else " (their own outputs; perplexity_examples / --kshot-cot give rationales)"))
        if key is not None:
            log(f"accuracy: extractor '{key.extractor}'" + (f" (auto: {key.reason})" if key.auto else ""))
    N, K = len(bank), len(tokenized)
    device = next(model.parameters()).device
    strategy = choose_strategy(strategy, device, sum(len(ex.ids) for ex in prepared))
    start = time.perf_counter()
    acc = None
    if key is not None:  # first: a refused accuracy costs no loss pass
        acc = generated_accuracy(model, tokenizer, bank, mine, key, prompts, sharded, max_new_tokens, max_tokens,
                                 progress)
    loss = torch.zeros(N, K, dtype=torch.float32, device=device)
    if mine:
        if strategy == "merged":
            with merged_adapters(model, bank, mine) as merger, compiled_layers(model, compile):
                loss[mine] = adapter_losses(model, merger, prepared, len(mine), max_tokens, progress,
                                            fast=False if compile else None)
        else:
            with multi_lora_model(model, bank, mine) as rows:
                loss[mine] = adapter_losses(model, rows, prepared, len(mine), max_tokens, progress)
    if sharded:
        import torch.distributed as dist
        dist.all_reduce(loss)
    if acc_file is not None:
        acc = acc_file
    seconds = time.perf_counter() - start
    meta = {"template": template if isinstance(template, str) else getattr(template, "name", str(template)),
            "examples": K, "adapters": N, "label_tokens": sum(len(ex.targets) for ex in prepared),
            "tokens": sum(len(ex.ids) for ex in prepared), "strategy": strategy, "compile": compile,
            "seconds": seconds, "pairs_per_s": N * K / seconds if seconds > 0 else None,
            "perplexity": "reasoning" if reasoning else "vanilla",
            "accuracy": key.extractor if key else (str(accuracy_file) if accuracy_file else None),
            "accuracy_auto": key.auto if key else None, "accuracy_examples": len(prompts) if prompts else None}
    return Scores(bank.names, loss.double().cpu(), None if acc is None else acc.cpu(), meta)
