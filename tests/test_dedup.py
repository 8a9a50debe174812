"""The dedup API (rocket.augment.deduplicate): methods (exact / knn / auto), the FAISS kNN path against exact, errors."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import rocket
from rocket.errors import RocketError
from tests.test_dedup_op import brute_force, planted

D = importlib.import_module("rocket.augment.deduplicate")

faiss = pytest.importorskip("faiss")


def test_public_name():
    # the public name is the function itself, never a module
    e = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]]), dim=1)
    assert rocket.dedup is D.dedup
    assert rocket.dedup(e, 0.9).tolist() == [0, 2]


@pytest.mark.parametrize("index", ["flat", "ivf"])
def test_knn_equals_exact_when_k_covers_every_neighbourhood(index):
    gen = torch.Generator().manual_seed(7)
    emb = planted(1500, 32, gen, frac=0.2, noise=0.05)
    prio = torch.randint(0, 10, (1500,), generator=gen).float()
    exact = D.dedup(emb, 0.9, prio, method="exact")
    # nprobe = nlist makes IVF exhaustive: it must then agree exactly too
    opts = dict(index=index, nlist=16, nprobe=16) if index == "ivf" else dict(index=index)
    kept, info = D.dedup(emb, 0.9, prio, method="knn", k=16, return_info=True, **opts)
    assert torch.equal(kept, exact)
    assert info["method"] == "knn" and info["index"] == index and len(exact) < 1500


def test_knn_misses_only_pairs_beyond_k():
    """Clusters of 6 near-identical items but k = 3: kNN drops a subset of what exact drops, and
    never an item the exact rule keeps."""
    gen = torch.Generator().manual_seed(8)
    centers = torch.randn(40, 16, generator=gen)
    emb = F.normalize(centers.repeat_interleave(6, 0) + 0.01 * torch.randn(240, 16, generator=gen), dim=1)
    prio = torch.rand(240, generator=gen)
    exact = set(D.dedup(emb, 0.9, prio, method="exact").tolist())
    approx = set(D.dedup(emb, 0.9, prio, method="knn", k=3).tolist())
    assert exact < approx  # strictly: some pairs were beyond the 3 nearest
    assert set(D.dedup(emb, 0.9, prio, method="knn", k=6).tolist()) == exact


def test_knn_band_recheck_near_threshold():
    from tests.test_dedup_op import near_threshold
    gen = torch.Generator().manual_seed(9)
    emb = near_threshold(200, 32, 0.9, gen)
    prio = torch.rand(200, generator=gen)
    kept, info = D.dedup(emb, 0.9, prio, method="knn", k=200, return_info=True)
    assert torch.equal(kept, brute_force(emb, 0.9, prio)) and info["uncertain"] > 0


def test_auto_switches_to_knn(monkeypatch):
    gen = torch.Generator().manual_seed(10)
    emb = planted(300, 16, gen)
    _, info = D.dedup(emb, 0.9, method="auto", return_info=True)
    assert info["method"] == "exact"
    monkeypatch.setitem(D.AUTO_EXACT_MAX, "cpu", 100)
    kept, info = D.dedup(emb, 0.9, method="auto", return_info=True)
    assert info["method"] == "knn" and torch.equal(kept, brute_force(emb, 0.9, torch.zeros(300)))


def test_bad_inputs():
    with pytest.raises(RocketError, match=r"embeddings must be \[n, d\]"):
        D.dedup(torch.randn(3))
    with pytest.raises(RocketError, match=r"priority has shape \(2,\), expected \(3,\)"):
        D.dedup(torch.randn(3, 2), priority=torch.zeros(2))
    with pytest.raises(RocketError, match="priority contains NaN"):
        D.dedup(torch.randn(3, 2), priority=torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(RocketError, match="must be floating point"):
        D.dedup(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(RocketError, match="method must be"):
        D.dedup(torch.randn(3, 2), method="lsh")
    with pytest.raises(RocketError, match="backend must be"):
        D.dedup(torch.randn(3, 2), backend="gpu")
    with pytest.raises(RocketError, match="backend 'cublas' needs CUDA"):
        D.dedup(torch.randn(3, 2), backend="cublas")
    with pytest.raises(RocketError, match="knn needs k >= 2"):
        D.dedup(torch.randn(3, 2), method="knn", k=1)
    assert D.dedup(torch.randn(0, 4)).numel() == 0
    assert D.dedup(torch.randn(0, 4), method="knn").numel() == 0


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_ivf_join(backend):
    gen = torch.Generator().manual_seed(12)
    emb = planted(900, 24, gen, frac=0.3, noise=0.05)
    prio = torch.randint(0, 10, (900,), generator=gen).float()
    exact = D.dedup(emb, 0.9, prio, method="exact")
    for nlist, nprobe in [(1, 1), (6, 6)]:  # one list, or every list: exhaustive, so exact
        kept, info = D.dedup(emb, 0.9, prio, method="ivf", nlist=nlist, nprobe=nprobe, backend=backend,
                             return_info=True)
        assert torch.equal(kept, exact) and info["nlist"] == nlist
    approx = set(D.dedup(emb, 0.9, prio, method="ivf", nlist=12, nprobe=1, backend=backend).tolist())
    assert set(exact.tolist()) <= approx  # misses pairs only, and few of these tight ones
    assert len(approx - set(exact.tolist())) <= 0.1 * (900 - len(exact))


def test_ivf_near_threshold_recheck():
    from tests.test_dedup_op import near_threshold
    gen = torch.Generator().manual_seed(13)
    emb = near_threshold(150, 32, 0.9, gen)
    prio = torch.rand(150, generator=gen)
    kept, info = D.dedup(emb, 0.9, prio, method="ivf", nlist=1, return_info=True)
    assert torch.equal(kept, brute_force(emb, 0.9, prio)) and info["uncertain"] > 0


@pytest.mark.gpu
def test_ivf_join_cuda():
    gen = torch.Generator().manual_seed(14)
    emb = planted(30000, 256, gen, frac=0.2, noise=0.1).cuda().to(torch.bfloat16)
    prio = torch.rand(30000, generator=gen).cuda()
    exact = D.dedup(emb, 0.9, prio, method="exact")
    kept, info = D.dedup(emb, 0.9, prio, method="ivf", nlist=64, nprobe=2, return_info=True)
    missed = len(set(kept.tolist()) - set(exact.tolist()))
    assert set(exact.tolist()) <= set(kept.tolist()) and missed <= 0.01 * (30000 - len(exact))
    _, info = D.dedup(emb, 0.9, prio, method="auto", return_info=True)
    assert info["method"] == "exact"


@pytest.mark.parametrize("method", ["exact", "knn", "ivf", "auto"])
@pytest.mark.parametrize("bad, message", [(float("nan"), "row 5 has non-finite values"),
                                          (float("inf"), "row 5 has non-finite values"),
                                          (0.0, "row 5 is all zeros")])
def test_non_finite_or_zero_rows_are_refused_on_every_method(method, bad, message):
    emb = F.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(4)), dim=1)
    emb[6] = emb[5]                              # an exact duplicate pair that must never be kept silently
    emb[5] = bad if bad == 0.0 else emb[5]
    if bad != 0.0:
        emb[5, 3] = bad
    with pytest.raises(RocketError, match=f"^dedup: {message}"):
        D.dedup(emb, 0.9, method=method, **({"nlist": 2} if method == "ivf" else {}))


def test_rows_that_are_not_unit_are_normalised_with_a_warning():
    gen = torch.Generator().manual_seed(5)
    emb = planted(300, 16, gen, frac=0.2, noise=0.05)
    scaled = emb * torch.rand(300, 1, generator=gen).add(0.5)
    with pytest.warns(UserWarning, match="not unit-norm"):
        kept = D.dedup(scaled, 0.9, method="exact")
    assert torch.equal(kept, D.dedup(emb, 0.9, method="exact")) and len(kept) < 300
