"""Stage 1: score every adapter of a bank on K-shot data (reasoning perplexity, exact-match accuracy)."""
from __future__ import annotations

from pathlib import Path
import torch
from rocket.adapters.bank import LoraBank
from rocket.data.answers import DEFAULT_MAX_NEW_TOKENS
from rocket.errors import ScoringError
from rocket.data.scores import Scores, read_accuracy
from rocket.runtime.adapters import compiled_layers, merged_adapters, multi_lora_model
from rocket.runtime.losses import adapter_losses, context_length, prepare_examples, tokenize_for_scoring, validate_bank
from rocket.scoring.accuracy import generated_accuracy, plan_accuracy


def _shard(n: int, distributed: bool | None) -> tuple[list[int], bool]:
    import torch.distributed as dist
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not distributed:
        return list(range(n)), False
    return list(range(dist.get_rank(), n, dist.get_world_size())), True


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
    validate_bank(model, bank)
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
