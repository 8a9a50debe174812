"""Exact near-duplicate removal: rocket.dedup vs blocked torch matmul joins (docs/design.md §4, exact dedup).

GPU rows: n ∈ {1e5, 1e6}, d = 1024, bf16 unit vectors with 10% planted near-duplicates, random
priorities. Peers in the same process: the torch join in bf16 (cuBLAS tiles of the lower triangle,
threshold, any), rocket's own unfused cuBLAS path, and at 1e5 the float32 reference join. Every
result must keep exactly the rows of the float32 reference join (of the bf16 torch join at 1e6).
CPU rows: CI runs 4000 × 384; ROCKET_BENCH_DEDUP_CPU_FULL=1 runs the 1e5 × 384 row (2 cores: minutes).
Approximate rows report time and recall of the dropped set against the exact join: the FAISS kNN
path (CPU faiss: 1e5 × 1024 on the GPU machine), the GPU-native IVF join at 1e6 (two noise levels:
near-duplicates at cos ≈ 0.9998 and ≈ 0.96) and at 1e7 × 1024 (recall against the exact join on
the planted rows, the only rows that can have a neighbour above τ).
"""
import os

import pytest
import torch
import torch.nn.functional as F

from bench.cases import planted_unit_vectors
from bench.harness import median_ms, timed
from bench.peers import dedup_blocked_torch, dedup_blocked_torch_lowp
from rocket.augment.deduplicate import dedup

CPU_FULL = os.environ.get("ROCKET_BENCH_DEDUP_CPU_FULL", "0") == "1"


def checked_median_ms(fn, device, outs, name, peaks):
    """Median ms of fn (do_bench on the GPU); its first result goes to outs[name] (on the CPU), to be
    checked against the reference, and the first call's peak GPU memory in GiB to peaks[name]. CPU
    runs of over a second are timed once, from that first call."""
    first_s, peak, out = timed(fn, device)
    outs[name] = out.cpu()
    if peak is not None:
        peaks[name] = peak
    if torch.device(device).type == "cpu" and first_s > 1:
        return first_s * 1e3
    return median_ms(fn, device, reps=3)


def shapes(on_gpu):
    if on_gpu:
        return {"1e5": (100_000, 1024), "1e6": (1_000_000, 1024)}
    return {"cpu": (100_000, 384) if CPU_FULL else (4000, 384)}


@pytest.mark.parametrize("size", ["1e5", "1e6", "cpu"])
def test_dedup(benchmark, recorder, device, on_gpu, size):
    if size not in shapes(on_gpu):
        pytest.skip("shape of the other device")
    n, d = shapes(on_gpu)[size]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    emb, prio = planted_unit_vectors(n, d, device, dtype)
    kept, info = benchmark.pedantic(dedup, args=(emb, 0.9, prio), kwargs=dict(method="exact", return_info=True),
                                    rounds=1, iterations=1)
    outs, peaks = {"rocket_benchmark_call": kept.cpu()}, {}
    times = {"rocket": checked_median_ms(lambda: dedup(emb, 0.9, prio, method="exact"), device, outs, "rocket", peaks)}
    if on_gpu:
        if n <= 100_000:  # rocket's unfused path (cuBLAS tiles + reduction kernel); 1e6 in dedup_tune.py
            times["rocket_unfused_cublas"] = checked_median_ms(
                lambda: dedup(emb, 0.9, prio, method="exact", backend="cublas"), device, outs, "rocket_unfused_cublas",
                peaks)
        times["blocked_torch_bf16"] = checked_median_ms(lambda: dedup_blocked_torch_lowp(emb, 0.9, prio), device,
                                                        outs, "blocked_torch_bf16", peaks)
        baseline = "blocked_torch_bf16"
    if not on_gpu or n <= 100_000:  # the float32 reference join (full rows): ~40 s at 1e6, so 1e5 only
        times["blocked_torch_fp32"] = checked_median_ms(lambda: dedup_blocked_torch(emb, 0.9, prio, block=2048),
                                                        device, outs, "blocked_torch_fp32", peaks)
        baseline = baseline if on_gpu else "blocked_torch_fp32"
    # the independent reference: the float32 reference join (rocket.kernels.reference.dedup) where it ran, else
    # the torch bf16 join; every other result, rocket's first, keeps exactly its rows
    ref_name = "blocked_torch_fp32" if "blocked_torch_fp32" in outs else "blocked_torch_bf16"
    wrong = [name for name, out in outs.items() if name != ref_name and not torch.equal(out, outs[ref_name])]
    assert not wrong, (wrong, ref_name)
    recorder.record(device, {"n": n, "d": d, "dtype": str(dtype)}, times, baseline=baseline,
                    kept=int(kept.numel()), uncertain_rows=info["uncertain"], band=info["band"],
                    rocket_tflops=n * n * d / times["rocket"] / 1e9, peak_memory_gib=peaks or None,
                    resident_memory_gib=torch.cuda.memory_allocated() / 2 ** 30 if on_gpu else None)
    assert 0.85 * n < kept.numel() < 0.95 * n  # ~10% planted duplicates are gone


