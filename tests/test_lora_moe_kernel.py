"""Fused LoRA-MoE kernels (rocket/kernels/lora_moe.py, lora_moe_route.py, dual_mm.py) vs the torch
reference and the reference implementation's per-expert loop: outputs, routing and every gradient
(x, A, B, router, and the probs path of the balancing loss)."""
from functools import partial

import pytest
import torch

from tests.helpers import rel_err
from rocket.kernels import dual_mm as gemm
from rocket.kernels import lora_moe as K
from rocket.kernels import lora_moe_route as route
from rocket.kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _inputs(T, d_in, d_out, E, r, dtype, gen, bias=True, router_std=1.0):
    x = torch.randn(T, d_in, generator=gen)
    W = torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5
    b = torch.randn(d_out, generator=gen) if bias else None
    A = torch.randn(E, r, d_in, generator=gen) / d_in ** 0.5
    B = torch.randn(E, d_out, r, generator=gen)
    s = torch.rand(E, generator=gen) + 0.5
    G = torch.randn(E, d_in, generator=gen) * router_std / d_in ** 0.5
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return cast(x), cast(W), cast(b), cast(A), cast(B), s.to(DEVICE), cast(G)


def _grads(fn, x, W, b, A, B, s, G, k, gy, gp, x_lora=None):
    """Output, probs and the grads of <y, gy> + <probs, gp> w.r.t. x, A, B, G (and x_lora)."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, G)]
    xl = None if x_lora is None else x_lora.detach().clone().requires_grad_()
    y, probs = fn(leaves[0], W, b, leaves[1], leaves[2], s, leaves[3], k, xl)
    loss = (y.double() * gy.double()).sum() + (probs.double() * gp.double()).sum()
    grads = torch.autograd.grad(loss, leaves + ([xl] if xl is not None else []))
    return [y, probs, *grads]


def _kernel(x, W, b, A, B, s, G, k, xl, gemm_backend="auto"):
    y, probs, _ = K.lora_moe(x, W, b, A, B, s, G, k, xl, return_routing=True, gemm_backend=gemm_backend)
    return y, probs


def _reference(x, W, b, A, B, s, G, k, xl):
    _, _, probs = reference.route_topk(x, G, k)
    return reference.lora_moe(x, W, b, A, B, s, G, k, xl), probs


def _loop(x, W, b, A, B, s, G, k, xl):
    _, _, probs = reference.route_topk(x, G, k)
    return reference.lora_moe_loop(x, W, b, A, B, s, G, k, xl), probs


def _double(*ts):
    return [None if t is None else t.detach().double() for t in ts]


CASES = [  # T, d_in, d_out, E, r, k
    (1, 16, 16, 1, 1, 1),
    (37, 70, 45, 5, 3, 2),
    (150, 33, 130, 8, 16, 2),
    (65, 48, 17, 3, 7, 3),      # top_k = E
    (40, 24, 40, 64, 2, 5),     # many experts
    (33, 20, 36, 2, 128, 1),    # rank 128
    (50, 64, 96, 4, 16, 2),     # K blocks divide d_in, d_out and the padded extra K: one-loop GEMM path
    (45, 37, 29, 6, 5, 1),      # top-1: the expert's output scaled by its probability (Switch)
    (19, 70, 33, 3, 9, 1),
]


@pytest.mark.parametrize("balancing", [True, False])
@pytest.mark.parametrize("T, d_in, d_out, E, r, k", CASES)
def test_outputs_and_all_grads_match_reference_and_loop_fp32(T, d_in, d_out, E, r, k, balancing):
    """balancing=False: no gradient through probs, so the router's gradient comes from y alone."""
    gen = torch.Generator().manual_seed(T * 7 + E)
    x, W, b, A, B, s, G = _inputs(T, d_in, d_out, E, r, torch.float32, gen)
    gy = torch.randn(T, d_out, generator=gen).to(DEVICE)
    gp = torch.randn(T, E, generator=gen).to(DEVICE)
    if not balancing:
        gp = torch.zeros_like(gp)
    got = _grads(_kernel, x, W, b, A, B, s, G, k, gy, gp)
    ref = _grads(_reference, *_double(x, W, b, A, B, s, G), k, gy, gp)
    loop = _grads(_loop, *_double(x, W, b, A, B, s, G), k, gy, gp)
    names = ["y", "probs", "dx", "dA", "dB", "dG"]
    for name, g, r_, l_ in zip(names, got, ref, loop):
        assert g.shape == r_.shape, name
        assert rel_err(g, r_) < TOL[torch.float32], name
        assert rel_err(g, l_) < TOL[torch.float32], name
    if E > 1:  # the router learns from y for every k (at k = E through the softmax alone)
        assert got[5].abs().max() > 1e-4 * ref[5].abs().max() > 0


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_fp32(dtype, k):
    gen = torch.Generator().manual_seed(11)
    T, d_in, d_out, E, r = 130, 72, 56, 6, 8
    x, W, b, A, B, s, G = _inputs(T, d_in, d_out, E, r, dtype, gen)
    gy = torch.randn(T, d_out, generator=gen).to(dtype).to(DEVICE)
    gp = torch.randn(T, E, generator=gen).to(DEVICE)
    got = _grads(_kernel, x, W, b, A, B, s, G, k, gy, gp)
    ref = _grads(_reference, *_double(x, W, b, A, B, s, G), k, gy, gp)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for name, g, r_ in zip(["y", "probs", "dx", "dA", "dB", "dG"], got, ref):
        assert g.dtype == (torch.float32 if name == "probs" else dtype), name
        assert rel_err(g, r_) < TOL[dtype], name


