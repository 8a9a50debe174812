"""Scoring N adapters on K examples (DESIGN §5 'Scoring'): rocket.score_adapters' batched pass vs
peft, in one process. GPU: random-init Llama ~1B, N=32 adapters r=16 on all seven projections,
K=50 random-token examples (prompt 100–300, answer 50–200); CPU: tiny shapes, correctness only.

Rates are adapter·examples per second. peft peers run on a subset of adapters/examples (their cost
is linear in both) and are reported as rates too; MFU counts the useful FLOPs (unpadded tokens)."""
import statistics
import time
from pathlib import Path

import pytest
import torch

from bench.peers import peft_loop_losses, peft_mixed_losses, peft_padded_losses
from rocket.bank import LoraAdapter, LoraBank
from rocket.data import IGNORE_INDEX, Tokenized
from rocket.scoring import AdapterRows, adapter_losses, multi_lora_model, score_adapters
from rocket.tiny import LLAMA_TARGETS

GPU = dict(hidden=2048, layers=16, heads=16, mlp=5504, vocab=32000, N=32, r=16, K=50, prompt=(100, 300),
           answer=(50, 200), loop=(2, 8), padded=(4, 50), mixed=(8, 20), budgets=(16384, 32768, 65536))
CPU = dict(hidden=64, layers=2, heads=4, mlp=128, vocab=512, N=3, r=4, K=4, prompt=(10, 30), answer=(5, 20),
           loop=(3, 4), padded=(3, 4), mixed=(3, 4), budgets=(256,))
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12}  # dense bf16 tensor-core peak (SXM datasheets)


def build_model(s, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["heads"],
                      max_position_embeddings=2048, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def random_bank(model, N, r, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    modules = [(n, m) for n, m in model.named_modules() if n.rpartition(".")[2] in LLAMA_TARGETS]
    adapters = []
    for a in range(N):
        weights = {n: ((torch.randn(r, m.in_features, generator=gen) / m.in_features ** 0.5).to(dtype),
                       (torch.randn(m.out_features, r, generator=gen) * 0.02).to(dtype)) for n, m in modules}
        adapters.append(LoraAdapter(f"a{a:02d}", Path("."), r, 2.0 * r, False, weights,
                                    {n: 2.0 for n in weights}))
    return LoraBank(adapters)


def random_examples(s, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(s["K"]):
        p = int(torch.randint(s["prompt"][0], s["prompt"][1] + 1, (1,), generator=gen))
        a = int(torch.randint(s["answer"][0], s["answer"][1] + 1, (1,), generator=gen))
        ids = torch.randint(3, s["vocab"], (p + a,), generator=gen).tolist()
        out.append(Tokenized(ids, [IGNORE_INDEX] * p + ids[p:], p))
    return out


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


def wall(fn, device, reps):
    """Median seconds of fn() after one warm-up call (work of seconds: do_bench's many reps don't fit)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile_top(fn, n=14):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=n)


def test_scoring(recorder, device, on_gpu):
    s = GPU if on_gpu else CPU
    dtype = torch.bfloat16 if on_gpu else torch.float32
    reps = 3 if on_gpu else 1
    model = build_model(s, device, dtype)
    bank = random_bank(model, s["N"], s["r"], dtype)
    examples = random_examples(s)
    N, K = s["N"], s["K"]
    flops = scoring_flops(s, examples, N)
    peak = next((v for k, v in PEAK_BF16.items() if on_gpu and k in torch.cuda.get_device_name()), None)

    times, extra = {}, {}
    with multi_lora_model(model, bank) as rows:
        for budget in s["budgets"]:
            times[f"rocket_{budget // 1024}k" if budget >= 1024 else f"rocket_{budget}"] = wall(
                lambda: adapter_losses(model, rows, examples, N, budget, progress=False), device, reps)
        best_budget = min(s["budgets"], key=lambda b: times[f"rocket_{b // 1024}k" if b >= 1024 else f"rocket_{b}"])
        ours = adapter_losses(model, rows, examples, N, best_budget, progress=False).cpu()
        if on_gpu:
            print(profile_top(lambda: adapter_losses(model, rows, examples[:6], N, best_budget, progress=False)))
    # the base model alone over the same batches: what the LoRA layers cost on top
    times["base_only"] = wall(lambda: adapter_losses(model, AdapterRows(device), examples, N, best_budget,
                                                     progress=False), device, reps)
    t = time.perf_counter()
    e2e = score_adapters(model, None, bank, examples, max_tokens=best_budget, progress=False)
    if on_gpu:
        torch.cuda.synchronize()
    times["rocket_end_to_end"] = time.perf_counter() - t  # stacking the bank included, one run
    assert torch.allclose(e2e.loss.float(), ours, atol=1e-3 if on_gpu else 1e-5)

    # peers on subsets: (adapters, examples) each
    names = bank.names[:max(s["loop"][0], s["padded"][0], s["mixed"][0])]
    pm = peft_from_bank(model, bank, names)
    subsets = {"peft_loop": (peft_loop_losses, s["loop"]), "peft_padded": (peft_padded_losses, s["padded"]),
               "peft_mixed": (peft_mixed_losses, s["mixed"])}
    peer_loss = {}
    for key, (fn, (na, ne)) in subsets.items():
        sub_names, sub_ex = names[:na], examples[:ne]
        times[key] = wall(lambda: fn(pm, sub_names, sub_ex), device, 1 if on_gpu else reps)
        extra[key + "_pairs"] = na * ne
        peer_loss[key] = fn(pm, sub_names, sub_ex).cpu()

    pairs = {k: extra.get(k + "_pairs", N * K) for k in times}
    rate = {k: pairs[k] / v for k, v in times.items()}
    best = f"rocket_{best_budget // 1024}k" if best_budget >= 1024 else f"rocket_{best_budget}"
    diffs = {k: float((ours[:v.shape[0], :v.shape[1]] - v).abs().max()) for k, v in peer_loss.items()}
    row = recorder.record(
        device, {"N": N, "K": K, "r": s["r"], "hidden": s["hidden"], "layers": s["layers"], "mlp": s["mlp"],
                 "vocab": s["vocab"], "dtype": str(dtype), "tokens": sum(len(t.input_ids) for t in examples)},
        {k: v * 1e3 for k, v in times.items()},
        adapter_examples_per_s=rate, speedup_vs_best_peer=rate[best] / max(rate[k] for k in subsets),
        tflops=flops / times[best] / 1e12, mfu=None if peak is None else flops / times[best] / peak,
        best_budget=best_budget, max_abs_loss_diff_vs_peft=diffs, peer_pairs=extra)
    print({k: round(v, 1) for k, v in rate.items()}, f"MFU {row['mfu']}", f"TFLOP/s {row['tflops']:.1f}",
          f"diffs {diffs}")
    tol = 0.1 if on_gpu else 1e-4  # bf16 rocket vs peft's float32 LoRA path on a bf16 base
    assert all(d < tol for d in diffs.values()), diffs
