"""Near-duplicate removal (stage 3): the SemDeDup rule of DESIGN.md §3 at scale.

Rule: item j is dropped iff some item k that outranks it (higher priority, or equal priority and
k < j) has cos(j, k) > τ. Items are first put in rank order, so "outranks" = "earlier position".

Exact methods compute the similarity join in low precision and decide each row with a certainty
band: a row is decided at once unless its largest earlier similarity lies within δ of τ, where δ
bounds the rounding error of that computation (input rounding to the compute dtype, float32
accumulation, output rounding); those few rows are re-decided in float64. Decisions therefore
equal the rule evaluated in float64 on the given values (DESIGN's exact rule), whatever dtype the
join used.

- CUDA: the fused Triton join (rocket/kernels/dedup.py, tensor cores, no n×n matrix), or `backend=
  "cublas"` for the unfused cuBLAS-tile + reduction path of rocket._C (kept for comparison).
- CPU: the multithreaded C++ join of rocket._C (float32 BLAS tiles + OpenMP reduction).
- method="knn": FAISS, neighbours above τ among each item's k nearest (see rocket/knn_dedup.py):
  approximate, for pools too large for the exact join. method="ivf": the exact join inside each
  k-means list (nprobe lists an item), on the GPU without faiss. Both only ever miss pairs.
"""
from __future__ import annotations

import math
import time

import torch

from rocket import _C
from rocket._namesake import make_module_callable
from rocket.errors import RocketError

# method="auto" switches to the kNN path above these pool sizes (the exact join is O(n²·d)).
AUTO_EXACT_MAX = {"cuda": 2_000_000, "cpu": 200_000}
_UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24,
                  torch.float64: 2.0 ** -53}


def rank_order(priority: torch.Tensor | None, n: int, device=None) -> torch.Tensor:
    """Positions in rank order: higher priority first, ties by lower index (stable)."""
    if priority is None:
        return torch.arange(n, device=device)
    if priority.shape != (n,):
        raise RocketError(f"dedup: priority has shape {tuple(priority.shape)}, expected ({n},)")
    prio = priority.detach().to(device=device, dtype=torch.float64)
    if torch.isnan(prio).any():
        raise RocketError("dedup: priority contains NaN")
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


def dedup(embeddings: torch.Tensor, threshold: float = 0.9, priority: torch.Tensor | None = None,
          method: str = "auto", k: int = 32, backend: str | None = None, block: int | None = None,
          return_info: bool = False, **knn_options):
    """Kept indices (int64, ascending, on the CPU) after the near-duplicate rule above.

    embeddings: [n, d], rows L2-normalised by the caller (cos = dot); float16/bfloat16/float32/64.
    priority: [n] (default: all equal, so the lower index wins).
    method: "exact" (the join), "knn" (FAISS, k nearest; knn_options go to knn_dedup.knn_dropped),
    "ivf" (the exact join inside k-means lists, GPU-native; knn_options go to knn_dedup.ivf_dropped),
    or "auto" (exact up to AUTO_EXACT_MAX items on the device; beyond, knn, or ivf for CUDA tensors
    when faiss has no GPU support).
    backend (exact only): "triton" (CUDA default; also runs in the Triton interpreter on the CPU),
    "cublas" (CUDA, unfused) or "cpu" (C++, the CPU default). block: tile rows of the rocket._C paths.
    return_info: also return a dict (method, backend, band, uncertain rows rechecked, seconds).
    """
    if embeddings.dim() != 2:
        raise RocketError(f"dedup: embeddings must be [n, d], got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise RocketError(f"dedup: embeddings must be floating point, got {embeddings.dtype}")
    if method not in ("auto", "exact", "knn", "ivf"):
        raise RocketError(f"dedup: method must be 'auto', 'exact', 'knn' or 'ivf', got {method!r}")
    n, d = embeddings.shape
    start = time.perf_counter()
    order = rank_order(priority, n, embeddings.device)
    if method == "auto":
        if n <= AUTO_EXACT_MAX["cuda" if embeddings.is_cuda else "cpu"]:
            method = "exact"
        else:  # FAISS where it can use the GPU (or the data is on the CPU), else the GPU-native IVF join
            from rocket.knn_dedup import faiss_has_gpu
            method = "knn" if not embeddings.is_cuda or faiss_has_gpu() else "ivf"
    info = {"n": n, "d": d, "method": method}
    if n == 0:
        dropped = torch.zeros(0, dtype=torch.bool, device=embeddings.device)
    elif method == "knn":
        from rocket.knn_dedup import knn_dropped
        dropped = knn_dropped(embeddings.index_select(0, order), float(threshold), k=k, info=info, **knn_options)
    elif method == "ivf":
        from rocket.knn_dedup import ivf_dropped
        dropped = ivf_dropped(embeddings.index_select(0, order), float(threshold), backend=backend, info=info,
                              **knn_options)
    else:
        dropped = exact_dropped(embeddings.index_select(0, order), float(threshold), backend, block, info)
    kept = order[~dropped.to(order.device)]
    kept = torch.sort(kept).values.cpu()
    info["kept"] = int(kept.numel())
    info["seconds"] = time.perf_counter() - start
    return (kept, info) if return_info else kept


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
            raise RocketError("dedup: backend 'cublas' needs CUDA tensors and rocket._C built with CUDA")
        if backend == "cpu" and ranked.is_cuda:
            raise RocketError("dedup: backend 'cpu' needs CPU tensors")
        if backend == "cublas":
            x = ranked if ranked.dtype in (torch.float16, torch.bfloat16) else ranked.float()
            delta = error_bound(d, norm2, ranked.dtype, x.dtype, sim=x.dtype)
            codes = _C.dedup_codes_cuda(x, threshold - delta, threshold + delta, block or 8192)
        else:
            delta = error_bound(d, norm2, ranked.dtype, torch.float32)
            codes = _C.dedup_codes_cpu(ranked, threshold - delta, threshold + delta, block or 512)
    else:
        raise RocketError(f"dedup: backend must be 'triton', 'cublas' or 'cpu', got {backend!r}")
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


make_module_callable(__name__, dedup)
