"""One LoRA-MoE layer (docs/design.md): rocket's fused kernels vs peers in one process, forward and
forward+backward (grads of x, A, B, router; W frozen), as ratios to the frozen base linear alone,
timed in interleaved rounds, each timing in its own steady state of the GPU's clocks
(bench.harness.interleaved_median_ms). GPU: bf16, T ∈ {4096, 16384}, 4096 → {4096, 11008}, E ∈ {4, 8},
k=2, r=16; CPU: small shapes in the interpreter (correctness of the same code, timings are not results).

Peers (bench/peers.py): the reference implementation's per-expert loop, dense all-experts einsum, a
generic grouped Triton MoE (sort by expert, SGMV, index_add), and a single peft-style LoRA (rank r,
no routing). `rocket_cublas` is rocket with gemm_backend="cublas": every product in cuBLAS, the base
product first and the LoRA product added over y (what `auto` does up to SMALL_M tokens; above,
`auto` puts the LoRA product first and the base product reads it back as C).

Where the host cannot issue the launches as fast as the GPU runs them (T=4096, 4096→4096), eager
timings measure the host. On the GPU each fwd+bwd is therefore also captured in a CUDA graph and its
replay timed (`ratio_fwdbwd_graphed`): the GPU's time alone, as a training step under CUDA graphs
sees it. The loop and grouped peers read the routing on the host, so they cannot be captured.
"""
from functools import partial

import torch
import torch.nn.functional as F

from bench.harness import cuda_graph, host_wall, interleaved_median_ms, median_ms
from bench.peers import lora_moe_dense_einsum, lora_moe_grouped, lora_moe_loop, lora_single
from tests.helpers import rel_err
from rocket.kernels import reference as R
from rocket.kernels.dual_mm import _IMPLS, CHOICES
from rocket.kernels.lora_moe import lora_moe

GPU = dict(shapes=[(T, 4096, d_out, E) for T in (16384, 4096) for d_out in (4096, 11008) for E in (8, 4)],
           k=2, r=16, dtype=torch.bfloat16, reps={})
CPU = dict(shapes=[(70, 48, 40, 4), (33, 32, 24, 8)], k=2, r=4, dtype=torch.float32, reps=dict(warmup=0, reps=1))
HEADLINE = (16384, 4096, 4096, 8)
GRAPHABLE = ("base", "rocket", "rocket_triton", "rocket_tma", "rocket_cublas", "dense_einsum", "single_lora")


def _inputs(T, d_in, d_out, E, r, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(dtype).to(device)  # noqa: E731
    return dict(x=t(T, d_in), W=t(d_out, d_in, scale=d_in ** -0.5), b=t(d_out), A=t(E, r, d_in, scale=d_in ** -0.5),
                B=t(E, d_out, r, scale=0.02), s=(torch.rand(E, generator=gen) + 0.5).to(device),
                G=t(E, d_in, scale=d_in ** -0.5), gy=t(T, d_out))


def _methods(v, k):
    """name → f(x, A, B, G) -> y, and which of (x, A, B, G) each one differentiates."""
    W, b, s = v["W"], v["b"], v["s"]
    s0 = float(s[0])

    def rocket(backend):
        return lambda x, A, B, G: lora_moe(x, W, b, A, B, s, G, k, gemm_backend=backend)
    return {
        "base": (lambda x, A, B, G: F.linear(x, W, b), (0,)),
        "rocket": (rocket("auto"), (0, 1, 2, 3)),
        "rocket_triton": (rocket("triton"), (0, 1, 2, 3)),
        "rocket_tma": (rocket("tma"), (0, 1, 2, 3)),
        "rocket_cublas": (rocket("cublas"), (0, 1, 2, 3)),
        "dense_einsum": (lambda x, A, B, G: lora_moe_dense_einsum(x, W, b, A, B, s, G, k), (0, 1, 2, 3)),
        "grouped_triton": (lambda x, A, B, G: lora_moe_grouped(x, W, b, A, B, s, G, k), (0, 1, 2, 3)),
        "loop": (lambda x, A, B, G: lora_moe_loop(x, W, b, A, B, s, G, k), (0, 1, 2, 3)),
        "single_lora": (lambda x, A, B, G: lora_single(x, W, b, A[0], B[0], s0), (0, 1, 2)),
    }


def _fwd_bwd(fn, wrt, v):
    leaves = [v[n].detach().requires_grad_(i in wrt) for i, n in enumerate("xABG")]

    def step():
        y = fn(*leaves)
        return [y, *torch.autograd.grad(y, [leaves[i] for i in wrt], v["gy"])]
    return step


def _profile(step, n=16):
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=n)


