"""LoRA mixture of experts: y = x Wᵀ + b + Σ_{(e,w) in topk(x)} w · s_e · B_e A_e x (docs/design.md):
the autograd Function (LoraMoEFunction) and the public entry point `lora_moe`.

Design: the experts are few and thin (E·r = 128 at E=8, r=16, against d = 4096), so instead of
gathering tokens per expert we treat the E experts as ONE concatenated LoRA of rank E·r and make
routing a mask on its [T, E·r] intermediate:

  forward   route_fwd: [logits | h] = x [G; A_cat]ᵀ, then in the same kernel p, top-k, w (p
            renormalised over the top-k; p itself at k = 1) and
            hm = h · (w·s)[expert of column]                 one read of x, fp32 accumulators
            (its last programs lay out B_cat [d_out, E·r] from lora_B [E, d_out, r])
            y = [x | hm] [W | B_cat]ᵀ + b                     the base GEMM with E·r extra K (≈3% FLOPs)*
  backward  route_bwd: ghm = g B_cat, then in the same kernel gh = ghm·(w·s) and ∂logits via
            top-k/renorm (k ≥ 2)/softmax → gcat = [gh | ∂logits]   one read of g
            (its last programs lay out [A_cat; G] in x's dtype)
            ∂B_cat = gᵀ hm                                    K = T, cuBLAS
            [∂A_cat; ∂G] = gcatᵀ x                            K = T, cuBLAS, one read of x
            ∂x = [g | gcat] [W; A_cat; G]                     the base backward GEMM with extra K

* dual_mm (rocket/kernels/dual_mm.py): one Triton GEMM with two K segments (pointer loads, or TMA
  descriptors), or cuBLAS (the LoRA product first, read back as C by the base product); the
  `gemm_backend` argument picks one, and "auto" (the default) takes cuBLAS up to SMALL_M tokens and
  above times the three once per shape and keeps the fastest.

route_fwd and route_bwd, their tuner and launches are in rocket/kernels/lora_moe_route.py.

Small token counts (training micro-batches) are bound by host launch time, not by the GPU: the
layer is 2 Triton + 6 cuBLAS launches forward and backward together and no copies (the route
kernels lay out the weights the GEMMs need, float32 masters rounded: no cast nodes in the graph);
the route kernels are launched without Triton's per-call binding; and autotuning keys bucket the
token count to a power of two (variable-length batches do not retune).

No [T, E, d] tensor exists; the only per-token intermediates are [T, E·r] and [T, E]. The
reference (rocket/kernels/reference.py: lora_moe, route_topk) is the CPU path and the oracle.

Forward and backward can be captured in a CUDA graph (torch.cuda.graph, make_graphed_callables),
which removes the host's launch cost at small T. Nothing is timed inside a capture, so run the
layer once per token-count bucket before capturing, as torch.cuda.graphs asks: the capture then
replays the tuned kernels. Under torch.compile the layer runs as it is and the model around it is
compiled (one graph break per layer call).
"""
from __future__ import annotations

import torch

from rocket.kernels import reference, use_triton
from rocket.kernels.dual_mm import _takes_cublas, check_backend, dual_mm
from rocket.kernels.lora_moe_route import route_backward, route_forward


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(..., out_dtype=) (CUDA, half → fp32)


def _mm_as(a, b, dtype):
    """a @ b as `dtype`: a float32 result of half operands comes straight out of cuBLAS where torch
    can (no rounding to half, no cast kernel)."""
    if dtype == a.dtype:
        return torch.mm(a, b)
    if _MM_OUT_DTYPE and a.is_cuda and dtype == torch.float32:
        return torch.mm(a, b, out_dtype=dtype)
    return torch.mm(a, b).to(dtype)


