"""Scoring N adapters on K examples (docs/design.md §4 and §5, scoring): rocket.score_adapters' batched
pass vs peft, in one process. GPU: random-init Llama ~1B, N=32 adapters r=16 on all seven projections,
K=50 random-token examples (prompt 100–300, answer 50–200); CPU: tiny shapes, correctness only.

Rates are adapter·examples per second. peft peers run on a subset of adapters/examples (their cost
is linear in both) and are reported as rates too; MFU counts the useful FLOPs (unpadded tokens).
Every rocket path's losses are checked against peft's on the adapters and examples the peft peers ran."""
import os
import statistics
import time
from pathlib import Path

import torch

from bench.cases import random_bank, random_llama, random_token_rows
from bench.peers import peft_loop_losses, peft_mixed_losses, peft_padded_losses
from rocket.data.tokenize import IGNORE_INDEX, Tokenized
from rocket.runtime.adapters import AdapterRows, compiled_layers, merged_adapters, multi_lora_model
from rocket.runtime.losses import adapter_losses, prepare_examples
from rocket.scoring.score import score_adapters
from rocket.tiny import LLAMA_TARGETS

GPU = dict(hidden=2048, layers=16, heads=16, mlp=5504, vocab=32000, N=32, r=16, K=50, prompt=(100, 300),
           answer=(50, 200), loop=(2, 8), padded=(4, 50), mixed=(8, 20), budgets=(16384, 32768))
CPU = dict(hidden=64, layers=2, heads=4, mlp=128, vocab=512, N=3, r=4, K=3, prompt=(6, 14), answer=(3, 8),
           loop=(2, 3), padded=(3, 3), mixed=(3, 3), budgets=(64,))
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12}  # dense bf16 tensor-core peak (SXM datasheets)


def random_examples(s, seed=0):
    """s["K"] scoring examples: loss on the answer tokens only."""
    return [Tokenized(ids, [IGNORE_INDEX] * p + ids[p:], p) for p, ids in random_token_rows(s["K"], s, seed)]


def peft_from_bank(model, bank, names):
    """peft model holding `names` (weights copied from the bank), as a peft user would load them."""
    from peft import LoraConfig, get_peft_model
    r = bank[names[0]].r
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(LLAMA_TARGETS), lora_dropout=0.0)
    pm = get_peft_model(model, cfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    with torch.no_grad():
        for mod_name, mod in pm.named_modules():
            if hasattr(mod, "lora_A") and isinstance(mod.lora_A, torch.nn.ModuleDict) and len(mod.lora_A):
                key = mod_name.removeprefix("base_model.model.")
                for n in names:
                    A, B = bank[n].weights[key]
                    mod.lora_A[n].weight.copy_(A)
                    mod.lora_B[n].weight.copy_(B)
    return pm.eval()


def scoring_flops(s, tokenized, n_adapters):
    """Useful FLOPs of scoring: 2·params·tokens for the layers (LoRA included), the LM head on label
    tokens only, causal attention 2·H·L² per layer; padding not counted."""
    H, I, nl, V, r = s["hidden"], s["mlp"], s["layers"], s["vocab"], s["r"]
    dense = nl * (4 * H * H + 3 * H * I)
    lora = nl * r * (4 * 2 * H + 2 * (H + I) + (I + H))
    total = 0
    for t in tokenized:
        L, labels = len(t.input_ids), sum(l != IGNORE_INDEX for l in t.labels[1:])
        total += 2 * (dense + lora) * L + 2 * V * H * labels + nl * 2 * H * L * L
    return total * n_adapters


def wall(fn, device, reps, warmup=True):
    """(median seconds of fn(), its last result, peak GPU memory of the timed calls in GiB or None on
    the CPU); one warm-up call first on the GPU (work of seconds: do_bench's many reps don't fit)."""
    if warmup and device.type == "cuda":
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out, torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None


def profile_top(fn, n=25):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=n, max_name_column_width=70)


def _key(strategy, budget):
    return f"rocket_{strategy}_{budget // 1024}k" if budget >= 1024 else f"rocket_{strategy}_{budget}"


