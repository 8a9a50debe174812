"""rocket._C near-duplicate filter (CPU always, CUDA on the device) against the brute-force rule."""
import pytest
import torch
import torch.nn.functional as F

from rocket import _C
from rocket.dedup import dedup
from rocket.kernels import reference as R


def brute_force(emb, threshold, prio):
    """The rule of DESIGN §3 read literally, pair by pair."""
    n = emb.shape[0]
    sim = emb.double() @ emb.double().t()
    keep = []
    for j in range(n):
        beaten = any((prio[k] > prio[j] or (prio[k] == prio[j] and k < j)) and sim[j, k] > threshold
                     for k in range(n) if k != j)
        if not beaten:
            keep.append(j)
    return torch.tensor(keep, dtype=torch.long)


def planted(n, d, gen, frac=0.2, noise=0.05):
    """Unit vectors with a fraction of noisy copies of earlier rows (near-duplicates)."""
    emb = torch.randn(n, d, generator=gen)
    src = torch.randint(0, n, (int(n * frac),), generator=gen)
    dst = torch.randint(0, n, (int(n * frac),), generator=gen)
    emb[dst] = emb[src] + noise * torch.randn(len(dst), d, generator=gen)
    return F.normalize(emb, dim=1)


@pytest.mark.parametrize("n, d, block", [(1, 4, 2), (97, 16, 10), (300, 33, 64)])
def test_cpu_matches_brute_force(n, d, block):
    gen = torch.Generator().manual_seed(n)
    emb = planted(n, d, gen)
    prio = torch.randint(0, 5, (n,), generator=gen).float()  # many ties
    want = brute_force(emb, 0.9, prio)
    assert torch.equal(dedup(emb, 0.9, prio, block=block), want)
    assert torch.equal(R.dedup(emb, 0.9, prio, block=block), want)
    assert 0 < len(want) <= n


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


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"embeddings must be \[n, d\]"):
        dedup(torch.randn(3))
    with pytest.raises(ValueError, match=r"priority has shape \(2,\), expected \(3,\)"):
        dedup(torch.randn(3, 2), priority=torch.zeros(2))
    assert dedup(torch.randn(0, 4)).numel() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("n, d", [(1, 8), (1000, 64), (20000, 1024)])
def test_cuda_matches_cpu(n, d):
    assert _C.with_cuda
    gen = torch.Generator().manual_seed(n + d)
    emb = planted(n, d, gen)
    prio = torch.randint(0, 50, (n,), generator=gen).float()
    want = R.dedup(emb.double(), 0.9, prio)
    got = dedup(emb.cuda(), 0.9, prio.cuda())
    assert torch.equal(got, want)
