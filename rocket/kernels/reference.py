"""Plain-torch references of every rocket kernel.

They are the CPU path of the package and the oracles of the tests: written for clarity, never for
speed, and with the exact semantics of docs/design.md. Every Triton/CUDA kernel must agree with the
function here of the same name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- LoRA mixture of experts
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 when the oracle is fed float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def route_topk(x: torch.Tensor, router_weight: torch.Tensor, top_k: int):
    """Router of a LoRA-MoE layer: softmax(x Gᵀ) in float32, top-k; for k ≥ 2 the chosen
    probabilities renormalised to sum 1, for k = 1 the probability itself (as Switch Transformer:
    a renormalised single weight would be 1 and give the router no gradient; docs/design.md).

    x: [T, d_in], router_weight: [E, d_in]. Returns (weights [T, k] float32, experts [T, k] int64,
    probs [T, E] float32). Gradients flow to x and the router through `weights`.
    """
    logits = x.float() @ router_weight.float().t()
    probs = torch.softmax(logits, dim=-1)
    top_p, top_e = torch.topk(probs, top_k, dim=-1)
    weights = top_p / top_p.sum(dim=-1, keepdim=True) if top_k > 1 else top_p
    return weights, top_e, probs


def lora_moe(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora=None):
    """y = x Wᵀ + b + Σ_{(e,w) in topk(x)} w · s_e · B_e A_e x_lora, w as route_topk gives them.

    x: [..., d_in]; weight: [d_out, d_in] (frozen base); bias: [d_out] or None;
    lora_A: [E, r, d_in]; lora_B: [E, d_out, r]; scaling: [E] (float); router_weight: [E, d_in];
    x_lora: the input of the expert path (x after dropout), defaults to x. Routing uses x.
    Expert math is float32 (float64 for float64 inputs); the output has x's dtype.
    """
    shape = x.shape
    acc = _acc_dtype(x)
    x2 = x.reshape(-1, shape[-1])
    xl = x2 if x_lora is None else x_lora.reshape(-1, shape[-1])
    y = F.linear(x2, weight, bias).to(acc)
    weights, experts, _ = route_topk(x2, router_weight, top_k)
    scaling = torch.as_tensor(scaling, device=x.device).to(acc)
    # dense over experts: [T, E] gate with zeros outside the top-k
    gate = torch.zeros(x2.shape[0], lora_A.shape[0], dtype=acc, device=x.device)
    gate = gate.scatter(1, experts, weights.to(acc)) * scaling
    h = torch.einsum("td,erd->ter", xl.to(acc), lora_A.to(acc))
    delta = torch.einsum("ter,eor->teo", h, lora_B.to(acc))
    y = y + torch.einsum("te,teo->to", gate, delta)
    return y.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def lora_moe_loop(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora=None):
    """The reference implementation's algorithm, deliberately naive: one masked pass per expert with `index_add_`."""
    shape = x.shape
    acc = _acc_dtype(x)
    x2 = x.reshape(-1, shape[-1])
    xl = x2 if x_lora is None else x_lora.reshape(-1, shape[-1])
    out = F.linear(x2, weight, bias).to(acc)
    weights, experts, _ = route_topk(x2, router_weight, top_k)
    for e in range(lora_A.shape[0]):
        rows, slot = torch.nonzero(experts == e, as_tuple=True)
        if rows.numel() == 0:
            continue
        h = xl[rows].to(acc) @ lora_A[e].to(acc).t()
        d = (h @ lora_B[e].to(acc).t()) * (float(scaling[e]) * weights[rows, slot, None].to(acc))
        out = out.index_add(0, rows, d)
    return out.to(x.dtype).reshape(*shape[:-1], weight.shape[0])


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: E · Σ_e f_e · P_e (1.0 when perfectly balanced).

    f_e: fraction of (token, slot) assignments routed to e; P_e: mean router probability of e.
    """
    # a comparison, not bincount: bincount reads the largest id on the host, which a CUDA graph forbids
    counts = (experts.reshape(-1, 1) == torch.arange(n_experts, device=experts.device)).sum(dim=0).float()
    frac = counts / experts.numel()
    return n_experts * torch.sum(frac * probs.float().mean(dim=0))


# --------------------------------------------------------------------------- multi-adapter LoRA
def multi_lora(x, lora_A, lora_B, scaling, adapter_ids):
    """Per-row adapter LoRA delta: out[i] = s_m · B_m A_m x[i] with m = adapter_ids[i].

    x: [N, d_in]; lora_A: [M, r, d_in]; lora_B: [M, d_out, r]; scaling: [M]; adapter_ids: [N]
    int, -1 = no adapter (zero delta). Zero-padded ranks contribute nothing. Returns float32.
    """
    ids = adapter_ids.long()
    out = torch.zeros(x.shape[0], lora_B.shape[1], dtype=torch.float32, device=x.device)
    for m in torch.unique(ids[ids >= 0]).tolist():
        rows = torch.nonzero(ids == m, as_tuple=True)[0]
        h = x[rows].float() @ lora_A[m].float().t()
        out[rows] = (h @ lora_B[m].float().t()) * float(scaling[m])
    return out


# --------------------------------------------------------------------------- Llama layer glue (scoring)
def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: float32 statistics, normalised value rounded to h's dtype, times weight."""
    x = h.float()
    n = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return weight * n


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF apply_rotary_pos_emb on x [T, heads, d] with cos/sin [T, d]: x·cos + rotate_half(x)·sin."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Gated MLP activation: silu(gate) · up."""
    return F.silu(gate) * up


