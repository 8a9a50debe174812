"""Near-duplicate removal (stage 3): the SemDeDup rule (docs/design.md) at scale.

Rule: item j is dropped iff some item k that outranks it (higher priority, or equal priority and
k < j) has cos(j, k) > τ. Items are first put in rank order, so "outranks" = "earlier position".

Exact methods compute the similarity join in low precision and decide each row with a certainty
band: a row is decided at once unless its largest earlier similarity lies within δ of τ, where δ
bounds the rounding error of that computation (input rounding to the compute dtype, float32
accumulation, output rounding); those few rows are re-decided in float64. Decisions therefore
equal the rule evaluated in float64 on the given values (the exact rule), whatever dtype the
join used.

- CUDA: the fused Triton join (rocket/kernels/dedup.py, tensor cores, no n×n matrix), or `backend=
  "cublas"` for the unfused cuBLAS-tile + reduction path of rocket._C (kept for comparison).
- CPU: the multithreaded C++ join of rocket._C (float32 BLAS tiles + OpenMP reduction).
- method="knn": FAISS, neighbours above τ among each item's k nearest (see rocket/knn_dedup.py):
  approximate, for pools too large for the exact join. method="ivf": the exact join inside each
  k-means list (nprobe lists an item), on the GPU without faiss. Both only ever miss pairs.
"""
from __future__ import annotations

import time
import warnings

import torch

from rocket.errors import AugmentError
from rocket.augment.exact import exact_dropped, rank_order


# method="auto" switches to the kNN path above these pool sizes (the exact join is O(n²·d)).
AUTO_EXACT_MAX = {"cuda": 2_000_000, "cpu": 200_000}


# How far a row's squared norm may stray from 1 and still count as unit: rounding (of 16-bit storage,
# or float32 rows held in float64) is not a forgotten normalisation.
UNIT_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float32: 1e-3, torch.float64: 1e-3}


def checked_rows(embeddings: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """The rows as the rule needs them: a non-finite or zero row is refused (naming the row); rows
    that are not unit-norm are normalised, with a warning (the rule compares cosines)."""
    bad_norm = []
    for s in range(0, embeddings.shape[0], chunk):
        part = embeddings[s:s + chunk]
        finite = torch.isfinite(part).all(dim=1)
        if not bool(finite.all()):
            raise AugmentError(f"dedup: row {s + int((~finite).nonzero()[0])} has non-finite values (NaN or Inf)")
        norm2 = part.float().pow(2).sum(1)
        if bool((norm2 == 0).any()):
            raise AugmentError(f"dedup: row {s + int((norm2 == 0).nonzero()[0])} is all zeros (no direction)")
        off = ((norm2 - 1).abs() > UNIT_TOLERANCE[embeddings.dtype]).nonzero()
        if len(off) and not bad_norm:
            bad_norm.append((s + int(off[0]), float(norm2[off[0]].sqrt())))
    if bad_norm:
        row, norm = bad_norm[0]
        warnings.warn(f"dedup: rows are not unit-norm (e.g. row {row}, norm {norm:.4g}); normalising them",
                      stacklevel=3)
        wide = torch.promote_types(embeddings.dtype, torch.float32)
        embeddings = torch.nn.functional.normalize(embeddings.to(wide), dim=1).to(embeddings.dtype)
    return embeddings


def dedup(embeddings: torch.Tensor, threshold: float = 0.9, priority: torch.Tensor | None = None,
          method: str = "auto", k: int = 32, backend: str | None = None, block: int | None = None,
          return_info: bool = False, **knn_options):
    """Kept indices (int64, ascending, on the CPU) after the near-duplicate rule above.

    embeddings: [n, d], rows L2-normalised (cos = dot; rows that are not are normalised, with a
    warning; a non-finite or zero row is an error); float16/bfloat16/float32/64.
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
        raise AugmentError(f"dedup: embeddings must be [n, d], got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise AugmentError(f"dedup: embeddings must be floating point, got {embeddings.dtype}")
    if method not in ("auto", "exact", "knn", "ivf"):
        raise AugmentError(f"dedup: method must be 'auto', 'exact', 'knn' or 'ivf', got {method!r}")
    embeddings = checked_rows(embeddings)
    n, d = embeddings.shape
    start = time.perf_counter()
    order = rank_order(priority, n, embeddings.device)
    if method == "auto":
        if n <= AUTO_EXACT_MAX["cuda" if embeddings.is_cuda else "cpu"]:
            method = "exact"
        else:  # FAISS where it can use the GPU (or the data is on the CPU), else the GPU-native IVF join
            from rocket.augment.faiss_index import faiss_has_gpu
            method = "knn" if not embeddings.is_cuda or faiss_has_gpu() else "ivf"
    info = {"n": n, "d": d, "method": method}
    if n == 0:
        dropped = torch.zeros(0, dtype=torch.bool, device=embeddings.device)
    elif method == "knn":
        from rocket.augment.approximate import knn_dropped
        dropped = knn_dropped(embeddings.index_select(0, order), float(threshold), k=k, info=info, **knn_options)
    elif method == "ivf":
        from rocket.augment.approximate import ivf_dropped
        dropped = ivf_dropped(embeddings.index_select(0, order), float(threshold), backend=backend, info=info,
                              **knn_options)
    else:
        dropped = exact_dropped(embeddings.index_select(0, order), float(threshold), backend, block, info)
    kept = order[~dropped.to(order.device)]
    kept = torch.sort(kept).values.cpu()
    info["kept"] = int(kept.numel())
    info["seconds"] = time.perf_counter() - start
    return (kept, info) if return_info else kept
