"""Stage 3: select open data similar to the K-shot set, then remove near-duplicates (DESIGN.md §3).

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

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rocket.data import example_text, load_examples, write_jsonl
from rocket.dedup import dedup
from rocket.embed import SEED_PREFIX, Embedder, load_embedder
from rocket.errors import RocketError

INDEXES = ("flat", "ivf")
FAISS_GPU_MAX_K = 2048  # faiss-gpu's largest k for a search


class SelectionError(RocketError):
    """Unusable selection inputs: sizes, embeddings or options; the message names the culprit."""


# --------------------------------------------------------------------------- retrieval
def _faiss():
    try:
        import faiss
    except ImportError:
        raise SelectionError("data selection needs the package faiss-cpu (pip install 'rocket[augment]')") from None
    return faiss


def faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _numpy(emb: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(emb.detach().to(torch.float32).cpu().numpy())


def _on_gpu(index, use_gpu: bool):
    """The index moved to GPU 0 when asked and faiss has GPU support, else the index itself."""
    if not (use_gpu and faiss_has_gpu()):
        return index
    faiss = _faiss()
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)  # keeps its resources alive


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
        raise SelectionError(f"unknown index {index!r}: use one of {', '.join(INDEXES)}")
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


# --------------------------------------------------------------------------- selection
def _check_embeddings(name: str, emb, n: int, d: int | None = None) -> torch.Tensor:
    emb = torch.as_tensor(emb).detach().to("cpu", torch.float32)
    if emb.dim() != 2 or emb.shape[0] != n or (d is not None and emb.shape[1] != d):
        want = f"[{n}, {d if d is not None else 'dim'}]"
        raise SelectionError(f"{name} has shape {tuple(emb.shape)}, expected {want}")
    norms = emb.norm(dim=1)
    if not torch.isfinite(norms).all() or (norms == 0).any():
        bad = int((~torch.isfinite(norms) | (norms == 0)).nonzero()[0])
        raise SelectionError(f"{name}: row {bad} is zero or not finite")
    if (norms - 1).abs().max() > 1e-5:  # rows from an Embedder are unit already: no copy of a large pool
        emb = emb / norms[:, None]
    return emb


def select_data(kshot: list[dict], pool: list[dict], target: int = 1000, threshold: float = 0.9, *,
                embedder: "Embedder | str | Path | None" = None, kshot_embeddings=None, pool_embeddings=None,
                prefix: str | None = None, batch_size: int | None = None, device: str | torch.device | None = None,
                index: str = "flat", nlist: int | None = None, nprobe: int | None = None,
                dedup_method: str = "auto", seed: int = 0, progress: bool = True) -> tuple[list[dict], dict]:
    """K-shot items + the open items chosen for them, and a report (counts, thresholds, timings).

    target: output size before dedup (the seed's target_num): C = target − K candidates.
    threshold: cosine above which the lower-priority item of a pair is a near-duplicate.
    embedder: an Embedder, a local model directory, or None for the bundled all-MiniLM-L6-v2;
    kshot_embeddings / pool_embeddings: precomputed rows [K, d] / [N, d] used instead (normalised here).
    prefix: prepended to every text before embedding (rocket.embed.SEED_PREFIX is the seed's).
    index: 'flat' (exact) or 'ivf' (approximate, for very large pools; nlist/nprobe tune it).
    dedup_method: rocket.dedup's method: auto (exact unless the candidates are very many), exact,
    knn or ivf.
    """
    start = time.perf_counter()
    kshot, pool = list(kshot), list(pool)
    n_k, n_pool = len(kshot), len(pool)
    if n_k == 0 or n_pool == 0:
        raise SelectionError(f"select_data needs K-shot and pool examples, got {n_k} and {n_pool}")
    if not isinstance(target, (int, np.integer)) or target < n_k:
        raise SelectionError(f"target {target} is smaller than the {n_k} K-shot items it includes")
    if not (isinstance(threshold, (int, float)) and -1.0 <= threshold <= 1.0):
        raise SelectionError(f"threshold must be a cosine in [-1, 1], got {threshold!r}")
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
    kept = kept[rank_by_priority(cand_prio[kept])]  # highest priority first
    timings["dedup"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start

    selected = cand[kept]
    out = [dict(e) for e in kshot] + [dict(pool[j]) for j in selected]
    report = {
        "counts": {"kshot": n_k, "pool": n_pool, "candidates": int(len(cand)),
                   "candidates_near_kshot": int((cand_prio > threshold).sum()),
                   "duplicates_removed": int(len(cand) - len(kept)), "kept": int(len(kept)),
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


# --------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("--opensource", "--opensource_path", dest="opensource", required=True,
                        help="open instruction data to select from (JSONL or JSON array)")
    parser.add_argument("--kshot", "--kshot_data_path", dest="kshot", required=True,
                        help="K-shot examples of the task (JSONL or JSON array)")
    parser.add_argument("--target", "--target_num", dest="target", type=int, default=1000,
                        help="output size before dedup, K-shot items included (default: 1000)")
    parser.add_argument("--threshold", type=float, default=0.9,
                        help="cosine above which a lower-priority item is a near-duplicate (default: 0.9)")
    parser.add_argument("--out", required=True, help="augmented data to write (JSONL)")
    parser.add_argument("--report", help="also write the selection report here (JSON)")
    parser.add_argument("--embed-model", help="local HF encoder or sentence-transformers directory "
                        "(default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--pooling", choices=["mean", "cls", "lasttoken"],
                        help="pooling of a plain HF encoder (default: mean, or the sentence-transformers config)")
    parser.add_argument("--max-length", "--cutoff_len", dest="max_length", type=int,
                        help="tokens per text, longer texts are truncated (default: the model's limit)")
    parser.add_argument("--batch-size", type=int, help="texts per embedding batch (default: 256 on CUDA, 32 on CPU)")
    prefix = parser.add_mutually_exclusive_group()
    prefix.add_argument("--prefix", help="text prepended to every item before embedding")
    prefix.add_argument("--retrieval-prefix", action="store_true",
                        help=f"prepend the seed's retrieval instruction {SEED_PREFIX!r}")
    parser.add_argument("--index", choices=INDEXES, default="flat",
                        help="FAISS search: flat (exact, default, fastest for one selection) or ivf "
                             "(approximate IVF index over the pool)")
    parser.add_argument("--nlist", type=int, help="IVF lists (default: sqrt(pool size))")
    parser.add_argument("--nprobe", type=int, help="IVF lists searched per query (default: min(64, nlist/4))")
    parser.add_argument("--dedup-method", choices=["auto", "exact", "knn", "ivf"], default="auto",
                        help="near-duplicate search (rocket.dedup): auto (exact unless the candidates are very "
                             "many), exact, knn or ivf (approximate)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _write_json(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(args) -> int:
    start = time.perf_counter()
    kshot = load_examples(args.kshot)
    pool = load_examples(args.opensource)
    read_s = time.perf_counter() - start
    t = time.perf_counter()
    embedder = load_embedder(args.embed_model, str(args.device), args.pooling, args.max_length)
    load_s = time.perf_counter() - t
    examples, report = select_data(
        kshot, pool, args.target, args.threshold, embedder=embedder,
        prefix=SEED_PREFIX if args.retrieval_prefix else args.prefix, batch_size=args.batch_size,
        device=args.device, index=args.index, nlist=args.nlist, nprobe=args.nprobe,
        dedup_method=args.dedup_method, seed=args.seed,
        progress=not args.no_progress)
    t = time.perf_counter()
    write_jsonl(args.out, examples)
    report["timings_s"].update(read=round(read_s, 4), load_embedder=round(load_s, 4),
                               write=round(time.perf_counter() - t, 4),
                               total=round(time.perf_counter() - start, 4))
    report.update(opensource=str(args.opensource), kshot_path=str(args.kshot), out=str(args.out))
    if args.report:
        _write_json(args.report, report)
    c = report["counts"]
    print(f"rocket augment: {c['pool']} open items → {c['candidates']} candidates → {c['kept']} kept "
          f"({c['duplicates_removed']} near-duplicates above {args.threshold}) + {c['kshot']} K-shot = "
          f"{c['output']} items in {report['timings_s']['total']:.1f}s; wrote {args.out}", file=sys.stdout)
    return 0