def approx_shapes(method, on_gpu):
    if not on_gpu:
        return [(4000, 64)]
    return [(100_000, 1024)] if method == "knn" else [(1_000_000, 1024)]


@pytest.mark.parametrize("method", ["knn", "ivf"])
@pytest.mark.parametrize("noise", [0.02, 0.3])
def test_dedup_approx(recorder, device, on_gpu, method, noise):
    """The approximate paths: FAISS kNN (CPU faiss unless a GPU build is installed; IVF index) and
    the GPU-native IVF join; time and recall of the dropped set against the exact join. Each call is
    timed once (harness.timed): FAISS runs on the CPU."""
    if method == "knn":
        pytest.importorskip("faiss")
    opts = dict(k=16, index="ivf", nprobe=16) if method == "knn" else {}
    for n, d in approx_shapes(method, on_gpu):
        emb, prio = planted_unit_vectors(n, d, device, torch.bfloat16 if on_gpu else torch.float32, noise=noise, seed=3)
        s_exact, peak_exact, exact = timed(lambda: dedup(emb, 0.9, prio, method="exact"), device)
        run = lambda: dedup(emb, 0.9, prio, method=method, return_info=True, **opts)  # noqa: E731
        # The IVF join's first call compiles its Triton kernels (one per list-size class): cold and warm.
        cold = {"ivf_cold": 1e3 * timed(run, device)[0]} if method == "ivf" else {}
        s_approx, peak_approx, (approx, info) = timed(run, device)
        exact_set, approx_set = set(exact.tolist()), set(approx.tolist())
        assert exact_set <= approx_set  # the approximate paths never drop what exact keeps
        dropped = n - len(exact_set)
        recall = 1 - len(approx_set - exact_set) / max(dropped, 1)
        recorder.record(device, {"n": n, "d": d, "noise": noise, "method": method,
                                 **{k: v for k, v in info.items() if k in ("index", "k", "nprobe", "nlist")}},
                        {method: 1e3 * s_approx, **cold, "exact": 1e3 * s_exact}, baseline="exact", recall=recall,
                        exact_dropped=dropped, peak_memory_gib={method: peak_approx, "exact": peak_exact} if on_gpu
                        else None)
        assert recall >= 0.9


def planted_big(n, d, device, dup_frac=0.1, noise=0.02, seed=5, chunk=1_000_000):
    """Like planted_unit_vectors, built in chunks straight into bf16 (1e7 × 1024 is 20 GB), and also
    returning the planted rows: only they can have a neighbour above τ (random unit vectors in
    d = 1024 sit at |cos| < 0.3), so the exact rule on them alone is the exact rule on all."""
    gen = torch.Generator(device=device).manual_seed(seed)
    emb = torch.empty(n, d, dtype=torch.bfloat16, device=device)
    for s in range(0, n, chunk):
        emb[s:s + chunk] = F.normalize(torch.randn(min(chunk, n - s), d, generator=gen, device=device), dim=1)
    k = int(n * dup_frac)
    src = torch.randint(0, n, (k,), generator=gen, device=device)
    dst = torch.randint(0, n, (k,), generator=gen, device=device)
    for s in range(0, k, chunk):
        a, b = src[s:s + chunk], dst[s:s + chunk]
        emb[b] = F.normalize(emb[a].float() + noise / d ** 0.5 * torch.randn(len(a), d, generator=gen, device=device),
                             dim=1).to(torch.bfloat16)
    return emb, torch.rand(n, generator=gen, device=device), torch.unique(torch.cat([src, dst]))


def test_dedup_ivf_1e7(recorder, device, on_gpu):
    """1e7 × 1024 with the GPU-native IVF join; recall against the exact join on the planted rows."""
    if not on_gpu:
        pytest.skip("GPU-only shape")
    n, d = 10_000_000, 1024
    emb, prio, involved = planted_big(n, d, device)
    s_approx, peak_approx, (approx, info) = timed(lambda: dedup(emb, 0.9, prio, method="ivf", return_info=True),
                                                  device)
    s_sub, peak_sub, sub_kept = timed(lambda: dedup(emb[involved], 0.9, prio[involved], method="exact"), device)
    involved = involved.cpu()
    exact_dropped = torch.zeros(n, dtype=torch.bool)
    exact_dropped[involved] = True
    exact_dropped[involved[sub_kept]] = False
    approx_dropped = torch.ones(n, dtype=torch.bool)
    approx_dropped[approx] = False
    assert not (approx_dropped & ~exact_dropped).any()
    recall = int(approx_dropped.sum()) / max(int(exact_dropped.sum()), 1)
    recorder.record(device, {"n": n, "d": d, "noise": 0.02, "method": "ivf", "nlist": info["nlist"],
                             "nprobe": info["nprobe"]}, {"ivf": 1e3 * s_approx, "exact_on_planted_rows": 1e3 * s_sub},
                    recall=recall, exact_dropped=int(exact_dropped.sum()), planted_rows=int(involved.numel()),
                    peak_memory_gib={"ivf": peak_approx, "exact_on_planted_rows": peak_sub},
                    resident_memory_gib=emb.numel() * emb.element_size() / 2 ** 30)
    assert recall >= 0.99
