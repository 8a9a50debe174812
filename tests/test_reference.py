"""The plain-torch references agree with deliberately naive formulations of docs/design.md §4."""
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import rel_err
from rocket.kernels import reference


def _moe_inputs(T, d_in, d_out, E, r, gen, dtype=torch.float32):
    x = torch.randn(T, d_in, generator=gen, dtype=dtype)
    W = torch.randn(d_out, d_in, generator=gen, dtype=dtype) / d_in ** 0.5
    b = torch.randn(d_out, generator=gen, dtype=dtype)
    A = torch.randn(E, r, d_in, generator=gen, dtype=dtype) / d_in ** 0.5
    B = torch.randn(E, d_out, r, generator=gen, dtype=dtype)
    s = torch.rand(E, generator=gen) + 0.5
    G = torch.randn(E, d_in, generator=gen, dtype=dtype)
    return x, W, b, A, B, s, G


def _token_weights(p: torch.Tensor, k: int):
    """(experts, weights) of one token from its probabilities: the top k renormalised, or for k = 1
    the probability itself (Switch)."""
    top = torch.topk(p, k)
    return top.indices.tolist(), top.values / top.values.sum() if k > 1 else top.values


@pytest.mark.parametrize("T, d_in, d_out, E, r, k", [(1, 7, 5, 1, 1, 1), (37, 33, 19, 5, 3, 2), (64, 16, 48, 8, 4, 3),
                                                     (29, 13, 11, 6, 5, 1)])
def test_lora_moe_matches_loop_and_token_formula(T, d_in, d_out, E, r, k):
    gen = torch.Generator().manual_seed(T * 1000 + E)
    args = _moe_inputs(T, d_in, d_out, E, r, gen, torch.float64)
    x, W, b, A, B, s, G = args
    y = reference.lora_moe(*args, top_k=k)
    assert rel_err(y, reference.lora_moe_loop(*args, top_k=k)) < 1e-12
    # token by token, straight from the formula
    for t in (0, T // 2, T - 1):
        experts, w = _token_weights(torch.softmax(x[t] @ G.t(), -1), k)
        want = x[t] @ W.t() + b
        for e, we in zip(experts, w):
            want = want + we * s[e] * (B[e] @ (A[e] @ x[t]))
        assert rel_err(y[t], want) < 1e-6  # routing in float32


@pytest.mark.parametrize("k", [1, 2])
def test_lora_moe_gradients_match_a_per_token_loop(k):
    """Output and every gradient (x, A, B, router) against the formula token by token in float64,
    with the Switch weight for k = 1: the router's gradient is not zero there."""
    gen = torch.Generator().manual_seed(8 + k)
    x, W, b, A, B, s, G = _moe_inputs(17, 11, 9, 5, 3, gen, torch.float64)
    gy = torch.randn(17, 9, generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, A, B, G)]
    y = reference.lora_moe(leaves[0], W, b, leaves[1], leaves[2], s, leaves[3], top_k=k)
    got = [y, *torch.autograd.grad((y * gy).sum(), leaves)]
    leaves = [t.clone().requires_grad_() for t in (x, A, B, G)]
    xs, As, Bs, Gs = leaves
    rows = []
    for t in range(x.shape[0]):
        experts, w = _token_weights(torch.softmax(xs[t] @ Gs.t(), -1), k)
        row = xs[t] @ W.t() + b
        for e, we in zip(experts, w):
            row = row + we * float(s[e]) * (Bs[e] @ (As[e] @ xs[t]))
        rows.append(row)
    y = torch.stack(rows)
    want = [y, *torch.autograd.grad((y * gy).sum(), leaves)]
    assert want[4].abs().max() > 1e-3  # the router learns, k = 1 included
    for name, g, w_ in zip(["y", "dx", "dA", "dB", "dG"], got, want):
        assert rel_err(g, w_) < 1e-6, name  # the reference routes in float32


def test_lora_moe_gradients_match_loop():
    gen = torch.Generator().manual_seed(7)
    x, W, b, A, B, s, G = _moe_inputs(29, 12, 10, 4, 3, gen, torch.float64)
    grads = []
    for fn in (reference.lora_moe, reference.lora_moe_loop):
        leaves = [t.clone().requires_grad_() for t in (x, A, B, G)]
        y = fn(leaves[0], W, b, leaves[1], leaves[2], s, leaves[3], top_k=2)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads.append([t.grad for t in leaves])
    for g_ref, g_loop in zip(*grads):
        assert g_ref.abs().sum() > 0 and rel_err(g_ref, g_loop) < 1e-6


def test_load_balancing_loss_is_one_when_balanced():
    probs = torch.full((8, 4), 0.25)
    experts = torch.arange(8).remainder(4).view(8, 1)
    assert reference.load_balancing_loss(probs, experts, 4).item() == pytest.approx(1.0)


def test_multi_lora_matches_per_row():
    gen = torch.Generator().manual_seed(3)
    M, N, d_in, d_out, r = 3, 11, 9, 7, 4
    x = torch.randn(N, d_in, generator=gen)
    A, B = torch.randn(M, r, d_in, generator=gen), torch.randn(M, d_out, r, generator=gen)
    s = torch.rand(M, generator=gen)
    ids = torch.randint(-1, M, (N,), generator=gen)
    out = reference.multi_lora(x, A, B, s, ids)
    for i in range(N):
        want = torch.zeros(d_out) if ids[i] < 0 else s[ids[i]] * (B[ids[i]] @ (A[ids[i]] @ x[i]))
        assert torch.allclose(out[i], want, atol=1e-5)


def test_cross_entropies_agree():
    gen = torch.Generator().manual_seed(5)
    Bsz, T, V, H = 3, 13, 17, 8
    hidden = torch.randn(Bsz, T, H, generator=gen)
    Wlm = torch.randn(V, H, generator=gen)
    labels = torch.randint(0, V, (Bsz, T), generator=gen)
    labels[:, :4] = reference.IGNORE_INDEX
    labels[1, 9:] = reference.IGNORE_INDEX
    logits = hidden @ Wlm.t()
    per_ex = reference.masked_cross_entropy_per_example(logits, labels)
    for i in range(Bsz):
        m = labels[i, 1:] != reference.IGNORE_INDEX
        want = F.cross_entropy(logits[i, :-1][m], labels[i, 1:][m])
        assert per_ex[i].item() == pytest.approx(want.item(), rel=1e-5)
    flat_h = hidden[:, :-1].reshape(-1, H)
    flat_t = labels[:, 1:].reshape(-1)
    ids = torch.arange(Bsz).repeat_interleave(T - 1)
    assert torch.allclose(reference.linear_cross_entropy_per_example(flat_h, Wlm, flat_t, ids, Bsz), per_ex, atol=1e-5)
    labels[2, 1:] = reference.IGNORE_INDEX
    with pytest.raises(ValueError, match="no label tokens"):
        reference.masked_cross_entropy_per_example(logits, labels)


def test_lora_delta_inner_is_frobenius_of_explicit_delta():
    gen = torch.Generator().manual_seed(11)
    A_i, B_i = torch.randn(3, 20, generator=gen, dtype=torch.float64), torch.randn(15, 3, generator=gen, dtype=torch.float64)
    A_j, B_j = torch.randn(5, 20, generator=gen, dtype=torch.float64), torch.randn(15, 5, generator=gen, dtype=torch.float64)
    want = ((B_i @ A_i) * (B_j @ A_j)).sum()
    assert reference.lora_delta_inner(A_i, B_i, A_j, B_j).item() == pytest.approx(want.item(), rel=1e-6)
