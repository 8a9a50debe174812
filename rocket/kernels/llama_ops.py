"""Fused elementwise kernels of a Llama-family decoder layer, for rocket's packed scoring passes.

In a scoring pass the GEMMs run near the tensor-core peak and the time lost is in the
memory-bound glue between them, which eager transformers spreads over ~20 kernels per layer
(RMSNorm alone upcasts, squares, reduces, scales and downcasts in separate passes). These kernels
read and write each tensor once:

  add_rms_norm   residual stream h ← h + delta, and RMSNorm(h) · w (one row per program)
  rotary_        rotate q and k in place with the rows' cos/sin (HF's rotate_half convention)
  silu_mul       silu(gate) · up (gate and up may be halves of one fused product)

Rounding follows transformers' eager Llama (bf16 results rounded where HF rounds them), so the
outputs agree with it to the last bit or one bf16 ulp. Forward only. References: rocket/kernels/reference.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rocket.kernels import reference
from rocket.kernels import use_triton


@triton.jit
def _add_rms_norm(h_ptr, d_ptr, w_ptr, out_ptr, H, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < H
    h = tl.load(h_ptr + row * H + cols, mask=ok, other=0.0)
    if HAS_DELTA:
        h = (h.to(tl.float32) + tl.load(d_ptr + row * H + cols, mask=ok, other=0.0).to(tl.float32)).to(h.dtype)
        tl.store(h_ptr + row * H + cols, h, mask=ok)
    x = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    n = (x * inv).to(h.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * H + cols, (w * n).to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h ← h + delta in place (when delta is given), returns RMSNorm(h) · weight. h, delta: [T, H]."""
    if not use_triton(h, weight):
        if delta is not None:
            h.add_(delta)
        return reference.rms_norm(h, weight, eps)
    T, H = h.shape
    out = torch.empty_like(h)
    if T:
        block = triton.next_power_of_2(H)
        _add_rms_norm[(T,)](h, h if delta is None else delta, weight, out, H, eps, HAS_DELTA=delta is not None,
                            BLOCK=block, num_warps=8 if block >= 4096 else 4)
    return out


@triton.jit
def _rotary(x_ptr, cos_ptr, sin_ptr, n_heads, row_stride, head_dim, half, BLOCK_J: tl.constexpr,
            BLOCK_H: tl.constexpr):
    # half = head_dim / 2 need not be a power of two (OpenLLaMA-3B: 50, Phi-2: 40): the column
    # range is padded to BLOCK_J and masked.
    t = tl.program_id(0).to(tl.int64)
    hh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    jj = tl.arange(0, BLOCK_J)
    j_ok = jj < half
    ok = (hh < n_heads)[:, None] & j_ok[None, :]
    c1 = tl.load(cos_ptr + t * head_dim + jj, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * head_dim + half + jj, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * head_dim + jj, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * head_dim + half + jj, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    p1 = x_ptr + t * row_stride + hh[:, None] * head_dim + jj[None, :]
    x1 = tl.load(p1, mask=ok, other=0.0)
    x2 = tl.load(p1 + half, mask=ok, other=0.0)
    dt = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    # HF: q*cos + rotate_half(q)*sin, each product rounded to the input dtype, then the sum
    o1 = ((f1 * c1).to(dt).to(tl.float32) + (-f2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
    tl.store(p1, o1, mask=ok)
    tl.store(p1 + half, o2, mask=ok)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, n_heads, head_dim] in place by cos/sin [T, head_dim] (HF rotate_half convention)."""
    if not use_triton(x, cos):
        x.copy_(reference.rotary(x, cos, sin))
        return x
    T, n_heads, d = x.shape
    if x.stride(2) != 1 or x.stride(1) != d or cos.stride() != (d, 1) or sin.stride() != (d, 1):
        raise ValueError("rotary_: x must be [T, heads, head_dim] with contiguous heads, cos/sin contiguous")
    if T:
        block_h = min(16, triton.next_power_of_2(n_heads))
        _rotary[(T, triton.cdiv(n_heads, block_h))](x, cos, sin, n_heads, x.stride(0), d, d // 2,
                                                    BLOCK_J=triton.next_power_of_2(d // 2), BLOCK_H=block_h,
                                                    num_warps=4)
    return x


@triton.jit
def _silu_mul(g_ptr, u_ptr, out_ptr, n_cols, sg, su, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    g = tl.load(g_ptr + row * sg + cols, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * su + cols, mask=ok, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (s * u).to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for [T, I] tensors of one shape with contiguous rows (any row stride, so gate
    and up may be the two halves of one fused gate/up product); a contiguous result."""
    if not use_triton(gate, up):
        return reference.silu_mul(gate, up)
    if gate.dim() != 2 or gate.shape != up.shape or gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError(f"silu_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} must be [T, I] of one shape "
                         "with contiguous rows")
    T, n = gate.shape
    out = torch.empty(T, n, device=gate.device, dtype=gate.dtype)
    if T and n:
        block = min(4096, triton.next_power_of_2(n))
        _silu_mul[(T, triton.cdiv(n, block))](gate, up, out, n, gate.stride(0), up.stride(0), BLOCK=block,
                                              num_warps=8 if block >= 2048 else 4)
    return out
