"""LoRA mixture of experts: y = x Wᵀ + b + Σ_{(e,w) in topk(x)} w · s_e · B_e A_e x (DESIGN §3).

Design: the experts are few and thin (E·r = 128 at E=8, r=16, against d = 4096), so instead of
gathering tokens per expert we treat the E experts as ONE concatenated LoRA of rank E·r and make
routing a mask on its [T, E·r] intermediate:

  forward   route_fwd: [logits | h] = x [G; A_cat]ᵀ, then in the same kernel p, top-k, w and
            hm = h · (w·s)[expert of column]                 one read of x, fp32 accumulators
            (its last programs lay out B_cat [d_out, E·r] from lora_B [E, d_out, r])
            y = [x | hm] [W | B_cat]ᵀ + b                     the base GEMM with E·r extra K (≈3% FLOPs)*
  backward  route_bwd: ghm = g B_cat, then in the same kernel gh = ghm·(w·s) and ∂logits via
            top-k/renorm/softmax → gcat = [gh | ∂logits]      one read of g
            (its last programs lay out [A_cat; G] in x's dtype)
            ∂B_cat = gᵀ hm                                    K = T, cuBLAS
            [∂A_cat; ∂G] = gcatᵀ x                            K = T, cuBLAS, one read of x
            ∂x = [g | gcat] [W; A_cat; G]                     the base backward GEMM with extra K

* dual_mm: one Triton GEMM with two K segments (pointer loads, or TMA descriptors), or cuBLAS (the
  LoRA product first, read back as C by the base product); GEMM_BACKEND="auto" takes cuBLAS up to
  SMALL_M tokens and above times the three once per shape and keeps the fastest.

Small token counts (training micro-batches) are bound by host launch time, not by the GPU: the
layer is 2 Triton + 6 cuBLAS launches forward and backward together and no copies (the route
kernels lay out the weights the GEMMs need, float32 masters rounded: no cast nodes in the graph);
the route kernels are launched without Triton's per-call binding (their shapes are constexprs, so
per call only the token count and the pointers are specialised); and autotuning keys bucket the
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

import os
import statistics

import torch
import triton
import triton.language as tl

from rocket.kernels import reference as R
from rocket.kernels import use_triton
from rocket.kernels.direct_launch import Launcher

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


# --------------------------------------------------------------------------- routing fused with its skinny GEMMs
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
    outside the top-k and in the pad columns up to KP). Writes probs [M, E] fp32, experts [M, k]
    int32, h [M, E·R] fp32, hm [M, KP]. The programs after those write B_cat [N, KP] in hm's dtype
    from B [E, N, R] (_b_cat_rows), so the expansion GEMM needs no copy of its own."""
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
        gate = tl.where(chosen, p / tot[:, None], 0.0) * s[None, :]  # [BM, EP]
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
    = ∂logits through top-k renorm and softmax (plus ∂probs when the balancing loss used probs); the
    pad columns up to KG are zeroed. h, probs, experts are the forward's. The programs after those
    write AG = [A_cat; G] in gcat's dtype (_ag_rows), the extra K of the ∂x GEMM."""
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
        w = tl.where(chosen, p / tot[:, None], 0.0)
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
        dw = tl.where(chosen, dgate * s[None, :], 0.0)
        # w_e = p_e / Σ_chosen p  ⇒  ∂p_e = (∂w_e − Σ_j ∂w_j w_j) / Σ_chosen p   (chosen e only)
        dp = tl.where(chosen, (dw - tl.sum(dw * w, axis=1)[:, None]) / tot[:, None], 0.0)
        if HAS_DP:
            dp += tl.load(dprobs_ptr + rm[:, None] * E + re[None, :], mask=m_ok[:, None] & e_ok[None, :], other=0.0)
        dz = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        tl.store(gcat_ptr + rm[:, None] * KG + ER + re[None, :], dz.to(gcat_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & e_ok[None, :])
        for c0 in range(ER + E, KG, BER):
            cols = c0 + tl.arange(0, BER)
            tl.store(gcat_ptr + rm[:, None] * KG + cols[None, :],
                     tl.zeros((BM, BER), dtype=gcat_ptr.dtype.element_ty), mask=m_ok[:, None] & (cols < KG)[None, :])


# Plain-Python integer helpers for the per-call path: triton.cdiv / next_power_of_2 are
# ConstexprFunction objects in recent Triton, ~100× slower than this on the host.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _pad(n: int) -> int:
    """Extra-K widths are padded to the GEMM's K block, so its unified K loop needs no masks."""
    return _cdiv(n, PAD_K) * PAD_K


def _bucket(m: int) -> int:
    """Autotuning key of a token count: the next power of two, so variable-length batches (a new T
    almost every step) reuse a tuned config instead of tuning again."""
    return _pow2(max(int(m), 1))


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


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph: then nothing may be timed (a timer
    synchronises the device, which a capture forbids)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


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


# --------------------------------------------------------------------------- base GEMM with extra K
@triton.jit
def _dual_mm(a1_ptr, b1_ptr, a2_ptr, b2_ptr, bias_ptr, out_ptr, M, MB, N, K1, K2,
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


_dual_mm_tuned = triton.autotune(configs=_mm_configs(), key=["MB", "N", "K1", "K2", "sb1k", "sb1n"],
                                 do_bench=_quick_bench)(_dual_mm)


def _dual_mm_pointers(a1, b1, a2, b2, bias, out):
    M, K1 = a1.shape
    N = b1.shape[1]
    K2 = a2.shape[1]
    ieee, dot_f32 = _flags(a1.dtype)
    bk2 = PAD_K if K2 % PAD_K == 0 else max(16, min(PAD_K, _pow2(K2)))
    args = (a1, b1, a2, b2, bias if bias is not None else out, out, M, _bucket(M), N, K1, K2,
            a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1), a2.stride(0), a2.stride(1),
            b2.stride(0), b2.stride(1), out.stride(0))
    if _INTERPRET or a1.dtype == torch.float32:
        bm, bn, bk = (32, 32, 32) if _INTERPRET else (64, 64, 32)
        bk2 = bk if K2 % bk == 0 else bk2
        grid = (_cdiv(M, bm) * _cdiv(N, bn),)
        _dual_mm[grid](*args, BM=bm, BN=bn, BK=bk, BK2=bk2, GROUP_M=8, HAS_BIAS=bias is not None,
                       EVEN_K1=K1 % bk == 0, IEEE=ieee, DOT_F32=dot_f32, UNIFIED=True,
                       num_warps=4, num_stages=2)
        return out
    grid = lambda meta: (_cdiv(M, meta["BM"]) * _cdiv(N, meta["BN"]),)  # noqa: E731
    _dual_mm_tuned[grid](*args, BK2=bk2, HAS_BIAS=bias is not None, EVEN_K1=K1 % PAD_K == 0, IEEE=ieee,
                         DOT_F32=dot_f32)
    return out


# --------------------------------------------------------------------------- the same GEMM through TMA
@triton.jit
def _dual_mm_tma(a1_d, b1_d, a2_d, b2_d, bias_ptr, out_d, M, MB, N, K1, K2,
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
    key=["MB", "N", "K1", "K2", "B1_KMAJOR", "B2_KMAJOR"], do_bench=_quick_bench)(_dual_mm_tma)


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
            bias if bias is not None else out, TensorDescriptor.from_tensor(out, [bm, bn]), M, _bucket(M), N, K1, K2)
    meta = dict(B1_KMAJOR=d1[1], B2_KMAJOR=d2[1], HAS_BIAS=bias is not None, DOT_F32=_INTERPRET)
    if _INTERPRET:
        _dual_mm_tma[(_cdiv(M, bm) * _cdiv(N, bn),)](*args, BM=bm, BN=bn, BK=bk, GROUP_M=8, **meta)
    else:
        grid = lambda m: (_cdiv(M, m["BM"]) * _cdiv(N, m["BN"]),)  # noqa: E731
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
        torch.addmm(bias if bias.dtype == out.dtype else bias.to(out.dtype), a2, b2, out=out)
    return out.addmm_(a1, b1)


