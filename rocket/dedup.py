"""Near-duplicate removal (stage 3): the exact SemDeDup rule of DESIGN.md §3 at scale."""
from __future__ import annotations

import torch

from rocket import _C


def rank_order(priority: torch.Tensor | None, n: int) -> torch.Tensor:
    """Positions in rank order: higher priority first, ties by lower index (stable)."""
    if priority is None:
        return torch.arange(n)
    if priority.shape != (n,):
        raise ValueError(f"dedup: priority has shape {tuple(priority.shape)}, expected ({n},)")
    return torch.sort(priority.detach().float().cpu(), descending=True, stable=True).indices


def dedup(embeddings: torch.Tensor, threshold: float = 0.9, priority: torch.Tensor | None = None,
          block: int | None = None) -> torch.Tensor:
    """Kept indices (ascending) after dropping every item that has a higher-ranked neighbour with
    cosine similarity > threshold. Embeddings must be L2-normalised rows [n, d]; CUDA tensors run
    on the GPU, CPU tensors on the multithreaded C++ path."""
    if embeddings.dim() != 2:
        raise ValueError(f"dedup: embeddings must be [n, d], got shape {tuple(embeddings.shape)}")
    n = embeddings.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.long)
    order = rank_order(priority, n).to(embeddings.device)
    ranked = embeddings.index_select(0, order)
    if embeddings.is_cuda:
        if not _C.with_cuda:
            raise RuntimeError("dedup: rocket._C was built without CUDA; reinstall with a CUDA torch and nvcc")
        dropped = _C.dedup_sorted_cuda(ranked, float(threshold), block or 8192)
    else:
        dropped = _C.dedup_sorted_cpu(ranked, float(threshold), block or 2048)
    kept = order[~dropped.to(order.device)]
    return torch.sort(kept).values.cpu()
