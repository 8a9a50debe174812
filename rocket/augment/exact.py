"""The exact near-duplicate join: kernel codes (C++ / CUDA / Triton) and the float64 re-check of
pairs within the kernel's error bound of τ.
"""
from __future__ import annotations

import math
import torch
from rocket import _C
from rocket.errors import AugmentError


_UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24,
                  torch.float64: 2.0 ** -53}


def rank_order(priority: torch.Tensor | None, n: int, device=None) -> torch.Tensor:
    """Positions in rank order: higher priority first, ties by lower index (stable)."""
    if priority is None:
        return torch.arange(n, device=device)
    if priority.shape != (n,):
        raise AugmentError(f"dedup: priority has shape {tuple(priority.shape)}, expected ({n},)")
    prio = priority.detach().to(device=device, dtype=torch.float64)
    if torch.isnan(prio).any():
        raise AugmentError("dedup: priority contains NaN")
    return torch.sort(prio, descending=True, stable=True).indices


def error_bound(d: int, norm2: float, src: torch.dtype, compute: torch.dtype,
                sim: torch.dtype = torch.float32) -> float:
    """Bound on |computed sim − exact sim| for rows of squared norm ≤ norm2 when rows of dtype src
    are rounded to `compute`, multiplied exactly, summed in float32 (tensor cores may truncate:
    unit 2^-23) and the sum rounded to `sim`. Doubled for safety: a wider band only costs rechecks."""
    exact_input = src == compute or (_UNIT_ROUNDOFF[src] >= _UNIT_ROUNDOFF[compute] and
                                     not (src == torch.bfloat16 and compute == torch.float16))
    u_in = 0.0 if exact_input else _UNIT_ROUNDOFF[compute]
    subnormal = 2.0 ** -25 if compute == torch.float16 and not exact_input else 0.0
    u_out = 0.0 if sim == torch.float32 else _UNIT_ROUNDOFF[sim]
    bound = norm2 * (2 * u_in + u_in ** 2 + d * 2.0 ** -23 + u_out) + 2 * math.sqrt(d * norm2) * subnormal
    return 2.0 * bound


def exact_dropped(ranked: torch.Tensor, threshold: float, backend: str | None = None, block: int | None = None,
                  info: dict | None = None) -> torch.Tensor:
    """Dropped flags (bool [n], rank positions) of rank-sorted rows by the exact rule."""
    codes, delta, backend = exact_codes(ranked, threshold, backend, block)
    dropped = codes == 2
    uncertain = torch.nonzero(codes == 1, as_tuple=True)[0]
    if uncertain.numel():
        dropped[uncertain] = recheck_float64(ranked, uncertain, threshold)
    if info is not None:
        info.update(backend=backend, band=delta, uncertain=int(uncertain.numel()))
    return dropped


def exact_codes(ranked: torch.Tensor, threshold: float, backend: str | None = None, block: int | None = None,
                norm2: float | None = None):
    """(codes, δ, backend): row codes of the join (0 keep, 1 re-decide in float64, 2 drop) with the
    band τ ± δ that makes codes 0 and 2 exact."""
    n, d = ranked.shape
    backend = backend or ("triton" if ranked.is_cuda else "cpu")
    if norm2 is None:
        norm2 = max_sq_norm(ranked)
    if backend == "triton":
        from rocket.kernels import dedup as K
        compute = _kernel_dtype(ranked)
        delta = error_bound(d, norm2, ranked.dtype, compute)
        codes = K.dedup_codes(K.pad_for_kernel(ranked, compute), n, threshold - delta, threshold + delta)
    elif backend in ("cublas", "cpu"):
        if backend == "cublas" and not (ranked.is_cuda and _C.with_cuda):
            raise AugmentError("dedup: backend 'cublas' needs CUDA tensors and rocket._C built with CUDA")
        if backend == "cpu" and ranked.is_cuda:
            raise AugmentError("dedup: backend 'cpu' needs CPU tensors")
        if backend == "cublas":
            x = ranked if ranked.dtype in (torch.float16, torch.bfloat16) else ranked.float()
            delta = error_bound(d, norm2, ranked.dtype, x.dtype, sim=x.dtype)
            codes = _C.dedup_codes_cuda(x, threshold - delta, threshold + delta, block or 8192)
        else:
            delta = error_bound(d, norm2, ranked.dtype, torch.float32)
            codes = _C.dedup_codes_cpu(ranked, threshold - delta, threshold + delta, block or 512)
    else:
        raise AugmentError(f"dedup: backend must be 'triton', 'cublas' or 'cpu', got {backend!r}")
    return codes, delta, backend


def max_sq_norm(x: torch.Tensor, chunk: int = 1 << 20) -> float:
    """max_i ||x_i||² in float32, a chunk of rows at a time (no float32 copy of a 16-bit pool)."""
    return max(float(x[s:s + chunk].float().pow(2).sum(1).max()) for s in range(0, x.shape[0], chunk))


def _kernel_dtype(ranked: torch.Tensor) -> torch.dtype:
    """Tensor-core dtype of the Triton join: 16-bit inputs as they are; wider ones as float16 (10
    mantissa bits, exact range for unit vectors) unless their values overflow it. In the Triton
    interpreter (CPU tests) the kernel runs in float32."""
    if not ranked.is_cuda:
        return torch.float32
    if ranked.dtype in (torch.float16, torch.bfloat16):
        return ranked.dtype
    return torch.float16 if float(ranked.abs().max()) < 6.0e4 else torch.bfloat16


def recheck_float64(ranked: torch.Tensor, positions: torch.Tensor, threshold: float,
                    rows: int = 256, cols: int = 65536) -> torch.Tensor:
    """For each rank position p in `positions`: any q < p with <ranked[p], ranked[q]> > threshold,
    in float64 (the rule's exact decision for rows the fast join could not decide)."""
    out = torch.zeros(positions.numel(), dtype=torch.bool, device=ranked.device)
    for s in range(0, positions.numel(), rows):
        pos = positions[s:s + rows]
        queries = ranked[pos].double()
        hit = torch.zeros(pos.numel(), dtype=torch.bool, device=ranked.device)
        for c in range(0, int(pos.max()), cols):
            q = torch.arange(c, min(c + cols, int(pos.max())), device=ranked.device)
            sim = queries @ ranked[q].double().t()
            hit |= ((sim > threshold) & (q[None, :] < pos[:, None])).any(dim=1)
        out[s:s + rows] = hit
    return out


def recheck_pairs_float64(ranked: torch.Tensor, p: torch.Tensor, q: torch.Tensor, threshold: float,
                          chunk: int = 65536) -> torch.Tensor:
    """<ranked[p_i], ranked[q_i]> > threshold in float64, for each pair i."""
    out = torch.zeros(p.numel(), dtype=torch.bool)
    for s in range(0, p.numel(), chunk):
        a = ranked[p[s:s + chunk].to(ranked.device)].double()
        b = ranked[q[s:s + chunk].to(ranked.device)].double()
        out[s:s + chunk] = ((a * b).sum(1) > threshold).cpu()
    return out