class LoraMoEFunction(torch.autograd.Function):
    """y (and, with `routing`, probs and experts) of the LoRA-MoE layer on 2-D x; W and b frozen.

    lora_A, lora_B, router_weight may be in another float dtype than x (float32 masters of a bf16
    model): they are rounded to x's dtype inside the kernels, and their gradients come back in their
    own dtype, so the layer needs no cast nodes in the autograd graph. Small token counts are bound
    by the host, so both directions issue as few torch calls as they can."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora, routing, gemm_backend):
        early = _takes_cublas(x.shape[0], x.dtype, gemm_backend)
        w_t = weight.t()
        if early:  # cuBLAS: the base product is issued first, the rest is issued while it runs
            y = torch.mm(x, w_t) if bias is None else torch.addmm(bias, x, w_t)
        probs, experts, h, hm, B_cat = route_forward(x, x_lora, lora_A, lora_B, router_weight, scaling, top_k)
        if early:
            y.addmm_(hm, B_cat.t())
        else:
            y = dual_mm(x, w_t, hm, B_cat.t(), bias, backend=gemm_backend)
        ctx.save_for_backward(x, x_lora, weight, lora_A, lora_B, B_cat, router_weight, scaling, h, hm, probs, experts)
        ctx.gemm_backend = gemm_backend
        if not routing:
            return y
        ctx.mark_non_differentiable(experts)
        ctx.set_materialize_grads(False)  # an unused probs output gives None, not a zero tensor to read
        return y, probs, experts

    @staticmethod
    def backward(ctx, gy, gprobs=None, _ge=None):
        x, x_lora, weight, lora_A, lora_B, B_cat, G, scaling, h, hm, probs, experts = ctx.saved_tensors
        need = ctx.needs_input_grad
        T = x.shape[0]
        E, r, d_in = lora_A.shape
        ER = E * r
        g = torch.zeros(T, weight.shape[0], device=x.device, dtype=x.dtype) if gy is None else gy.contiguous()
        early = need[0] and _takes_cublas(T, x.dtype, ctx.gemm_backend)
        gx = torch.mm(g, weight) if early else None  # as in forward: the base product of ∂x first
        # AG = [A_cat; G] in x's dtype comes out of the same kernel: the extra K of ∂x and ∂x_lora
        gcat, AG = route_backward(g, B_cat, h, scaling, probs, experts, gprobs, lora_A, G, need[0] or need[8])
        gA = gB = gG = gxl = None
        if need[4]:  # a permuted view: AccumulateGrad lays it out as lora_B (in C++, no Python copy)
            gB = _mm_as(g.t(), hm if hm.shape[1] == ER else hm[:, :ER], lora_B.dtype).view(-1, E, r).permute(1, 0, 2)
        if x_lora is None and need[3] and need[6] and lora_A.dtype == G.dtype:
            gAG = _mm_as(gcat[:, :ER + E].t(), x, lora_A.dtype)  # one read of x for both
            gA, gG = gAG[:ER].view(E, r, d_in), gAG[ER:]
        else:
            xl = x if x_lora is None else x_lora
            gA = _mm_as(gcat[:, :ER].t(), xl, lora_A.dtype).view(E, r, d_in) if need[3] else None
            gG = _mm_as(gcat[:, ER:ER + E].t(), x, G.dtype) if need[6] else None
        if need[0]:
            # x feeds the router always and the experts unless x_lora does (then only G's rows)
            lo, hi = (0, ER + E if early else AG.shape[0]) if x_lora is None else (ER, ER + E)
            gc, ag = gcat[:, lo:hi], AG[lo:hi]
            gx = gx.addmm_(gc, ag) if early else dual_mm(g, weight, gc, ag, backend=ctx.gemm_backend)
        if need[8]:
            gxl = gcat[:, :ER] @ AG[:ER]
        return gx, None, None, gA, gB, None, gG, None, gxl, None, None


def _as(t, dtype):
    """t in `dtype`, contiguous; no dispatch when it already is (host time counts at small T)."""
    return (t if t.dtype == dtype else t.to(dtype)).contiguous()


def _check_operands(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora):
    """A one-line ValueError naming the first operand whose shape disagrees with x, weight and lora_A:
    the kernels index every operand by those shapes, so a mismatch would read out of bounds."""
    if lora_A.dim() != 3:
        raise ValueError(f"lora_moe: lora_A must be [E, r, d_in], got {list(lora_A.shape)}")
    E, r, d_in = lora_A.shape
    d_out = weight.shape[0]
    n_scaling = scaling.numel() if isinstance(scaling, torch.Tensor) else len(scaling) if isinstance(
        scaling, (list, tuple)) else 1
    if (x.shape[-1] == d_in and weight.shape == (d_out, d_in) and lora_B.shape == (E, d_out, r)
            and router_weight.shape == (E, d_in) and (bias is None or bias.shape == (d_out,))
            and (x_lora is None or x_lora.shape == x.shape) and n_scaling in (1, E) and 1 <= top_k <= E):
        return
    for name, got, want in (("x", tuple(x.shape[-1:]), (d_in,)), ("weight", tuple(weight.shape), (d_out, d_in)),
                            ("lora_B", tuple(lora_B.shape), (E, d_out, r)),
                            ("router_weight", tuple(router_weight.shape), (E, d_in)),
                            ("bias", None if bias is None else tuple(bias.shape), None if bias is None else (d_out,)),
                            ("x_lora", None if x_lora is None else tuple(x_lora.shape),
                             None if x_lora is None else tuple(x.shape))):
        if got != want:
            where = " in its last dimension" if name == "x" else ""
            raise ValueError(f"lora_moe: {name} is {list(got)} but lora_A {list(lora_A.shape)} and weight "
                             f"{list(weight.shape)} need {list(want)}{where}")
    if n_scaling not in (1, E):
        raise ValueError(f"lora_moe: scaling has {n_scaling} entries for {E} experts (give one, or one per expert)")
    raise ValueError(f"lora_moe: top_k={top_k} must be in [1, {E}] (the number of experts)")


@torch.compiler.disable  # torch.compile runs the layer as it is and compiles the model around it:
# dynamo cannot trace the direct kernel launches (each would break the graph again)
def lora_moe(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora=None,
             return_routing: bool = False, *, gemm_backend: str = "auto"):
    """Same contract as reference.lora_moe. With return_routing, returns (y, probs [T, E] float32,
    experts [T, k] int64) where probs carries gradients to x and the router (load-balancing loss).

    Triton path (CUDA, or the interpreter): W and b must be frozen (the MoE layer never trains them;
    otherwise the reference runs); lora_A, lora_B, router_weight may be float32 masters of a
    half-precision x (rounded to x's dtype in the kernels, gradients in their own dtype). scaling:
    one per expert, or one for all. Operands of mismatched shapes raise a one-line ValueError.

    gemm_backend: which GEMM carries the base product with the LoRA product as extra K (see
    rocket.kernels.dual_mm.dual_mm): "auto" (the default), "triton", "tma" or "cublas"; any other
    value raises a ValueError. The reference path has no such GEMM and ignores it.
    """
    _check_operands(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora)
    check_backend(gemm_backend, "lora_moe: gemm_backend")
    frozen = not (weight.requires_grad or (bias is not None and bias.requires_grad))
    if not (frozen and use_triton(x, weight, lora_A, lora_B, router_weight)):
        y = reference.lora_moe(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora)
        if not return_routing:
            return y
        _, experts, probs = reference.route_topk(x.reshape(-1, x.shape[-1]), router_weight, top_k)
        return y, probs, experts
    dt = x.dtype
    flat = x.dim() != 2
    x2 = (x.reshape(-1, x.shape[-1]) if flat else x).contiguous()
    xl2 = None if x_lora is None else _as(x_lora.reshape(-1, x.shape[-1]), dt)
    if not (isinstance(scaling, torch.Tensor) and scaling.dtype == torch.float32 and scaling.device == x.device):
        scaling = torch.as_tensor(scaling, device=x.device).to(torch.float32)
    if scaling.numel() != lora_A.shape[0]:  # one for all experts: the kernels read one per expert
        scaling = scaling.reshape(1).expand(lora_A.shape[0])
    out = LoraMoEFunction.apply(
        x2, weight if weight.dtype == dt else weight.to(dt), None if bias is None else _as(bias, dt),
        lora_A.contiguous(), lora_B.contiguous(), scaling.contiguous(), router_weight.contiguous(), int(top_k), xl2,
        return_routing, gemm_backend)
    y, probs, experts = out if return_routing else (out, None, None)
    if flat:
        y = y.reshape(*x.shape[:-1], weight.shape[0])
    return (y, probs, experts.long()) if return_routing else y
