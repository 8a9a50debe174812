"""Peers that rocket's kernels are measured against. They reuse the test references
(kernels/reference.py) wherever the reference is itself the peer's algorithm."""
from rocket.kernels import reference as R

# Dedup: the blocked torch matmul join (the exact rule, one [block, n] similarity tile at a time).
dedup_blocked_torch = R.dedup


# --------------------------------------------------------------------------- scoring (issue 4)
# Per-example losses of many LoRA adapters with peft, three ways. `peft_model` holds the adapters
# (`names`); `tokenized` are rocket.data.Tokenized. Losses as in the tests: HF logits, then the
# reference masked cross-entropy (float32) per example.
def _peft_rows(tokenized, idx, device):
    import torch
    L = max(len(tokenized[k].input_ids) for k in idx)
    ids = torch.zeros(len(idx), L, dtype=torch.long)
    mask = torch.zeros(len(idx), L, dtype=torch.long)
    labels = torch.full((len(idx), L), R.IGNORE_INDEX, dtype=torch.long)
    for b, k in enumerate(idx):  # right padding, as HF training does
        t = tokenized[k]
        n = len(t.input_ids)
        ids[b, :n], mask[b, :n], labels[b, :n] = torch.tensor(t.input_ids), 1, torch.tensor(t.labels)
    return ids.to(device), mask.to(device), labels.to(device)


def peft_loop_losses(peft_model, names, tokenized):
    """The per-adapter, per-example loop: set_adapter, batch 1."""
    import torch
    device = next(peft_model.parameters()).device
    out = torch.zeros(len(names), len(tokenized), device=device)
    with torch.no_grad():
        for a, name in enumerate(names):
            peft_model.set_adapter(name)
            for k in range(len(tokenized)):
                ids, _, labels = _peft_rows(tokenized, [k], device)
                out[a, k] = R.masked_cross_entropy_per_example(peft_model(input_ids=ids).logits, labels)[0]
    return out


def peft_padded_losses(peft_model, names, tokenized, batch: int = 16):
    """set_adapter per adapter, then length-sorted padded batches of examples."""
    import torch
    device = next(peft_model.parameters()).device
    order = sorted(range(len(tokenized)), key=lambda k: -len(tokenized[k].input_ids))
    out = torch.zeros(len(names), len(tokenized), device=device)
    with torch.no_grad():
        for a, name in enumerate(names):
            peft_model.set_adapter(name)
            for s in range(0, len(order), batch):
                idx = order[s:s + batch]
                ids, mask, labels = _peft_rows(tokenized, idx, device)
                logits = peft_model(input_ids=ids, attention_mask=mask).logits
                out[a, idx] = R.masked_cross_entropy_per_example(logits, labels)
    return out


def peft_mixed_losses(peft_model, names, tokenized, batch: int = 16):
    """peft's mixed-adapter batches: every (adapter, example) row in length-sorted padded batches,
    `adapter_names=` per row."""
    import torch
    device = next(peft_model.parameters()).device
    pairs = sorted(((a, k) for a in range(len(names)) for k in range(len(tokenized))),
                   key=lambda p: (-len(tokenized[p[1]].input_ids), p[1], p[0]))
    out = torch.zeros(len(names), len(tokenized), device=device)
    with torch.no_grad():
        for s in range(0, len(pairs), batch):
            chunk = pairs[s:s + batch]
            ids, mask, labels = _peft_rows(tokenized, [k for _, k in chunk], device)
            logits = peft_model(input_ids=ids, attention_mask=mask, adapter_names=[names[a] for a, _ in chunk]).logits
            loss = R.masked_cross_entropy_per_example(logits, labels)
            for (a, k), v in zip(chunk, loss):
                out[a, k] = v
    return out
