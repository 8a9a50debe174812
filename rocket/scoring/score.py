"""Stage 1: score every adapter of a bank on K-shot data (reasoning perplexity, exact-match accuracy)."""
from __future__ import annotations

import warnings
from pathlib import Path
import torch
from rocket.adapters.bank import LoraBank
from rocket.adapters.similarity import has_delta
from rocket.data.answers import DEFAULT_MAX_NEW_TOKENS
from rocket.errors import ScoringError
from rocket.data.scores import Scores, format_ppl, read_accuracy
from rocket.runtime.adapters import compiled_layers, merged_adapters, multi_lora_model
from rocket.runtime.losses import adapter_losses, context_length, prepare_examples, tokenize_for_scoring, validate_bank
from rocket.scoring.accuracy import base_accuracy, generated_accuracy, plan_accuracy


def _shard(n: int, distributed: bool | None) -> tuple[list[int], bool]:
    import torch.distributed as dist
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not distributed:
        return list(range(n)), False
    return list(range(dist.get_rank(), n, dist.get_world_size())), True


# Tokens per adapter from which merging wins. A merge reads and writes the targeted weights once, so
# it costs ≈ 2·peak FLOP/s ÷ (HBM bytes/s · tokens) of the adapter's pass (≈ 400/tokens on an
# H200, independent of model size); SGMV adds 18% (1.1B Llama) to 67% (7B shape, 256 adapters)
# to every pass. Measured at 7B, 10 examples (≈ 3,300 tokens) per adapter: merged 124, SGMV 85
# adapter·examples/s (bench/results/scoring_scale-gpu-20261206-041606.json).
MERGE_FROM_TOKENS = 2048


def choose_strategy(strategy: str, device: torch.device, tokens_per_adapter: int) -> str:
    """'auto': merge adapters one at a time on a GPU when each has ≥ MERGE_FROM_TOKENS tokens to score,
    else run many adapters per pass with the SGMV kernel."""
    if strategy not in ("auto", "merged", "sgmv"):
        raise ScoringError(f"scoring: unknown strategy {strategy!r}: use auto, merged or sgmv")
    if strategy != "auto":
        return strategy
    return "merged" if device.type == "cuda" and tokens_per_adapter >= MERGE_FROM_TOKENS else "sgmv"


def _named(names: list[str], shown: int = 8) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def score_summary(scores: Scores) -> str:
    """The lowest PPL_R against the base model's, as `rocket score` and `rocket run` print it."""
    best = int(torch.argmin(scores.ppl_sum))
    text = f"lowest PPL_R: {scores.names[best]} ({format_ppl(scores.ppl_sum[best])})"
    if scores.base_ppl_sum is not None:
        text += (f", base model {format_ppl(scores.base_ppl_sum)} ({scores.below_base()} of {len(scores.names)} "
                 "adapters below it)")
    return text


def warn_unhelpful(scores: Scores) -> None:
    """One warning line per kind of adapter that cannot help (docs/design.md, 'The base model's
    row'): ΔW = 0 on every module (meta 'zero_delta'), and worse than the base model alone."""
    zero, worse = scores.unhelpful()
    if zero:
        warnings.warn(f"scoring: {len(zero)} adapter(s) with ΔW = 0 on every module (untrained: they score as the "
                      f"base model, and selection sets them aside): {_named(zero)}", stacklevel=3)
    if worse:
        acc = " and no better accuracy" if scores.accuracy is not None and scores.base_accuracy is not None else ""
        warnings.warn(f"scoring: {len(worse)} adapter(s) worse than the base model alone (a higher loss on every "
                      f"example{acc}): {_named(worse)}", stacklevel=3)


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

    The base model alone is scored in the same run (one more adapter's worth of work, on rank 0):
    Scores.base_loss, and base_accuracy when accuracy is generated. A warning names the adapters
    whose ΔW is 0 on every module and those worse than the base model (Scores.worse_than_base).
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
    first = not sharded or torch.distributed.get_rank() == 0   # logs, warns and scores the base model
    if first:
        log(f"perplexity: {'reasoning' if reasoning else 'vanilla'} on {len(tokenized)} examples"
            + ("" if reasoning else " (their own outputs; perplexity_examples / --kshot-cot give rationales)"))
        if key is not None:
            log(f"accuracy: extractor '{key.extractor}'" + (f" (auto: {key.reason})" if key.auto else ""))
    N, K = len(bank), len(tokenized)
    device = next(model.parameters()).device
    strategy = choose_strategy(strategy, device, sum(len(ex.ids) for ex in prepared))
    start = time.perf_counter()
    acc = base_acc = None
    if key is not None:  # first: a refused accuracy costs no loss pass
        acc = generated_accuracy(model, tokenizer, bank, mine, key, prompts, sharded, max_new_tokens, max_tokens,
                                 progress)
        base_acc = base_accuracy(model, tokenizer, key, prompts, first, sharded, max_new_tokens, max_tokens)
    loss = torch.zeros(N + 1, K, dtype=torch.float32, device=device)   # row N: the base model alone
    fast = False if compile and strategy == "merged" else None   # compile: transformers' layers, merged only
    if first:  # the base model alone, before any adapter is merged or any layer carries adapter rows
        loss[N] = adapter_losses(model, None, prepared, 1, max_tokens, False, fast=fast)[0]
    if mine:
        if strategy == "merged":
            with merged_adapters(model, bank, mine) as merger, compiled_layers(model, compile):
                loss[mine] = adapter_losses(model, merger, prepared, len(mine), max_tokens, progress, fast=fast)
        else:
            with multi_lora_model(model, bank, mine) as rows:
                loss[mine] = adapter_losses(model, rows, prepared, len(mine), max_tokens, progress, fast=fast)
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
            "accuracy_auto": key.auto if key else None, "accuracy_examples": len(prompts) if prompts else None,
            "zero_delta": [a.name for a in bank.adapters if not has_delta(a)] if first else []}
    loss = loss.double().cpu()
    scores = Scores(bank.names, loss[:N], None if acc is None else acc.cpu(), meta, loss[N], base_acc)
    if first:
        warn_unhelpful(scores)
    return scores
