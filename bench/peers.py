"""Peers that rocket's kernels are measured against. They reuse the test references
(kernels/reference.py) wherever the reference is itself the peer's algorithm."""
from rocket.kernels import reference as R

# Dedup: the blocked torch matmul join (the exact rule, one [block, n] similarity tile at a time).
dedup_blocked_torch = R.dedup


def dedup_blocked_torch_lowp(emb, threshold, priority, block: int = 8192):
    """The join as one would write it in torch on a GPU: rank order, then per row block one cuBLAS
    matmul in the input dtype (bf16 tensor cores) against the earlier rows only, threshold, strict
    lower triangle, any. Materialises a [block, n] tile per step; decisions in the input dtype."""
    import torch
    n = emb.shape[0]
    order = torch.sort(priority.to(emb.device).double(), descending=True, stable=True).indices
    x = emb.index_select(0, order)
    dropped = torch.zeros(n, dtype=torch.bool, device=emb.device)
    for s in range(0, n, block):
        e = min(n, s + block)
        dropped[s:e] = (x[s:e] @ x[:e].t() > threshold).tril_(s - 1).any(dim=1)
    return torch.sort(order[~dropped]).values


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


# --------------------------------------------------------------------------- selection (issue 5)
# Mean per-module ΔW cosine of n adapters that all cover every module; `modules` is a list of
# (A [n, r, d_in], B [n, d_out, r]) stacks. Two ways one would write it from the formula.
def delta_cos_pairwise_traces(modules, pair_chunk: int = 2048):
    """The r×r trace of DESIGN §3 pair by pair (reference.lora_delta_inner), batched over chunks
    of the n(n+1)/2 pairs: each pair gathers its own A_i, B_i, A_j, B_j."""
    import torch
    n = modules[0][0].shape[0]
    i, j = torch.triu_indices(n, n, device=modules[0][0].device)
    total = torch.zeros(n, n, dtype=torch.float64, device=i.device)
    for A, B in modules:
        inner = torch.empty(i.numel(), dtype=torch.float64, device=i.device)
        for s in range(0, i.numel(), pair_chunk):
            a, b = i[s:s + pair_chunk], j[s:s + pair_chunk]
            inner[s:s + pair_chunk] = R.lora_delta_inner(A[a], B[a], A[b], B[b]).double()
        full = torch.zeros(n, n, dtype=torch.float64, device=i.device)
        full[i, j] = inner
        full[j, i] = inner
        norm = full.diagonal().sqrt()
        total += full / (norm[:, None] * norm[None, :])
    return total / len(modules)


def delta_cos_explicit(modules, chunk: int = 16):
    """Form every ΔW = B A (d_out × d_in) in float32, flatten, normalise, one Gram per module."""
    import torch
    n = modules[0][0].shape[0]
    total = torch.zeros(n, n, dtype=torch.float64, device=modules[0][0].device)
    for A, B in modules:
        flat = torch.cat([(B[s:s + chunk].float() @ A[s:s + chunk].float()).flatten(1)
                          for s in range(0, n, chunk)])
        flat = flat / flat.norm(dim=1, keepdim=True)
        total += (flat @ flat.T).double()
        del flat
    return total / len(modules)
