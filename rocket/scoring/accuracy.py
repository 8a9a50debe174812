"""Accuracy of stage 1 (docs/design.md, 'Accuracy'): which extractor runs, checked against every gold
before any pass; the generation pass (the adapters', then the base model's alone); and the refusal
of an accuracy that cannot rank the adapters."""
from __future__ import annotations

import torch
from rocket.adapters.bank import LoraBank
from rocket.data.answers import AnswerKey, answer_key
from rocket.errors import ScoringError
from rocket.runtime.adapters import multi_lora_model
from rocket.runtime.generation import adapter_accuracy


def plan_accuracy(examples, accuracy: str | None, accuracy_file) -> AnswerKey | None:
    """The answer key when accuracy is generated (None when it is off or read from a file). Cheap
    (text only): the CLI and `rocket run` call it before loading the model, score_adapters again."""
    if accuracy_file is not None and accuracy not in (None, "auto"):
        raise ScoringError(f"scoring: give either the accuracy extractor '{accuracy}' or accuracy_file, not both")
    if accuracy is None or accuracy_file is not None:
        return None
    return answer_key(examples, accuracy)


def refuse_uninformative(key: AnswerKey, acc: torch.Tensor, read: torch.Tensor, K: int) -> None:
    """Every adapter at 0 because the extractor cannot read the answers (`exact`: no output equals
    its gold verbatim; `choice`/`number`: no generation states an answer at all) ranks nothing."""
    N = len(acc)
    if N < 2 or bool(acc.any()) or (key.extractor != "exact" and bool(read.any())):
        return
    if key.extractor == "exact":
        why = f"'exact' ({'auto: ' if key.auto else ''}{key.reason}) found no generation equal to its gold"
        fix = "pick --accuracy choice|number if the golds state an option or a number"
    else:
        why = f"'{key.extractor}' read an answer in none of the {N * K} generations"
        fix = "check the prompt template and --max-new-tokens"
    raise ScoringError(f"scoring: accuracy cannot rank the adapters: all {N} tie at 0 because extractor {why}; "
                       f"{fix}, give --accuracy-file, or run the ablation with --no-accuracy (accuracy=None)")


def generated_accuracy(model, tokenizer, bank: LoraBank, mine: list[int], key: AnswerKey,
                       prompts: list[list[int]], sharded: bool, max_new_tokens: int, max_tokens: int | None,
                       progress: bool) -> torch.Tensor:
    """acc [N] (float64, on the model's device) of every adapter of the bank; this rank generates
    for `mine` through the SGMV runtime, the others' share arrives by all-reduce."""
    device = next(model.parameters()).device
    acc = torch.zeros(len(bank), dtype=torch.float64, device=device)
    read = torch.zeros_like(acc)
    if mine:
        with multi_lora_model(model, bank, mine) as rows:
            acc_local, read_local = adapter_accuracy(model, rows, tokenizer, key, prompts, len(mine),
                                                     max_new_tokens, max_tokens, progress)
        acc[mine], read[mine] = acc_local.to(device), read_local.to(device)
    if sharded:
        import torch.distributed as dist
        dist.all_reduce(acc)
        dist.all_reduce(read)
    refuse_uninformative(key, acc, read, len(prompts))
    return acc


def base_accuracy(model, tokenizer, key: AnswerKey, prompts: list[list[int]], here: bool, sharded: bool,
                  max_new_tokens: int, max_tokens: int | None) -> float:
    """The base model's own accuracy (no adapter: one adapter's worth of generations), generated
    where `here` (rank 0) and shared with the other ranks by all-reduce."""
    acc = torch.zeros(1, dtype=torch.float64, device=next(model.parameters()).device)
    if here:
        acc[0] = adapter_accuracy(model, None, tokenizer, key, prompts, 1, max_new_tokens, max_tokens, False)[0][0]
    if sharded:
        import torch.distributed as dist
        dist.all_reduce(acc)
    return float(acc[0])
