"""LoRA mixture of experts: y = x Wᵀ + b + Σ_{(e,w) in topk(x)} w · s_e · B_e A_e x (DESIGN §3).

Design: the experts are few and thin (E·r = 128 at E=8, r=16, against d = 4096), so instead of
gathering tokens per expert we treat the E experts as ONE concatenated LoRA of rank E·r and make
routing a mask on its [T, E·r] intermediate:

  forward   [logits | h] = x [G; A_cat]ᵀ                     one skinny GEMM, one read of x (fp32 out)
            p, top-k, w, hm = h · (w·s)[expert of column]    a row kernel; hm is 0 off the top-k
            y = [x | hm] [W | B_cat]ᵀ + b                     the base GEMM with E·r extra K (≈3% FLOPs)*
  backward  ghm = g B_cat                                     skinny GEMM over g (fp32 out)
            ∂B_cat = gᵀ hm                                    K = T, cuBLAS
            gh = ghm·(w·s), ∂logits via top-k/renorm/softmax  a row kernel → gcat = [gh | ∂logits]
            [∂A_cat; ∂G] = gcatᵀ x                            K = T, cuBLAS, one read of x
            ∂x = [g | gcat] [W; A_cat; G]                     the base backward GEMM with extra K

* dual_mm: one Triton GEMM with two K segments (pointer loads, or TMA descriptors), or cuBLAS (the
  LoRA product first, read back as C by the base product); GEMM_BACKEND="auto" times the three once
  per shape on the real operands and keeps the fastest that agrees with cuBLAS.

No [T, E, d] tensor exists; the only per-token intermediates are [T, E·r] and [T, E]. Every big
operand is read the minimum number of times except g (twice: ghm and ∂B). The reference
(kernels/reference.py: lora_moe, route_topk) is the CPU path and the oracle.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from rocket.kernels import reference as R
from rocket.kernels import use_triton

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
PAD_K = 64  # the K block of the GEMM configs
# Which GEMM carries the base product (see dual_mm): "auto", "triton", "tma" or "cublas".
GEMM_BACKEND = os.environ.get("ROCKET_MOE_GEMM", "auto")


def _flags(dtype):
    """(IEEE, DOT_F32): float32 dots in exact fp32 (as torch's default matmul); bf16 dots upcast in the
    interpreter, whose bf16 tl.dot is wrong."""
    return dtype == torch.float32, _INTERPRET and dtype in (torch.bfloat16, torch.float16)


def _quick_bench(fn, quantiles):
    """Autotuning timer: shorter than do_bench's default, enough for kernels of ~0.1–5 ms."""
    return triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=quantiles)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# --------------------------------------------------------------------------- skinny GEMM (fp32 out)
