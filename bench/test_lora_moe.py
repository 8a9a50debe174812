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

Before any timing, every method's output and gradients are checked against the plain-torch
references of rocket.kernels.reference on the same inputs (float32 on the GPU, float64 on the CPU);
the relative errors are recorded as `rel_err_vs_reference`.
"""
import os
from functools import partial

import torch
import torch.nn.functional as F

from bench.cases import fwd_bwd, lora_moe_inputs, lora_moe_methods, rel_err
from bench.harness import cuda_graph, host_wall, interleaved_median_ms, median_ms, peak_memory
from rocket.kernels import reference
from rocket.kernels.dual_mm import _IMPLS, CHOICES

GPU = dict(shapes=[(T, 4096, d_out, E) for T in (16384, 4096) for d_out in (4096, 11008) for E in (8, 4)],
           k=2, r=16, dtype=torch.bfloat16, reps={})
CPU = dict(shapes=[(70, 48, 40, 4), (33, 32, 24, 8)], k=2, r=4, dtype=torch.float32, reps=dict(warmup=0, reps=1))
HEADLINE = (16384, 4096, 4096, 8)
if os.environ.get("ROCKET_BENCH_SHAPES") == "headline":  # a short GPU session: the headline row only
    GPU["shapes"] = [HEADLINE]
GRAPHABLE = ("base", "rocket", "rocket_triton", "rocket_tma", "rocket_cublas", "dense_einsum", "single_lora")


def reference_outputs(v, k, dense=True):
    """[y, *gradients] of the plain-torch references (rocket.kernels.reference) on v's tensors in
    float64 (CPU) or float32 (GPU), for the functions lora_moe_methods time: "moe" (the LoRA-MoE layer:
    reference.lora_moe, dense over experts, or where its [T, E, d_out] is large, reference.lora_moe_loop), "base"
    (the frozen linear) and "single_lora" (expert 0 alone on every row: reference.multi_lora)."""
    acc = torch.float64 if v["x"].device.type == "cpu" else torch.float32
    up = {n: v[n].to(acc) for n in ("x", "W", "b", "A", "B", "G", "gy")} | {"s": v["s"]}
    W, b, s = up["W"], up["b"], up["s"]
    moe = reference.lora_moe if dense else reference.lora_moe_loop
    first = torch.zeros(v["x"].shape[0], dtype=torch.long, device=v["x"].device)
    return {"moe": fwd_bwd(lambda x, A, B, G: moe(x, W, b, A, B, s, G, k), (0, 1, 2, 3), up)(),
            "base": fwd_bwd(lambda x, A, B, G: F.linear(x, W, b), (0,), up)(),
            "single_lora": fwd_bwd(lambda x, A, B, G: F.linear(x, W, b) + reference.multi_lora(x, A, B, s, first),
                                   (0, 1, 2), up)()}


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
        v = lora_moe_inputs(T, d_in, d_out, E, r, dtype, device)
        methods = lora_moe_methods(v, k)
        # correctness first: every method against the plain-torch reference (forward and every gradient it takes)
        outs, failed = {}, {}
        for name, (fn, wrt) in list(methods.items()):
            try:
                outs[name] = fwd_bwd(fn, wrt, v)()
            except Exception as e:  # a broken peer is reported, never hides rocket's numbers
                if name.startswith("rocket") or name == "base":
                    raise
                failed[name] = f"{type(e).__name__}: {e}"[:300]
                del methods[name]
        refs = reference_outputs(v, k, dense=T <= 4096 or not on_gpu)
        errs = {name: [rel_err(o, rf) for o, rf in zip(out, refs.get(name, refs["moe"]), strict=True)]
                for name, out in outs.items()}
        tol = 3e-2 if on_gpu else 1e-4  # bf16 layers on the GPU; float32 on the CPU, against float64
        assert all(max(e) < tol for e in errs.values()), errs
        del outs, refs

        timed = {name: fw for name, fw in methods.items() if on_gpu or name != "loop"}
        with torch.no_grad():  # interleaved rounds: the ratios hold while the GPU's clocks drift
            fwd = interleaved_median_ms({name: partial(fn, v["x"], v["A"], v["B"], v["G"])
                                         for name, (fn, _) in timed.items()}, device, **cfg["reps"])
        fwdbwd = interleaved_median_ms({name: fwd_bwd(fn, wrt, v) for name, (fn, wrt) in timed.items()}, device,
                                       **cfg["reps"])
        medians = {**{f"fwd/{n}": t for n, t in fwd.items()}, **{f"fwdbwd/{n}": t for n, t in fwdbwd.items()}}
        ratio_fwd = {n: t / fwd["base"] for n, t in fwd.items()}
        ratio_fwdbwd = {n: t / fwdbwd["base"] for n, t in fwdbwd.items()}
        extra = {}
        if on_gpu:  # one call of each method: its peak GPU memory, the shared inputs (resident_gib) included
            with torch.no_grad():
                fwd_peak = peak_memory({name: partial(fn, v["x"], v["A"], v["B"], v["G"])
                                        for name, (fn, _) in timed.items()}, device)
            extra["peak_memory_gib"] = {"fwd": fwd_peak, "fwdbwd": peak_memory(
                {name: fwd_bwd(fn, wrt, v) for name, (fn, wrt) in timed.items()}, device)}
        if on_gpu:  # host (CPU) time to issue one fwd+bwd: where it exceeds the GPU time, launches bound the step
            extra["host_issue_ms"] = {n: host_wall(fwd_bwd(*methods[n], v), 20)[0]
                                      for n in ("base", "rocket", "single_lora")}
            replays = {n: cuda_graph(fwd_bwd(*methods[n], v)) for n in GRAPHABLE if n in methods}
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
            print(_profile(fwd_bwd(*methods["rocket"], v)))
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