@pytest.mark.parametrize("k", [1, 2])
def test_expert_input_differs_from_router_input_dropout_path(k):
    gen = torch.Generator().manual_seed(12)
    T, d_in, d_out, E, r = 45, 30, 22, 4, 5
    x, W, b, A, B, s, G = _inputs(T, d_in, d_out, E, r, torch.float32, gen, bias=False)
    xl = (x * (torch.rand(x.shape, generator=gen).to(DEVICE) > 0.3) / 0.7)
    gy = torch.randn(T, d_out, generator=gen).to(DEVICE)
    gp = torch.randn(T, E, generator=gen).to(DEVICE)
    got = _grads(_kernel, x, W, b, A, B, s, G, k, gy, gp, x_lora=xl)
    ref = _grads(_reference, *_double(x, W, b, A, B, s, G), k, gy, gp, x_lora=xl.double())
    for name, g, r_ in zip(["y", "probs", "dx", "dA", "dB", "dG", "dx_lora"], got, ref):
        assert rel_err(g, r_) < TOL[torch.float32], name


def test_routing_matches_reference_topk_and_leading_dims_are_kept():
    gen = torch.Generator().manual_seed(13)
    x, W, b, A, B, s, G = _inputs(3 * 17, 40, 24, 7, 4, torch.float32, gen)
    y, probs, experts = K.lora_moe(x.view(3, 17, 40), W, b, A, B, s, G, 3, return_routing=True)
    w_ref, e_ref, p_ref = reference.route_topk(x.double(), G.double(), 3)
    assert y.shape == (3, 17, 24) and experts.dtype == torch.int64
    assert torch.equal(experts.cpu(), e_ref.cpu())  # same experts, same (descending) order
    assert rel_err(probs, p_ref) < 1e-6


def test_zero_padded_and_zero_scaling_experts_contribute_nothing():
    """Mixed ranks padded with zeros, and an expert of scaling 0 that the router may pick."""
    gen = torch.Generator().manual_seed(14)
    x, W, b, A, B, s, G = _inputs(60, 26, 18, 4, 6, torch.float32, gen)
    A[0, 3:] = 0
    B[0, :, 3:] = 0
    s[2] = 0
    gy = torch.randn(60, 18, generator=gen).to(DEVICE)
    gp = torch.zeros(60, 4).to(DEVICE)
    got = _grads(_kernel, x, W, b, A, B, s, G, 2, gy, gp)
    ref = _grads(_reference, *_double(x, W, b, A, B, s, G), 2, gy, gp)
    for name, g, r_ in zip(["y", "probs", "dx", "dA", "dB", "dG"], got, ref):
        assert rel_err(g, r_) < TOL[torch.float32], name
    assert got[3][2].abs().max() == 0 and got[4][2].abs().max() == 0  # scaling 0: no expert grads


