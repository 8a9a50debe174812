"""The exact near-duplicate join (C++ CPU, Triton fused kernel, cuBLAS path) against the rule read
literally in float64, on planted duplicates, priority ties and similarities within rounding of τ."""
import pytest
import torch
import torch.nn.functional as F

from rocket import _C
from rocket.augment.deduplicate import dedup
from rocket.augment.exact import error_bound
from rocket.kernels import dedup as K
from rocket.kernels import reference


def brute_force(emb, threshold, prio):
    """The rule of DESIGN §3 read literally, pair by pair, in float64."""
    n = emb.shape[0]
    sim = emb.double() @ emb.double().t()
    keep = []
    for j in range(n):
        beaten = any((prio[k] > prio[j] or (prio[k] == prio[j] and k < j)) and sim[j, k] > threshold
                     for k in range(n) if k != j)
        if not beaten:
            keep.append(j)
    return torch.tensor(keep, dtype=torch.long)


def float64_rule(emb, threshold, prio, block=2048):
    """The same rule vectorised (float64 sims, explicit outranks mask), for GPU-sized checks.
    (kernels.reference.dedup computes its sims in float32, too coarse for near-τ data.)"""
    e, prio = emb.double(), prio.double().to(emb.device)
    n = e.shape[0]
    idx = torch.arange(n, device=emb.device)
    dropped = torch.zeros(n, dtype=torch.bool, device=emb.device)
    for s in range(0, n, block):
        r = slice(s, min(s + block, n))
        outranks = (prio[None, :] > prio[r, None]) | ((prio[None, :] == prio[r, None]) & (idx[None, :] < idx[r, None]))
        dropped[r] = ((e[r] @ e.t() > threshold) & outranks).any(1)
    return torch.nonzero(~dropped, as_tuple=True)[0].cpu()


def brute_codes(ranked, lo, hi):
    """Row codes of rank-sorted rows (0: all earlier sims ≤ lo, 1: some in (lo, hi], 2: some > hi)."""
    sim = (ranked.double() @ ranked.double().t()).tril(-1)
    n = len(ranked)
    earlier = torch.ones(n, n, dtype=torch.bool).tril(-1)
    return torch.where(((sim > hi) & earlier).any(1), 2, torch.where(((sim > lo) & earlier).any(1), 1, 0))


def planted(n, d, gen, frac=0.2, noise=0.05, copies=0.05):
    """Unit vectors with noisy copies of other rows (near-duplicates) and exact copies (sim ties)."""
    emb = torch.randn(n, d, generator=gen)
    src = torch.randint(0, n, (int(n * frac),), generator=gen)
    dst = torch.randint(0, n, (int(n * frac),), generator=gen)
    emb[dst] = emb[src] + noise * torch.randn(len(dst), d, generator=gen)
    src = torch.randint(0, n, (int(n * copies),), generator=gen)
    dst = torch.randint(0, n, (int(n * copies),), generator=gen)
    emb[dst] = emb[src]
    return F.normalize(emb, dim=1)


def near_threshold(n, d, tau, gen, spread=3e-7):
    """Unit vectors whose similarities to row 0's neighbourhood straddle τ by a few float32 ulps:
    row i = cos_i·a + sin_i·b_i with cos_i = τ ± spread, b_i ⟂ a random."""
    a = F.normalize(torch.randn(d, generator=gen, dtype=torch.float64), dim=0)
    b = torch.randn(n, d, generator=gen, dtype=torch.float64)
    b = F.normalize(b - (b @ a)[:, None] * a[None, :], dim=1)
    cos = tau + spread * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)
    rows = cos[:, None] * a[None, :] + (1 - cos ** 2).sqrt()[:, None] * b
    rows[::7] = a  # exact copies of a: the pairs that straddle τ
    return rows.float()


@pytest.mark.parametrize("n, d, block", [(1, 4, 2), (97, 16, 10), (300, 33, 64)])
def test_cpu_matches_brute_force(n, d, block):
    gen = torch.Generator().manual_seed(n)
    emb = planted(n, d, gen)
    prio = torch.randint(0, 5, (n,), generator=gen).float()  # many ties
    want = brute_force(emb, 0.9, prio)
    assert torch.equal(dedup(emb, 0.9, prio, method="exact", block=block), want)
    assert torch.equal(reference.dedup(emb, 0.9, prio, block=block), want)
    assert torch.equal(float64_rule(emb, 0.9, prio, block=block), want)
    assert 0 < len(want) <= n and (n == 1 or len(want) < n)


@pytest.mark.parametrize("n, d", [(5, 8), (300, 40), (700, 64)])
def test_triton_matches_brute_force(n, d):
    """The fused kernel (interpreted on the CPU) through rocket.dedup, default tile config."""
    gen = torch.Generator().manual_seed(n + d)
    emb = planted(n, d, gen)
    prio = torch.randint(0, 5, (n,), generator=gen).float()
    assert torch.equal(dedup(emb, 0.9, prio, method="exact", backend="triton"), brute_force(emb, 0.9, prio))


