"""Stage 3: select open data similar to the K-shot set, then remove near-duplicates (docs/design.md,
'Data selection').

prio[j] = max_i cos(kshot_i, open_j) over L2-normalised embeddings of instruction + input + output;
the top C = target − K open items by prio (ties by index) are the candidates; a candidate is
dropped iff a higher-priority candidate has cos > threshold with it (rocket.dedup); the output is
the K-shot items followed by the kept items, highest priority first.

Retrieval uses FAISS: exact inner-product search by default (an IndexFlatIP over the K-shot
embeddings, queried by every pool item), or an IVF index over the pool (each K-shot item fetches
its C nearest pool items; the union is then scored exactly). For one selection the flat search is
both exact and faster: building the IVF index costs N·nlist·d against the flat search's N·K·d
(1e6 × 384, C = 1e4, 2 CPU cores: flat 1.8 s; IVF 25 s at recall 0.49 on random unit vectors).
A FAISS build with GPU support runs the search on the GPU; with faiss-cpu and a CUDA device the
exact search is a float64 matmul on the GPU instead. Whichever ran, the top C and their
priorities are those of the rule evaluated in float64.
"""
from __future__ import annotations

import time
from pathlib import Path
import numpy as np
import torch
from rocket.data.examples import example_text
from rocket.augment.deduplicate import dedup
from rocket.augment.embed import Embedder, load_embedder
from rocket.augment.retrieval import rank_by_priority, retrieve
from rocket.errors import AugmentError



# --------------------------------------------------------------------------- selection
def _check_embeddings(name: str, emb, n: int, d: int | None = None) -> torch.Tensor:
    emb = torch.as_tensor(emb).detach().to("cpu", torch.float32)
    if emb.dim() != 2 or emb.shape[0] != n or (d is not None and emb.shape[1] != d):
        want = f"[{n}, {d if d is not None else 'dim'}]"
        raise AugmentError(f"{name} has shape {tuple(emb.shape)}, expected {want}")
    norms = emb.norm(dim=1)
    if not torch.isfinite(norms).all() or (norms == 0).any():
        bad = int((~torch.isfinite(norms) | (norms == 0)).nonzero()[0])
        raise AugmentError(f"{name}: row {bad} is zero or not finite")
    if (norms - 1).abs().max() > 1e-5:  # rows from an Embedder are unit already: no copy of a large pool
        emb = emb / norms[:, None]
    return emb


def select_data(kshot: list[dict], pool: list[dict], target: int = 1000, threshold: float = 0.9, *,
                embedder: "Embedder | str | Path | None" = None, kshot_embeddings=None, pool_embeddings=None,
                prefix: str | None = None, batch_size: int | None = None, device: str | torch.device | None = None,
                index: str = "flat", nlist: int | None = None, nprobe: int | None = None,
                dedup_method: str = "auto", seed: int = 0, progress: bool = True) -> tuple[list[dict], dict]:
    """K-shot items + the open items chosen for them, and a report (counts, thresholds, timings).

    target: output size before dedup (the reference implementation's target_num): C = target − K candidates.
    threshold: cosine above which the lower-priority item of a pair is a near-duplicate.
    embedder: an Embedder, a local model directory, or None for the bundled all-MiniLM-L6-v2;
    kshot_embeddings / pool_embeddings: precomputed rows [K, d] / [N, d] used instead (normalised here).
    prefix: prepended to every text before embedding (rocket.embed.REFERENCE_PREFIX is the reference implementation's).
    index: 'flat' (exact) or 'ivf' (approximate, for very large pools; nlist/nprobe tune it).
    dedup_method: rocket.dedup's method: auto (exact unless the candidates are very many), exact,
    knn or ivf.
    """
    start = time.perf_counter()
    kshot, pool = list(kshot), list(pool)
    n_k, n_pool = len(kshot), len(pool)
    if n_k == 0 or n_pool == 0:
        raise AugmentError(f"select_data needs K-shot and pool examples, got {n_k} and {n_pool}")
    if not isinstance(target, (int, np.integer)) or target < n_k:
        raise AugmentError(f"target {target} is smaller than the {n_k} K-shot items it includes")
    if not (isinstance(threshold, (int, float)) and -1.0 <= threshold <= 1.0):
        raise AugmentError(f"threshold must be a cosine in [-1, 1], got {threshold!r}")
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    timings = {}

    name = "precomputed"
    if kshot_embeddings is None or pool_embeddings is None:
        t = time.perf_counter()
        if not isinstance(embedder, Embedder):
            embedder = load_embedder(None if embedder is None else str(embedder), str(device))
        timings["load_embedder"] = time.perf_counter() - t
        name = embedder.name

    def embed(examples, given, label):
        t = time.perf_counter()
        if given is None:
            given = embedder.encode([example_text(e) for e in examples], batch_size, prefix, progress)
        timings[f"embed_{label}"] = time.perf_counter() - t
        return given

    kshot_emb = _check_embeddings("kshot_embeddings", embed(kshot, kshot_embeddings, "kshot"), n_k)
    pool_emb = _check_embeddings("pool_embeddings", embed(pool, pool_embeddings, "pool"), n_pool,
                                 kshot_emb.shape[1])

    t = time.perf_counter()
    c = min(target - n_k, n_pool)
    cand, cand_prio, index_info = retrieve(kshot_emb, pool_emb, c, index, nlist, nprobe, seed, device)
    timings["retrieve"] = time.perf_counter() - t

    t = time.perf_counter()
    cand_emb = pool_emb[torch.from_numpy(cand)]
    kept, dedup_info = dedup(cand_emb.to(device) if device.type == "cuda" else cand_emb, float(threshold),
                             torch.from_numpy(cand_prio), method=dedup_method, return_info=True)
    kept = kept.numpy()
    # The K-shot items are the highest-priority members of the set: a candidate within τ of one
    # (its priority, the max cosine to the K-shot items, above τ) is a copy of it and is dropped.
    # They only add droppers, so the rule among the candidates themselves is unchanged.
    near_kshot = cand_prio > threshold
    n_pool_duplicates = int(len(cand) - len(kept) - near_kshot[np.setdiff1d(np.arange(len(cand)), kept)].sum())
    kept = kept[~near_kshot[kept]]
    kept = kept[rank_by_priority(cand_prio[kept])]  # highest priority first
    timings["dedup"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start

    selected = cand[kept]
    out = [dict(e) for e in kshot] + [dict(pool[j]) for j in selected]
    report = {
        "counts": {"kshot": n_k, "pool": n_pool, "candidates": int(len(cand)),
                   "kshot_copies_removed": int(near_kshot.sum()),
                   "duplicates_removed": n_pool_duplicates, "kept": int(len(kept)),
                   "kshot_included": n_k, "output": len(out)},
        "target": int(target), "threshold": float(threshold),
        "priority": ({"max": float(cand_prio.max()), "min": float(cand_prio.min()),
                      "mean": float(cand_prio.mean())} if len(cand) else None),
        "retrieval": index_info,
        "dedup": {k: v for k, v in dedup_info.items() if isinstance(v, (str, int, float, bool)) and k != "seconds"},
        "embedder": name, "dim": int(kshot_emb.shape[1]), "prefix": prefix,
        "device": str(device), "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "selected": selected.tolist(),
    }
    return out, report