def test_every_output_element_is_written(monkeypatch):
    """torch.empty returns NaN-filled memory while the kernels run: any unwritten element shows."""
    gen = torch.Generator().manual_seed(15)
    x, W, b, A, B, s, G = _inputs(67, 36, 29, 5, 6, torch.float32, gen)
    empty = torch.empty

    def nan_empty(*shape, **kw):
        t = empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    gy = torch.randn(67, 29, generator=gen).to(DEVICE)
    ref = _grads(_reference, *_double(x, W, b, A, B, s, G), 2, gy, torch.zeros(67, 5).to(DEVICE))
    monkeypatch.setattr(torch, "empty", nan_empty)
    got = _grads(_kernel, x, W, b, A, B, s, G, 2, gy, torch.zeros(67, 5).to(DEVICE))
    monkeypatch.undo()
    for name, g, r_ in zip(["y", "probs", "dx", "dA", "dB", "dG"], got, ref):
        assert rel_err(g, r_) < TOL[torch.float32], name


@pytest.mark.parametrize("E, r, w_dtype", [(5, 6, torch.float32), (3, 48, torch.bfloat16), (2, 80, torch.float32)])
def test_route_kernels_lay_out_the_gemm_weights(monkeypatch, E, r, w_dtype):
    """route_fwd's copy programs write B_cat[n, e·r + j] = B[e, n, j] and route_bwd's write
    [A_cat; G], both rounded to x's dtype with zero padding, into NaN-poisoned memory. Bit-exact on
    the GPU (round to nearest even, as torch); the interpreter truncates float32 to bf16 (≤ 1 ulp)."""
    gen = torch.Generator().manual_seed(21)
    T, d_in, d_out = 19, 40, 77
    x = torch.randn(T, d_in, generator=gen).to(torch.bfloat16).to(DEVICE)
    A, B, G = (torch.randn(*shape, generator=gen).to(w_dtype).to(DEVICE)
               for shape in ((E, r, d_in), (E, d_out, r), (E, d_in)))
    s = torch.rand(E, generator=gen).to(DEVICE)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan"))
                        if kw.get("dtype", torch.float32).is_floating_point else empty(*a, **kw))
    probs, experts, h, hm, B_cat = route.route_forward(x, None, A, B, G, s, 2)
    gcat, AG = route.route_backward(torch.randn(T, d_out, generator=gen).to(torch.bfloat16).to(DEVICE), B_cat, h,
                                    s, probs, experts, None, A, G, True)
    monkeypatch.undo()
    ER = E * r
    want_b = torch.zeros(d_out, B_cat.shape[1], dtype=torch.bfloat16, device=DEVICE)
    want_b[:, :ER] = B.permute(1, 0, 2).reshape(d_out, ER).to(torch.bfloat16)
    want_ag = torch.zeros(gcat.shape[1], d_in, dtype=torch.bfloat16, device=DEVICE)
    want_ag[:ER + E] = torch.cat([A.reshape(ER, d_in), G]).to(torch.bfloat16)
    assert B_cat.shape[1] % gemm.PAD_K == 0 and AG.shape == want_ag.shape
    ulp = 2.0 ** -7 if gemm._INTERPRET and w_dtype == torch.float32 else 0.0
    for got, want in ((B_cat, want_b), (AG, want_ag)):
        assert torch.allclose(got.float(), want.float(), rtol=ulp, atol=0.0)
        assert torch.equal(got == 0, want == 0)  # the padding (and nothing else) is exactly zero


def test_router_only_training_skips_expert_grads_and_trainable_base_uses_reference():
    gen = torch.Generator().manual_seed(16)
    x, W, b, A, B, s, G = _inputs(31, 20, 14, 4, 3, torch.float32, gen)
    Gp = G.clone().requires_grad_()
    K.lora_moe(x, W, b, A, B, s, Gp, 2).square().sum().backward()
    Gr = G.double().requires_grad_()
    y = reference.lora_moe(x.double(), W.double(), b.double(), A.double(), B.double(), s.double(), Gr, 2)
    y.square().sum().backward()
    assert rel_err(Gp.grad, Gr.grad) < TOL[torch.float32]
    Wt = W.clone().requires_grad_()
    K.lora_moe(x, Wt, b, A, B, s, G, 2).sum().backward()
    assert rel_err(Wt.grad, torch.ones(31, 14, dtype=torch.float64).t() @ x.double().cpu()) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "tma"])