def test_scoring(recorder, device, on_gpu):
    s = GPU if on_gpu else CPU
    dtype = torch.bfloat16 if on_gpu else torch.float32
    reps = 3 if on_gpu else 1
    model = random_llama(s, device, dtype).eval()
    bank = random_bank(model, s["N"], s["r"], dtype, name="a{:02d}")
    tokenized = random_examples(s)
    examples = prepare_examples(tokenized, s["vocab"])
    N, K = s["N"], s["K"]
    flops = scoring_flops(s, tokenized, N)
    peak = next((v for k, v in PEAK_BF16.items() if on_gpu and k in torch.cuda.get_device_name()), None)
    resident_gib = torch.cuda.memory_allocated() / 2 ** 30 if on_gpu else None  # the model; the bank is on the host

    times, peaks, extra, losses, budget_of = {}, {}, {"errors": {}}, {}, {}
    for budget in s["budgets"]:
        budget_of.update({_key("sgmv", budget): budget, _key("merged", budget): budget})
        with multi_lora_model(model, bank) as rows:
            times[_key("sgmv", budget)], losses["sgmv"], peaks[_key("sgmv", budget)] = wall(
                lambda: adapter_losses(model, rows, examples, N, budget, False).cpu(), device, reps)
        with merged_adapters(model, bank) as merger:
            times[_key("merged", budget)], losses["merged"], peaks[_key("merged", budget)] = wall(
                lambda: adapter_losses(model, merger, examples, N, budget, False).cpu(), device, reps)
    best = min(times, key=times.get)
    best_budget = budget_of[best]
    # transformers' own layers (packed varlen attention) instead of rocket.fastpath: what the fused glue buys
    with merged_adapters(model, bank) as merger:
        times["rocket_merged_hf_layers"], losses["merged_hf_layers"], peaks["rocket_merged_hf_layers"] = wall(
            lambda: adapter_losses(model, merger, examples, N, best_budget, False, fast=False).cpu(), device, reps)
    # q/k/v and gate/up as separate GEMMs (rocket.fastpath.FusedProjections off): what fusing them buys
    with merged_adapters(model, bank, fuse=False) as merger:
        times["rocket_merged_unfused"], losses["merged_unfused"], peaks["rocket_merged_unfused"] = wall(
            lambda: adapter_losses(model, merger, examples, N, best_budget, False).cpu(), device, reps)
    # the base model alone over the same packed passes: what the adapters cost on top
    times["base_only"], _, peaks["base_only"] = wall(
        lambda: adapter_losses(model, AdapterRows(device), examples, N, best_budget, False), device, reps)
    if on_gpu:
        try:  # regional torch.compile of the decoder layers (compile time excluded: warm-up call)
            t = time.perf_counter()
            with merged_adapters(model, bank) as merger, compiled_layers(model):
                adapter_losses(model, merger, examples[:8], 2, best_budget, False, fast=False)
                extra["compile_s"] = time.perf_counter() - t
                key = "rocket_merged_hf_compiled"
                times[key], losses["merged_hf_compiled"], peaks[key] = wall(
                    lambda: adapter_losses(model, merger, examples, N, best_budget, False, fast=False).cpu(),
                    device, reps)
        except Exception as e:  # recorded, not fatal: the eager paths are the product's default
            extra["errors"]["compiled"] = f"{type(e).__name__}: {str(e)[:300]}"
        out = Path(os.environ.get("ROCKET_BENCH_RESULTS", "."))
        for strategy in ("sgmv", "merged"):
            ctx = multi_lora_model(model, bank) if strategy == "sgmv" else merged_adapters(model, bank)
            with ctx as adapters:
                table = profile_top(lambda: adapter_losses(model, adapters, examples, 4, best_budget, False))
            (out / f"scoring-profile-{strategy}.txt").write_text(table)
            print(f"--- profile {strategy} (N=4)\n" + "\n".join(table.splitlines()[:16]))
    # the public call (strategy auto), set-up included: staging the adapters, copies of the base weights, packing
    times["rocket_end_to_end"], e2e, peaks["rocket_end_to_end"] = wall(
        lambda: score_adapters(model, None, bank, tokenized, accuracy=None, max_tokens=best_budget, progress=False,
                               log=lambda *a: None), device, reps, warmup=False)
    extra["end_to_end_strategy"] = e2e.meta["strategy"]
    sgmv_budget = min(s["budgets"], key=lambda b: times[_key("sgmv", b)])
    times["rocket_end_to_end_sgmv"], e2e_sgmv, peaks["rocket_end_to_end_sgmv"] = wall(
        lambda: score_adapters(model, None, bank, tokenized, accuracy=None, max_tokens=sgmv_budget,
                               progress=False, strategy="sgmv", log=lambda *a: None), device, reps, warmup=False)
    ours_name = "merged" if "merged" in best else "sgmv"
    ours = losses[ours_name]
    # how far the other rocket paths sit from the fastest one (recorded; checked against peft below)
    agree = {k: float((v - ours).abs().max()) for k, v in losses.items() if k != ours_name}
    agree["end_to_end"] = float((e2e.loss.float() - ours).abs().max())
    agree["end_to_end_sgmv"] = float((e2e_sgmv.loss.float() - losses["sgmv"]).abs().max())

    # peers on subsets: (adapters, examples) each
    names = bank.names[:max(s["loop"][0], s["padded"][0], s["mixed"][0])]
    pm = peft_from_bank(model, bank, names)
    subsets = {"peft_loop": (peft_loop_losses, s["loop"]), "peft_padded": (peft_padded_losses, s["padded"]),
               "peft_mixed": (peft_mixed_losses, s["mixed"])}
    peer_loss = {}
    for key, (fn, (na, ne)) in subsets.items():
        sub_names, sub_ex = names[:na], tokenized[:ne]
        times[key], peer_loss[key], peaks[key] = wall(lambda: fn(pm, sub_names, sub_ex).cpu(), device, 1)
        extra[key + "_pairs"] = na * ne

    pairs = {k: extra.get(k + "_pairs", N * K) for k in times}
    rate = {k: pairs[k] / v for k, v in times.items()}
    fastest = max((k for k in rate if k.startswith("rocket_") and not k.startswith("rocket_end_to_end")), key=rate.get)
    diffs = {k: float((ours[:v.shape[0], :v.shape[1]] - v).abs().max()) for k, v in peer_loss.items()}
    # every rocket path against the independent reference: peft's LoRA on the transformers model, losses
    # by the reference cross-entropy, on the (adapters, examples) subset each peft peer ran
    paths = {**losses, "end_to_end": e2e.loss.float(), "end_to_end_sgmv": e2e_sgmv.loss.float()}
    vs_peft = {k: max(float((v[:p.shape[0], :p.shape[1]] - p).abs().max()) for p in peer_loss.values())
               for k, v in paths.items()}
    row = recorder.record(
        device, {"N": N, "K": K, "r": s["r"], "hidden": s["hidden"], "layers": s["layers"], "mlp": s["mlp"],
                 "vocab": s["vocab"], "dtype": str(dtype), "tokens": sum(len(t.input_ids) for t in tokenized)},
        {k: v * 1e3 for k, v in times.items()},
        adapter_examples_per_s=rate, fastest=fastest,
        speedup_vs_best_peer=rate[fastest] / max(rate[k] for k in subsets),
        tflops={k: flops / times[k] / 1e12 for k in times if k.startswith("rocket_")},
        mfu=None if peak is None else {k: flops / times[k] / peak for k in times if k.startswith("rocket_")},
        peak_memory_gib=peaks if on_gpu else None, resident_memory_gib=resident_gib,
        best_budget=best_budget, max_abs_loss_diff_vs_peft=diffs, max_abs_loss_diff_vs_peft_per_path=vs_peft,
        max_abs_loss_diff_between_rocket_paths=agree, **extra)
    print({k: round(v, 1) for k, v in rate.items()}, f"fastest {fastest}", f"MFU {row['mfu']}",
          f"diffs {diffs}", f"vs peft per path {vs_peft}", f"agree {agree}", extra)
    tol = 0.1 if on_gpu else 1e-4  # bf16 rocket vs peft's LoRA path on a bf16 base
    assert all(d < tol for d in vs_peft.values()), vs_peft