@triton.jit
def _skinny_mm(a_ptr, b1_ptr, b2_ptr, o1_ptr, o2_ptr, M, K, N1, N2,
               sam, sak, sb1k, sb1n, sb2k, sb2n, so1m, so2m,
               BM: tl.constexpr, BK: tl.constexpr, BN1: tl.constexpr, BN2: tl.constexpr, HAS2: tl.constexpr,
               EVEN_K: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr):
    """o1 = a @ b1 (and o2 = a @ b2 from program column 0) in float32; a [M, K] is read once per
    column block of o1, so N1 ≤ BN1 reads it exactly once."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    m_ok = rm < M
    rn1 = pid_n * BN1 + tl.arange(0, BN1)
    n1_ok = rn1 < N1
    rn2 = tl.arange(0, BN2)
    n2_ok = rn2 < N2
    acc1 = tl.zeros((BM, BN1), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN2), dtype=tl.float32)
    rk = tl.arange(0, BK)
    a_p = a_ptr + rm[:, None] * sam + rk[None, :] * sak
    b1_p = b1_ptr + rk[:, None] * sb1k + rn1[None, :] * sb1n
    b2_p = b2_ptr + rk[:, None] * sb2k + rn2[None, :] * sb2n
    for k0 in range(0, K, BK):
        if EVEN_K:
            k_ok = rk < BK
        else:
            k_ok = rk < K - k0
        a = tl.load(a_p, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b1 = tl.load(b1_p, mask=k_ok[:, None] & n1_ok[None, :], other=0.0)
        acc1 = _dot(a, b1, acc1, IEEE, DOT_F32)
        if HAS2:
            b2 = tl.load(b2_p, mask=k_ok[:, None] & n2_ok[None, :], other=0.0)
            acc2 = _dot(a, b2, acc2, IEEE, DOT_F32)
        a_p += BK * sak
        b1_p += BK * sb1k
        b2_p += BK * sb2k
    tl.store(o1_ptr + rm[:, None] * so1m + rn1[None, :], acc1, mask=m_ok[:, None] & n1_ok[None, :])
    if HAS2:
        n2_ok = rn2 < tl.where(pid_n == 0, N2, 0)  # column block 0 writes o2
        tl.store(o2_ptr + rm[:, None] * so2m + rn2[None, :], acc2, mask=m_ok[:, None] & n2_ok[None, :])


_skinny_mm_tuned = triton.autotune(
    configs=[triton.Config({"BM": bm, "BK": bk}, num_warps=w, num_stages=st)
             for bm, bk, w, st in ((128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 6))],
    key=["M", "K", "N1", "N2"], do_bench=_quick_bench)(_skinny_mm)


def skinny_mm(a: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor | None = None):
    """(a @ b1, a @ b2) in float32 for thin b's (b as [K, N] views, any strides); a [M, K]."""
    M, K = a.shape
    N1 = b1.shape[1]
    o1 = torch.empty(M, N1, device=a.device, dtype=torch.float32)
    N2 = 0 if b2 is None else b2.shape[1]
    o2 = torch.empty(M, max(N2, 1), device=a.device, dtype=torch.float32)
    if M == 0:
        return (o1, o2[:, :N2]) if b2 is not None else o1
    ieee, dot_f32 = _flags(a.dtype)
    BN1 = max(16, min(128, triton.next_power_of_2(N1)))
    BN2 = max(16, triton.next_power_of_2(max(N2, 1)))
    b2_ = b1 if b2 is None else b2
    args = (a, b1, b2_, o1, o2, M, K, N1, N2, a.stride(0), a.stride(1), b1.stride(0), b1.stride(1),
            b2_.stride(0), b2_.stride(1), o1.stride(0), o2.stride(0))
    if _INTERPRET or a.dtype == torch.float32:
        BM, BK = (32, 32) if _INTERPRET else (64, 32)
        _skinny_mm[(triton.cdiv(M, BM), triton.cdiv(N1, BN1))](
            *args, BM=BM, BK=BK, BN1=BN1, BN2=BN2, HAS2=b2 is not None, EVEN_K=K % BK == 0,
            IEEE=ieee, DOT_F32=dot_f32, num_warps=4, num_stages=2)
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BM"]), triton.cdiv(N1, BN1))  # noqa: E731
        _skinny_mm_tuned[grid](*args, BN1=BN1, BN2=BN2, HAS2=b2 is not None, EVEN_K=K % 128 == 0,
                               IEEE=ieee, DOT_F32=dot_f32)
    return (o1, o2[:, :N2]) if b2 is not None else o1


# --------------------------------------------------------------------------- routing, forward and backward
@triton.jit
def _topk_rows(p, re, e_ok, TOPK: tl.constexpr, EP: tl.constexpr):
    """Chosen mask [BM, EP] of the TOPK largest p per row (ties → lower index) and their sum."""
    remaining = tl.where(e_ok[None, :], p, -1.0)
    chosen = remaining < -2.0  # all False
    tot = tl.sum(tl.zeros_like(p), axis=1)
    for _ in tl.static_range(TOPK):
        best = tl.max(remaining, axis=1)
        idx = tl.min(tl.where(remaining == best[:, None], re[None, :], EP), axis=1)
        sel = re[None, :] == idx[:, None]
        chosen = chosen | sel
        remaining = tl.where(sel, -1.0, remaining)
        tot += best
    return chosen, tot