def test_fused_gemm_variants_bf16(backend):
    """Both Triton GEMMs (pointer loads; TMA descriptors) in forward and backward layouts."""
    gen = torch.Generator().manual_seed(17)
    T, d_in, d_out, E, r, k = 70, 64, 40, 4, 16, 2
    x, W, b, A, B, s, G = _inputs(T, d_in, d_out, E, r, torch.bfloat16, gen)
    gy = torch.randn(T, d_out, generator=gen).to(torch.bfloat16).to(DEVICE)
    gp = torch.randn(T, E, generator=gen).to(DEVICE)
    got = _grads(partial(_kernel, gemm_backend=backend), x, W, b, A, B, s, G, k, gy, gp)
    ref = _grads(_reference, *_double(x, W, b, A, B, s, G), k, gy, gp)
    for name, g, r_ in zip(["y", "probs", "dx", "dA", "dB", "dG"], got, ref):
        assert rel_err(g, r_) < TOL[torch.bfloat16], name


def _gpu_case(backend, T, d_in, d_out, E, r, k):
    gen = torch.Generator().manual_seed(T + E)
    x, W, b, A, B, s, G = _inputs(T, d_in, d_out, E, r, torch.bfloat16, gen)
    gy = torch.randn(T, d_out, generator=gen).to(torch.bfloat16).to(DEVICE)
    gp = torch.randn(T, E, generator=gen).to(DEVICE)
    got = _grads(partial(_kernel, gemm_backend=backend), x, W, b, A, B, s, G, k, gy, gp)
    ref = _grads(_reference, *[None if t is None else t.float() for t in (x, W, b, A, B, s, G)], k, gy.float(), gp)
    for name, g, r_ in zip(["y", "probs", "dx", "dA", "dB", "dG"], got, ref):
        assert rel_err(g, r_) < TOL[torch.bfloat16], (backend, name)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("backend", ["auto", "triton", "tma", "cublas"])
def test_gpu_bf16_every_gemm_backend(backend, k):
    _gpu_case(backend, 4096, 1024, 2752, 8, 16, k)


@pytest.mark.gpu
def test_gpu_direct_launches_match_jit_launches(monkeypatch):
    """Once compiled, the route kernels are launched directly (rocket.kernels.direct_launch): the same
    inputs give bit-identical outputs and gradients as through Triton's JIT launcher, with fresh
    allocations and another token count's specialisation in between."""
    gen = torch.Generator().manual_seed(5)
    E, r, k = 4, 16, 2
    x, W, b, A, B, s, G = _inputs(333, 1024, 768, E, r, torch.bfloat16, gen)
    A, B, G = (t.float() for t in (A, B, G))  # float32 masters, as in training
    gy = torch.randn(333, 768, generator=gen).to(torch.bfloat16).to(DEVICE)
    gp = torch.randn(333, E, generator=gen).to(DEVICE)
    launchers = route._LAUNCHERS
    with monkeypatch.context() as m:
        for L in launchers:
            m.setattr(L, "direct", False)
        jit = _grads(_kernel, x, W, b, A, B, s, G, k, gy, gp)
    for _ in range(2):  # compiles (or finds) the kernels, then launches them directly
        _grads(_kernel, x[:17], W, b, A, B, s, G, k, gy[:17], gp[:17])
        before = sum(L.direct_launches for L in launchers)
        direct = _grads(_kernel, x.clone(), W, b, A, B, s, G, k, gy.clone(), gp.clone())
    assert sum(L.direct_launches for L in launchers) == before + 2  # route_fwd and route_bwd
    for name, g1, g2 in zip(["y", "probs", "dx", "dA", "dB", "dG"], jit, direct):
        assert torch.equal(g1, g2), name


