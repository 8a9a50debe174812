"""Fused linear + cross-entropy kernel vs the reference (linear_cross_entropy_per_example)."""
import pytest
import torch

from rocket.kernels import reference
from rocket.kernels.linear_ce import linear_cross_entropy_per_example, row_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n, H, V, E, chunk", [(1, 8, 5, 1, None), (53, 37, 101, 4, 7), (40, 16, 5000, 3, None)])
def test_matches_reference(n, H, V, E, chunk):
    gen = torch.Generator().manual_seed(n * V)
    hidden = torch.randn(n, H, generator=gen) * 2
    W = torch.randn(V, H, generator=gen)
    targets = torch.randint(0, V, (n,), generator=gen)
    ids = torch.arange(n) % E
    if n > E:
        targets[torch.randperm(n, generator=gen)[: n // 3]] = reference.IGNORE_INDEX
        targets[:E] = torch.randint(0, V, (E,), generator=gen)  # every example keeps a label
    got = linear_cross_entropy_per_example(hidden.to(DEVICE), W.to(DEVICE), targets.to(DEVICE), ids.to(DEVICE),
                                           E, chunk_rows=chunk)
    want = reference.linear_cross_entropy_per_example(hidden.double(), W.double(), targets, ids, E)
    assert torch.allclose(got.double().cpu(), want.double(), rtol=1e-5, atol=1e-5)


def test_row_cross_entropy_extreme_logits():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-50.0, -50.0, -50.0], [3.0, 80.0, -80.0]])
    targets = torch.tensor([1, 2, 1])
    got = row_cross_entropy(logits.to(DEVICE), targets.to(DEVICE))
    want = torch.nn.functional.cross_entropy(logits.double(), targets, reduction="none")
    assert torch.allclose(got.double().cpu(), want, rtol=1e-5, atol=1e-5)


def test_bad_targets_and_empty_examples():
    h, W = torch.randn(4, 8).to(DEVICE), torch.randn(10, 8).to(DEVICE)
    with pytest.raises(ValueError, match="vocabulary"):
        linear_cross_entropy_per_example(h, W, torch.tensor([1, 2, 10, 3]).to(DEVICE),
                                         torch.zeros(4, dtype=torch.long).to(DEVICE), 1)
    with pytest.raises(ValueError, match="no label tokens"):
        linear_cross_entropy_per_example(h, W, torch.tensor([1, 2, -100, -100]).to(DEVICE),
                                         torch.tensor([0, 0, 1, 1]).to(DEVICE), 2)
