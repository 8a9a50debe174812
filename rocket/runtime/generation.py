"""Multi-adapter greedy decoding and exact-match accuracy (docs/design.md, 'Accuracy').

Every (adapter, prompt) pair decodes at once: rows of a left-padded batch carry their adapter id
(through the MultiLoraLinear layers of rocket.runtime.adapters) and share one KV cache, so N
adapters × K prompts cost a few batched forwards per generated token instead of N·K `generate`
calls. A model without adapter rows (a base model, a LoRA-MoE) decodes through the same loop.
"""
from __future__ import annotations

import inspect
import torch
from tqdm.auto import tqdm
from rocket.data.tokenize import Tokenized, pad_batch
from rocket.data.answers import DEFAULT_MAX_NEW_TOKENS, AnswerKey
from rocket.errors import RocketError


def _kv_cache_io(decoder):
    """(name of the decoder's KV-cache argument, the cache of an output): transformers renamed
    `past_key_values` to `cache` (the old name is deprecated, to be removed in 5.40)."""
    if "cache" in inspect.signature(decoder.forward).parameters:
        return "cache", lambda state: state.cache
    return "past_key_values", lambda state: state.past_key_values


@torch.no_grad()
def greedy_generate(model, rows, prompts: list[list[int]], n_adapters: int, eos_id: int, pad_id: int,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_tokens: int | None = None,
                    progress: bool = True) -> list[list[list[int]]]:
    """Greedy continuations of every prompt under every adapter: out[a][k] = new token ids (EOS
    excluded), for a model wrapped by rocket.runtime.adapters.multi_lora_model (`rows` selects
    adapters), or with rows=None for the model as it is (n_adapters = 1: a base model, a LoRA-MoE)."""
    decoder = model.get_decoder()
    kv_arg, kv_of = _kv_cache_io(decoder)
    lm_head = model.get_output_embeddings()
    device = lm_head.weight.device
    max_tokens = max_tokens or (32768 if device.type == "cuda" else 4096)
    lengths = [len(p) for p in prompts]
    pairs = sorted(((a, k) for k in range(len(prompts)) for a in range(n_adapters)),
                   key=lambda p: (-lengths[p[1]], p[1], p[0]))
    batches, cur = [], []
    for pair in pairs:
        width = (lengths[cur[0][1]] if cur else lengths[pair[1]]) + max_new_tokens
        if cur and (len(cur) + 1) * width > max_tokens:
            batches.append(sorted(cur))
            cur = []
        cur.append(pair)
    if cur:
        batches.append(sorted(cur))

    out = [[[] for _ in prompts] for _ in range(n_adapters)]
    bar = tqdm(total=len(pairs), desc="generating", unit="pair", disable=not progress)
    for batch in batches:
        B = len(batch)
        padded = pad_batch([Tokenized.prompt_only(prompts[k]) for _, k in batch], pad_id, device, side="left")
        ids, mask = padded["input_ids"], padded["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        if rows is not None:
            rows.set([a for a, _ in batch])
        state = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        steps = []
        for step in range(max_new_tokens):
            nxt = lm_head(state.last_hidden_state[:, -1]).argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, eos_id), nxt)
            steps.append(nxt)
            finished |= nxt == eos_id
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
            positions = positions[:, -1:] + 1
            state = decoder(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions,
                            use_cache=True, **{kv_arg: kv_of(state)})
        tokens = torch.stack(steps, dim=1).tolist()
        for (a, k), seq in zip(batch, tokens):
            out[a][k] = seq[:seq.index(eos_id)] if eos_id in seq else seq
        bar.update(B)
    bar.close()
    return out


def adapter_accuracy(model, rows, tokenizer, key: AnswerKey, prompts: list[list[int]], n_adapters: int,
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, max_tokens: int | None = None,
                     progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """acc [n_adapters] = mean over the prompts of key.correct(greedy generation), and read
    [n_adapters] = how many generations the extractor read an answer in (float64); rows as in
    greedy_generate (None: the model as it is)."""
    if tokenizer is None:
        raise RocketError("accuracy: a tokenizer is needed to decode generations")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gens = greedy_generate(model, rows, prompts, n_adapters, tokenizer.eos_token_id, pad, max_new_tokens,
                           max_tokens, progress)
    acc = torch.zeros(n_adapters, dtype=torch.float64)
    read = torch.zeros(n_adapters, dtype=torch.float64)
    for a in range(n_adapters):
        texts = tokenizer.batch_decode(gens[a], skip_special_tokens=True)
        acc[a] = sum(key.correct(i, t) for i, t in enumerate(texts)) / len(texts)
        read[a] = sum(key.readers[i](t) is not None for i, t in enumerate(texts))
    return acc, read
