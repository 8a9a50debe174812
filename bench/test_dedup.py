"""Exact near-duplicate removal: rocket.dedup vs a blocked torch matmul join (DESIGN §5 'Dedup')."""
import pytest
import torch
import torch.nn.functional as F

from bench.harness import median_ms
from bench.peers import dedup_blocked_torch
from rocket.dedup import dedup


def planted_unit_vectors(n, d, device, dup_frac=0.1, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    emb = torch.randn(n, d, generator=gen)
    k = int(n * dup_frac)
    src, dst = torch.randint(0, n, (k,), generator=gen), torch.randint(0, n, (k,), generator=gen)
    emb[dst] = emb[src] + 0.02 * torch.randn(k, d, generator=gen)
    return F.normalize(emb, dim=1).to(device), torch.rand(n, generator=gen).to(device)


def shapes(on_gpu):
    return [(100_000, 1024), (1_000_000, 1024)] if on_gpu else [(4000, 384)]


@pytest.mark.parametrize("size", [0, 1])
def test_dedup(benchmark, recorder, device, on_gpu, size):
    if size >= len(shapes(on_gpu)):
        pytest.skip("GPU-only shape")
    n, d = shapes(on_gpu)[size]
    dtype = torch.bfloat16 if on_gpu else torch.float32
    emb, prio = planted_unit_vectors(n, d, device)
    emb = emb.to(dtype)
    kept = benchmark.pedantic(dedup, args=(emb, 0.9, prio), rounds=1, iterations=1)
    peer_block = 16384 if on_gpu else 1024
    want = dedup_blocked_torch(emb, 0.9, prio, block=peer_block)
    assert torch.equal(kept, want.cpu())
    times = {"rocket": median_ms(lambda: dedup(emb, 0.9, prio), device, reps=3),
             "blocked_torch": median_ms(lambda: dedup_blocked_torch(emb, 0.9, prio, block=peer_block), device, reps=3)}
    recorder.record(device, {"n": n, "d": d, "dtype": str(dtype)}, times, baseline="blocked_torch",
                    kept=int(kept.numel()))
