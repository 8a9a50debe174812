"""Training batches: tokenised examples, length-grouped batch plans, padded batches, the token loss."""
from __future__ import annotations

import logging
import torch
import torch.nn.functional as F
from rocket.data.tokenize import IGNORE_INDEX, Tokenized, tokenize_examples
from rocket.data.examples import DataError
from rocket.training.config import TrainConfig

log = logging.getLogger("rocket.train")


# --------------------------------------------------------------------------- data
def prepare_examples(examples, tokenizer, cfg: TrainConfig, where: str = "training data") -> list[Tokenized]:
    """Tokenise with the prompt masked; drop (or truncate) examples over the cutoff. Errors when
    nothing is left to train on."""
    if not examples:
        raise DataError(f"{where}: no training examples")
    toks = tokenize_examples(examples, tokenizer, cfg.template, max_length=cfg.cutoff, overflow=cfg.overflow)
    # a sequence trains only if some label after the first position is an output token
    kept = [t for t in toks if t is not None and any(x != IGNORE_INDEX for x in t.labels[1:])]
    if not kept:
        full = tokenize_examples(examples, tokenizer, cfg.template)
        shortest = min(len(t.input_ids) for t in full)
        raise DataError(f"{where}: all {len(examples)} examples are longer than the cutoff of {cfg.cutoff} tokens "
                        f"(the shortest has {shortest}): raise --cutoff or use --overflow truncate")
    if len(kept) < len(examples):
        log.warning("%s: dropped %d of %d examples longer than the cutoff of %d tokens",
                    where, len(examples) - len(kept), len(examples), cfg.cutoff)
    return kept


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True,
                           mega: int = 50) -> list[list[int]]:
    """Micro-batches of example indices for one epoch, a pure function of (seed, epoch).

    Shuffled; with group_by_length, each run of `mega` batches' worth of examples is sorted by
    length (so a batch pads little), batch order is shuffled again and the longest batch goes first
    (out-of-memory shows at once, as in HF's LengthGroupedSampler)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    if not group_by_length:
        return [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    batches = []
    span = batch_size * mega
    for s in range(0, len(perm), span):
        chunk = sorted(perm[s:s + span], key=lambda i: (-lengths[i], i))
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    longest = max(range(len(batches)), key=lambda b: (max(lengths[i] for i in batches[b]), -b))
    batches[0], batches[longest] = batches[longest], batches[0]
    return batches


def rank_batches(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """This rank's share of an epoch's batches; the list is wrapped to a multiple of world so every
    rank runs the same number of steps."""
    if world == 1:
        return batches
    padded = batches + batches[: (-len(batches)) % world]
    return padded[rank::world]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (float32) over the positions whose label is not masked."""
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def micro_batch_loss(model, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                     aux_loss: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token cross-entropy, the loss to backpropagate) of one micro-batch: the sum ×
    weights[0] (world / output tokens of the whole step), plus weights[1] (the balancing loss's
    coefficient / micro-batches of the step) × the MoE layers' load-balancing loss when `aux_loss`.
    The weights are a device tensor, so a captured micro-batch (training.graphs) replays any step."""
    part = token_loss_sum(logits, labels)
    loss = part * weights[0]
    if aux_loss:
        from rocket.moe.inject import moe_aux_loss
        loss = loss + weights[1] * moe_aux_loss(model)
    return part, loss