def lora_merge(weight, lora_A, lora_B, scaling):
    """A LoRA merged into its base weight: W + s · B A, accumulated in float32, in W's dtype."""
    return (weight.float() + float(scaling) * (lora_B.float() @ lora_A.float())).to(weight.dtype)


# --------------------------------------------------------------------------- losses
def masked_cross_entropy_per_example(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) per example over label tokens, HF shift convention.

    logits: [B, T, V]; labels: [B, T] with IGNORE_INDEX on prompt/padding. Position t of the
    logits predicts labels[t+1]. An example without label tokens is an error (its mean is undefined).
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("masked_cross_entropy_per_example: an example has no label tokens")
    tok = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX,
                          reduction="none")
    return tok.sum(dim=1) / counts


def linear_cross_entropy_per_example(hidden, lm_weight, targets, example_ids, n_examples):
    """Per-example mean cross-entropy of `hidden @ lm_weightᵀ` against `targets`, in float32.

    hidden: [N, H]; lm_weight: [V, H]; targets: [N] (IGNORE_INDEX rows are skipped, already
    shifted so row i predicts targets[i]); example_ids: [N] in [0, n_examples). Returns [n_examples].
    """
    keep = targets != IGNORE_INDEX
    logits = hidden[keep].float() @ lm_weight.float().t()
    tok = F.cross_entropy(logits, targets[keep].long(), reduction="none")
    ids = example_ids[keep].long()
    sums = torch.zeros(n_examples, dtype=torch.float32, device=hidden.device).index_add(0, ids, tok)
    counts = torch.bincount(ids, minlength=n_examples).float()
    return sums / counts


# --------------------------------------------------------------------------- near-duplicate removal
def priority_order_less(prio_k, k, prio_j, j):
    """True where item k outranks item j: higher priority, or equal priority and lower index."""
    return (prio_k > prio_j) | ((prio_k == prio_j) & (k < j))


def dedup(emb: torch.Tensor, threshold: float = 0.9, priority: torch.Tensor | None = None,
          block: int = 4096) -> torch.Tensor:
    """SemDeDup rule, exact: drop j iff some k that outranks j has cos(j, k) > threshold.

    emb: [n, d], rows L2-normalised by the caller (cos = dot). priority: [n] (default: all equal, so
    the lower index wins). Blocked matmul join, never the full n×n matrix. Returns kept indices,
    ascending (int64). Note the rule is not greedy: a dropped item still removes its lower-ranked
    neighbours, exactly as docs/design.md states.
    """
    n = emb.shape[0]
    prio = torch.zeros(n, dtype=torch.float32, device=emb.device) if priority is None \
        else priority.to(device=emb.device, dtype=torch.float32)
    idx = torch.arange(n, device=emb.device)
    dropped = torch.zeros(n, dtype=torch.bool, device=emb.device)
    for s in range(0, n, block):
        rows = slice(s, min(s + block, n))
        sim = emb[rows].float() @ emb.float().t()  # [b, n]
        outranks = priority_order_less(prio[None, :], idx[None, :], prio[rows, None], idx[rows, None])
        dropped[rows] = ((sim > threshold) & outranks).any(dim=1)
    return torch.nonzero(~dropped, as_tuple=True)[0]


# --------------------------------------------------------------------------- adapter similarity
def lora_delta_inner(A_i, B_i, A_j, B_j):
    """<B_i A_i, B_j A_j>_F = tr((B_iᵀ B_j)(A_j A_iᵀ)) with r×r work (batched over leading dims)."""
    acc = _acc_dtype(A_i)
    BtB = B_i.transpose(-1, -2).to(acc) @ B_j.to(acc)      # [.., r_i, r_j]
    AAt = A_j.to(acc) @ A_i.transpose(-1, -2).to(acc)      # [.., r_j, r_i]
    return (BtB * AAt.transpose(-1, -2)).sum(dim=(-1, -2))