_IMPLS = {"triton": _dual_mm_pointers, "tma": _dual_mm_tensor_memory, "cublas": _dual_mm_cublas}
_CHOSEN: dict[tuple, str] = {}


SMALL_M = 4096  # "auto" takes cuBLAS up to this many tokens without timing (measured on H200, see bench/results)


def _choose(a1, b1, a2, b2, bias, out) -> str:
    """GEMM_BACKEND "auto": up to SMALL_M rows cuBLAS (it won every timing there, and the step is
    bound by host launch time, which two cuBLAS calls keep lowest); above, time every usable
    implementation once per shape (token count bucketed to a power of two) and layout, on the real
    operands, and keep the fastest whose result agrees with cuBLAS."""
    if a1.shape[0] <= SMALL_M:
        return "cublas"
    key = (_bucket(a1.shape[0]), a1.shape[1], tuple(b1.shape), tuple(b1.stride()), a2.shape[1], a1.dtype, bias is None)
    if key not in _CHOSEN:
        if _capturing():  # inside a CUDA-graph capture nothing can be timed: cuBLAS, chosen again after it
            return "cublas"
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


def _takes_cublas(M: int, dtype) -> bool:
    """Whether dual_mm surely runs cuBLAS for M rows (then the extra K needs no zero padding)."""
    if _INTERPRET or dtype == torch.float32:
        return False
    return GEMM_BACKEND == "cublas" or (GEMM_BACKEND == "auto" and M <= SMALL_M)


