"""Scoring at the scale users run (docs/design.md §5, scoring): one `score_adapters` call over a bank of
hundreds of adapters on a 7B-shape Llama, adapters streamed from host memory, against peft's padded
batches on a subset of the same model; then the K = 10 regime (the paper's smallest K-shot set),
where merging one adapter at a time leaves the GPU short of work and many adapters share a pass.

GPU: random-init Llama hidden 4096, 32 layers, MLP 11008, vocab 32000 (~6.7B), 256 adapters r=16 on all
seven projections (bf16, in host memory), K = 50 and K = 10 random-token examples (prompt 100–300,
answer 50–200). CPU: tiny shapes, correctness only.

Rates are adapter·examples per second; MFU counts the useful FLOPs (unpadded tokens, bench.test_scoring's
count) against the bf16 dense peak; peak GPU memory is recorded beside every call. The K = 10 rows
also time the base model alone over the same packed passes, once per adapter: `strategy="auto"`
should run at ≥ 0.8× that."""
import time

import torch

from bench.cases import random_bank, random_llama
from bench.harness import timed
from bench.peers import peft_padded_losses
from bench.test_scoring import PEAK_BF16, peft_from_bank, random_examples, scoring_flops
from rocket.runtime.adapters import AdapterRows
from rocket.runtime.losses import adapter_losses, prepare_examples
from rocket.scoring.score import choose_strategy, score_adapters

GPU = dict(hidden=4096, layers=32, heads=32, mlp=11008, vocab=32000, N=256, r=16, K=50, K_small=10,
           prompt=(100, 300), answer=(50, 200), peft=(2, 50), base_reps=8)
CPU = dict(hidden=64, layers=2, heads=4, mlp=128, vocab=512, N=6, r=4, K=4, K_small=2, prompt=(6, 14),
           answer=(3, 8), peft=(2, 4), base_reps=2)


def test_scoring_scale(recorder, device, on_gpu):
    s = GPU if on_gpu else CPU
    dtype = torch.bfloat16 if on_gpu else torch.float32
    t0 = time.perf_counter()

    def say(msg):  # a device run that hits its limit still shows where it was
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    model = random_llama(s, device, dtype).eval()
    bank = random_bank(model, s["N"], s["r"], dtype, name="a{:03d}", draw_on=device.type)
    weights = sum(A.numel() + B.numel() for a in bank.adapters for A, B in a.weights.values())
    say(f"model and {len(bank)} adapters ready ({weights / 1e9:.2f}B adapter weights in host memory)")
    peak_flops = next((v for k, v in PEAK_BF16.items() if on_gpu and k in torch.cuda.get_device_name()), None)
    N = s["N"]
    seconds, peak_gib, rates, mfu, extra = {}, {}, {}, {}, {}

    def score(key, tokenized, **kw):
        sec, peak, scores = timed(lambda: score_adapters(model, None, bank, tokenized, accuracy=None, progress=False,
                                                         log=lambda *a: None, **kw), device)
        seconds[key], peak_gib[key] = sec, peak
        rates[key] = N * len(tokenized) / sec
        if peak_flops:
            mfu[key] = scoring_flops(s, tokenized, N) / sec / peak_flops
        extra[key + "_strategy"] = scores.meta["strategy"]
        say(f"{key}: {sec:.1f} s, {rates[key]:.0f} adapter·examples/s, strategy {scores.meta['strategy']}, "
            f"peak {peak} GiB")
        return scores

    # 1. the whole bank on K examples in one call (strategy auto), and peft's padded batches on a subset
    tokenized = random_examples(s)
    K = len(tokenized)
    full = score(f"rocket_k{K}", tokenized)
    n_a, n_e = s["peft"]
    names = bank.names[:n_a]
    pm = peft_from_bank(model, bank, names)
    sec, peak, peer = timed(lambda: peft_padded_losses(pm, names, tokenized[:n_e]).cpu(), device)
    seconds[f"peft_padded_k{K}"], peak_gib[f"peft_padded_k{K}"] = sec, peak
    rates[f"peft_padded_k{K}"] = n_a * n_e / sec
    vs_peft = float((full.loss[:n_a, :n_e].float() - peer).abs().max())
    model = pm.unload()  # the plain model again, for the K = 10 rows
    say(f"peft padded: {rates[f'peft_padded_k{K}']:.1f} adapter·examples/s; max |loss − peft| {vs_peft:.4f}")

    # 2. K = 10: each strategy, auto, and the base model alone over the same passes
    small = random_examples({**s, "K": s["K_small"]}, seed=1)
    by = {st: score(f"rocket_k{len(small)}_{st}", small, strategy=st) for st in ("merged", "sgmv", "auto")}
    examples = prepare_examples(small, s["vocab"])
    reps = s["base_reps"]
    sec, peak, _ = timed(lambda: adapter_losses(model, AdapterRows(device), examples, reps, None, False), device)
    base_rate = reps * len(small) / sec
    rates[f"base_k{len(small)}"] = base_rate
    faster = min(("merged", "sgmv"), key=lambda st: seconds[f"rocket_k{len(small)}_{st}"])
    auto = choose_strategy("auto", device, sum(len(ex.ids) for ex in examples))
    agree = max(float((by[st].loss - by["merged"].loss).abs().max()) for st in by)
    row = recorder.record(
        device, {k: s[k] for k in ("hidden", "layers", "mlp", "vocab", "N", "r", "K", "K_small")} | {"dtype": str(dtype)},
        {k: v * 1e3 for k, v in seconds.items()}, adapter_examples_per_s=rates, mfu=mfu or None,
        peak_memory_gib=peak_gib, rocket_vs_peft_padded=rates[f"rocket_k{K}"] / rates[f"peft_padded_k{K}"],
        peft_pairs=n_a * n_e, max_abs_loss_diff_vs_peft=vs_peft,
        small_k={"faster": faster, "auto_picks": auto, "auto_vs_base": rates[f"rocket_k{len(small)}_auto"] / base_rate,
                 "max_abs_loss_diff_between_strategies": agree}, **extra)
    say(f"K={len(small)}: faster {faster}, auto picks {auto}, auto at {row['small_k']['auto_vs_base']:.2f}× the base")
    # correctness, not speed: every path against peft's LoRA (bf16 on the GPU) and against each other
    tol = 0.1 if on_gpu else 1e-4
    assert vs_peft < tol and agree < tol, (vs_peft, agree)
