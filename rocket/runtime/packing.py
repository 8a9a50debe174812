"""Padding-free batches for scoring: rows of different lengths are concatenated into one sequence
[1, T] with per-row position ids, and attention stays inside each row through a varlen causal kernel
(flash attention on CUDA, one causal SDPA call per row elsewhere).

The kernel is registered with transformers' AttentionInterface as `rocket_packed`; a model uses it
only inside `packed_attention(model)` and only for models built on that interface (others keep
padded batches). Row boundaries travel as HF's flash-varlen kwargs (`cu_seq_lens_q`, `max_length_q`).
"""
from __future__ import annotations

from contextlib import contextmanager
import torch
import torch.nn.functional as F
from rocket.errors import RocketError


PACKED = "rocket_packed"
_registered = False


def varlen_causal_attention(q, k, v, cu_seqlens: torch.Tensor, max_len: int, scale: float | None):
    """Causal attention inside each segment of packed rows. q [T, Hq, d], k/v [T, Hkv, d] (Hkv divides
    Hq); cu_seqlens [rows+1] int32 on q's device. Returns [T, Hq, d]."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True,
                                                       False, scale=scale)[0]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    gqa = q.shape[1] != k.shape[1]
    for s, e in zip(bounds[:-1], bounds[1:]):
        out[s:e] = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                                  v[s:e].transpose(0, 1), is_causal=True, scale=scale,
                                                  enable_gqa=gqa).transpose(0, 1)
    return out


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                      max_length_q=None, **kwargs):
    """transformers attention function: query [1, Hq, T, d], key/value [1, Hkv, T, d] → ([1, T, Hq, d], None)."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise RocketError("packed attention needs one packed row of sequences and cu_seq_lens_q")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    return varlen_causal_attention(q, k, v, cu_seq_lens_q, int(max_length_q), scaling).unsqueeze(0), None


def supports_packing(model) -> bool:
    """Models whose attention goes through transformers' AttentionInterface (Llama, Mistral, Qwen2, …)."""
    return bool(getattr(model, "_supports_attention_backend", False)) and hasattr(model, "config")


@contextmanager
def packed_attention(model):
    """Switch `model` to the packed varlen attention for the duration (restored on exit)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        AttentionInterface.register(PACKED, _packed_attention)
        _registered = True
    old = model.config._attn_implementation
    model.config._attn_implementation = PACKED
    try:
        yield
    finally:
        model.config._attn_implementation = old


class PackedBatch:
    """Rows (adapter, example) concatenated: input ids [1, T], position ids [1, T], cu_seqlens, and the
    label rows (position in the packed sequence, target token, row index) for the fused loss."""

    def __init__(self, rows: list[tuple[int, int]], examples, device):
        ids, pos, lab_pos, lab_tgt, lab_row, cu = [], [], [], [], [], [0]
        for r, (_, e) in enumerate(rows):
            ex = examples[e]
            ids.append(ex.ids)
            pos.append(torch.arange(len(ex.ids)))
            lab_pos.append(ex.label_pos + cu[-1])
            lab_tgt.append(ex.targets)
            lab_row.append(torch.full((len(ex.targets),), r, dtype=torch.long))
            cu.append(cu[-1] + len(ex.ids))
        self.rows = rows
        self.lengths = [cu[i + 1] - cu[i] for i in range(len(rows))]
        self.tokens = cu[-1]
        self.max_len = max(self.lengths)
        self.input_ids = torch.cat(ids)[None].to(device, non_blocking=True)
        self.position_ids = torch.cat(pos)[None].to(device, non_blocking=True)
        self.cu_seqlens = torch.tensor(cu, dtype=torch.int32).to(device, non_blocking=True)
        self.label_pos = torch.cat(lab_pos).to(device, non_blocking=True)
        self.targets = torch.cat(lab_tgt).to(device, non_blocking=True)
        self.label_row = torch.cat(lab_row).to(device, non_blocking=True)
        self.adapters = torch.tensor([a for a, _ in rows]).to(device, non_blocking=True)
        self.example_ids = torch.tensor([e for _, e in rows]).to(device, non_blocking=True)

    def forward_kwargs(self) -> dict:
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, use_cache=False,
                    cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens, max_length_q=self.max_len,
                    max_length_k=self.max_len)


def pack_rows(rows: list[tuple[int, int]], lengths: list[int], max_tokens: int) -> list[list[tuple[int, int]]]:
    """Consecutive runs of `rows` holding ≤ max_tokens real tokens each (a longer row goes alone)."""
    batches, cur, used = [], [], 0
    for row in rows:
        n = lengths[row[1]]
        if cur and used + n > max_tokens:
            batches.append(cur)
            cur, used = [], 0
        cur.append(row)
        used += n
    if cur:
        batches.append(cur)
    return batches
