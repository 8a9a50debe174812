"""Peers that rocket's kernels are measured against. They reuse the test references
(rocket/kernels/reference.py) wherever the reference is itself the peer's algorithm."""
from rocket.kernels import reference

# Dedup: the blocked torch matmul join (the exact rule, one [block, n] similarity tile at a time).
dedup_blocked_torch = reference.dedup


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


# --------------------------------------------------------------------------- scoring (bench/test_scoring.py)
# Per-example losses of many LoRA adapters with peft, three ways. `peft_model` holds the adapters
# (`names`); `tokenized` are rocket.data.Tokenized. Losses as in the tests: HF logits, then the
# reference masked cross-entropy (float32) per example.
def _peft_rows(tokenized, idx, device):
    import torch
    L = max(len(tokenized[k].input_ids) for k in idx)
    ids = torch.zeros(len(idx), L, dtype=torch.long)
    mask = torch.zeros(len(idx), L, dtype=torch.long)
    labels = torch.full((len(idx), L), reference.IGNORE_INDEX, dtype=torch.long)
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
                out[a, k] = reference.masked_cross_entropy_per_example(peft_model(input_ids=ids).logits, labels)[0]
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
                out[a, idx] = reference.masked_cross_entropy_per_example(logits, labels)
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
            loss = reference.masked_cross_entropy_per_example(logits, labels)
            for (a, k), v in zip(chunk, loss):
                out[a, k] = v
    return out


# --------------------------------------------------------------------------- selection (bench/test_selection.py)
# Mean per-module ΔW cosine of n adapters that all cover every module; `modules` is a list of
# (A [n, r, d_in], B [n, d_out, r]) stacks. Two ways one would write it from the formula.
def delta_cos_pairwise_traces(modules, pair_chunk: int = 2048):
    """The r×r trace of docs/design.md §4 ('Group diversity') pair by pair (reference.lora_delta_inner),
    batched over chunks of the n(n+1)/2 pairs: each pair gathers its own A_i, B_i, A_j, B_j."""
    import torch
    n = modules[0][0].shape[0]
    i, j = torch.triu_indices(n, n, device=modules[0][0].device)
    total = torch.zeros(n, n, dtype=torch.float64, device=i.device)
    for A, B in modules:
        inner = torch.empty(i.numel(), dtype=torch.float64, device=i.device)
        for s in range(0, i.numel(), pair_chunk):
            a, b = i[s:s + pair_chunk], j[s:s + pair_chunk]
            inner[s:s + pair_chunk] = reference.lora_delta_inner(A[a], B[a], A[b], B[b]).double()
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


# --------------------------------------------------------------------------- LoRA-MoE layer (bench/test_lora_moe.py)
# One LoRA-MoE layer y = xWᵀ + b + Σ_topk w·s_e·B_e A_e x (2-D x), gradients by autograd.
# The reference implementation's algorithm: softmax → top-k → renorm (k ≥ 2; p itself at k = 1, as
# reference.route_topk), one masked pass per expert with index_add.
lora_moe_loop = reference.lora_moe_loop


def lora_moe_dense_einsum(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k):
    """Every expert on every token in x's dtype, the gate zero off the top-k: two einsums (the
    second contracts experts and ranks together, so it is one [T, E·r] × [E·r, d_out] GEMM)."""
    import torch
    import torch.nn.functional as F
    weights, experts, _ = reference.route_topk(x, router_weight, top_k)
    gate = torch.zeros(x.shape[0], lora_A.shape[0], device=x.device).scatter(1, experts, weights) * scaling
    h = torch.einsum("td,erd->ter", x, lora_A) * gate.to(x.dtype)[:, :, None]
    return F.linear(x, weight, bias) + torch.einsum("ter,eor->to", h, lora_B)


def lora_single(x, weight, bias, lora_A, lora_B, scaling):
    """One peft-style LoRA (lora_A [r, d_in], lora_B [d_out, r]): base(x) + B(A x)·s."""
    import torch.nn.functional as F
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_A), lora_B) * scaling


