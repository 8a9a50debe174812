"""dual_mm: out = a1 @ b1 + a2 @ b2 (+ bias) with one fp32 accumulator, a GEMM with two K segments.

The LoRA-MoE layer (rocket/kernels/lora_moe.py) runs its frozen base product with the experts' E·r
columns as a second K segment, so the LoRA product costs extra reduction steps and no output pass.
Three backends, picked by the `backend` argument: one Triton kernel loading through pointers, the
same kernel with TMA descriptors, or cuBLAS (the second product first, read back as C by the first);
"auto" takes cuBLAS up to SMALL_M rows and above times the three once per shape and keeps the fastest.
The Triton and host helpers the route kernels share with it live here too (_dot, _cdiv, _bucket, ...).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
PAD_K = 64  # the K block of the GEMM configs


BACKENDS = ("auto", "triton", "tma", "cublas")  # what dual_mm's `backend` accepts


def check_backend(backend, name: str = "dual_mm: backend") -> None:
    """A one-line ValueError unless `backend` is one of BACKENDS; `name` says whose argument it is."""
    if backend not in BACKENDS:
        raise ValueError(f"{name}={backend!r} is not one of {', '.join(BACKENDS)}")


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


# Plain-Python integer helpers for the per-call path: triton.cdiv / next_power_of_2 are
# ConstexprFunction objects in recent Triton, ~100× slower than this on the host.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _bucket(m: int) -> int:
    """Autotuning key of a token count: the next power of two, so variable-length batches (a new T
    almost every step) reuse a tuned config instead of tuning again."""
    return _pow2(max(int(m), 1))


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph: then nothing may be timed (a timer
    synchronises the device, which a capture forbids)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


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
    """backend "auto": up to SMALL_M rows cuBLAS (it won every timing there, and the step is
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


def _takes_cublas(M: int, dtype, backend: str) -> bool:
    """Whether dual_mm surely runs cuBLAS for M rows with `backend` (then the extra K needs no zero
    padding)."""
    if _INTERPRET or dtype == torch.float32:
        return False
    return backend == "cublas" or (backend == "auto" and M <= SMALL_M)


def dual_mm(a1, b1, a2, b2, bias=None, out_dtype=None, backend: str = "auto"):
    """a1 @ b1 + a2 @ b2 (+ bias) with one fp32 accumulator; b's are [K, N] views (any strides).

    backend: "auto" (default: cuBLAS up to SMALL_M rows, above the fastest of the below per shape,
    timed once), "triton" (pointer loads, one-loop variant), "tma" (tensor-memory-accelerator tiles),
    "cublas" (two cuBLAS calls); any other value raises a ValueError. Where the one asked for cannot
    run (cuBLAS in the interpreter, TMA on operands it cannot describe), the pointer kernel runs."""
    check_backend(backend)
    M, N = a1.shape[0], b1.shape[1]
    out = torch.empty(M, N, device=a1.device, dtype=out_dtype or a1.dtype)
    if M == 0 or N == 0:
        return out
    if backend == "cublas" and _INTERPRET:
        backend = "triton"
    if backend == "tma" and not _tma_usable(a1, b1, a2, b2, out):
        backend = "triton"
    if backend == "auto":
        backend = "triton" if (_INTERPRET or a1.dtype == torch.float32) else _choose(a1, b1, a2, b2, bias, out)
    return _IMPLS[backend](a1, b1, a2, b2, bias, out)