@pytest.mark.parametrize("BM, BN, GS", [(16, 16, 1), (16, 32, 2), (16, 64, 3)])
def test_kernel_codes_every_tile(BM, BN, GS):
    """Small tiles: many super-rows and groups, a partial last group and a partial last tile."""
    cfg = dict(BM=BM, BN=BN, BK=16, GS=GS, num_warps=4, num_stages=1)
    gen = torch.Generator().manual_seed(BM + BN + GS)
    n, d = 7 * BN + 5, 24
    ranked = planted(n, d, gen, frac=0.3, noise=0.3)
    lo, hi = 0.85, 0.95
    padded = K.pad_for_kernel(ranked, torch.float32, cfg)
    assert padded.shape == (8 * BN, 32)
    codes = K.dedup_codes(padded, n, lo, hi, cfg)
    want = brute_codes(ranked, lo, hi)
    assert torch.equal(codes.long(), want)
    assert set(want.tolist()) == {0, 1, 2}


def test_cpu_codes_and_early_exit():
    gen = torch.Generator().manual_seed(5)
    ranked = planted(500, 16, gen, frac=0.4, noise=0.4)
    for block in (7, 64, 1000):
        codes = _C.dedup_codes_cpu(ranked, 0.8, 0.9, block)
        assert codes.dtype == torch.int8
        assert torch.equal(codes.long(), brute_codes(ranked, 0.8, 0.9))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_margin_near_threshold(backend, dtype):
    """Similarities within a few ulps of τ: only the float64 recheck of banded rows gets these right."""
    gen = torch.Generator().manual_seed(11)
    tau = 0.9
    emb = near_threshold(120, 48, tau, gen).to(dtype)
    prio = torch.rand(120, generator=gen)
    want = brute_force(emb, tau, prio)
    kept, info = dedup(emb, tau, prio, method="exact", backend=backend, return_info=True)
    assert torch.equal(kept, want) and torch.equal(float64_rule(emb, tau, prio), want)
    assert info["uncertain"] > 0 and 0 < len(want) < 120


def test_exact_ties():
    # sims exactly τ (in binary: strictly greater drops) and equal priorities (the lower index wins)
    e = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 0, 0, 0], [0.5, 0.5, 0.5, 0.5], [0, 1.0, 0, 0]])
    for backend in ("cpu", "triton"):
        assert dedup(e, 0.5, backend=backend).tolist() == [0, 1, 3]  # e0·e1 = e0·e3 = 0.5, not > 0.5
        assert dedup(e, 0.4999, backend=backend).tolist() == [0]
        assert dedup(e, 0.5, torch.tensor([0.0, 0.0, 1.0, 0.0]), backend=backend).tolist() == [1, 2, 3]


def test_default_priority_keeps_lowest_index():
    e = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]), dim=1)
    assert dedup(e, 0.9).tolist() == [0, 2]
    assert dedup(e, 0.9, torch.tensor([0.0, 1.0, 0.0])).tolist() == [1, 2]


def test_rule_is_not_greedy():
    # b is dropped by a; c is dropped by b even though b itself is dropped (DESIGN's rule).
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.96, 0.28]), torch.tensor([0.84, 0.54])
    e = F.normalize(torch.stack([a, b, c]), dim=1)
    assert float(e[0] @ e[2]) < 0.9 < float(e[1] @ e[2])
    assert dedup(e, 0.9).tolist() == [0]
    assert dedup(e, 0.9, backend="triton").tolist() == [0]


def test_error_bound():
    # 16-bit inputs multiply exactly: only accumulation counts; float32 → float16 adds input rounding
    acc = 2 * 1024 * 2.0 ** -23
    assert error_bound(1024, 1.0, torch.bfloat16, torch.bfloat16) == pytest.approx(acc)
    assert error_bound(1024, 1.0, torch.float32, torch.float16) > acc + 2 * 2 * 2.0 ** -11
    assert error_bound(1024, 4.0, torch.bfloat16, torch.bfloat16) == pytest.approx(4 * acc)
    assert error_bound(64, 1.0, torch.bfloat16, torch.bfloat16, sim=torch.bfloat16) > 2.0 ** -8


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cublas"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, d", [(1, 8), (1000, 64), (20000, 1024)])
def test_cuda_matches_float64(backend, dtype, n, d):
    assert _C.with_cuda
    gen = torch.Generator().manual_seed(n + d)
    emb = planted(n, d, gen).to(dtype)
    prio = torch.randint(0, 50, (n,), generator=gen).float()
    want = float64_rule(emb.cuda(), 0.9, prio.cuda())
    got = dedup(emb.cuda(), 0.9, prio.cuda(), method="exact", backend=backend)
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_margin_near_threshold(dtype):
    gen = torch.Generator().manual_seed(3)
    emb = near_threshold(3000, 1024, 0.9, gen).to(dtype)
    prio = torch.rand(3000, generator=gen)
    want = float64_rule(emb.cuda(), 0.9, prio.cuda())
    kept, info = dedup(emb.cuda(), 0.9, prio.cuda(), method="exact", return_info=True)
    assert torch.equal(kept, want) and info["uncertain"] > 0