def dual_mm(a1, b1, a2, b2, bias=None, out_dtype=None):
    """a1 @ b1 + a2 @ b2 (+ bias) with one fp32 accumulator; b's are [K, N] views (any strides).

    GEMM_BACKEND: "auto" (default: cuBLAS up to SMALL_M rows, above the fastest of the below per
    shape, timed once), "triton" (pointer loads, one-loop variant), "tma" (tensor-memory-accelerator
    tiles), "cublas" (two cuBLAS calls)."""
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
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora, routing):
        early = _takes_cublas(x.shape[0], x.dtype)
        w_t = weight.t()
        if early:  # cuBLAS: the base product is issued first, the rest is issued while it runs
            y = torch.mm(x, w_t) if bias is None else torch.addmm(bias, x, w_t)
        probs, experts, h, hm, B_cat = route_forward(x, x_lora, lora_A, lora_B, router_weight, scaling, top_k)
        if early:
            y.addmm_(hm, B_cat.t())
        else:
            y = dual_mm(x, w_t, hm, B_cat.t(), bias)
        ctx.save_for_backward(x, x_lora, weight, lora_A, lora_B, B_cat, router_weight, scaling, h, hm, probs, experts)
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
        early = need[0] and _takes_cublas(T, x.dtype)
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
            gx = gx.addmm_(gc, ag) if early else dual_mm(g, weight, gc, ag)
        if need[8]:
            gxl = gcat[:, :ER] @ AG[:ER]
        return gx, None, None, gA, gB, None, gG, None, gxl, None


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
             return_routing: bool = False):
    """Same contract as reference.lora_moe. With return_routing, returns (y, probs [T, E] float32,
    experts [T, k] int64) where probs carries gradients to x and the router (load-balancing loss).

    Triton path (CUDA, or the interpreter): W and b must be frozen (the MoE layer never trains them;
    otherwise the reference runs); lora_A, lora_B, router_weight may be float32 masters of a
    half-precision x (rounded to x's dtype in the kernels, gradients in their own dtype). scaling:
    one per expert, or one for all. Operands of mismatched shapes raise a one-line ValueError.
    """
    _check_operands(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora)
    frozen = not (weight.requires_grad or (bias is not None and bias.requires_grad))
    if not (frozen and use_triton(x, weight, lora_A, lora_B, router_weight)):
        y = R.lora_moe(x, weight, bias, lora_A, lora_B, scaling, router_weight, top_k, x_lora)
        if not return_routing:
            return y
        _, experts, probs = R.route_topk(x.reshape(-1, x.shape[-1]), router_weight, top_k)
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
        return_routing)
    y, probs, experts = out if return_routing else (out, None, None)
    if flat:
        y = y.reshape(*x.shape[:-1], weight.shape[0])
    return (y, probs, experts.long()) if return_routing else y
