"""Where the LoRA-MoE time goes (GPU): host issue time vs device kernel time, kernel lists and host
syncs, for one layer (bench shapes) and for steady training steps of the bench_train model, with
the peft single-LoRA peer beside it. Not a pytest suite: `python3 -m bench.profile_moe [layer|train|train7b|host|bordered|quick]`;
tables go to stdout, a JSON summary to $ROCKET_BENCH_RESULTS (default bench/results).
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time
import warnings

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.harness import RESULTS, git_commit, host_wall, median_ms

DEV = torch.device("cuda")
SUMMARY: dict = {}


def kernels(step, n=3, rows=25, title=""):
    """Device kernel ms per step and kernel launches per step, from the profiler; prints the top tables."""
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    dev_ms = sum(e.time_range.elapsed_us() for e in ev) / n / 1e3
    ka = prof.key_averages()
    print(f"\n==== {title}: {dev_ms:.3f} ms of kernels, {len(ev) / n:.0f} kernels per step")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    print(ka.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))
    return dev_ms, len(ev) / n


def syncs(step, title):
    """Host syncs of one step (torch's sync debug mode), by message."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    msgs = {}
    for x in w:
        key = f"{x.filename}:{x.lineno} {str(x.message)[:80]}"
        msgs[key] = msgs.get(key, 0) + 1
    print(f"\n==== syncs in one step of {title}: {sum(msgs.values())}")
    for k, v in sorted(msgs.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {v:4d}  {k}")
    return sum(msgs.values())


def _main_module():
    """main's rocket/kernels/lora_moe.py (carried as bench/_main_lora_moe.py) for a same-run A/B, if present;
    its lora_moe must take the gemm_backend argument."""
    try:
        from bench import _main_lora_moe
    except ImportError:
        return None
    return _main_lora_moe


def layer(shapes=((4096, 4096, 4096, 8), (3072, 2048, 5504, 4), (3072, 2048, 2048, 4)),
          names=("base", "single_lora", "rocket", "rocket_cublas", "rocket_triton", "main_auto", "main_cublas")):
    from bench.cases import fwd_bwd, lora_moe_inputs, lora_moe_methods
    from rocket.kernels.dual_mm import CHOICES
    main = _main_module()
    out = {}
    for T, d_in, d_out, E in shapes:
        v = lora_moe_inputs(T, d_in, d_out, E, 16, torch.bfloat16, DEV)
        methods = lora_moe_methods(v, 2)
        if main is not None:
            for be in ("auto", "cublas"):
                fn = lambda x, A, B, G, be=be: main.lora_moe(x, v["W"], v["b"], A, B, v["s"], G, 2,  # noqa: E731
                                                             gemm_backend=be)
                methods[f"main_{be}"] = (fn, (0, 1, 2, 3))
        row = {}
        for name in names:
            if name not in methods:
                continue
            step = fwd_bwd(*methods[name], v)
            step()
            issue, wall = host_wall(step)
            row[name] = dict(do_bench=median_ms(step, DEV), issue=issue, wall=wall)
            if T == 4096 or name in ("rocket", "single_lora", "main_auto"):
                row[name]["kernel_ms"], row[name]["launches"] = kernels(step, title=f"layer T={T} {d_in}->{d_out} E={E} {name}", rows=14)
        if T == 4096:
            syncs(fwd_bwd(*methods["rocket"], v), "rocket layer")
        print(f"T={T} {d_in}->{d_out} E={E}:", json.dumps(row))
        out[f"{T}x{d_in}x{d_out}xE{E}"] = row
    out["auto_choices"] = {str(k): c for k, c in CHOICES.items()}
    # one fp32-out cuBLAS product (the gradients of the fp32 masters), if this torch has it
    a = torch.randn(64, 3072, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(3072, 2048, device=DEV, dtype=torch.bfloat16)
    try:
        o = torch.mm(a, b, out_dtype=torch.float32)
        out["mm_out_dtype"] = [str(o.dtype), float((o - a.float() @ b.float()).norm() / o.norm())]
    except Exception as e:  # noqa: BLE001
        out["mm_out_dtype"] = repr(e)[:200]
    SUMMARY["layer"] = out


def host():
    """Host µs per call of what one LoRA-MoE layer issues, at tiny shapes (so the host bounds every
    row): torch primitives, the route kernel through Triton's JIT launcher and through
    rocket.kernels.direct_launch, whole layers forward and forward+backward against peft's LoRA layer.
    (The 2026-11-30 result files' "direct launch" row timed the compiled kernel's bare launcher.)"""
    from torch import nn
    from rocket.kernels import lora_moe_route as route
    from rocket.kernels.direct_launch import Launcher
    from rocket.kernels.dual_mm import _cdiv
    from rocket.moe.layer import LoraMoELinear
    T, d_in, d_out, E, r = 64, 2048, 5504, 4, 16
    bf = dict(device=DEV, dtype=torch.bfloat16)
    x = torch.randn(T, d_in, **bf)

    def per_call(fn, n=1000):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return round((t1 - t0) / n * 1e6, 2)

    out = {}
    a, b = torch.randn(64, 64, **bf), torch.randn(64, 64, **bf)
    out["torch.empty"] = per_call(lambda: torch.empty(64, 64, **bf))
    out["torch.mm"] = per_call(lambda: torch.mm(a, b))
    out["tensor.t"] = per_call(lambda: a.t())
    out["contiguous (already)"] = per_call(lambda: a.contiguous())
    A = torch.randn(E, r, d_in, device=DEV) * 0.02
    B = torch.randn(E, d_out, r, device=DEV) * 0.02
    G = torch.randn(E, d_in, device=DEV) * 0.02
    s = torch.ones(E, device=DEV)
    out["route_forward (function)"] = per_call(lambda: route.route_forward(x, None, A, B, G, s, 2))
    outs = route.route_forward(x, None, A, B, G, s, 2)
    args = (x, x, A, G, s, B, *outs, T)
    meta = dict(K=d_in, N=d_out, E=E, R=r, KP=outs[3].shape[1], EP=16, BER=64, IEEE=False, DOT_F32=False, TOPK=2,
                HAS_XL=False, COPY_ROWS=route._B_ROWS, BM=64, BK=64, num_warps=4, num_stages=4)
    grid = (1 + _cdiv(d_out, route._B_ROWS),)  # one row block, then the B_cat copy programs
    out["route kernel, JIT launch"] = per_call(lambda: route._route_fwd[grid](*args, **meta))
    launcher = Launcher(route._route_fwd)  # what the layer uses: the compiled kernel launched directly
    out["route kernel, rocket Launcher"] = per_call(
        lambda: launcher.launch("bench", lambda m: grid, args, lambda: meta, x.get_device()))
    out["direct launches"] = launcher.direct_launches

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t

        @staticmethod
        def backward(ctx, g):
            return g
    xg = x.detach().requires_grad_()
    out["Function.apply (identity)"] = per_call(lambda: Fn.apply(xg))
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False, **bf)
    moe = LoraMoELinear(base, torch.randn(E, r, d_in) * 0.02, torch.randn(E, d_out, r) * 0.02, [2.0] * E, 2,
                        dtype=torch.float32)
    gy = torch.randn(T, d_out, **bf)

    def fb(mod, ctx=None):
        def step():
            with (ctx() if ctx else torch.autocast("cuda", enabled=False)):
                y = mod(xg)
            y.backward(gy)
        return step
    with torch.no_grad():
        out["base fwd"] = per_call(lambda: base(x))
        out["rocket layer fwd"] = per_call(lambda: moe(x))
    out["base fwd+bwd"] = per_call(fb(base))
    out["rocket layer fwd+bwd"] = per_call(fb(moe))
    from peft import LoraConfig, get_peft_model

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(d_in, d_out, bias=False, **bf)
    pm = get_peft_model(Wrap(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], lora_dropout=0.0))
    for p in pm.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    lin = pm.base_model.model.lin
    auto = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    with torch.no_grad(), auto():
        out["peft layer fwd (autocast)"] = per_call(lambda: lin(x))
    out["peft layer fwd+bwd (autocast)"] = per_call(fb(lin, auto))
    for k, v in out.items():
        print(f"  {k:40s} {v}")
    SUMMARY["host_us"] = out


def train(seven_b=False):
    """Steady training steps of the bench_train model (seven_b: its 7B shape, micro-batch 2 × 1024)."""
    from bench.cases import TRAIN_7B, TRAIN_GPU
    from bench.cases import build_model, random_bank
    S = TRAIN_7B if seven_b else TRAIN_GPU
    from rocket.moe.inject import inject_lora_moe, moe_layers
    from rocket.training.engines import TorchEngine
    from rocket.training.config import TrainConfig
    from rocket.training.batches import token_loss_sum
    base = build_model(S, DEV)
    gen = torch.Generator().manual_seed(0)
    B, L = (2, 1024) if seven_b else (8, 384)
    ids = torch.randint(3, S["vocab"], (B, L), generator=gen).to(DEV)
    labels = ids.clone()
    labels[:, : L // 2] = -100
    cur = dict(batch={"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels=labels,
               n=(labels[:, 1:] != -100).sum())  # the batch the steps run: fixed, or set per step (varied)
    cfg = TrainConfig(batch_size=B, lr=1e-5)
    out = {}

    peft_model = copy.deepcopy(base)
    from peft import LoraConfig, get_peft_model
    from rocket.tiny import LLAMA_TARGETS
    pm = get_peft_model(peft_model, LoraConfig(r=16, lora_alpha=32, target_modules=list(LLAMA_TARGETS),
                                               lora_dropout=0.0, task_type="CAUSAL_LM"))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)

    def peft_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = pm(**cur["batch"]).logits
        (token_loss_sum(logits, cur["labels"]) / cur["n"]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    model = inject_lora_moe(base, random_bank(base, S["E"], S["r"]), list(range(S["E"])), top_k=2)
    eng = TorchEngine(model, cfg, DEV)

    def rocket_step():
        logits = eng.forward(cur["batch"], True)
        eng.backward(token_loss_sum(logits, cur["labels"]) / cur["n"])
        eng.step(1e-5)

    import rocket.moe.layer as moe_mod
    main, new = _main_module(), moe_mod.lora_moe

    def main_lora_moe(x, W, b, A, B, s, G, k, xl, return_routing=False, gemm_backend="auto"):  # main's: casts outside
        return main.lora_moe(x, W, b, A.to(x.dtype), B.to(x.dtype), s, G.to(x.dtype), k, xl,
                             return_routing=return_routing, gemm_backend=gemm_backend)

    def main_step():
        moe_mod.lora_moe = main_lora_moe
        try:
            rocket_step()
        finally:
            moe_mod.lora_moe = new

    steps = (("peft", peft_step), ("rocket", rocket_step)) + ((("main", main_step),) if main else ())
    for name, step in steps:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / 2 ** 30  # both models and their optimizer states
        issue, wall = host_wall(step, n=8)
        out[name] = dict(issue=issue, wall=wall, tokens_per_s=B * L / wall * 1e3, resident_memory_gib=resident,
                         peak_memory_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
        out[name]["kernel_ms"], out[name]["launches"] = kernels(step, n=2, title=f"train step {name}", rows=40)
        out[name]["syncs"] = syncs(step, name)
        print(name, json.dumps(out[name]), flush=True)
    for backend in ("cublas", "triton"):
        for moe_layer in moe_layers(model).values():
            moe_layer.gemm_backend = backend
        for _ in range(2):
            rocket_step()
        issue, wall = host_wall(rocket_step, n=8)
        out[f"rocket_{backend}"] = dict(issue=issue, wall=wall, tokens_per_s=B * L / wall * 1e3)
        print(backend, json.dumps(out[f"rocket_{backend}"]), flush=True)
    for moe_layer in moe_layers(model).values():
        moe_layer.gemm_backend = "auto"
    fixed = cur.copy()
    for name, step in (("peft", peft_step), ("rocket", rocket_step)):
        out[f"{name}_varied"] = varied_steps(S, B, cur, step)
        print(f"{name} varied", json.dumps(out[f"{name}_varied"]), flush=True)
    cur.update(fixed)  # the first fixed-shape rows again: does the process slow down as it goes?
    for name, step in (("peft", peft_step), ("rocket", rocket_step)):
        issue, wall = host_wall(step, n=8)
        out[f"{name}_again"] = dict(issue=issue, wall=wall, tokens_per_s=B * L / wall * 1e3)
        print(f"{name} again", json.dumps(out[f"{name}_again"]), flush=True)
    SUMMARY["train7b" if seven_b else "train"] = out


def bordered(shapes=((16384, 4096, 4096, 8), (4096, 4096, 4096, 8), (16384, 4096, 11008, 8))):
    """The bordered product's GEMMs against the layer's, same run (bench/notes_lora_moe_perf.md):
    forward [x | hm]·[W | B_cat]ᵀ as one cuBLAS product, with x copied into the wide operand
    (as a route kernel would) and without (its floor), against the base product then hm·B_catᵀ added
    over y; backward g·[W | B_cat] (∂x_base and ∂hm at once) then gcat·[A_cat; G] added over the ∂x
    view, against g·W plus gcat·[A_cat; G] plus the g·B_cat that route_bwd computes now. The route
    kernels' elementwise work is the same in both and left out."""
    out = {}
    for T, d_in, d_out, E in shapes:
        row = _bordered_row(T, d_in, d_out, E)
        print(f"bordered T={T} {d_in}->{d_out} E={E}:", json.dumps(row), flush=True)
        out[f"{T}x{d_in}x{d_out}xE{E}"] = row
    SUMMARY["bordered"] = out


def _bordered_row(T, d_in, d_out, E, r=16):
    from bench.harness import interleaved_median_ms
    ER, gen = E * r, torch.Generator(device=DEV).manual_seed(0)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEV, generator=gen) * scale).to(torch.bfloat16)
    x, hm, g, gcat = t(T, d_in), t(T, ER), t(T, d_out), t(T, ER + E)
    wide_w = t(d_out, d_in + ER, scale=d_in ** -0.5)  # [W | B_cat]: W a strided view of one buffer
    B_cat, b, AG = wide_w[:, d_in:], t(d_out), t(ER + E, d_in, scale=d_in ** -0.5)
    W = wide_w[:, :d_in].contiguous()  # the layer's now: W on its own
    wide_x = torch.cat([x, hm], 1)
    ms = interleaved_median_ms({
        "base_fwd": lambda: torch.addmm(b, x, W.t()),
        "now_fwd": lambda: torch.addmm(b, x, W.t()).addmm_(hm, B_cat.t()),
        "bordered_fwd": lambda: (wide_x[:, :d_in].copy_(x), torch.addmm(b, wide_x, wide_w.t())),
        "bordered_fwd_no_copy": lambda: torch.addmm(b, wide_x, wide_w.t()),
        "base_bwd": lambda: torch.mm(g, W),
        "now_bwd": lambda: (torch.mm(g, B_cat), torch.mm(g, W).addmm_(gcat, AG)),
        "bordered_bwd": lambda: torch.mm(g, wide_w)[:, :d_in].addmm_(gcat, AG),
    }, DEV)
    ratios = {f"{k}_over_base": v / ms["base_fwd" if "fwd" in k else "base_bwd"] for k, v in ms.items() if "base" not in k}
    return {"ms": ms, **ratios}


def varied_steps(S, B, cur, step, count=12):
    """Steps over batches of the bench's varied lengths (S's prompt and answer ranges, padded to
    S["pad"], the attention mask marking the padding), as bench/test_train.py runs them: every shape
    is run once first, then each step is timed to the end of its GPU work (the loop syncs per step)."""
    from bench.cases import random_token_rows
    from rocket.data.tokenize import IGNORE_INDEX, Tokenized, pad_batch
    rows = [Tokenized(ids, [IGNORE_INDEX] * p + ids[p:], p) for p, ids in random_token_rows(count * B, S, seed=1)]
    batches = []
    for i in range(count):
        b = pad_batch(rows[i * B:(i + 1) * B], 0, DEV, S["pad"])
        batches.append(dict(batch={"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]},
                            labels=b["labels"], n=(b["labels"][:, 1:] != IGNORE_INDEX).sum(), tokens=b["n_input"]))
    for b in batches:
        cur.update(b)
        step()
    ms, tokens = [], 0
    for b in batches:
        cur.update(b)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        ms.append(1e3 * (time.perf_counter() - t0))
        tokens += b["tokens"]
    return dict(median_ms=statistics.median(ms), tokens_per_s=tokens / sum(ms) * 1e3, steps=count,
                padded_tokens=[int(b["batch"]["input_ids"].numel()) for b in batches])


if __name__ == "__main__":
    parts = sys.argv[1:] or ["layer", "train"]
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for p in parts:
        {"layer": layer, "train": train, "train7b": lambda: train(seven_b=True), "host": host, "bordered": bordered,  # quick: the T=4096 layer, rocket against base and single LoRA
         "quick": lambda: layer(shapes=((4096, 4096, 4096, 8),), names=("base", "single_lora", "rocket"))}[p]()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"profile_moe-gpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"suite": "profile_moe", "device": torch.cuda.get_device_name(), "commit": git_commit(),
                                "torch": torch.__version__, **SUMMARY}, indent=1, default=str) + "\n")
    print("wrote", path)