def _expert_tiles(sorted_experts, n_experts, block_m=64):
    """SGMV tile table [3, n_tiles] (expert, start, end) of expert-sorted assignment rows, and each
    expert's row range (one host sync, as generic MoE layers do)."""
    import torch
    counts = torch.bincount(sorted_experts, minlength=n_experts).cpu()
    ends = torch.cumsum(counts, 0)
    rows = []
    for e, (c, end) in enumerate(zip(counts.tolist(), ends.tolist())):
        starts = torch.arange(end - c, end, block_m)
        rows.append(torch.stack([torch.full_like(starts, e), starts, (starts + block_m).clamp(max=end)]))
    bounds = [(end - c, end) for c, end in zip(counts.tolist(), ends.tolist())]
    return torch.cat(rows, 1).to(torch.int32).to(sorted_experts.device), bounds


def lora_moe_grouped(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k):
    """A generic grouped MoE in Triton: the T·k (token, expert) assignments are sorted by expert,
    gathered, run through the segmented (SGMV) shrink/expand kernel, weighted and scattered back
    with index_add; the backward runs the same kernel transposed for ∂x and per-expert segment
    GEMMs for ∂A, ∂B. Routing (and its gradient) by autograd of reference.route_topk."""
    import torch
    import torch.nn.functional as F
    weights, experts, _ = reference.route_topk(x, router_weight, top_k)
    order = torch.argsort(experts.reshape(-1), stable=True)
    tiles, bounds = _expert_tiles(experts.reshape(-1)[order], lora_A.shape[0])
    delta = _GroupedLoraMoE.apply(x, lora_A, lora_B, scaling.float().contiguous(), weights, order, tiles, top_k,
                                  bounds)
    return F.linear(x, weight, bias) + delta


def _grouped_cls():
    import torch
    from rocket.kernels.multi_lora import multi_lora_add_

    class GroupedLoraMoE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, A, B, scaling, weights, order, tiles, top_k, bounds):
            rows = order // top_k
            xs = x[rows].contiguous()
            d = torch.zeros(xs.shape[0], B.shape[1], device=x.device, dtype=torch.float32)
            multi_lora_add_(d, xs, A.contiguous(), B.contiguous(), scaling, tiles)
            w = weights.reshape(-1)[order]
            out = torch.zeros(x.shape[0], B.shape[1], device=x.device, dtype=torch.float32)
            out.index_add_(0, rows, d * w[:, None])
            ctx.save_for_backward(xs, d, w, rows, order, tiles, A, B, scaling)
            ctx.shape, ctx.bounds, ctx.scales = (x.shape[0], top_k), bounds, scaling.tolist()
            return out.to(x.dtype)

        @staticmethod
        def backward(ctx, g):
            xs, d, w, rows, order, tiles, A, B, scaling = ctx.saved_tensors
            T, k = ctx.shape
            gs = g[rows]
            gw = torch.zeros(T * k, device=g.device, dtype=torch.float32)
            gw[order] = (gs.float() * d).sum(1)
            gsw = (gs.float() * w[:, None]).to(g.dtype)
            gxs = torch.zeros(xs.shape[0], xs.shape[1], device=g.device, dtype=torch.float32)
            multi_lora_add_(gxs, gsw, B.transpose(1, 2).contiguous(), A.transpose(1, 2).contiguous(), scaling, tiles)
            gx = torch.zeros(T, xs.shape[1], device=g.device, dtype=torch.float32).index_add_(0, rows, gxs)
            gA, gB = torch.zeros_like(A), torch.zeros_like(B)
            for e, (lo, hi) in enumerate(ctx.bounds):
                if hi > lo:
                    h = xs[lo:hi] @ A[e].t()
                    u = gsw[lo:hi] @ B[e]
                    gB[e] = (gsw[lo:hi].t() @ h) * ctx.scales[e]
                    gA[e] = (u.t() @ xs[lo:hi]) * ctx.scales[e]
            return gx.to(g.dtype), gA, gB, None, gw.view(T, k), None, None, None, None

    return GroupedLoraMoE


class _LazyGrouped:
    """Builds the autograd Function on first use (the kernel import needs triton)."""
    cls = None

    @classmethod
    def apply(cls, *args):
        if cls.cls is None:
            cls.cls = _grouped_cls()
        return cls.cls.apply(*args)


_GroupedLoraMoE = _LazyGrouped