@pytest.mark.gpu
@pytest.mark.parametrize("T, d_in, warm_up", [(777, 1024, True), (5000, 1024, True), (300, 640, False)])
def test_gpu_cuda_graph_replays_forward_and_backward(T, d_in, warm_up):
    """Forward and backward captured in one CUDA graph replay on new inputs (copied into the captured
    ones) to what eager calls give: T=777 on the cuBLAS-first path, T=5000 above SMALL_M, and a shape
    never run before the capture (untuned: the default route config, cuBLAS)."""
    E, r, k, d_out = 4, 16, 2, 768

    def fresh(seed):
        gen = torch.Generator().manual_seed(seed)
        x, W, b, A, B, s, G = _inputs(T, d_in, d_out, E, r, torch.bfloat16, gen)
        return [x, A.float(), B.float(), G.float()], torch.randn(T, d_out, generator=gen).to(DEVICE).bfloat16(), (
            W, b, s)

    def step(leaves, gy, W, b, s):  # float32 masters, as in training
        y, probs, _ = K.lora_moe(leaves[0], W, b, leaves[1], leaves[2], s, leaves[3], k, return_routing=True)
        return [y, probs, *torch.autograd.grad(y, leaves, gy)]
    inputs, gy, frozen = fresh(1)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    if warm_up:  # on a side stream, as torch.cuda.graphs asks: compiles and tunes
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(leaves, gy, *frozen)
        torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(leaves, gy, *frozen)
    for seed in (2, 3):
        new, new_gy, _ = fresh(seed)
        with torch.no_grad():
            for leaf, t in zip(leaves, new):
                leaf.copy_(t)
            gy.copy_(new_gy)
        graph.replay()
        eager = step([t.detach().clone().requires_grad_() for t in new], new_gy, *frozen)
        for name, g, e in zip(["y", "probs", "dx", "dA", "dB", "dG"], captured, eager):
            assert rel_err(g, e) < 1e-3, (name, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("T, d_in, d_out, E, r, k", [(1000, 4096, 1000, 4, 16, 2), (3, 512, 384, 64, 8, 7),
                                                     (777, 1000, 1100, 5, 12, 3), (999, 1000, 1100, 7, 12, 1)])
def test_gpu_bf16_odd_shapes(T, d_in, d_out, E, r, k):
    _gpu_case("auto", T, d_in, d_out, E, r, k)


@pytest.mark.parametrize("dtype, T, d_in, d_out, E, r, k, dropout", [
    (torch.bfloat16, 53, 40, 24, 4, 6, 2, False),
    (torch.float16, 1, 16, 20, 1, 3, 1, False),       # T=1, E=1
    (torch.bfloat16, 29, 36, 18, 3, 5, 3, True),      # k=E, dropout input
    (torch.bfloat16, 21, 24, 16, 2, 80, 1, False),    # E·r = 160 > one column block of the fused kernels
])
def test_float32_masters_with_half_activations(dtype, T, d_in, d_out, E, r, k, dropout):
    """Trainable float32 masters go straight in (rounded to x's dtype inside the kernels): the same
    function as rounding them first, every gradient in float32 and no cast node in the graph."""
    gen = torch.Generator().manual_seed(21 + T)
    x, W, b, _, _, s, _ = _inputs(T, d_in, d_out, E, r, dtype, gen)
    A = (torch.randn(E, r, d_in, generator=gen) / d_in ** 0.5).to(DEVICE)
    B = torch.randn(E, d_out, r, generator=gen).to(DEVICE)
    G = torch.randn(E, d_in, generator=gen).div(d_in ** 0.5).to(DEVICE)
    xl = (x * (torch.rand(x.shape, generator=gen).to(DEVICE) > 0.3)).to(dtype) if dropout else None
    gy = torch.randn(T, d_out, generator=gen).to(dtype).to(DEVICE)
    gp = torch.randn(T, E, generator=gen).to(DEVICE)
    got = _grads(_kernel, x, W, b, A, B, s, G, k, gy, gp, x_lora=xl)
    assert got[0].dtype == dtype and all(g.dtype == torch.float32 for g in got[3:6])
    rounded = [t.to(dtype) for t in (A, B, G)]
    ref = _grads(_reference, *_double(x, W, b, rounded[0], rounded[1], s, rounded[2]), k, gy, gp,
                 x_lora=None if xl is None else xl.double())
    for name, g, r_ in zip(["y", "probs", "dx", "dA", "dB", "dG", "dx_lora"], got, ref):
        assert rel_err(g, r_) < TOL[dtype], name
    y = K.lora_moe(x, W, b, A.requires_grad_(), B, s, G, k, xl)
    nodes, todo = set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        nodes.add(type(fn).__name__)
        todo += [f for f, _ in fn.next_functions if f is not None]
    assert "LoraMoEFunctionBackward" in nodes and "AccumulateGrad" in nodes and not any("Copy" in n for n in nodes)


def test_route_tuning_cancels_a_steady_drift_of_the_clocks(monkeypatch):
    """_tune_route picks the truly fastest config although every timing runs 0.3 ms faster than the one
    before (a GPU warming up): one pass config after config would pick the second config. A config
    that fails to build is not a candidate."""
    true_ms = [4.0, 4.2, 4.9, 5.5]
    calls = []

    class Kernel:  # kernel[grid](*args, **meta) runs config meta["BM"]; BM 32 cannot build
        def __getitem__(self, grid):
            def run(*args, **meta):
                if meta["BM"] == 32:
                    raise RuntimeError("out of shared memory")
                calls.append(meta["BM"])
            return run
    configs = [dict(BM=bm, BK=64, num_warps=4, num_stages=3) for bm in (64, 128, 16, 32)]
    monkeypatch.setattr(route, "ROUTE_CONFIGS", configs)
    timings = []

    def drifting_timer(fn):
        fn()
        i = [c["BM"] for c in configs].index(calls[-1])
        timings.append(i)
        return true_ms[i] - 0.3 * len(timings)
    monkeypatch.setattr(route, "_tuning_time", drifting_timer)
    assert route._tune_route(Kernel(), 1000, 0, (), {}) == configs[0]
    assert timings[:3] == [0, 1, 2] and timings[3:6] == [2, 1, 0] and len(timings) == 3 * route.TUNING_ROUNDS
    one_pass = {i: true_ms[i] - 0.3 * (n + 1) for n, i in enumerate(timings[:3])}
    assert min(one_pass, key=one_pass.get) != 0  # what a single pass would have picked


def test_route_tuning_drops_a_config_whose_timing_fails(monkeypatch):
    """A config that builds and runs but then cannot be timed (the timer raises in a later round) is
    dropped, however fast its earlier timings were; the rest are still compared."""
    monkeypatch.setattr(route, "ROUTE_CONFIGS", [dict(BM=bm, BK=64, num_warps=4, num_stages=3) for bm in (64, 128, 16)])
    launched, timed = [], []

    def timer(fn):
        fn()
        bm = launched[-1]
        if bm == 16 and bm in timed:
            raise torch.cuda.OutOfMemoryError("no memory for the cache flush")
        timed.append(bm)
        return {64: 2.0, 128: 1.5, 16: 0.1}[bm]

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append(meta["BM"])
    monkeypatch.setattr(route, "_tuning_time", timer)
    assert route._tune_route(Kernel(), 1000, 0, (), {})["BM"] == 128
    assert timed.count(16) == 1 and timed.count(64) == timed.count(128) == route.TUNING_ROUNDS


def test_nothing_is_timed_inside_a_cuda_graph_capture(monkeypatch):
    """A route key first seen while a CUDA graph is being captured keeps ROUTE_CONFIGS[0] untimed (a
    timer would synchronise the capturing stream), and "auto" takes cuBLAS there without recording a
    choice; outside a capture both time as before."""
    tuned = []
    monkeypatch.setattr(route, "_tune_route",
                        lambda kernel, T, extra, args, kw: tuned.append(T) or route.ROUTE_CONFIGS[2])
    monkeypatch.setattr(route, "_ROUTE_TUNED", {})
    monkeypatch.setattr(gemm, "_CHOSEN", {})
    for module in (route, gemm):  # each module calls the name it imported
        monkeypatch.setattr(module, "_capturing", lambda: True)
    fwd = route._FWD.kernel
    assert route._route_config(fwd, (4096, "key"), 3000, 0, (), {}) == route.ROUTE_CONFIGS[0] and tuned == []
    big = torch.randn(gemm.SMALL_M + 1, 8)
    assert gemm._choose(big, torch.randn(8, 5), torch.randn(gemm.SMALL_M + 1, 3), torch.randn(3, 5), None,
                        torch.empty(gemm.SMALL_M + 1, 5)) == "cublas" and gemm._CHOSEN == {}
    monkeypatch.setattr(route, "_capturing", lambda: False)
    assert route._route_config(fwd, (8192, "key"), 5000, 0, (), {}) == route.ROUTE_CONFIGS[2] and tuned == [5000]
    assert route._route_config(fwd, (8192, "key"), 6000, 0, (), {}) == route.ROUTE_CONFIGS[2] and tuned == [5000]


@pytest.mark.parametrize("bad, field", [
    (dict(x=(9, 17)), "x is [17]"), (dict(W=(12, 17)), "weight is [12, 17]"), (dict(B=(3, 12, 5)), "lora_B"),
    (dict(G=(2, 16)), "router_weight"), (dict(b=(13,)), "bias"), (dict(xl=(9, 15)), "x_lora"),
    (dict(A=(3, 16)), "lora_A must be"), (dict(s=(2,)), "scaling has 2 entries"), (dict(k=4), "top_k=4"),
    (dict(k=0), "top_k=0"),
])
def test_mismatched_operands_raise_one_line_errors(bad, field):
    """Each operand of the wrong shape (or top_k outside [1, E]) is named in one line, before any kernel
    could read out of bounds."""
    gen = torch.Generator().manual_seed(3)
    shapes = dict(x=(9, 16), W=(12, 16), b=(12,), A=(3, 4, 16), B=(3, 12, 4), G=(3, 16), s=(3,), xl=(9, 16)) | {
        n: v for n, v in bad.items() if n != "k"}
    t = {n: torch.randn(*shape, generator=gen).to(DEVICE) for n, shape in shapes.items()}
    with pytest.raises(ValueError, match="^lora_moe: " + field.replace("[", r"\[")) as e:
        K.lora_moe(t["x"], t["W"], t["b"], t["A"], t["B"], t["s"], t["G"], bad.get("k", 2), t["xl"])
    assert "\n" not in str(e.value)


def test_an_unknown_gemm_backend_raises_one_line_errors():
    """The GEMM backend is an argument, checked where it comes in: by lora_moe (on every path) and
    by dual_mm, each naming itself and the accepted values."""
    gen = torch.Generator().manual_seed(6)
    x, W, b, A, B, s, G = _inputs(9, 16, 12, 3, 4, torch.float32, gen)
    with pytest.raises(ValueError, match="^lora_moe: gemm_backend='cuda' is not one of auto, triton, tma, cublas$"):
        K.lora_moe(x, W, b, A, B, s, G, 2, gemm_backend="cuda")
    with pytest.raises(ValueError, match="^dual_mm: backend='TMA' is not one of "):
        gemm.dual_mm(x, W.t(), x, W.t(), backend="TMA")


def test_one_scaling_for_all_experts():
    """A float (or one-element) scaling applies to every expert, as in the reference."""
    gen = torch.Generator().manual_seed(4)
    x, W, b, A, B, _, G = _inputs(23, 20, 18, 4, 3, torch.float32, gen)
    want = reference.lora_moe(*_double(x, W, b, A, B), torch.full((4,), 1.7, dtype=torch.float64), G.double(), 2)
    for scaling in (1.7, torch.tensor([1.7])):
        assert rel_err(K.lora_moe(x, W, b, A, B, scaling, G, 2), want) < TOL[torch.float32]


def test_token_count_buckets_are_powers_of_two():
    assert [gemm._bucket(m) for m in (0, 1, 2, 3, 1536, 2048, 2049, 3584, 16384)] == [1, 1, 2, 4, 2048, 2048, 4096,
                                                                                     4096, 16384]


@pytest.mark.parametrize("dtype, bias, dropout, k", [(torch.float32, True, False, 2), (torch.bfloat16, False, False, 2),
                                                     (torch.float32, False, True, 2), (torch.float32, True, True, 1)])
def test_base_product_first_path(monkeypatch, dtype, bias, dropout, k):
    """The path where cuBLAS takes the GEMMs (small T on the GPU): base product issued first, the
    LoRA product added in place, unpadded extra K in the backward; forced here on any device."""
    monkeypatch.setattr(K, "_takes_cublas", lambda M, dt, backend: True)
    gen = torch.Generator().manual_seed(31)
    T, d_in, d_out, E, r = 47, 40, 36, 5, 4
    x, W, b, A, B, s, G = _inputs(T, d_in, d_out, E, r, dtype, gen, bias=bias)
    xl = (x * (torch.rand(x.shape, generator=gen).to(DEVICE) > 0.4)).to(dtype) if dropout else None
    gy = torch.randn(T, d_out, generator=gen).to(dtype).to(DEVICE)
    gp = torch.randn(T, E, generator=gen).to(DEVICE)
    got = _grads(_kernel, x, W, b, A, B, s, G, k, gy, gp, x_lora=xl)
    ref = _grads(_reference, *_double(x, W, b, A, B, s, G), k, gy, gp, x_lora=None if xl is None else xl.double())
    for name, g, r_ in zip(["y", "probs", "dx", "dA", "dB", "dG", "dx_lora"], got, ref):
        assert rel_err(g, r_) < TOL[dtype], name
