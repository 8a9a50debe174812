"""Fused linear + cross-entropy for scoring: per-example mean loss over label tokens.

Only rows that carry a label are projected to the vocabulary (prompt and padding rows never are),
and they are projected in row chunks, so at most [chunk, V] logits exist at once, in the hidden
states' dtype (as HF computes them) and never as a float32 [tokens, V] copy. A Triton kernel reads
each logits row once with an online logsumexp in float32 and writes `lse − logit[target]`; the
per-example mean is a segment sum over the rows. Forward only.

Reference: `rocket.kernels.reference.linear_cross_entropy_per_example`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rocket.kernels import use_triton
from rocket.kernels import reference

IGNORE_INDEX = reference.IGNORE_INDEX
CHUNK_ELEMENTS = 1 << 28  # logits elements alive at once (512 MiB in bf16)


@triton.jit
def _row_cross_entropy(logits_ptr, targets_ptr, loss_ptr, V, stride_row, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    # finite sentinel: lanes past V never see a real logit and must add exactly 0 to the sum
    m = tl.full((BLOCK_V,), -1e30, tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        vv = v0 + tl.arange(0, BLOCK_V)
        ok = vv < V
        z = tl.load(base + vv, mask=ok, other=-1e30).to(tl.float32)
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.where(ok, tl.exp(z - m_new), 0.0)
        m = m_new
    m_all = tl.max(m, axis=0)
    lse = m_all + tl.log(tl.sum(s * tl.exp(m - m_all), axis=0))
    target = tl.load(targets_ptr + row)
    z_t = tl.load(base + target).to(tl.float32)
    tl.store(loss_ptr + row, lse - z_t)


def row_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats, float32) of every row of logits [n, V] against targets [n] in [0, V)."""
    n, V = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        block_v = min(4096, triton.next_power_of_2(V))
        _row_cross_entropy[(n,)](logits, targets.contiguous(), loss, V, logits.stride(0), BLOCK_V=block_v,
                                 num_warps=8 if block_v >= 2048 else 4)
    return loss


def linear_cross_entropy_per_example(hidden, lm_weight, targets, example_ids, n_examples,
                                     chunk_rows: int | None = None, validate: bool = True) -> torch.Tensor:
    """Per-example mean cross-entropy of `hidden @ lm_weightᵀ` against `targets` (float32 [n_examples]).

    hidden: [N, H]; lm_weight: [V, H]; targets: [N], IGNORE_INDEX rows skipped (already shifted: row i
    predicts targets[i]); example_ids: [N] in [0, n_examples). An example without label rows is an error.
    validate=False: the caller guarantees every row is a label row with an in-vocabulary target and
    every example has one (no host synchronisation then).
    """
    if not use_triton(hidden, lm_weight):
        return reference.linear_cross_entropy_per_example(hidden, lm_weight, targets, example_ids, n_examples)
    V = lm_weight.shape[0]
    h, tgt, ids = hidden, targets.long(), example_ids.long()
    if validate:
        keep = torch.nonzero(targets != IGNORE_INDEX, as_tuple=True)[0]
        h, tgt, ids = hidden[keep], tgt[keep], ids[keep]
        if bool(((tgt < 0) | (tgt >= V)).any()):
            raise ValueError(f"linear_cross_entropy_per_example: a target is outside the vocabulary [0, {V})")
    # index_add_, not bincount: bincount reads its maximum back to the host (a sync per call)
    counts = torch.zeros(n_examples, dtype=torch.float32, device=hidden.device).index_add_(
        0, ids, torch.ones(ids.shape[0], dtype=torch.float32, device=hidden.device))
    if validate and bool((counts == 0).any()):
        raise ValueError("linear_cross_entropy_per_example: an example has no label tokens")
    chunk = chunk_rows or max(1, CHUNK_ELEMENTS // V)
    weight = lm_weight.to(hidden.dtype)
    tok = torch.empty(h.shape[0], dtype=torch.float32, device=hidden.device)
    for s in range(0, h.shape[0], chunk):
        logits = h[s:s + chunk] @ weight.t()
        tok[s:s + chunk] = row_cross_entropy(logits, tgt[s:s + chunk])
    sums = torch.zeros(n_examples, dtype=torch.float32, device=hidden.device).index_add_(0, ids, tok)
    return sums / counts