def test_lora_moe_layer(recorder, device, on_gpu):
    cfg = GPU if on_gpu else CPU
    k, r, dtype = cfg["k"], cfg["r"], cfg["dtype"]
    for T, d_in, d_out, E in cfg["shapes"]:
        v = _inputs(T, d_in, d_out, E, r, dtype, device)
        methods = _methods(v, k)
        # correctness first: rocket (both GEMM backends) and the peers against each other
        outs, failed = {}, {}
        for name, (fn, wrt) in list(methods.items()):
            if name == "base":
                continue
            try:
                outs[name] = _fwd_bwd(fn, wrt, v)()
            except Exception as e:  # a broken peer is reported, never hides rocket's numbers
                if name.startswith("rocket"):
                    raise
                failed[name] = f"{type(e).__name__}: {e}"[:300]
                del methods[name]
        if T <= 4096 or not on_gpu:  # the float32 reference itself, where its [T, E, d_out] fits easily
            up = {n: v[n].float() for n in "xWbABG"}
            ref = _fwd_bwd(lambda x, A, B, G: R.lora_moe(x, up["W"], up["b"], A, B, v["s"], G, k), (0, 1, 2, 3),
                           {**up, "gy": v["gy"].float()})()
        else:
            ref = outs["rocket_cublas"]
        errs = {name: [rel_err(o, rf) for o, rf in zip(out, ref)] for name, out in outs.items() if name != "single_lora"}
        tol = 3e-2 if on_gpu else 1e-4
        for name in ("rocket", "rocket_triton", "rocket_tma", "rocket_cublas"):
            assert max(errs[name]) < tol, (name, errs[name])
        del outs, ref

        timed = {name: fw for name, fw in methods.items() if on_gpu or name != "loop"}
        with torch.no_grad():  # interleaved rounds: the ratios hold while the GPU's clocks drift
            fwd = interleaved_median_ms({name: partial(fn, v["x"], v["A"], v["B"], v["G"])
                                         for name, (fn, _) in timed.items()}, device, **cfg["reps"])
        fwdbwd = interleaved_median_ms({name: _fwd_bwd(fn, wrt, v) for name, (fn, wrt) in timed.items()}, device,
                                       **cfg["reps"])
        medians = {**{f"fwd/{n}": t for n, t in fwd.items()}, **{f"fwdbwd/{n}": t for n, t in fwdbwd.items()}}
        ratio_fwd = {n: t / fwd["base"] for n, t in fwd.items()}
        ratio_fwdbwd = {n: t / fwdbwd["base"] for n, t in fwdbwd.items()}
        extra = {}
        if on_gpu:  # host (CPU) time to issue one fwd+bwd: where it exceeds the GPU time, launches bound the step
            extra["host_issue_ms"] = {n: host_wall(_fwd_bwd(*methods[n], v), 20)[0]
                                      for n in ("base", "rocket", "single_lora")}
            replays = {n: cuda_graph(_fwd_bwd(*methods[n], v)) for n in GRAPHABLE if n in methods}
            graphed = interleaved_median_ms(replays, device)
            del replays  # each graph holds its own memory pool
            medians.update({f"graph_fwdbwd/{n}": t for n, t in graphed.items()})
            extra["ratio_fwdbwd_graphed"] = {n: t / graphed["base"] for n, t in graphed.items()}
        if on_gpu and (T, d_in, d_out, E) == HEADLINE:
            # where the time goes: the GEMMs alone (Triton fused GEMM with no extra K vs cuBLAS), and a profile
            # the base GEMM with E·r = 128 extra K, each implementation, fwd and bwd layouts, vs cuBLAS base alone
            gen = torch.Generator().manual_seed(1)
            h = torch.randn(T, 128, generator=gen).to(dtype).to(device)
            Bc = torch.randn(d_out, 128, generator=gen).to(dtype).to(device)
            AGc = torch.randn(128, d_in, generator=gen).to(dtype).to(device)
            extra["gemm_only_ms"] = {"cublas_base_fwd": median_ms(lambda: F.linear(v["x"], v["W"], v["b"]), device),
                                     "cublas_base_bwd": median_ms(lambda: v["gy"] @ v["W"], device)}
            for impl, fn in _IMPLS.items():
                out_f = torch.empty(T, d_out, device=device, dtype=dtype)
                out_b = torch.empty(T, d_in, device=device, dtype=dtype)
                extra["gemm_only_ms"][f"{impl}_fwd"] = median_ms(
                    lambda: fn(v["x"], v["W"].t(), h, Bc.t(), v["b"], out_f), device)  # noqa: B023
                extra["gemm_only_ms"][f"{impl}_bwd"] = median_ms(
                    lambda: fn(v["gy"], v["W"], h, AGc, None, out_b), device)  # noqa: B023
            with torch.no_grad():
                print(_profile(lambda: methods["rocket"][0](v["x"], v["A"], v["B"], v["G"])))
            print(_profile(_fwd_bwd(*methods["rocket"], v)))
        row = recorder.record(device, {"T": T, "d_in": d_in, "d_out": d_out, "E": E, "k": k, "r": r,
                                       "dtype": str(dtype)}, medians,
                              ratio_fwd=ratio_fwd, ratio_fwdbwd=ratio_fwdbwd, rel_err_vs_reference=errs, failed=failed,
                              base_gemm_tflops=2 * T * d_in * d_out / fwd["base"] / 1e9, **extra)
        print(f"T={T} {d_in}->{d_out} E={E}: fwd " + " ".join(f"{n}={x:.3f}" for n, x in ratio_fwd.items())
              + " | fwd+bwd " + " ".join(f"{n}={x:.3f}" for n, x in ratio_fwdbwd.items())
              + f" | base fwd {fwd['base']:.3f} ms, fwd+bwd {fwdbwd['base']:.3f} ms",
              {n: round(x, 3) for n, x in extra.get("ratio_fwdbwd_graphed", {}).items()}, row.get("gemm_only_ms", ""),
              row.get("host_issue_ms", ""))
    if on_gpu:  # what gemm_backend="auto" measured and chose per GEMM shape
        recorder.rows[-1]["auto_gemm_choices"] = {str(k_): c for k_, c in CHOICES.items()}
        print({str(k_): c for k_, c in CHOICES.items()})
