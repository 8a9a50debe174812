"""ΔW group similarity (docs/design.md §4, group diversity): rocket.group_similarity vs per-pair r×r
traces and explicit ΔW.

The GPU shape (bench/README.md): 500 adapters, r=16, on 7 modules × 32 layers of 4096×4096 linears,
generated on the GPU as tensors (no files). Peers run on the same adapters at the shapes they can
finish: per-pair traces on one layer (7 modules), explicit ΔW on 64 adapters of one layer.
"""
import statistics
import time

import pytest
import torch

from bench.harness import median_ms, peak_memory
from bench.peers import delta_cos_explicit, delta_cos_pairwise_traces
from rocket.adapters.bank import LoraAdapter, LoraBank
from rocket.adapters.similarity import group_similarity

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def synthetic_bank(n, r, layers, width, dtype, device, seed=0):
    """n adapters on TARGETS × layers, all width×width, sharing a common component (so cosines
    are not all ≈ 0). Adapter weights are views into per-module stacks, which are returned too."""
    gen = torch.Generator(device=device).manual_seed(seed)
    modules, stacks = [], []
    for layer in range(layers):
        for t in TARGETS:
            A = torch.randn(n, r, width, generator=gen, device=device, dtype=dtype)
            A += torch.randn(1, r, width, generator=gen, device=device, dtype=dtype)
            B = torch.randn(n, width, r, generator=gen, device=device, dtype=dtype)
            B += torch.randn(1, width, r, generator=gen, device=device, dtype=dtype)
            modules.append(f"model.layers.{layer}.{t}")
            stacks.append((A, B))
    adapters = [LoraAdapter(f"synthetic{i:03d}", None, r, 2.0 * r, False,
                            {m: (A[i], B[i]) for m, (A, B) in zip(modules, stacks)},
                            {m: 2.0 for m in modules}) for i in range(n)]
    return LoraBank(adapters), stacks


def gram_flops(n, r, width, n_modules, block_rows=4096):
    """FLOPs of the two Gram GEMMs per module on the upper-triangular tiles group_similarity computes."""
    step = max(1, block_rows // r)
    sizes = [min(step, n - s) * r for s in range(0, n, step)]
    pairs = sum(sizes[a] * sizes[b] for a in range(len(sizes)) for b in range(a, len(sizes)))
    return 2 * 2 * pairs * width * n_modules


def wall_ms(fn, device, reps=3):
    """Median wall-clock of multi-second calls (do_bench would repeat them ~8 times)."""
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


SHAPES = {  # name: (n, r, layers, width, dtype, peers)
    "gpu": [("full", 500, 16, 32, 4096, torch.bfloat16, ()),
            ("full", 500, 16, 32, 4096, torch.float32, ()),
            ("one_layer", 500, 16, 1, 4096, torch.bfloat16, ("pairwise_traces",)),
            ("small", 64, 16, 1, 4096, torch.bfloat16, ("pairwise_traces", "explicit_delta"))],
    "cpu": [("small", 24, 4, 2, 64, torch.float32, ("pairwise_traces", "explicit_delta"))],
}
PEERS = {"pairwise_traces": delta_cos_pairwise_traces, "explicit_delta": delta_cos_explicit}


@pytest.mark.parametrize("case", range(4))
def test_group_similarity(benchmark, recorder, device, on_gpu, case):
    shapes = SHAPES["gpu" if on_gpu else "cpu"]
    if case >= len(shapes):
        pytest.skip("GPU-only shape")
    name, n, r, layers, width, dtype, peers = shapes[case]
    bank, stacks = synthetic_bank(n, r, layers, width, dtype, device)
    run = lambda: group_similarity(bank, device=device)  # noqa: E731
    cos = benchmark.pedantic(run, rounds=1, iterations=1)
    assert torch.isfinite(cos).all() and torch.equal(cos, cos.T)
    assert torch.allclose(cos.diagonal(), torch.ones(n, dtype=torch.float64), atol=1e-6)
    # Peers accumulate in float32 too (bf16 products are exact in both): differences are float32 sums.
    errors = {f"max_abs_diff_vs_{p}": float((PEERS[p](stacks).cpu() - cos).abs().max()) for p in peers}
    assert all(e < 2e-3 for e in errors.values()), errors
    if name == "full" and on_gpu:
        times = {"rocket": wall_ms(run, device)}
        timer = "wall-clock median of 3 after 1 warm-up"
    else:
        times = {"rocket": median_ms(run, device, reps=3)}
        times.update({p: median_ms(lambda p=p: PEERS[p](stacks), device, reps=3) for p in peers})
        timer = "do_bench median" if on_gpu else "wall-clock median of 3"
    flops = gram_flops(n, r, width, len(stacks))
    peaks = peak_memory({"rocket": run} | {p: lambda p=p: PEERS[p](stacks) for p in times if p != "rocket"}, device)
    recorder.record(device, {"adapters": n, "r": r, "modules": len(stacks), "width": width, "dtype": str(dtype)},
                    times, baseline="rocket", timer=timer, gram_tflops_per_s=flops / times["rocket"] / 1e9,
                    peak_memory_gib=peaks,
                    bank_gib=sum(A.numel() + B.numel() for A, B in stacks) * stacks[0][0].element_size() / 2**30,
                    mean_offdiag_cos=float((cos.sum() - n) / (n * n - n)), **errors)
    del bank, stacks
    if on_gpu:
        torch.cuda.empty_cache()
