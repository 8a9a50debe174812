"""The routing kernels of the LoRA-MoE layer (rocket/kernels/lora_moe.py) and their launches.

route_fwd computes the router logits, softmax and top-k of every token together with the expert
shrink h = x A_catᵀ masked by the gates (one read of x), and lays out B_cat for the expansion GEMM;
route_bwd takes all of it back from ∂y and lays out [A_cat; G] for the ∂x GEMM. Their shapes are
constexprs, so per call only the token count and the pointers are specialised: half precision on the
GPU times ROUTE_CONFIGS once per token-count bucket, then launches the compiled kernel directly
(rocket.kernels.direct_launch: host time bounds small steps).
"""
from __future__ import annotations

import statistics

import torch
import triton
import triton.language as tl

from rocket.kernels.direct_launch import Launcher
from rocket.kernels.dual_mm import PAD_K, _INTERPRET, _bucket, _capturing, _cdiv, _dot, _flags, _pow2


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
def _per_column(gate, cols, re, R, c_ok):
    """[BM, BER] value of the [BM, EP] per-expert `gate` at each column's expert (column // R)."""
    onehot = tl.where(((cols // R)[None, :] == re[:, None]) & c_ok[None, :], 1.0, 0.0)  # [EP, BER]
    return tl.dot(gate, onehot, input_precision="ieee"), onehot  # exact: one nonzero term per column


@triton.jit
def _rows_times_cols(a_ptr, sam, w_ptr, swk, swc, rm, m_ok, cols, c_ok, K,
                     BM: tl.constexpr, BK: tl.constexpr, BER: tl.constexpr, EVEN_K: tl.constexpr,
                     IEEE: tl.constexpr, DOT_F32: tl.constexpr):
    """[BM, BER] fp32 = a[rm, :K] · w[:K, cols] with a row-major (row stride sam) and w[k, c] at
    w_ptr + k·swk + c·swc, read in any float dtype and rounded to a's."""
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BER), dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            k_ok = rk < BK
        else:
            k_ok = rk < K - k0
        at = tl.load(a_ptr + rm[:, None] * sam + (k0 + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + (k0 + rk)[:, None] * swk + cols[None, :] * swc, mask=k_ok[:, None] & c_ok[None, :],
                     other=0.0)
        acc = _dot(at, wt.to(at.dtype), acc, IEEE, DOT_F32)
    return acc


@triton.jit
def _b_cat_rows(b_ptr, bcat_ptr, q, N: tl.constexpr, R: tl.constexpr, ER: tl.constexpr, KP: tl.constexpr,
                BN: tl.constexpr, BER: tl.constexpr):
    """Rows q·BN… of B_cat [N, KP]: B_cat[n, e·R + j] = B[e, n, j] (B [E, N, R], any float dtype,
    rounded to B_cat's), zero pad columns."""
    rn = (q * BN + tl.arange(0, BN)).to(tl.int64)
    n_ok = rn < N
    for c0 in range(0, KP, BER):
        cols = c0 + tl.arange(0, BER)
        src = (cols // R).to(tl.int64) * (N * R) + cols % R
        v = tl.load(b_ptr + rn[:, None] * R + src[None, :], mask=n_ok[:, None] & (cols < ER)[None, :], other=0.0)
        tl.store(bcat_ptr + rn[:, None] * KP + cols[None, :], v.to(bcat_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & (cols < KP)[None, :])


@triton.jit
def _route_fwd(x_ptr, xl_ptr, a_ptr, g_ptr, s_ptr, b_ptr, probs_ptr, e_ptr, h_ptr, hm_ptr, bcat_ptr, M,
               K: tl.constexpr, N: tl.constexpr, E: tl.constexpr, R: tl.constexpr, KP: tl.constexpr,
               BM: tl.constexpr, BK: tl.constexpr, EP: tl.constexpr, BER: tl.constexpr, TOPK: tl.constexpr,
               HAS_XL: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr, COPY_ROWS: tl.constexpr):
    """Programs below cdiv(M, BM), one block of BM rows each: logits = x Gᵀ and h = x_lora A_catᵀ
    (fp32 accumulators, A and G read in any float dtype and rounded to x's), p = softmax(logits), the
    top-k experts (descending, as torch.topk), and hm = h · (w·s)[expert of column] in hm's dtype (0
    outside the top-k and in the pad columns up to KP; w = p renormalised over the top-k for k ≥ 2,
    p itself for k = 1). Writes probs [M, E] fp32, experts [M, k] int32, h [M, E·R] fp32, hm [M, KP].
    The programs after those write B_cat [N, KP] in hm's dtype from B [E, N, R] (_b_cat_rows), so the
    expansion GEMM needs no copy of its own."""
    ER: tl.constexpr = E * R
    EVEN_K: tl.constexpr = K % BK == 0
    n_rows = tl.cdiv(M, BM)
    pid = tl.program_id(0)
    if pid >= n_rows:
        _b_cat_rows(b_ptr, bcat_ptr, pid - n_rows, N, R, ER, KP, COPY_ROWS, BER)
    else:
        rm = (pid * BM + tl.arange(0, BM)).to(tl.int64)
        m_ok = rm < M
        rk = tl.arange(0, BK)
        re = tl.arange(0, EP)
        e_ok = re < E
        rc = tl.arange(0, BER)
        c_ok = rc < ER
        accz = tl.zeros((BM, EP), dtype=tl.float32)
        acch = tl.zeros((BM, BER), dtype=tl.float32)
        for k0 in range(0, K, BK):  # the logits and the first column block of h share the reads of x
            if EVEN_K:
                k_ok = rk < BK
            else:
                k_ok = rk < K - k0
            xt = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            gt = tl.load(g_ptr + re[None, :] * K + (k0 + rk)[:, None], mask=k_ok[:, None] & e_ok[None, :], other=0.0)
            accz = _dot(xt, gt.to(xt.dtype), accz, IEEE, DOT_F32)
            if HAS_XL:
                xt = tl.load(xl_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :],
                             other=0.0)
            at = tl.load(a_ptr + rc[None, :] * K + (k0 + rk)[:, None], mask=k_ok[:, None] & c_ok[None, :], other=0.0)
            acch = _dot(xt, at.to(xt.dtype), acch, IEEE, DOT_F32)
        z = tl.where(e_ok[None, :], accz, -float("inf"))
        z = z - tl.max(z, axis=1)[:, None]
        ez = tl.where(e_ok[None, :], tl.exp(z), 0.0)
        p = ez / tl.sum(ez, axis=1)[:, None]
        tl.store(probs_ptr + rm[:, None] * E + re[None, :], p, mask=m_ok[:, None] & e_ok[None, :])
        chosen, tot = _topk_rows(p, re, e_ok, TOPK, EP)
        remaining = tl.where(e_ok[None, :], p, -1.0)
        for j in tl.static_range(TOPK):  # experts in descending order of p, ties → lower index
            best = tl.max(remaining, axis=1)
            idx = tl.min(tl.where(remaining == best[:, None], re[None, :], EP), axis=1)
            remaining = tl.where(re[None, :] == idx[:, None], -1.0, remaining)
            tl.store(e_ptr + rm * TOPK + j, idx, mask=m_ok)
        s = tl.load(s_ptr + re, mask=e_ok, other=0.0).to(tl.float32)
        w = tl.where(chosen, p, 0.0)
        if TOPK > 1:  # renormalised over the chosen; top-1 keeps p (Switch), so the router learns
            w = w / tot[:, None]
        gate = w * s[None, :]  # [BM, EP]
        for c0 in range(0, KP, BER):
            cols = c0 + rc
            c_ok = cols < ER
            if c0 > 0:  # further column blocks of h (E·r > BER): x_lora is read again
                acch = _rows_times_cols(xl_ptr, K, a_ptr, 1, K, rm, m_ok, cols, c_ok, K, BM, BK, BER, EVEN_K,
                                        IEEE, DOT_F32)
            gate_col, _ = _per_column(gate, cols, re, R, c_ok)
            tl.store(h_ptr + rm[:, None] * ER + cols[None, :], acch, mask=m_ok[:, None] & c_ok[None, :])
            tl.store(hm_ptr + rm[:, None] * KP + cols[None, :], (acch * gate_col).to(hm_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & (cols < KP)[None, :])


@triton.jit
def _ag_rows(a_ptr, g_ptr, ag_ptr, q, K: tl.constexpr, ER: tl.constexpr, E: tl.constexpr, KG: tl.constexpr,
             BR: tl.constexpr, BK: tl.constexpr):
    """Rows q·BR… of AG [KG, K] = [A_cat; G; zero rows] in AG's dtype (A_cat, G in any float dtype)."""
    rows = q * BR + tl.arange(0, BR)
    from_a = rows < ER
    from_g = (rows >= ER) & (rows < ER + E)
    ra = tl.where(from_a, rows, 0).to(tl.int64)
    rg = tl.where(from_g, rows - ER, 0).to(tl.int64)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        va = tl.load(a_ptr + ra[:, None] * K + rk[None, :], mask=from_a[:, None] & k_ok[None, :], other=0.0)
        vg = tl.load(g_ptr + rg[:, None] * K + rk[None, :], mask=from_g[:, None] & k_ok[None, :], other=0.0)
        v = tl.where(from_a[:, None], va.to(ag_ptr.dtype.element_ty), vg.to(ag_ptr.dtype.element_ty))
        tl.store(ag_ptr + rows.to(tl.int64)[:, None] * K + rk[None, :], v, mask=(rows < KG)[:, None] & k_ok[None, :])


@triton.jit
def _route_bwd(g_ptr, b_ptr, h_ptr, s_ptr, probs_ptr, e_ptr, dprobs_ptr, gcat_ptr, a_ptr, gw_ptr, ag_ptr, M,
               N: tl.constexpr, K: tl.constexpr, E: tl.constexpr, R: tl.constexpr, KP: tl.constexpr,
               KG: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, EP: tl.constexpr, BER: tl.constexpr,
               TOPK: tl.constexpr, HAS_DP: tl.constexpr, IEEE: tl.constexpr, DOT_F32: tl.constexpr,
               COPY_ROWS: tl.constexpr):
    """Programs below cdiv(M, BM), one block of BM rows each: ghm = ∂y B_cat (fp32 accumulator; B_cat
    [N, KP]), then gcat[:, :ER] = ghm·(w·s)[expert of column] (∂ of the shrink) and gcat[:, ER:ER+E]
    = ∂logits through top-k (and the renormalisation for k ≥ 2) and softmax (plus ∂probs when the
    balancing loss used probs); the pad columns up to KG are zeroed. h, probs, experts are the
    forward's. The programs after those write AG = [A_cat; G] in gcat's dtype (_ag_rows), the extra K
    of the ∂x GEMM."""
    ER: tl.constexpr = E * R
    EVEN_K: tl.constexpr = N % BK == 0
    n_rows = tl.cdiv(M, BM)
    pid = tl.program_id(0)
    if pid >= n_rows:
        _ag_rows(a_ptr, gw_ptr, ag_ptr, pid - n_rows, K, ER, E, KG, COPY_ROWS, 128)
    else:
        rm = (pid * BM + tl.arange(0, BM)).to(tl.int64)
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
        w = tl.where(chosen, p, 0.0)
        if TOPK > 1:  # as route_fwd: renormalised for k ≥ 2, p itself for k = 1
            w = w / tot[:, None]
        gate = w * s[None, :]
        dgate = tl.zeros((BM, EP), dtype=tl.float32)
        for c0 in range(0, ER, BER):
            cols = c0 + tl.arange(0, BER)
            c_ok = cols < ER
            ghm = _rows_times_cols(g_ptr, N, b_ptr, KP, 1, rm, m_ok, cols, c_ok, N, BM, BK, BER, EVEN_K, IEEE,
                                   DOT_F32)
            msk = m_ok[:, None] & c_ok[None, :]
            h = tl.load(h_ptr + rm[:, None] * ER + cols[None, :], mask=msk, other=0.0)
            gate_col, onehot = _per_column(gate, cols, re, R, c_ok)
            tl.store(gcat_ptr + rm[:, None] * KG + cols[None, :], (ghm * gate_col).to(gcat_ptr.dtype.element_ty),
                     mask=msk)
            dgate = tl.dot(ghm * h, tl.trans(onehot), dgate, input_precision="ieee")  # Σ over each expert's r
        dp = tl.where(chosen, dgate * s[None, :], 0.0)  # ∂w, and ∂p for k = 1 (w = p)
        if TOPK > 1:  # w_e = p_e / Σ_chosen p  ⇒  ∂p_e = (∂w_e − Σ_j ∂w_j w_j) / Σ_chosen p  (chosen e only)
            dp = tl.where(chosen, (dp - tl.sum(dp * w, axis=1)[:, None]) / tot[:, None], 0.0)
        if HAS_DP:
            dp += tl.load(dprobs_ptr + rm[:, None] * E + re[None, :], mask=m_ok[:, None] & e_ok[None, :], other=0.0)
        dz = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        tl.store(gcat_ptr + rm[:, None] * KG + ER + re[None, :], dz.to(gcat_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & e_ok[None, :])
        for c0 in range(ER + E, KG, BER):
            cols = c0 + tl.arange(0, BER)
            tl.store(gcat_ptr + rm[:, None] * KG + cols[None, :],
                     tl.zeros((BM, BER), dtype=gcat_ptr.dtype.element_ty), mask=m_ok[:, None] & (cols < KG)[None, :])


def _pad(n: int) -> int:
    """Extra-K widths are padded to the GEMM's K block, so its unified K loop needs no masks."""
    return _cdiv(n, PAD_K) * PAD_K


ROUTE_CONFIGS = [dict(BM=bm, BK=bk, num_warps=w, num_stages=st)
                 for bm, bk, w, st in ((64, 64, 4, 4), (128, 64, 8, 4), (64, 128, 4, 3), (32, 64, 4, 4))]
_ROUTE_TUNED: dict[tuple, dict] = {}  # (kernel, (token bucket, x dtype, shapes, dtypes, flags)) → config
_B_ROWS, _AG_ROWS = 64, 16  # rows of B_cat / of [A_cat; G] per copy program of the route kernels
_FWD, _BWD = Launcher(_route_fwd), Launcher(_route_bwd)
_LAUNCHERS = (_FWD, _BWD)


def _launch(launcher, x, T, extra, key, args, consts):
    """Run a route kernel (launcher.kernel): cdiv(T, BM) row blocks, then `extra` programs (weight
    copies). Half precision on the GPU: the fastest of ROUTE_CONFIGS, timed on the real operands the
    first time a (token-count bucket, key) is seen, then plain launches of the compiled kernel
    (rocket.kernels.direct_launch: host time bounds small steps). Float32 (exact IEEE dots) and the
    interpreter: one fixed config. `key`: what besides the token bucket and x's dtype decides the
    config, `extra` and the constexprs `consts()` (shapes, operand dtypes, flags)."""
    full_key = (_bucket(T), x.dtype, key)
    kernel = launcher.kernel

    def meta():
        ieee, dot_f32 = _flags(x.dtype)
        m = consts() | dict(IEEE=ieee, DOT_F32=dot_f32)
        if _INTERPRET or x.dtype == torch.float32:
            return m | (dict(BM=16, BK=32, num_warps=4, num_stages=1) if _INTERPRET
                        else dict(BM=32, BK=32, num_warps=4, num_stages=2))
        return m | _route_config(kernel, full_key, T, extra, args, m)

    grid = lambda m: (_cdiv(T, m["BM"]) + extra,)  # noqa: E731
    if _INTERPRET:
        m = meta()
        kernel[grid(m)](*args, **m)
    else:
        launcher.launch(full_key, grid, args, meta, x.get_device())


def _route_config(kernel, full_key, T, extra, args, m) -> dict:
    """The route kernel's tuned config for full_key, tuned now if it is new. A key first seen inside
    a CUDA-graph capture cannot be timed: it keeps ROUTE_CONFIGS[0] (the launcher then holds that
    compiled kernel), so a layer warmed up before its capture, as torch.cuda.graphs asks, runs tuned."""
    tkey = (id(kernel), full_key)
    if tkey not in _ROUTE_TUNED:
        _ROUTE_TUNED[tkey] = ROUTE_CONFIGS[0] if _capturing() else _tune_route(kernel, T, extra, args, m)
    return _ROUTE_TUNED[tkey]


TUNING_ROUNDS = 4  # even: rounds alternate the order of the configs


def _tuning_time(fn) -> float:
    """One timing of a route-tuning round (ms): 15 ms of runs, so that the rounds of all the configs
    together take about what one pass of _quick_bench over them did."""
    return triton.testing.do_bench(fn, warmup=5, rep=10)


def _tune_route(kernel, T, extra, args, kw) -> dict:
    """The fastest of ROUTE_CONFIGS by the median of TUNING_ROUNDS rounds that each time every config
    once, in order and in reverse order by turns. The GPU's clocks drift over a tuning (power,
    temperature); timed one config after another, a steady drift would favour the first or the last
    config, while the median of alternating rounds cancels it."""
    runs = {}
    for i, cfg in enumerate(ROUTE_CONFIGS):
        run = lambda cfg=cfg: kernel[(_cdiv(T, cfg["BM"]) + extra,)](*args, **kw, **cfg)  # noqa: E731
        try:  # the route kernels only write their outputs: safe to run repeatedly
            run()  # compiles
        except Exception:  # a config this GPU cannot build (shared memory, registers) is not a candidate
            continue
        runs[i] = run
    times = {i: [] for i in runs}
    order = list(runs)
    for _ in range(TUNING_ROUNDS):
        for i in list(order):
            try:
                times[i].append(_tuning_time(runs[i]))
            except Exception:  # cannot be timed here (e.g. no memory for the timer's cache flush)
                order.remove(i)
                del times[i]
        order.reverse()
    return ROUTE_CONFIGS[min(times, key=lambda i: statistics.median(times[i])) if times else 0]


def _expert_block(n_experts: int) -> int:
    """EP: the route kernels' block over the experts (a power of two, at least 16 for tl.dot)."""
    return max(16, _pow2(n_experts))


def _column_block(width: int) -> int:
    """BER: the route kernels' column block over the E·r columns (a power of two, 16 to 128)."""
    return max(16, min(128, _pow2(width)))


def route_forward(x, x_lora, lora_A, lora_B, G, scaling, top_k):
    """Routing, expert shrink and the expansion operand in one kernel: (probs [T, E] fp32, experts
    [T, k] int32, h [T, E·r] fp32, hm [T, KP] x.dtype, B_cat [d_out, KP] x.dtype) with KP = pad(E·r)
    and zero pad columns; x (and x_lora) contiguous [T, d_in], read once when E·r ≤ 128."""
    T, d_in = x.shape
    E, r, _ = lora_A.shape
    d_out = lora_B.shape[1]
    ER, KP = E * r, _pad(E * r)
    dev = x.device
    probs = torch.empty(T, E, device=dev, dtype=torch.float32)
    experts = torch.empty(T, top_k, device=dev, dtype=torch.int32)
    h = torch.empty(T, ER, device=dev, dtype=torch.float32)
    hm = torch.empty(T, KP, device=dev, dtype=x.dtype)
    B_cat = torch.empty(d_out, KP, device=dev, dtype=x.dtype)
    if T:
        has_xl = x_lora is not None
        _launch(_FWD, x, T, _cdiv(d_out, _B_ROWS), (d_in, d_out, E, r, top_k, has_xl, lora_A.dtype, G.dtype,
                                                     lora_B.dtype),
                (x, x_lora if has_xl else x, lora_A, G, scaling, lora_B, probs, experts, h, hm, B_cat, T),
                lambda: dict(K=d_in, N=d_out, E=E, R=r, KP=KP, EP=_expert_block(E), BER=_column_block(KP),
                             TOPK=top_k, HAS_XL=has_xl, COPY_ROWS=_B_ROWS))
    return probs, experts, h, hm, B_cat


def route_backward(g, B_cat, h, scaling, probs, experts, dprobs, lora_A, G, with_ag):
    """(gcat [T, KG] g.dtype = [∂h | ∂logits | zeros], AG [KG, d_in] g.dtype = [A_cat; G; zeros] or
    None) with KG = pad(E·r + E), from ∂y (see _route_bwd); one kernel, g contiguous."""
    T, d_out = g.shape
    E, r, d_in = lora_A.shape
    KG = _pad(E * r + E)
    gcat = torch.empty(T, KG, device=g.device, dtype=g.dtype)
    AG = torch.empty(KG, d_in, device=g.device, dtype=g.dtype) if with_ag else None
    if T:
        has_dp = dprobs is not None
        top_k = experts.shape[1]
        _launch(_BWD, g, T, _cdiv(KG, _AG_ROWS) if with_ag else 0,
                (d_out, d_in, E, r, top_k, has_dp, with_ag, B_cat.dtype, lora_A.dtype, G.dtype),
                (g, B_cat, h, scaling, probs, experts, dprobs.contiguous() if has_dp else probs, gcat, lora_A, G,
                 AG if with_ag else gcat, T),
                lambda: dict(N=d_out, K=d_in, E=E, R=r, KP=B_cat.shape[1], KG=KG, EP=_expert_block(E),
                             BER=_column_block(E * r), TOPK=top_k, HAS_DP=has_dp, COPY_ROWS=_AG_ROWS))
    return gcat, AG