@triton.jit
def _route_fwd(logit_ptr, h_ptr, s_ptr, probs_ptr, w_ptr, e_ptr, hm_ptr, M, E, ER, R, KP,
               BM: tl.constexpr, EP: tl.constexpr, BER: tl.constexpr, TOPK: tl.constexpr):
    """probs = softmax(logits) (fp32), top-k experts and renormalised weights, and
    hm = h · (w·s)[expert of column] in hm's dtype (0 outside the top-k), zero-padded to KP columns."""
    rm = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    m_ok = rm < M
    re = tl.arange(0, EP)
    e_ok = re < E
    z = tl.load(logit_ptr + rm[:, None] * E + re[None, :], mask=m_ok[:, None] & e_ok[None, :], other=0.0)
    z = tl.where(e_ok[None, :], z, -float("inf"))
    z = z - tl.max(z, axis=1)[:, None]
    ez = tl.where(e_ok[None, :], tl.exp(z), 0.0)
    p = ez / tl.sum(ez, axis=1)[:, None]
    tl.store(probs_ptr + rm[:, None] * E + re[None, :], p, mask=m_ok[:, None] & e_ok[None, :])
    chosen, tot = _topk_rows(p, re, e_ok, TOPK, EP)
    # weights and experts in descending order (as torch.topk), renormalised by the same sum
    remaining = tl.where(e_ok[None, :], p, -1.0)
    for j in tl.static_range(TOPK):
        best = tl.max(remaining, axis=1)
        idx = tl.min(tl.where(remaining == best[:, None], re[None, :], EP), axis=1)
        remaining = tl.where(re[None, :] == idx[:, None], -1.0, remaining)
        tl.store(w_ptr + rm * TOPK + j, best / tot, mask=m_ok)
        tl.store(e_ptr + rm * TOPK + j, idx, mask=m_ok)
    s = tl.load(s_ptr + re, mask=e_ok, other=0.0).to(tl.float32)
    gate = tl.where(chosen, p / tot[:, None], 0.0) * s[None, :]  # [BM, EP]
    for c0 in range(0, KP, BER):
        cols = c0 + tl.arange(0, BER)
        c_ok = cols < ER
        onehot = tl.where(((cols // R)[None, :] == re[:, None]) & c_ok[None, :], 1.0, 0.0)  # [EP, BER]
        gate_col = tl.dot(gate, onehot, input_precision="ieee")  # exact: one nonzero term per column
        h = tl.load(h_ptr + rm[:, None] * ER + cols[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        tl.store(hm_ptr + rm[:, None] * KP + cols[None, :], (h * gate_col).to(hm_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & (cols < KP)[None, :])


@triton.jit
def _route_bwd(ghm_ptr, h_ptr, s_ptr, probs_ptr, e_ptr, dprobs_ptr, gcat_ptr, M, E, ER, R, sgc, sghm,
               BM: tl.constexpr, EP: tl.constexpr, BER: tl.constexpr, TOPK: tl.constexpr, HAS_DP: tl.constexpr):
    """From ghm = ∂y B_cat (fp32) and the saved h, probs, experts: gcat[:, :ER] = ghm·(w·s)[expert
    of column] (∂ of the shrink) and gcat[:, ER:ER+E] = ∂logits through top-k renorm and softmax
    (plus ∂probs when the load-balancing loss used probs); columns past ER+E up to sgc are zeroed."""
    rm = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    m_ok = rm < M
    re = tl.arange(0, EP)
    e_ok = re < E
    p = tl.load(probs_ptr + rm[:, None] * E + re[None, :], mask=m_ok[:, None] & e_ok[None, :], other=0.0)
    chosen = re[None, :] < 0
    for j in tl.static_range(TOPK):
        ej = tl.load(e_ptr + rm * TOPK + j, mask=m_ok, other=-1)
        chosen = chosen | (re[None, :] == ej[:, None])
    tot = tl.sum(tl.where(chosen, p, 0.0), axis=1)
    tot = tl.where(tot > 0, tot, 1.0)
    s = tl.load(s_ptr + re, mask=e_ok, other=0.0).to(tl.float32)
    w = tl.where(chosen, p / tot[:, None], 0.0)
    gate = w * s[None, :]
    dgate = tl.zeros((BM, EP), dtype=tl.float32)
    for c0 in range(0, ER, BER):
        cols = c0 + tl.arange(0, BER)
        c_ok = cols < ER
        onehot = tl.where(((cols // R)[None, :] == re[:, None]) & c_ok[None, :], 1.0, 0.0)  # [EP, BER]
        msk = m_ok[:, None] & c_ok[None, :]
        ghm = tl.load(ghm_ptr + rm[:, None] * sghm + cols[None, :], mask=msk, other=0.0)
        h = tl.load(h_ptr + rm[:, None] * ER + cols[None, :], mask=msk, other=0.0)
        gate_col = tl.dot(gate, onehot, input_precision="ieee")
        tl.store(gcat_ptr + rm[:, None] * sgc + cols[None, :], (ghm * gate_col).to(gcat_ptr.dtype.element_ty),
                 mask=msk)
        dgate = tl.dot(ghm * h, tl.trans(onehot), dgate, input_precision="ieee")  # Σ over each expert's r
    dw = tl.where(chosen, dgate * s[None, :], 0.0)
    # w_e = p_e / Σ_chosen p  ⇒  ∂p_e = (∂w_e − Σ_j ∂w_j w_j) / Σ_chosen p   (chosen e only)
    dp = tl.where(chosen, (dw - tl.sum(dw * w, axis=1)[:, None]) / tot[:, None], 0.0)
    if HAS_DP:
        dp += tl.load(dprobs_ptr + rm[:, None] * E + re[None, :], mask=m_ok[:, None] & e_ok[None, :], other=0.0)
    dz = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    tl.store(gcat_ptr + rm[:, None] * sgc + ER + re[None, :], dz.to(gcat_ptr.dtype.element_ty),
             mask=m_ok[:, None] & e_ok[None, :])
    for c0 in range(ER + E, sgc, BER):
        cols = c0 + tl.arange(0, BER)
        tl.store(gcat_ptr + rm[:, None] * sgc + cols[None, :], tl.zeros((BM, BER), dtype=gcat_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & (cols < sgc)[None, :])


def _route_blocks(E, ER):
    return 32, max(16, triton.next_power_of_2(E)), max(16, min(128, triton.next_power_of_2(ER)))


def _pad(n: int) -> int:
    """Extra-K widths are padded to the GEMM's K block, so its unified K loop needs no masks."""
    return triton.cdiv(n, PAD_K) * PAD_K


def route_forward(logits, h, scaling, top_k, r, out_dtype):
    """(probs [T, E] fp32, weights [T, k] fp32, experts [T, k] int32, hm [T, pad(E·r)] out_dtype
    with zero pad columns)."""
    T, E = logits.shape
    ER = h.shape[1]
    probs = torch.empty(T, E, device=h.device, dtype=torch.float32)
    weights = torch.empty(T, top_k, device=h.device, dtype=torch.float32)
    experts = torch.empty(T, top_k, device=h.device, dtype=torch.int32)
    hm = torch.empty(T, _pad(ER), device=h.device, dtype=out_dtype)
    BM, EP, BER = _route_blocks(E, ER)
    if T:
        _route_fwd[(triton.cdiv(T, BM),)](logits, h, scaling, probs, weights, experts, hm, T, E, ER, r, hm.shape[1],
                                          BM=BM, EP=EP, BER=BER, TOPK=top_k, num_warps=4)
    return probs, weights, experts, hm


def route_backward(ghm, h, scaling, probs, experts, dprobs, r, out_dtype):
    """gcat [T, pad(E·r + E)] out_dtype: [∂h | ∂logits | zeros] (see _route_bwd)."""
    T, E = probs.shape
    ER = h.shape[1]
    gcat = torch.empty(T, _pad(ER + E), device=h.device, dtype=out_dtype)
    BM, EP, BER = _route_blocks(E, ER)
    if T:
        dp = dprobs.contiguous() if dprobs is not None else probs
        _route_bwd[(triton.cdiv(T, BM),)](ghm, h, scaling, probs, experts, dp, gcat, T, E, ER, r, gcat.stride(0),
                                          ghm.stride(0),
                                          BM=BM, EP=EP, BER=BER, TOPK=experts.shape[1],
                                          HAS_DP=dprobs is not None, num_warps=4)
    return gcat


# --------------------------------------------------------------------------- base GEMM with extra K
@triton.jit
def _dual_mm(a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, out_ptr, M, N, K1, K2,
             sa1m, sa1k, sb1k, sb1n, sa2m, sa2k, sb2k, sb2n, som,
             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BK2: tl.constexpr, GROUP_M: tl.constexpr,
             HAS_BIAS: tl.constexpr, EVEN_K1: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
             UNIFIED: tl.constexpr):
    """out = a1 @ b1 + a2 @ b2 (+ bias), fp32 accumulation: the frozen base product and the LoRA
    product share one accumulator, so the LoRA costs K2 extra reduction steps and no output pass."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    ram = (rm % M).to(tl.int64)  # wrapped rows/cols: loads need no M/N masks, the store is masked
    rbn = (rn % N).to(tl.int64)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    rk = tl.arange(0, BK)
    a1_p = a1_ptr + ram[:, None] * sa1m + rk[None, :] * sa1k
    b1_p = b1_ptr + rk[:, None] * sb1k + rbn[None, :] * sb1n
    if UNIFIED and EVEN_K1 and BK2 == BK:
        # one K loop over both products (K2 a multiple of BK): the software pipeline never drains
        # between the base product and the LoRA product
        a2_p = a2_ptr + ram[:, None] * sa2m + rk[None, :] * sa2k
        b2_p = b2_ptr + rk[:, None] * sb2k + rbn[None, :] * sb2n
        n1 = K1 // BK
        for i in range(0, n1 + K2 // BK):
            first = i < n1
            a = tl.load(tl.where(first, a1_p, a2_p))
            b = tl.load(tl.where(first, b1_p, b2_p))
            acc = _dot(a, b, acc, IEEE, DOT_F32)
            a1_p += BK * sa1k
            b1_p += BK * sb1k
            a2_p += tl.where(first, 0, BK * sa2k)
            b2_p += tl.where(first, 0, BK * sb2k)
    else:
        for k0 in range(0, K1, BK):
            if EVEN_K1:
                a = tl.load(a1_p)
                b = tl.load(b1_p)
            else:
                a = tl.load(a1_p, mask=rk[None, :] < K1 - k0, other=0.0)
                b = tl.load(b1_p, mask=rk[:, None] < K1 - k0, other=0.0)
            acc = _dot(a, b, acc, IEEE, DOT_F32)
            a1_p += BK * sa1k
            b1_p += BK * sb1k
        rk2 = tl.arange(0, BK2)
        a2_p = a2_ptr + ram[:, None] * sa2m + rk2[None, :] * sa2k
        b2_p = b2_ptr + rk2[:, None] * sb2k + rbn[None, :] * sb2n
        for k0 in range(0, K2, BK2):
            a = tl.load(a2_p, mask=rk2[None, :] < K2 - k0, other=0.0)
            b = tl.load(b2_p, mask=rk2[:, None] < K2 - k0, other=0.0)
            acc = _dot(a, b, acc, IEEE, DOT_F32)
            a2_p += BK2 * sa2k
            b2_p += BK2 * sb2k
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rbn).to(tl.float32)[None, :]
    rm64 = rm.to(tl.int64)
    tl.store(out_ptr + rm64[:, None] * som + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _mm_configs():
    return [triton.Config({"BM": bm, "BN": bn, "BK": PAD_K, "GROUP_M": 8, "UNIFIED": u}, num_warps=w, num_stages=st)
            for bm, bn, w, st, u in ((128, 256, 8, 3, 0), (128, 256, 8, 3, 1), (128, 256, 8, 4, 1), (128, 128, 8, 4, 0))]


_dual_mm_tuned = triton.autotune(configs=_mm_configs(), key=["M", "N", "K1", "K2", "sb1k", "sb1n"],
                                 do_bench=_quick_bench)(_dual_mm)


def _dual_mm_pointers(a1, b1, a2, b2, bias, out):
    M, K1 = a1.shape
    N = b1.shape[1]
    K2 = a2.shape[1]
    ieee, dot_f32 = _flags(a1.dtype)
    bk2 = PAD_K if K2 % PAD_K == 0 else max(16, min(PAD_K, triton.next_power_of_2(K2)))
    args = (a1, b1, a2, b2, bias if bias is not None else out, out, M, N, K1, K2,
            a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1), a2.stride(0), a2.stride(1),
            b2.stride(0), b2.stride(1), out.stride(0))
    if _INTERPRET or a1.dtype == torch.float32:
        bm, bn, bk = (32, 32, 32) if _INTERPRET else (64, 64, 32)
        bk2 = bk if K2 % bk == 0 else bk2
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _dual_mm[grid](*args, BM=bm, BN=bn, BK=bk, BK2=bk2, GROUP_M=8, HAS_BIAS=bias is not None,
                       EVEN_K1=K1 % bk == 0, IEEE=ieee, DOT_F32=dot_f32, UNIFIED=True,
                       num_warps=4, num_stages=2)
        return out
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    _dual_mm_tuned[grid](*args, BK2=bk2, HAS_BIAS=bias is not None, EVEN_K1=K1 % PAD_K == 0, IEEE=ieee,
                         DOT_F32=dot_f32)
    return out


# --------------------------------------------------------------------------- the same GEMM through TMA
@triton.jit
def _dual_mm_tma(a1_d, b1_d, a2_d, b2_d, bias_ptr, out_d, M, N, K1, K2,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                 B1_KMAJOR: tl.constexpr, B2_KMAJOR: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr):
    """_dual_mm with tiles moved by the tensor-memory accelerator (bounds handled by the descriptors);
    a b operand stored [N, K] (K-major, as x Wᵀ needs W) is loaded as such and transposed in the dot."""
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = min(n_m - first_m, GROUP_M)
    off_m = (first_m + (pid % (GROUP_M * n_n)) % size_m) * BM
    off_n = ((pid % (GROUP_M * n_n)) // size_m) * BN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K1, BK):
        a = a1_d.load([off_m, k])
        if B1_KMAJOR:
            b = b1_d.load([off_n, k]).T
        else:
            b = b1_d.load([k, off_n])
        acc = _dot(a, b, acc, False, DOT_F32)
    for k in range(0, K2, BK):
        a = a2_d.load([off_m, k])
        if B2_KMAJOR:
            b = b2_d.load([off_n, k]).T
        else:
            b = b2_d.load([k, off_n])
        acc = _dot(a, b, acc, False, DOT_F32)
    if HAS_BIAS:
        rn = off_n + tl.arange(0, BN)
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out_d.store([off_m, off_n], acc.to(out_d.dtype))


def _tma_blocks(nargs):
    BM, BN, BK = nargs["BM"], nargs["BN"], nargs["BK"]
    nargs["a1_d"].block_shape = nargs["a2_d"].block_shape = [BM, BK]
    nargs["b1_d"].block_shape = [BN, BK] if nargs["B1_KMAJOR"] else [BK, BN]
    nargs["b2_d"].block_shape = [BN, BK] if nargs["B2_KMAJOR"] else [BK, BN]
    nargs["out_d"].block_shape = [BM, BN]


_dual_mm_tma_tuned = triton.autotune(
    configs=[triton.Config({"BM": bm, "BN": bn, "BK": PAD_K, "GROUP_M": 8}, num_warps=w, num_stages=st,
                           pre_hook=_tma_blocks)
             for bm, bn, w, st in ((128, 256, 8, 3), (128, 256, 8, 4), (128, 128, 8, 4))],
    key=["M", "N", "K1", "K2", "B1_KMAJOR", "B2_KMAJOR"], do_bench=_quick_bench)(_dual_mm_tma)


def _kn_descriptor(b, block_k, block_n):
    """(descriptor, K-major?) of a [K, N] operand view, or None where TMA cannot read it."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    if b.stride(0) == 1 and b.t().is_contiguous():
        return TensorDescriptor.from_tensor(b.t(), [block_n, block_k]), True
    if b.is_contiguous():
        return TensorDescriptor.from_tensor(b, [block_k, block_n]), False
    return None


def _tma_ok(*ts) -> bool:
    return all(t.dtype in (torch.bfloat16, torch.float16) and t.data_ptr() % 16 == 0
               and all(st * t.element_size() % 16 == 0 for st, n in zip(t.stride(), t.shape) if st != 1)
               for t in ts)


def _dual_mm_tensor_memory(a1, b1, a2, b2, bias, out):
    from triton.tools.tensor_descriptor import TensorDescriptor
    M, K1 = a1.shape
    N, K2 = b1.shape[1], a2.shape[1]
    bm, bn, bk = (32, 32, 32) if _INTERPRET else (128, 256, PAD_K)  # the tuned run resets the blocks
    d1, d2 = _kn_descriptor(b1, bk, bn), _kn_descriptor(b2, bk, bn)
    args = (TensorDescriptor.from_tensor(a1, [bm, bk]), d1[0], TensorDescriptor.from_tensor(a2, [bm, bk]), d2[0],
            bias if bias is not None else out, TensorDescriptor.from_tensor(out, [bm, bn]), M, N, K1, K2)
    meta = dict(B1_KMAJOR=d1[1], B2_KMAJOR=d2[1], HAS_BIAS=bias is not None, DOT_F32=_INTERPRET)
    if _INTERPRET:
        _dual_mm_tma[(triton.cdiv(M, bm) * triton.cdiv(N, bn),)](*args, BM=bm, BN=bn, BK=bk, GROUP_M=8, **meta)
    else:
        grid = lambda m: (triton.cdiv(M, m["BM"]) * triton.cdiv(N, m["BN"]),)  # noqa: E731
        _dual_mm_tma_tuned[grid](*args, **meta)
    return out


def _tma_usable(a1, b1, a2, b2, out) -> bool:
    if not _tma_ok(a1, a2, out, b1, b2) or a1.stride(1) != 1 or a2.stride(1) != 1:
        return False
    return all(b.stride(0) == 1 and b.t().is_contiguous() or b.is_contiguous() for b in (b1, b2))


def _dual_mm_cublas(a1, b1, a2, b2, bias, out):
    # the LoRA product first (with the bias), then the base product reads it back as C (beta = 1)
    if bias is None:
        torch.mm(a2, b2, out=out)
    else:
        torch.addmm(bias.to(out.dtype), a2, b2, out=out)
    return out.addmm_(a1, b1)


_IMPLS = {"triton": _dual_mm_pointers, "tma": _dual_mm_tensor_memory, "cublas": _dual_mm_cublas}
_CHOSEN: dict[tuple, str] = {}


def _choose(a1, b1, a2, b2, bias, out) -> str:
    """GEMM_BACKEND "auto": time every usable implementation once per shape and layout (like an
    autotuner, on the real operands), keep the fastest whose result agrees with cuBLAS."""
    key = (tuple(a1.shape), tuple(b1.shape), tuple(b1.stride()), tuple(a2.shape), a1.dtype, bias is None)
    if key not in _CHOSEN:
        names = ["cublas", "triton"] + (["tma"] if _tma_usable(a1, b1, a2, b2, out) else [])
        ref = _dual_mm_cublas(a1, b1, a2, b2, bias, torch.empty_like(out)).float()
        times = {}
        for name in names:
            try:
                got = _IMPLS[name](a1, b1, a2, b2, bias, torch.empty_like(out)).float()
                if not bool(((got - ref).norm() <= 1e-2 * ref.norm().clamp_min(1e-30))):
                    continue
                times[name] = triton.testing.do_bench(
                    lambda: _IMPLS[name](a1, b1, a2, b2, bias, out), warmup=10, rep=50)  # noqa: B023
            except Exception:  # an implementation this GPU/Triton cannot build is simply not a candidate
                continue
        _CHOSEN[key] = min(times, key=times.get)
        CHOICES[key] = dict(times, chosen=_CHOSEN[key])
    return _CHOSEN[key]


CHOICES: dict[tuple, dict] = {}  # what "auto" measured and chose, per GEMM key (reported by the bench)


def dual_mm(a1, b1, a2, b2, bias=None, out_dtype=None):
    """a1 @ b1 + a2 @ b2 (+ bias) with one fp32 accumulator; b's are [K, N] views (any strides).

    GEMM_BACKEND: "auto" (default on CUDA: fastest of the below per shape), "triton" (pointer
    loads, one-loop variant), "tma" (tensor-memory-accelerator tiles), "cublas" (two cuBLAS calls)."""
    M, K1 = a1.shape
    N = b1.shape[1]
    out = torch.empty(M, N, device=a1.device, dtype=out_dtype or a1.dtype)
    if M == 0 or N == 0:
        return out
    backend = GEMM_BACKEND
    if backend == "cublas" and _INTERPRET:
        backend = "triton"
    if backend == "tma" and not _tma_usable(a1, b1, a2, b2, out):
        backend = "triton"
    if backend == "auto":
        backend = "triton" if (_INTERPRET or a1.dtype == torch.float32) else _choose(a1, b1, a2, b2, bias, out)
    return _IMPLS[backend](a1, b1, a2, b2, bias, out)


# --------------------------------------------------------------------------- autograd
class LoraMoEFunction(torch.autograd.Function):
    """(y, probs, experts) of the LoRA-MoE layer on 2-D x; W and b frozen (no gradients)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora):
        T, d_in = x.shape
        E, r, _ = lora_A.shape
        d_out = weight.shape[0]
        ER = E * r
        A_cat = lora_A.reshape(ER, d_in)
        if x_lora is None:
            h, logits = skinny_mm(x, A_cat.t(), router_weight.t())
        else:
            h, logits = skinny_mm(x_lora, A_cat.t()), skinny_mm(x, router_weight.t())
        probs, weights, experts, hm = route_forward(logits, h, scaling, top_k, r, x.dtype)
        # [d_out, pad(E·r)]: expert-major columns, zero pad (hm's pad columns are zero too)
        if hm.shape[1] == ER:
            B_cat = lora_B.permute(1, 0, 2).reshape(d_out, ER)
        else:
            B_cat = lora_B.new_zeros(d_out, hm.shape[1])
            B_cat[:, :ER].view(d_out, E, r).copy_(lora_B.permute(1, 0, 2))
        y = dual_mm(x, weight.t(), hm, B_cat.t(), bias)
        ctx.save_for_backward(x, x_lora, weight, lora_A, B_cat, router_weight, scaling, h, hm, probs, experts)
        ctx.mark_non_differentiable(weights, experts)
        ctx.set_materialize_grads(False)  # an unused probs output gives None, not a zero tensor to read
        return y, probs, weights, experts

    @staticmethod
    def backward(ctx, gy, gprobs, _gw, _ge):
        x, x_lora, weight, lora_A, B_cat, G, scaling, h, hm, probs, experts = ctx.saved_tensors
        need = ctx.needs_input_grad
        T, d_in = x.shape
        E, r, _ = lora_A.shape
        ER = E * r
        d_out = weight.shape[0]
        g = torch.zeros(T, d_out, device=x.device, dtype=x.dtype) if gy is None else gy.contiguous()
        A_cat = lora_A.reshape(ER, d_in)
        ghm = skinny_mm(g, B_cat[:, :ER])
        gB = None
        if need[4]:
            gB = torch.mm(g.t(), hm[:, :ER]).view(d_out, E, r).permute(1, 0, 2).contiguous()
        gcat = route_backward(ghm, h, scaling, probs, experts, gprobs, r, x.dtype)
        gA = gG = gx = gxl = None
        if x_lora is None:
            if need[3] or need[6]:
                gAG = torch.mm(gcat[:, :ER + E].t(), x)
                gA = gAG[:ER].view(E, r, d_in) if need[3] else None
                gG = gAG[ER:] if need[6] else None
            if need[0]:
                AG = lora_A.new_zeros(gcat.shape[1], d_in)  # [A_cat; G; zero pad], matching gcat's columns
                AG[:ER] = A_cat
                AG[ER:ER + E] = G
                gx = dual_mm(g, weight, gcat, AG)
        else:
            gA = torch.mm(gcat[:, :ER].t(), x_lora).view(E, r, d_in) if need[3] else None
            gG = torch.mm(gcat[:, ER:ER + E].t(), x) if need[6] else None
            if need[0]:
                gx = dual_mm(g, weight, gcat[:, ER:ER + E], G)
            if need[8]:
                gxl = gcat[:, :ER] @ A_cat
        return gx, None, None, gA, gB, None, gG, None, gxl


def lora_moe(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora=None,
             return_routing: bool = False):
    """Same contract as reference.lora_moe. With return_routing, returns (y, probs [T, E] float32,
    experts [T, k] int64) where probs carries gradients to x and the router (load-balancing loss).

    Triton path (CUDA, or the interpreter): W and b must be frozen (the MoE layer never trains them;
    otherwise the reference runs); lora_A, lora_B, router_weight are cast to x's dtype.
    """
    frozen = not (weight.requires_grad or (bias is not None and bias.requires_grad))
    if not (frozen and use_triton(x, weight, lora_A, lora_B, router_weight)):
        y = R.lora_moe(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora)
        if not return_routing:
            return y
        _, experts, probs = R.route_topk(x.reshape(-1, x.shape[-1]), router_weight, top_k)
        return y, probs, experts
    shape = x.shape
    dt = x.dtype
    x2 = x.reshape(-1, shape[-1]).contiguous()
    xl2 = None if x_lora is None else x_lora.reshape(-1, shape[-1]).to(dt).contiguous()
    scaling = torch.as_tensor(scaling, device=x.device).to(torch.float32).contiguous()
    y, probs, _, experts = LoraMoEFunction.apply(
        x2, weight.to(dt).contiguous(), None if bias is None else bias.to(dt).contiguous(),
        lora_A.to(dt).contiguous(), lora_B.to(dt).contiguous(), scaling, router_weight.to(dt).contiguous(),
        int(top_k), xl2)
    y = y.reshape(*shape[:-1], weight.shape[0])
    return (y, probs, experts.long()) if return_routing else y
