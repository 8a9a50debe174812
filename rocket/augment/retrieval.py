"""Retrieval: the priority of every open item (its largest cosine to a K-shot item) and the top C."""
from __future__ import annotations

import math
import numpy as np
import torch
from rocket.augment.faiss_index import _on_gpu, faiss_has_gpu
from rocket.augment.faiss_index import _faiss
from rocket.errors import AugmentError


INDEXES = ("flat", "ivf")
FAISS_GPU_MAX_K = 2048  # faiss-gpu's largest k for a search


def _numpy(emb: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(emb.detach().to(torch.float32).cpu().numpy())


def kshot_priority(kshot_emb: torch.Tensor, pool_emb: torch.Tensor, use_gpu: bool = False) -> np.ndarray:
    """prio[j] = max_i <kshot_i, pool_j> in float32 for every pool row (IndexFlatIP over the K-shot rows)."""
    faiss = _faiss()
    index = faiss.IndexFlatIP(kshot_emb.shape[1])
    index.add(_numpy(kshot_emb))
    scores, _ = _on_gpu(index, use_gpu).search(_numpy(pool_emb), 1)
    return scores[:, 0]


def priority64(kshot_emb: torch.Tensor, pool_emb: torch.Tensor, rows: np.ndarray | None,
               device: torch.device, chunk: int = 65536) -> np.ndarray:
    """prio of the pool rows `rows` (None: all) in float64, in chunks sent to `device` as float32."""
    kshot64 = kshot_emb.to(device, torch.float64)
    n = pool_emb.shape[0] if rows is None else len(rows)
    out = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, chunk):
        block = pool_emb[start:start + chunk] if rows is None else pool_emb[torch.from_numpy(rows[start:start + chunk])]
        out[start:start + chunk] = (block.to(device).double() @ kshot64.T).amax(dim=1).cpu()
    return out.numpy()


def rank_by_priority(prio: np.ndarray) -> np.ndarray:
    """Positions from highest to lowest priority, ties by lower position."""
    return np.argsort(-prio, kind="stable")


def ivf_candidates(kshot_emb: torch.Tensor, pool_emb: torch.Tensor, c: int, nlist: int | None = None,
                   nprobe: int | None = None, seed: int = 0, use_gpu: bool = False) -> tuple[np.ndarray, dict]:
    """Pool positions (ascending) that some K-shot item finds among its c nearest in an IVF index.

    With exact search this union contains the top c by prio (each such item is in the list of
    the K-shot item that attains its max); IVF trades a little of that recall for speed.
    """
    faiss = _faiss()
    n, d = pool_emb.shape
    nlist = nlist or max(1, min(int(math.sqrt(n)), n // 39))  # faiss wants >= 39 training rows per list
    nprobe = min(nprobe or max(1, min(64, nlist // 4)), nlist)
    pool = _numpy(pool_emb)
    sample = pool
    if n > 64 * nlist:  # k-means on a sample: training costs iters·sample·nlist·d
        sample = pool[np.sort(np.random.default_rng(seed).choice(n, 64 * nlist, replace=False))]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(sample)
    index.add(pool)
    index.nprobe = nprobe
    k = min(c, n)
    search_index = _on_gpu(index, use_gpu and k <= FAISS_GPU_MAX_K)
    if search_index is not index:
        search_index.nprobe = nprobe
    _, found = search_index.search(_numpy(kshot_emb), k)
    return np.unique(found[found >= 0]), {"nlist": nlist, "nprobe": nprobe}


def exact_top(kshot_emb: torch.Tensor, pool_emb: torch.Tensor, positions: np.ndarray, prio32: np.ndarray,
              c: int, device: torch.device) -> tuple[np.ndarray, np.ndarray, int]:
    """The top c of `positions` (ascending) by prio evaluated in float64, that prio, and how many
    items were rescored.

    FAISS's float32 inner products are off by at most δ = 2(d+2)·2⁻²⁴ for unit rows, so every item
    of the true top c has a float32 prio within 2δ of the float32 c-th value or above it; only
    those are rescored in float64 (ties, then the dedup's ranking, are decided on exact values).
    """
    if c == 0:
        return positions[:0], np.zeros(0), 0
    delta = 2.0 * (kshot_emb.shape[1] + 2) * 2.0 ** -24
    cth = np.partition(prio32, len(prio32) - c)[len(prio32) - c]
    near = positions[prio32 >= cth - 2 * delta]
    prio64 = priority64(kshot_emb, pool_emb, near, device)
    keep = np.sort(rank_by_priority(prio64)[:c])  # near is ascending: position ties are index ties
    return near[keep], prio64[keep], len(near)


def retrieve(kshot_emb: torch.Tensor, pool_emb: torch.Tensor, c: int, index: str = "flat",
             nlist: int | None = None, nprobe: int | None = None, seed: int = 0,
             device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray, dict]:
    """The top-c pool positions by prio (ascending positions), their float64 prio, index details.

    flat on CUDA without faiss-gpu: every prio in float64 on the GPU (K·N·d is small there);
    otherwise FAISS in float32 (GPU index when faiss has GPU support), then exact_top.
    """
    if index not in INDEXES:
        raise AugmentError(f"unknown index {index!r}: use one of {', '.join(INDEXES)}")
    device = torch.device(device)
    use_gpu = device.type == "cuda"
    n = pool_emb.shape[0]
    c = min(c, n)
    if index == "flat" and use_gpu and not faiss_has_gpu():
        prio = priority64(kshot_emb, pool_emb, None, device)
        top = np.sort(rank_by_priority(prio)[:c])
        return top, prio[top], {"index": "flat", "search": "torch float64 (cuda)"}
    search = "faiss-gpu" if use_gpu and faiss_has_gpu() else "faiss-cpu"
    if index == "flat":
        positions, info = np.arange(n), {"index": "flat", "search": search}
        prio32 = kshot_priority(kshot_emb, pool_emb, use_gpu)
    else:
        positions, info = ivf_candidates(kshot_emb, pool_emb, c, nlist, nprobe, seed, use_gpu)
        info = {"index": "ivf", "search": search, "searched": int(len(positions)), **info}
        prio32 = kshot_priority(kshot_emb, pool_emb[torch.from_numpy(positions)], use_gpu)
    top, prio, rescored = exact_top(kshot_emb, pool_emb, positions, prio32, min(c, len(positions)), device)
    return top, prio, {**info, "rescored_float64": rescored}
